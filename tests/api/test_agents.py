from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from appliance.api.agent_schemas import DEFAULT_CALL_TIMEOUT, DEFAULT_PROMPT
from appliance.call.prewarm import Greeting
from appliance.server import create_app
from appliance.store.accounts import create_account, get_account
from appliance.store.documents import Document
from tests.conftest import Credentials, make_settings


async def create(client: httpx.AsyncClient, acct: Credentials, **fields: Any) -> dict[str, Any]:
    r = await client.post(f"{acct.base}/Voiceagent/", auth=acct.auth, json={"name": "Agent", **fields})
    assert r.status_code == 201, r.text
    return r.json()


async def make_function(client: httpx.AsyncClient, acct: Credentials, name: str) -> str:
    r = await client.post(
        f"{acct.base}/Function/", auth=acct.auth, json={"name": name, "handler_url": "http://127.0.0.1:9/x"}
    )
    return str(r.json()["id"])


async def test_create_fills_every_default(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    agent = await create(client, account)
    models = app.state.appliance.settings.models
    assert agent["welcome_message"] == "" and agent["prompt"] == DEFAULT_PROMPT
    assert agent["answer_llm"] == {
        "provider": "local",
        "model": models.llm,
        "temperature": 0.3,
        "max_tokens": 200,
    }
    assert agent["stt"] == {"provider": "local", "model": models.asr, "language": "en"}
    assert agent["tts"] == {"provider": "local", "voice": models.tts, "speed": 1.0}
    assert agent["function_ids"] == [] and agent["knowledgebase_ids"] == []
    assert agent["call_timeout"] == DEFAULT_CALL_TIMEOUT
    base = f"http://127.0.0.1:8000/v1/Account/{account.auth_id}/Voiceagent/{agent['id']}"
    assert agent["call_url"] == f"{base}/talk/"
    assert agent["websocket_url"] == "ws" + base[4:] + "/connect/"


async def test_crud_round_trip(client: httpx.AsyncClient, account: Credentials) -> None:
    f1 = await make_function(client, account, "one")
    f2 = await make_function(client, account, "two")
    agent = await create(
        client, account, welcome_message="Hi, Acme here.", prompt="Help {{name}}.",
        answer_llm={"model": "smollm2-135m", "temperature": 0.0, "max_tokens": 64},
        tts={"speed": 1.2}, function_ids=[f2, f1], call_timeout=60,
    )  # fmt: skip
    url = f"{account.base}/Voiceagent/{agent['id']}/"
    assert agent["function_ids"] == [f2, f1] and agent["answer_llm"]["model"] == "smollm2-135m"
    assert (await client.get(url, auth=account.auth)).json() == agent

    r = await client.patch(url, auth=account.auth, json={"tts": {"speed": 0.8}, "function_ids": [f1]})
    assert r.status_code == 200, r.text
    patched = r.json()
    # Nested settings merge: the voice stays, only the speed changes; lists are replaced.
    assert patched["tts"] == agent["tts"] | {"speed": 0.8}
    assert patched["function_ids"] == [f1]
    assert patched["answer_llm"] == agent["answer_llm"] and patched["welcome_message"] == "Hi, Acme here."
    r = await client.patch(url, auth=account.auth, json={"answer_llm": {"model": None}})
    assert r.json()["answer_llm"]["model"] == "qwen2.5-coder-0.5b"  # null: back to the default

    assert (await client.delete(url, auth=account.auth)).status_code == 204
    assert (await client.get(url, auth=account.auth)).status_code == 404
    assert (await client.patch(url, auth=account.auth, json={"name": "x"})).status_code == 404


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"answer_llm": {"model": "gpt-5"}}, "answer_llm.model", "gpt-5"),
        ({"answer_llm": {"model": "whisper-tiny.en"}}, "answer_llm.model", "whisper-tiny.en"),  # wrong role
        ({"stt": {"model": "no-such-asr"}}, "stt.model", "no-such-asr"),
        ({"stt": {"language": "de"}}, "stt.language", "en"),  # whisper-tiny.en is English only
        ({"tts": {"voice": "en_US-amy"}}, "tts.voice", "en_US-amy"),
        ({"answer_llm": {"provider": "openai"}}, "answer_llm.provider", "local"),
        ({"function_ids": ["3f1c2d9e-0000-0000-0000-000000000000"]}, "function_ids", "3f1c2d9e"),
        ({"knowledgebase_ids": ["doc-that-does-not-exist"]}, "knowledgebase_ids", "doc-that-does-not-exist"),
        ({"call_timeout": 5}, "call_timeout", ""),
        ({"name": ""}, "name", ""),
    ],
)
async def test_bad_values_are_422_naming_field_and_value(
    client: httpx.AsyncClient, account: Credentials, fields: dict[str, Any], field: str, value: str
) -> None:
    r = await client.post(f"{account.base}/Voiceagent/", auth=account.auth, json={"name": "A"} | fields)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"] and value in r.json()["error"]


