"""A fake of Plivo's voice REST API: just the calls the appliance makes (PLIVO.md §3).

It checks Basic auth like Plivo, records every request, and answers in Plivo's shapes:
``POST /v1/Account/{id}/Call/`` -> 201 ``{"message": "call fired", "request_uuid", "api_id"}``;
``DELETE .../Call/{uuid}/`` -> 204, or 404 for a call that is not live; ``POST .../Call/{uuid}/``
(transfer) -> 202. Use the ``fake_plivo`` fixture, or ``running_fake_plivo()`` anywhere async.

A placed call becomes "live" under a fresh call UUID (``fake.placed[-1].call_uuid``) so a test can
hang it up; inbound calls made by the simulated caller are registered with ``add_live_call``.
Hanging up or transferring a live call sets its ``hangup_signal`` event: pass it to the simulated
caller (``CallerOptions.hangup_signal``) and it ends the stream the way Plivo would (``stop``,
close). ``caller_options(placed)`` answers a placed outbound call like Plivo's outbound leg.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from appliance.simulator.caller import CallerOptions
from tests.fakes.server import serve_asgi

FAKE_AUTH_ID = "MAFAKEACCOUNT0000001"
FAKE_AUTH_TOKEN = "fake-plivo-auth-token-0123456789"


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: dict[str, Any]
    call_uuid: str | None = None  # the URL's call uuid (hangup/transfer) or the placed call's uuid


@dataclass
class PlacedCall:
    request_uuid: str
    call_uuid: str
    params: dict[str, Any]


@dataclass
class FakePlivo:
    auth_id: str = FAKE_AUTH_ID
    auth_token: str = FAKE_AUTH_TOKEN
    base_url: str = ""
    requests: list[RecordedRequest] = field(default_factory=list)
    placed: list[PlacedCall] = field(default_factory=list)
    live_calls: set[str] = field(default_factory=set)
    hung_up: list[str] = field(default_factory=list)
    transfers: list[RecordedRequest] = field(default_factory=list)
    unauthorized: int = 0
    signals: dict[str, asyncio.Event] = field(default_factory=dict)

    def add_live_call(self, call_uuid: str) -> asyncio.Event:
        """Register an inbound call as live; returns the event set when it is hung up/transferred."""
        self.live_calls.add(call_uuid)
        return self.hangup_signal(call_uuid)

    def hangup_signal(self, call_uuid: str) -> asyncio.Event:
        return self.signals.setdefault(call_uuid, asyncio.Event())

    def end(self, call_uuid: str) -> None:
        self.live_calls.discard(call_uuid)
        self.hangup_signal(call_uuid).set()

    def caller_options(self, placed: PlacedCall, **overrides: Any) -> CallerOptions:
        """Simulated-caller options that answer ``placed`` like Plivo's outbound leg (signed)."""
        params = placed.params
        options = CallerOptions(
            answer_url=str(params["answer_url"]),
            call_uuid=placed.call_uuid,
            from_number=str(params.get("from", "")),
            to_number=str(params.get("to", "")),
            direction="outbound",
            extra_form={"ALegUUID": placed.call_uuid, "ALegRequestUUID": placed.request_uuid},
            account_id=self.auth_id,
            auth_token=self.auth_token,
            hangup_signal=self.hangup_signal(placed.call_uuid),
        )
        for key, value in overrides.items():
            setattr(options, key, value)
        return options

    def by_kind(self, method: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method]


def _api_id() -> str:
    return str(uuid.uuid4())


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    if request.headers.get("content-type", "").startswith("application/json"):
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}
    return dict(parse_qsl(raw.decode()))


def build_app(fake: FakePlivo) -> Starlette:
    def authorised(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == fake.auth_id and password == fake.auth_token

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"api_id": _api_id(), "error": message}, status_code=status)

    async def calls(request: Request) -> Response:
        if request.path_params["auth_id"] != fake.auth_id or not authorised(request):
            fake.unauthorized += 1
            return error(401, "not authorized")
        body = await _body(request)
        missing = [k for k in ("from", "to", "answer_url") if not body.get(k)]
        if missing:
            fake.requests.append(RecordedRequest("POST", request.url.path, body))
            return error(400, f"missing parameters: {', '.join(missing)}")
        placed = PlacedCall(str(uuid.uuid4()), str(uuid.uuid4()), body)
        fake.placed.append(placed)
        fake.add_live_call(placed.call_uuid)
        fake.requests.append(RecordedRequest("POST", request.url.path, body, placed.call_uuid))
        return JSONResponse(
            {"message": "call fired", "request_uuid": placed.request_uuid, "api_id": _api_id()},
            status_code=201,
        )

    async def call(request: Request) -> Response:
        if request.path_params["auth_id"] != fake.auth_id or not authorised(request):
            fake.unauthorized += 1
            return error(401, "not authorized")
        call_uuid = request.path_params["call_uuid"]
        body = await _body(request)
        recorded = RecordedRequest(request.method, request.url.path, body, call_uuid)
        fake.requests.append(recorded)
        if call_uuid not in fake.live_calls:
            return error(404, "call not found")
        if request.method == "DELETE":
            fake.hung_up.append(call_uuid)
            fake.end(call_uuid)
            return Response(status_code=204)
        fake.transfers.append(recorded)
        fake.end(call_uuid)  # the A leg leaves the stream for the transfer XML
        return JSONResponse(
            {"message": "call transferred", "call_uuids": [call_uuid], "api_id": _api_id()}, status_code=202
        )

    return Starlette(
        routes=[
            Route("/v1/Account/{auth_id}/Call/", calls, methods=["POST"]),
            Route("/v1/Account/{auth_id}/Call/{call_uuid}/", call, methods=["POST", "DELETE"]),
        ]
    )


@contextlib.asynccontextmanager
async def running_fake_plivo() -> AsyncIterator[FakePlivo]:
    fake = FakePlivo()
    async with serve_asgi(build_app(fake)) as base_url:
        fake.base_url = base_url
        yield fake


@pytest_asyncio.fixture
async def fake_plivo() -> AsyncIterator[FakePlivo]:
    """A fresh fake Plivo REST server per test; point ``plivo_api_base_url`` at ``fake.base_url``."""
    async with running_fake_plivo() as fake:
        yield fake
