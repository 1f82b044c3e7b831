from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from appliance.store import accounts
from tests.conftest import Credentials

ACCOUNT_ROUTES = ["/", "/Voiceagent/", "/Function/", "/Model/"]


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Basic")
    body = r.json()
    assert set(body) == {"error", "api_id"} and body["error"]


@pytest.mark.parametrize("route", ACCOUNT_ROUTES)
async def test_missing_credentials_are_refused(
    client: httpx.AsyncClient, account: Credentials, route: str
) -> None:
    assert_401(await client.get(account.base + route))


@pytest.mark.parametrize("route", ACCOUNT_ROUTES)
async def test_wrong_token_is_refused(client: httpx.AsyncClient, account: Credentials, route: str) -> None:
    assert_401(await client.get(account.base + route, auth=(account.auth_id, account.auth_token + "x")))


@pytest.mark.parametrize("route", ACCOUNT_ROUTES)
async def test_credentials_of_another_account_in_the_path_are_refused(
    client: httpx.AsyncClient, account: Credentials, other_account: Credentials, route: str
) -> None:
    # Valid credentials, but for B, on A's path - both directions.
    assert_401(await client.get(account.base + route, auth=other_account.auth))
    assert_401(await client.get(other_account.base + route, auth=account.auth))


async def test_unknown_account_is_refused(client: httpx.AsyncClient) -> None:
    assert_401(
        await client.get("/v1/Account/MANOSUCHACCOUNT00000/Voiceagent/", auth=("MANOSUCHACCOUNT00000", "x"))
    )


async def test_bearer_or_garbage_authorization_is_refused(
    client: httpx.AsyncClient, account: Credentials
) -> None:
    for header in ("Bearer abc", "Basic !!!notbase64", "Basic"):
        assert_401(await client.get(account.base + "/", headers={"Authorization": header}))


@pytest.mark.parametrize("route", ACCOUNT_ROUTES)
async def test_right_credentials_pass(client: httpx.AsyncClient, account: Credentials, route: str) -> None:
    r = await client.get(account.base + route, auth=account.auth)
    assert r.status_code == 200, r.text


async def test_the_slow_hash_runs_once_per_client_not_per_request(
    client: httpx.AsyncClient, account: Credentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = accounts.check_token

    def counting(stored: str, token: str) -> bool:
        calls.append(token)
        return real(stored, token)

    monkeypatch.setattr(accounts, "check_token", counting)
    accounts.verified_cache._items.clear()
    for _ in range(5):
        assert (await client.get(account.base + "/Voiceagent/", auth=account.auth)).status_code == 200
    assert len(calls) == 1
    # Wrong tokens are never cached: each one pays the hash.
    for _ in range(2):
        assert_401(await client.get(account.base + "/", auth=(account.auth_id, "wrong")))
    assert len(calls) == 3


async def test_account_route_shows_plivo_credentials_masked(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    r = await client.get(account.base + "/", auth=account.auth)
    assert r.json()["plivo_configured"] is False and r.json()["plivo_auth_token"] is None
    async with app.state.appliance.services["db"].sessions() as s:
        await accounts.set_plivo_credentials(
            s, account.auth_id, "MAPLIVO0000000000042", "plivo-secret-token-9876"
        )
    r = await client.get(account.base + "/", auth=account.auth)
    body = r.json()
    assert body["auth_id"] == account.auth_id and body["plivo_configured"] is True
    assert body["plivo_auth_id"] == "****0042" and body["plivo_auth_token"] == "****9876"
    assert "plivo-secret" not in r.text and "token_hash" not in r.text