async def test_patch_with_unknown_model_is_422_and_changes_nothing(
    client: httpx.AsyncClient, account: Credentials
) -> None:
    agent = await create(client, account)
    url = f"{account.base}/Voiceagent/{agent['id']}/"
    r = await client.patch(url, auth=account.auth, json={"name": "Renamed", "tts": {"voice": "nope"}})
    assert r.status_code == 422 and "tts.voice" in r.json()["error"]
    assert (await client.get(url, auth=account.auth)).json()["name"] == "Agent"
    r = await client.patch(url, auth=account.auth, json={"name": None})
    assert r.status_code == 422


async def test_references_to_another_accounts_objects_are_422(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, other_account: Credentials
) -> None:
    theirs_fn = await make_function(client, other_account, "theirs")
    mine_fn = await make_function(client, account, "mine")
    async with app.state.appliance.services["db"].sessions() as s:
        a, b = await get_account(s, account.auth_id), await get_account(s, other_account.auth_id)
        assert a is not None and b is not None
        doc_a = Document(
            account_id=a.id, name="a", filename="a.txt", content_type="text/plain", status="ready"
        )
        doc_b = Document(
            account_id=b.id, name="b", filename="b.txt", content_type="text/plain", status="ready"
        )
        s.add_all([doc_a, doc_b])
        await s.commit()
    url = f"{account.base}/Voiceagent/"
    r = await client.post(url, auth=account.auth, json={"name": "A", "function_ids": [mine_fn, theirs_fn]})
    assert r.status_code == 422 and theirs_fn in r.json()["error"] and mine_fn not in r.json()["error"]
    r = await client.post(url, auth=account.auth, json={"name": "A", "knowledgebase_ids": [doc_b.id]})
    assert r.status_code == 422 and doc_b.id in r.json()["error"]
    agent = await create(client, account, function_ids=[mine_fn], knowledgebase_ids=[doc_a.id])
    assert agent["knowledgebase_ids"] == [doc_a.id]
    # And in the other direction, through PATCH.
    theirs_agent = await create(client, other_account)
    r = await client.patch(
        f"{other_account.base}/Voiceagent/{theirs_agent['id']}/", auth=other_account.auth,
        json={"function_ids": [mine_fn]},
    )  # fmt: skip
    assert r.status_code == 422 and mine_fn in r.json()["error"]


async def test_accounts_never_see_each_others_agents(
    client: httpx.AsyncClient, account: Credentials, other_account: Credentials
) -> None:
    mine = await create(client, account, name="mine")
    theirs = await create(client, other_account, name="theirs")
    for me, foreign in ((account, theirs), (other_account, mine)):
        url = f"{me.base}/Voiceagent/{foreign['id']}/"
        assert (await client.get(url, auth=me.auth)).status_code == 404
        assert (await client.patch(url, auth=me.auth, json={"name": "hijacked"})).status_code == 404
        assert (await client.delete(url, auth=me.auth)).status_code == 404
        listed = (await client.get(f"{me.base}/Voiceagent/", auth=me.auth)).json()
        assert [o["id"] for o in listed["objects"]] != [] and foreign["id"] not in {
            o["id"] for o in listed["objects"]
        }
        assert listed["meta"]["total_count"] == 1
    assert (await client.get(f"{account.base}/Voiceagent/{mine['id']}/", auth=account.auth)).json()[
        "name"
    ] == "mine"


async def test_pagination_walks_every_agent_once(client: httpx.AsyncClient, account: Credentials) -> None:
    ids = {(await create(client, account, name=f"a{i}"))["id"] for i in range(23)}
    page = (await client.get(f"{account.base}/Voiceagent/", auth=account.auth)).json()
    assert page["meta"] == {
        "limit": 20, "offset": 0, "total_count": 23, "previous": None,
        "next": f"{account.base}/Voiceagent/?limit=20&offset=20",
    }  # fmt: skip
    seen = [o["id"] for o in page["objects"]]
    last = (await client.get(page["meta"]["next"], auth=account.auth)).json()
    seen += [o["id"] for o in last["objects"]]
    assert (
        last["meta"]["next"] is None
        and last["meta"]["previous"] == f"{account.base}/Voiceagent/?limit=20&offset=0"
    )
    assert len(seen) == 23 and set(seen) == ids


@pytest.fixture
async def https_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = make_settings(tmp_path / "data", public_base_url="https://voice.example.com/")
    app = create_app(settings, load_engines=False)
    async with app.router.lifespan_context(app):
        yield app


