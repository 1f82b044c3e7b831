from __future__ import annotations

from typing import Any

import pytest

from appliance.store import agents, functions
from appliance.store.accounts import create_account
from appliance.store.db import Database
from appliance.store.documents import Document


def agent_fields(name: str = "Receptionist") -> dict[str, Any]:
    return {
        "name": name,
        "welcome_message": "Hello!",
        "prompt": "Be brief. Caller: {{name}}",
        "answer_llm": {"provider": "local", "model": "smollm2-135m", "temperature": 0.1, "max_tokens": 50},
        "stt": {"provider": "local", "model": "whisper-tiny.en", "language": "en"},
        "tts": {"provider": "local", "voice": "piper-joe-medium", "speed": 1.25},
        "knowledgebase_ids": [],
        "call_timeout": 120,
    }


async def make_function(db: Database, account_id: str, name: str) -> str:
    async with db.sessions() as s:
        f = await functions.create_function(
            s, account_id, {"name": name, "handler_url": "http://h.test/x", "user_parameters": [],
                            "fixed_parameters": [], "description": ""},
        )  # fmt: skip
    return f.id


@pytest.fixture
async def two_accounts(db: Database) -> tuple[str, str]:
    async with db.sessions() as s:
        a = await create_account(s, "A")
        b = await create_account(s, "B")
    return a.account.id, b.account.id


async def test_round_trip_with_ordered_functions(db: Database, two_accounts: tuple[str, str]) -> None:
    a, _ = two_accounts
    f1, f2, f3 = [await make_function(db, a, n) for n in ("one", "two", "three")]
    async with db.sessions() as s:
        created = await agents.create_agent(s, a, agent_fields(), [f3, f1, f2, f1])
        assert created.function_ids == [f3, f1, f2]  # order kept, duplicates dropped
    async with db.sessions() as s:
        got = await agents.get_agent(s, a, created.id)
    assert got is not None
    assert got.function_ids == [f3, f1, f2]
    assert [f.name for f in got.functions] == ["three", "one", "two"]
    assert got.answer_llm["temperature"] == 0.1 and got.tts["speed"] == 1.25
    assert got.prompt == "Be brief. Caller: {{name}}" and got.call_timeout == 120


async def test_update_replaces_function_links(db: Database, two_accounts: tuple[str, str]) -> None:
    a, _ = two_accounts
    f1, f2 = [await make_function(db, a, n) for n in ("one", "two")]
    async with db.sessions() as s:
        agent = await agents.create_agent(s, a, agent_fields(), [f1, f2])
        agent = await agents.update_agent(s, agent, {"name": "New"}, [f2])
        assert agent.function_ids == [f2] and agent.name == "New"
        agent = await agents.update_agent(s, agent, {"call_timeout": 60})  # links untouched
    async with db.sessions() as s:
        got = await agents.get_agent(s, a, agent.id)
        assert got is not None and got.function_ids == [f2] and got.call_timeout == 60


async def test_deleting_a_function_removes_it_from_agents(
    db: Database, two_accounts: tuple[str, str]
) -> None:
    a, _ = two_accounts
    f1, f2 = [await make_function(db, a, n) for n in ("one", "two")]
    async with db.sessions() as s:
        agent = await agents.create_agent(s, a, agent_fields(), [f1, f2])
    async with db.sessions() as s:
        target = await functions.get_function(s, a, f1)
        assert target is not None
        await functions.delete_function(s, target)
    async with db.sessions() as s:
        got = await agents.get_agent(s, a, agent.id)
        assert got is not None and got.function_ids == [f2]


async def test_deleting_an_agent_keeps_its_functions(db: Database, two_accounts: tuple[str, str]) -> None:
    a, _ = two_accounts
    f1 = await make_function(db, a, "one")
    async with db.sessions() as s:
        agent = await agents.create_agent(s, a, agent_fields(), [f1])
        await agents.delete_agent(s, agent)
    async with db.sessions() as s:
        assert await agents.get_agent(s, a, agent.id) is None
        assert await functions.get_function(s, a, f1) is not None


async def test_agents_are_scoped_to_their_account(db: Database, two_accounts: tuple[str, str]) -> None:
    a, b = two_accounts
    async with db.sessions() as s:
        mine = await agents.create_agent(s, a, agent_fields("mine"), [])
        theirs = await agents.create_agent(s, b, agent_fields("theirs"), [])
    async with db.sessions() as s:
        assert await agents.get_agent(s, a, theirs.id) is None
        assert await agents.get_agent(s, b, mine.id) is None
        rows, total = await agents.list_agents(s, a, limit=20, offset=0)
    assert total == 1 and [r.id for r in rows] == [mine.id]


async def test_knowledgebase_ids_are_checked_per_account_and_dropped_on_delete(
    db: Database, two_accounts: tuple[str, str]
) -> None:
    a, b = two_accounts
    async with db.sessions() as s:
        doc_a = Document(account_id=a, name="a.txt", filename="a.txt", content_type="text/plain")
        doc_b = Document(account_id=b, name="b.txt", filename="b.txt", content_type="text/plain")
        s.add_all([doc_a, doc_b])
        await s.commit()
        missing = await agents.missing_knowledgebase_ids(s, a, [doc_a.id, doc_b.id, "nope"])
        assert missing == [doc_b.id, "nope"]
        fields = agent_fields() | {"knowledgebase_ids": [doc_a.id]}
        agent = await agents.create_agent(s, a, fields, [])
        other = await agents.create_agent(s, b, agent_fields() | {"knowledgebase_ids": [doc_b.id]}, [])
        # b's document id is not in a's agents: removing it from a's account changes nothing.
        assert await agents.remove_knowledgebase_id(s, a, doc_b.id) == 0
        assert await agents.remove_knowledgebase_id(s, a, doc_a.id) == 1
        await s.commit()
    async with db.sessions() as s:
        got = await agents.get_agent(s, a, agent.id)
        untouched = await agents.get_agent(s, b, other.id)
    assert got is not None and got.knowledgebase_ids == []
    assert untouched is not None and untouched.knowledgebase_ids == [doc_b.id]
