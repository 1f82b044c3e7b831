from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from appliance.server import create_app
from appliance.store.accounts import create_account
from tests.conftest import Credentials, make_settings


def assert_error(r: httpx.Response, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "api_id"}
    uuid.UUID(body["api_id"])
    for needle in needles:
        assert needle in body["error"], body["error"]
    return str(body["error"])


async def test_framework_404_and_405_have_the_error_shape(
    client: httpx.AsyncClient, account: Credentials
) -> None:
    assert_error(await client.get("/no/such/path"), 404)
    assert_error(await client.get(f"{account.base}/NoSuchResource/", auth=account.auth), 404)
    r = await client.put(f"{account.base}/Voiceagent/", auth=account.auth, json={})
    assert_error(r, 405)
    assert "allow" in r.headers


async def test_every_api_id_is_unique(client: httpx.AsyncClient) -> None:
    ids = {(await client.get("/nope")).json()["api_id"] for _ in range(3)}
    assert len(ids) == 3


async def test_validation_errors_name_the_field(client: httpx.AsyncClient, account: Credentials) -> None:
    url = f"{account.base}/Voiceagent/"
    assert_error(await client.post(url, auth=account.auth, json={}), 422, "name", "required")
    assert_error(
        await client.post(url, auth=account.auth, json={"name": "x", "call_timeout": "soon"}),
        422,
        "call_timeout",
    )
    assert_error(
        await client.post(url, auth=account.auth, json={"name": "x", "tts": {"speed": 9}}), 422, "tts.speed"
    )
    assert_error(await client.post(url, auth=account.auth, json={"name": "x", "promt": "typo"}), 422, "promt")
    assert_error(await client.get(url + "?limit=101", auth=account.auth), 422, "limit")
    assert_error(await client.get(url + "?offset=-1", auth=account.auth), 422, "offset")


async def test_malformed_json_is_a_422_about_the_body(
    client: httpx.AsyncClient, account: Credentials
) -> None:
    r = await client.post(
        f"{account.base}/Function/", auth=account.auth, content=b"{not json",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert_error(r, 422, "body", "JSON")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(
    client: httpx.AsyncClient, account: Credentials, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/Voiceagent/", "/Function/"):
        r = await client.post(
            account.base + path, auth=account.auth, content=b'{"name": "x"}', headers=headers
        )
        assert_error(r, 415, "application/json")


@pytest.fixture
async def small_app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    settings = make_settings(tmp_path / "data", limits={"max_upload_bytes": 1000})
    app = create_app(settings, load_engines=False)
    async with app.router.lifespan_context(app):
        yield app


async def test_oversized_bodies_are_413_declared_or_streamed(small_app: FastAPI) -> None:
    async with small_app.state.appliance.services["db"].sessions() as s:
        acct = await create_account(s, "A")
    limit = 1000 + 64 * 1024
    transport = httpx.ASGITransport(app=small_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://t", auth=(acct.auth_id, acct.auth_token)
    ) as c:
        url = f"/v1/Account/{acct.auth_id}/Voiceagent/"
        big = b'{"name": "' + b"x" * (limit + 10) + b'"}'
        assert_error(
            await c.post(url, content=big, headers={"content-type": "application/json"}), 413, str(limit)
        )

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"name": "'
            for _ in range(100):
                yield b"y" * 1024
            yield b'"}'

        r = await c.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413)
        # Just under the limit is read normally (and fails validation on the name's length, not size).
        ok = b'{"name": "' + b"z" * 300 + b'"}'
        assert_error(await c.post(url, content=ok, headers={"content-type": "application/json"}), 422, "name")


async def test_unhandled_exceptions_become_500_in_the_error_shape(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    app.add_api_route("/boom-for-test", boom)
    r = await client.get("/boom-for-test")
    text = assert_error(r, 500)
    assert "secret internal detail" not in text