async def test_urls_follow_the_public_base_url_with_wss_for_https(https_app: FastAPI) -> None:
    async with https_app.state.appliance.services["db"].sessions() as s:
        acct = await create_account(s, "A")
    transport = httpx.ASGITransport(app=https_app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://t", auth=(acct.auth_id, acct.auth_token)
    ) as c:
        r = await c.post(f"/v1/Account/{acct.auth_id}/Voiceagent/", json={"name": "A"})
    agent = r.json()
    path = f"/v1/Account/{acct.auth_id}/Voiceagent/{agent['id']}"
    assert agent["call_url"] == f"https://voice.example.com{path}/talk/"
    assert agent["websocket_url"] == f"wss://voice.example.com{path}/connect/"


async def test_model_list_shows_installed_models_and_voices(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    r = await client.get(f"{account.base}/Model/", auth=account.auth)
    assert r.status_code == 200
    objects = {o["id"]: o for o in r.json()["objects"]}
    manifest = app.state.appliance.manifest
    assert set(objects) == {s.id for s in manifest.installed()}
    assert (
        objects["qwen2.5-coder-0.5b"]["used_as"] == "answer_llm.model"
        and objects["qwen2.5-coder-0.5b"]["default"]
    )
    assert objects["smollm2-135m"]["default"] is False
    assert objects["piper-joe-medium"]["used_as"] == "tts.voice"
    llms = (await client.get(f"{account.base}/Model/?role=llm", auth=account.auth)).json()["objects"]
    assert {o["id"] for o in llms} == {s.id for s in manifest.installed("llm")} and all(
        o["role"] == "llm" for o in llms
    )
    assert (await client.get(f"{account.base}/Model/?role=gpu", auth=account.auth)).status_code == 422


async def test_a_created_or_changed_agent_is_queued_for_its_prompt_to_be_read_ahead(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    warmer = app.state.appliance.services["calls"].warmer  # waits here: the engines are not loaded
    assert warmer.queued() == [] and not warmer.warming  # nothing to read at start-up: no agents yet
    first = await create(client, account, prompt="You answer for the Harbour shop.")
    second = await create(client, account, prompt="You answer for the Juniper shop.")
    assert [a.id for a in warmer.queued()] == [second["id"], first["id"]]
    url = f"{account.base}/Voiceagent/{first['id']}/"
    r = await client.patch(url, auth=account.auth, json={"prompt": "You answer for the Copper shop."})
    assert r.status_code == 200, r.text
    queued = warmer.queued()
    assert [a.id for a in queued] == [first["id"], second["id"]]
    assert queued[0].prompt == "You answer for the Copper shop."  # the agent as it is now
    # Its greeting goes with it, in its voice and speed as they are now.
    r = await client.patch(
        url, auth=account.auth, json={"welcome_message": "Copper shop, hello!", "tts": {"speed": 1.25}}
    )
    assert r.status_code == 200, r.text
    voice = app.state.appliance.settings.models.tts  # stored as the voice it resolved to
    assert warmer.queued_greeting(first["id"]) == Greeting("Copper shop, hello!", voice, 1.25)
    queued = warmer.queued()
    r = await client.patch(url, auth=account.auth, json={"answer_llm": {"model": "no-such-model"}})
    assert r.status_code == 422
    assert warmer.queued() == queued  # a refused change reads nothing


async def test_a_restarted_server_queues_the_most_recently_changed_agents(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    ids = [(await create(client, account, prompt=f"You answer for shop {n}."))["id"] for n in range(5)]
    r = await client.patch(
        f"{account.base}/Voiceagent/{ids[0]}/", auth=account.auth, json={"name": "Renamed"}
    )
    assert r.status_code == 200
    settings = app.state.appliance.settings
    restarted = create_app(settings, load_engines=False)
    async with restarted.router.lifespan_context(restarted):
        warmer = restarted.state.appliance.services["calls"].warmer
        assert warmer.max_agents == min(settings.call.prewarm_agents, settings.llm.slots - 1) == 3
        assert [a.id for a in warmer.queued()] == [ids[0], ids[4], ids[3]]
        assert warmer.queued()[0].name == "Renamed"
        assert warmer.warming  # /ready waits for these reads (the engines never load here)


async def test_changing_a_function_queues_the_agents_offering_it(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    warmer = app.state.appliance.services["calls"].warmer
    function_id = await make_function(client, account, "lookup_order")
    first = await create(client, account, prompt="Harbour shop.", function_ids=[function_id])
    without = await create(client, account, prompt="Juniper shop.")
    last = await create(client, account, prompt="Copper shop.", function_ids=[function_id])
    assert [a.id for a in warmer.queued()] == [last["id"], without["id"], first["id"]]
    r = await client.patch(
        f"{account.base}/Function/{function_id}/", auth=account.auth,
        json={"description": "Look up an order by its number"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    queued = warmer.queued()
    assert [a.id for a in queued] == [last["id"], first["id"], without["id"]]
    for agent in queued[:2]:  # as they are now: the prompt describes the function anew
        assert [f.description for f in agent.functions] == ["Look up an order by its number"]
