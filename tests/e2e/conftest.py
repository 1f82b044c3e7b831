"""One real server with every engine loaded, shared by the end-to-end call tests, plus the outside
world it talks to: a fake Plivo REST server and a customer's function handler."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from appliance.audio.resample import resample
from appliance.simulator.caller import CallerOptions, CallResult, ScriptItem, run_call
from appliance.store.accounts import set_plivo_cli
from tests.conftest import Credentials, LiveServer
from tests.fakes.plivo_rest import FakePlivo, running_fake_plivo
from tests.fakes.server import serve_asgi
from tests.speech import DATA_DIR, SpeechDataMissing, load_recordings

READY_TIMEOUT_S = 900.0


@dataclass
class Handler:
    """A customer's function endpoint: records every call, answers from ``reply``."""

    url: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    reply: dict[str, Any] = field(default_factory=lambda: {"status": "booked", "day": "Monday"})


@pytest_asyncio.fixture(scope="session")
async def e2e_plivo() -> AsyncIterator[FakePlivo]:
    async with running_fake_plivo() as fake:
        yield fake


@pytest_asyncio.fixture(scope="session")
async def handler() -> AsyncIterator[Handler]:
    h = Handler()

    async def endpoint(request: Request) -> JSONResponse:
        h.calls.append(await request.json())
        return JSONResponse(h.reply)

    async with serve_asgi(Starlette(routes=[Route("/hook", endpoint, methods=["POST"])])) as base:
        h.url = f"{base}/hook"
        yield h


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    try:
        load_recordings()
    except SpeechDataMissing as exc:
        pytest.skip(str(exc))
    return DATA_DIR


@pytest_asyncio.fixture(scope="session")
async def call_server(live_server_factory: Callable[..., LiveServer], e2e_plivo: FakePlivo) -> LiveServer:
    live = live_server_factory(load_engines=True, plivo_api_base_url=e2e_plivo.base_url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient() as client:
        while True:
            r = await client.get(f"{live.base_url}/ready")
            if r.status_code == 200:
                break
            body = r.json()
            if body.get("error"):
                pytest.fail(f"engines failed to load: {body['error']}")
            if time.monotonic() > deadline:
                pytest.fail("engines did not become ready in time")
            await asyncio.sleep(1.0)
    return live


@pytest_asyncio.fixture(scope="session")
async def call_account(call_server: LiveServer, e2e_plivo: FakePlivo) -> Credentials:
    creds = await call_server.create_account("e2e calls")
    await set_plivo_cli(call_server.settings, creds.auth_id, e2e_plivo.auth_id, e2e_plivo.auth_token)
    return creds


@dataclass
class CallRig:
    server: LiveServer
    account: Credentials
    plivo: FakePlivo
    handler: Handler

    @property
    def api(self) -> str:
        return f"{self.server.base_url}{self.account.base}"

    async def agent(self, **fields: Any) -> dict[str, Any]:
        body = {"name": "e2e agent", **fields}
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{self.api}/Voiceagent/", json=body, auth=self.account.auth)
        assert r.status_code == 201, r.text
        return dict(r.json())

    async def function(self, **fields: Any) -> str:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(f"{self.api}/Function/", json=fields, auth=self.account.auth)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def call(self, agent: dict[str, Any], script: list[ScriptItem], **options: Any) -> CallResult:
        # This 2-core box runs several test suites at once: give replies far more time than a
        # real caller would before calling the agent silent.
        options.setdefault("final_wait_ms", 120_000)
        options.setdefault("agent_settle_ms", 1500)
        opts = CallerOptions(answer_url=agent["call_url"], auth_token=self.plivo.auth_token, **options)
        self.plivo.add_live_call(opts.call_uuid)
        return await run_call(opts, script)

    async def record(self, call_uuid: str, *, wait_s: float = 10.0) -> dict[str, Any]:
        """The call's record once it is closed (the writer finishes just after the socket)."""
        deadline = time.monotonic() + wait_s
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                r = await client.get(f"{self.api}/Call/{call_uuid}/", auth=self.account.auth)
                if r.status_code == 200 and r.json()["status"] != "live":
                    return dict(r.json())
                if time.monotonic() > deadline:
                    assert r.status_code == 200, r.text
                    return dict(r.json())
                await asyncio.sleep(0.2)

    async def transcribe(self, pcm8k: np.ndarray) -> str:
        """What the agent said, heard back through the server's own ASR engine."""
        asr = self.server.app.state.appliance.engines.peek("asr")
        audio = resample(pcm8k.astype(np.int16), 8000, 16000).astype(np.float32) / 32768.0
        result = await asyncio.to_thread(asr.transcribe_sync, audio, language="en")
        return str(result.text).lower()


@pytest_asyncio.fixture(scope="session")
async def rig(
    call_server: LiveServer, call_account: Credentials, e2e_plivo: FakePlivo, handler: Handler
) -> CallRig:
    return CallRig(call_server, call_account, e2e_plivo, handler)
