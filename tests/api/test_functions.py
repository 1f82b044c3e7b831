from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Credentials


def body(name: str = "check_order", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "description": "Look up an order's status",
        "handler_url": "https://shop.example/hooks/order",
        "user_parameters": [
            {"name": "order_id", "type": "string", "description": "The order number", "required": True},
            {"name": "channel", "type": "string", "enum": ["phone", "web"], "required": False},
        ],
        "fixed_parameters": [{"name": "api_key", "value": "secret-1"}],
        **extra,
    }


async def create(client: httpx.AsyncClient, acct: Credentials, **kw: Any) -> dict[str, Any]:
    r = await client.post(f"{acct.base}/Function/", auth=acct.auth, json=body(**kw))
    assert r.status_code == 201, r.text
    return r.json()


async def test_crud_round_trip(client: httpx.AsyncClient, account: Credentials) -> None:
    created = await create(client, account)
    url = f"{account.base}/Function/{created['id']}/"
    assert created["user_parameters"][1]["enum"] == ["phone", "web"]
    assert created["fixed_parameters"] == [{"name": "api_key", "value": "secret-1"}]
    got = (await client.get(url, auth=account.auth)).json()
    assert got == created
    r = await client.patch(
        url, auth=account.auth, json={"description": "New text", "handler_url": "http://10.0.0.5/x"}
    )
    assert r.status_code == 200, r.text
    patched = r.json()
    assert patched["description"] == "New text" and patched["handler_url"] == "http://10.0.0.5/x"
    assert patched["name"] == "check_order" and patched["user_parameters"] == created["user_parameters"]
    assert (await client.delete(url, auth=account.auth)).status_code == 204
    assert (await client.get(url, auth=account.auth)).status_code == 404
    assert (await client.delete(url, auth=account.auth)).status_code == 404


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "has space"}, "name"),
        ({"name": "9starts_with_digit"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"handler_url": "ftp://files.example/x"}, "handler_url"),
        ({"handler_url": "file:///etc/passwd"}, "handler_url"),
        ({"handler_url": "https://"}, "handler_url"),
        ({"user_parameters": [{"name": "a", "type": "date"}]}, "user_parameters.0.type"),
        ({"user_parameters": [{"name": "a", "type": "integer", "enum": [1, "two"]}]}, "user_parameters.0"),
        ({"user_parameters": [{"name": "a b"}]}, "user_parameters.0.name"),
        ({"user_parameters": [{"name": "a"}, {"name": "a"}]}, "parameter name 'a'"),
        (
            {"user_parameters": [{"name": "k"}], "fixed_parameters": [{"name": "k", "value": 1}]},
            "parameter name 'k'",
        ),
        ({"fixed_parameters": [{"name": "k"}]}, "fixed_parameters.0.value"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
async def test_invalid_bodies_are_422_naming_the_field(
    client: httpx.AsyncClient, account: Credentials, change: dict[str, Any], field: str
) -> None:
    r = await client.post(f"{account.base}/Function/", auth=account.auth, json=body() | change)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]


async def test_patch_rejects_null_and_bad_merged_parameters(
    client: httpx.AsyncClient, account: Credentials
) -> None:
    created = await create(client, account)
    url = f"{account.base}/Function/{created['id']}/"
    r = await client.patch(url, auth=account.auth, json={"name": None})
    assert r.status_code == 422 and "name" in r.json()["error"]
    # A fixed parameter named like an existing user parameter: caught after merging with the stored lists.
    r = await client.patch(
        url, auth=account.auth, json={"fixed_parameters": [{"name": "order_id", "value": 1}]}
    )
    assert r.status_code == 422 and "order_id" in r.json()["error"]


async def test_duplicate_names_conflict(client: httpx.AsyncClient, account: Credentials) -> None:
    await create(client, account, name="dup")
    other = await create(client, account, name="other")
    r = await client.post(f"{account.base}/Function/", auth=account.auth, json=body("dup"))
    assert r.status_code == 409 and "dup" in r.json()["error"]
    r = await client.patch(f"{account.base}/Function/{other['id']}/", auth=account.auth, json={"name": "dup"})
    assert r.status_code == 409


async def test_deleting_a_used_function_removes_it_from_agents(
    client: httpx.AsyncClient, account: Credentials
) -> None:
    f1 = await create(client, account, name="one")
    f2 = await create(client, account, name="two")
    r = await client.post(
        f"{account.base}/Voiceagent/",
        auth=account.auth,
        json={"name": "A", "function_ids": [f1["id"], f2["id"]]},
    )
    agent = r.json()
    assert (await client.delete(f"{account.base}/Function/{f1['id']}/", auth=account.auth)).status_code == 204
    got = (await client.get(f"{account.base}/Voiceagent/{agent['id']}/", auth=account.auth)).json()
    assert got["function_ids"] == [f2["id"]]


async def test_accounts_never_see_each_others_functions(
    client: httpx.AsyncClient, account: Credentials, other_account: Credentials
) -> None:
    mine = await create(client, account, name="mine")
    theirs = await create(client, other_account, name="theirs")
    for me, foreign in ((account, theirs), (other_account, mine)):
        url = f"{me.base}/Function/{foreign['id']}/"
        assert (await client.get(url, auth=me.auth)).status_code == 404
        assert (await client.patch(url, auth=me.auth, json={"description": "hijack"})).status_code == 404
        assert (await client.delete(url, auth=me.auth)).status_code == 404
        listed = (await client.get(f"{me.base}/Function/", auth=me.auth)).json()
        assert (
            foreign["id"] not in {o["id"] for o in listed["objects"]} and listed["meta"]["total_count"] == 1
        )
    # Untouched by the attempts above.
    got = (await client.get(f"{account.base}/Function/{mine['id']}/", auth=account.auth)).json()
    assert got["description"] == mine["description"]


async def test_pagination(client: httpx.AsyncClient, account: Credentials) -> None:
    ids = {(await create(client, account, name=f"f{i}"))["id"] for i in range(7)}
    first = (await client.get(f"{account.base}/Function/?limit=3", auth=account.auth)).json()
    assert (
        first["meta"]["limit"] == 3
        and first["meta"]["total_count"] == 7
        and first["meta"]["previous"] is None
    )
    seen = [o["id"] for o in first["objects"]]
    nxt = first["meta"]["next"]
    while nxt:
        page = (await client.get(nxt, auth=account.auth)).json()
        assert page["meta"]["previous"] is not None
        seen += [o["id"] for o in page["objects"]]
        nxt = page["meta"]["next"]
    assert len(seen) == 7 and set(seen) == ids
    default = (await client.get(f"{account.base}/Function/", auth=account.auth)).json()
    assert default["meta"]["limit"] == 20 and len(default["objects"]) == 7
    beyond = (await client.get(f"{account.base}/Function/?offset=50", auth=account.auth)).json()
    assert beyond["objects"] == [] and beyond["meta"]["total_count"] == 7
