from __future__ import annotations

from typing import Any

import pytest

from appliance.store import functions
from appliance.store.accounts import create_account
from appliance.store.db import Database


def fn(name: str = "book_table", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "description": "Book a table",
        "handler_url": "https://example.test/book",
        "user_parameters": [{"name": "party_size", "type": "integer", "required": True}],
        "fixed_parameters": [{"name": "api_key", "value": "k-1"}],
        **extra,
    }


@pytest.fixture
async def two_accounts(db: Database) -> tuple[str, str]:
    async with db.sessions() as s:
        a = await create_account(s, "A")
        b = await create_account(s, "B")
    return a.account.id, b.account.id


async def test_round_trip_keeps_parameter_json(db: Database, two_accounts: tuple[str, str]) -> None:
    a, _ = two_accounts
    async with db.sessions() as s:
        created = await functions.create_function(s, a, fn())
    async with db.sessions() as s:
        got = await functions.get_function(s, a, created.id)
    assert got is not None
    assert got.user_parameters == [{"name": "party_size", "type": "integer", "required": True}]
    assert got.fixed_parameters == [{"name": "api_key", "value": "k-1"}]
    assert got.created_at.tzinfo is not None


async def test_names_are_unique_per_account_only(db: Database, two_accounts: tuple[str, str]) -> None:
    a, b = two_accounts
    async with db.sessions() as s:
        first = await functions.create_function(s, a, fn("lookup"))
        await functions.create_function(s, b, fn("lookup"))  # another account may reuse it
        with pytest.raises(functions.FunctionNameTaken):
            await functions.create_function(s, a, fn("lookup"))
        other = await functions.create_function(s, a, fn("other"))
        with pytest.raises(functions.FunctionNameTaken):
            await functions.update_function(s, other, {"name": "lookup"})
        # Renaming to its own name is not a conflict.
        await functions.update_function(s, first, {"name": "lookup", "description": "new"})


async def test_other_accounts_functions_are_invisible(db: Database, two_accounts: tuple[str, str]) -> None:
    a, b = two_accounts
    async with db.sessions() as s:
        mine = await functions.create_function(s, a, fn("mine"))
        theirs = await functions.create_function(s, b, fn("theirs"))
    async with db.sessions() as s:
        assert await functions.get_function(s, a, theirs.id) is None
        rows, total = await functions.list_functions(s, a, limit=10, offset=0)
        assert [r.id for r in rows] == [mine.id] and total == 1
        assert await functions.missing_function_ids(s, a, [mine.id, theirs.id, "nope"]) == [theirs.id, "nope"]
        assert await functions.missing_function_ids(s, a, []) == []


async def test_list_pages_newest_first(db: Database, two_accounts: tuple[str, str]) -> None:
    a, _ = two_accounts
    async with db.sessions() as s:
        ids = [(await functions.create_function(s, a, fn(f"f{i}"))).id for i in range(5)]
    async with db.sessions() as s:
        page1, total = await functions.list_functions(s, a, limit=2, offset=0)
        page3, _ = await functions.list_functions(s, a, limit=2, offset=4)
        everything, _ = await functions.list_functions(s, a, limit=10, offset=0)
    assert total == 5 and len(page1) == 2 and len(page3) == 1
    assert {r.id for r in everything} == set(ids)
    assert [r.id for r in everything][:2] == [r.id for r in page1]
