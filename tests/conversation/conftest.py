"""Fixtures for the brain: a real local HTTP handler server (the customer's endpoint), a scripted fake
LLM for fast deterministic paths, the real Qwen model, and the seed's order-status scenario."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from appliance.config import load_settings
from appliance.conversation import AgentConfig, FunctionSpec, Parameter
from appliance.model_manifest import Manifest


@dataclass
class HandlerServer:
    """A customer's function handler on a loopback port; records every request body it receives."""

    base_url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Set by tests that need to hold the handler (to check a cancelled dispatch).
    gate: asyncio.Event | None = None

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == path]


ORDERS = {"12345": "shipped, arriving Friday", "777": "being packed"}


def _make_app(server: HandlerServer) -> web.Application:
    async def record(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = {"raw": raw.decode("utf-8", "replace")}
        server.requests.append({"path": request.path, "body": body})
        return body

    async def order(request: web.Request) -> web.Response:
        body = await record(request)
        args = body.get("arguments", {})
        if args.get("api_key") != "secret-key-1":
            return web.json_response({"error": "bad api key"}, status=403)
        status = ORDERS.get(str(args.get("order_id")), "not found")
        return web.json_response({"order_id": args.get("order_id"), "status": status})

    async def transfer(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"transferred": True, "queue_position": 2})

    async def text(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="The store opens at nine.", content_type="text/plain")

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        await asyncio.sleep(2)
        return web.json_response({"late": True})

    async def fail(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"error": "boom"}, status=500)

    async def badjson(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="{not json", content_type="application/json")

    async def big(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="x" * 100_000, content_type="text/plain")

    async def gated(request: web.Request) -> web.Response:
        await record(request)
        if server.gate is not None:
            await server.gate.wait()
        return web.json_response({"ok": True})

    app = web.Application()
    for path, handler in {
        "/order": order, "/transfer": transfer, "/text": text, "/slow": slow, "/fail": fail,
        "/badjson": badjson, "/big": big, "/gated": gated,
    }.items():  # fmt: skip
        app.router.add_post(path, handler)
    return app


@pytest.fixture(scope="session")
async def handler_server() -> AsyncIterator[HandlerServer]:
    server = HandlerServer(base_url="")
    runner = web.AppRunner(_make_app(server))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.base_url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()


@pytest.fixture
def handler(handler_server: HandlerServer) -> HandlerServer:
    handler_server.requests.clear()
    handler_server.gate = None
    return handler_server


def closed_port_url() -> str:
    """A loopback URL nobody listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing"


SEED_PROMPT = (
    "You are the phone assistant of Acme Shop. Help customers with their orders. "
    "If the customer asks for a human, transfer them to a human agent."
)


def seed_agent(handler_url: str, *, transfer_url: str | None = None, **overrides: Any) -> AgentConfig:
    """The seed's scenario: an order-status function (user ``order_id``, fixed ``api_key``) and a
    transfer function."""
    functions = (
        FunctionSpec(
            name="get_order_status",
            description="Look up the delivery status of a customer's order by its order number",
            handler_url=handler_url,
            user_parameters=(Parameter("order_id", "string", "The order number", True),),
            fixed_parameters={"api_key": "secret-key-1"},
        ),
        FunctionSpec(
            name="transfer_to_human",
            description="Transfer the customer to a human support agent",
            handler_url=transfer_url or handler_url,
            user_parameters=(
                Parameter("department", "string", "Which team", True, enum=("sales", "support")),
            ),
        ),
    )
    fields: dict[str, Any] = {
        "id": "agent-1",
        "name": "Ava",
        "prompt": SEED_PROMPT,
        "account_id": "acct-1",
        "functions": functions,
    }
    fields.update(overrides)
    return AgentConfig(**fields)


class ScriptedLlm:
    """A fake LLM that answers each ``stream`` call with the next scripted output, in small pieces.
    ``hold_after`` pieces, it waits on ``gate`` (to test cancellation mid-generation)."""

    model_id = "scripted"

    def __init__(self, outputs: Sequence[str], *, piece_size: int = 3, context_size: int = 4096):
        self.outputs = list(outputs)
        self.piece_size = piece_size
        self.context_size = context_size
        self.prompts: list[str] = []
        self.schemas: list[dict[str, Any] | None] = []
        self.max_tokens: list[int] = []
        self.closed = 0
        self.pieces_sent = 0
        self.hold_after: int | None = None
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()  # set once the stream waits on ``gate``

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    def format_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        rendered = "".join(f"<{m['role']}>{m['content']}</{m['role']}>\n" for m in messages)
        return rendered + ("<assistant>" if add_generation_prompt else "")

    async def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: Sequence[str] = (),
    ) -> AsyncIterator[str]:
        self.prompts.append(prompt)
        self.schemas.append(json_schema)
        self.max_tokens.append(max_tokens)
        output = self.outputs.pop(0)
        try:
            for i in range(0, len(output), self.piece_size):
                if self.hold_after is not None and self.pieces_sent >= self.hold_after:
                    self.holding.set()
                    await self.gate.wait()
                self.pieces_sent += 1
                yield output[i : i + self.piece_size]
                await asyncio.sleep(0)
        finally:
            self.closed += 1


def llm_path(model_id: str) -> Path:
    settings = load_settings()
    return Manifest.load(settings.models_dir).weights(model_id, "llm", verify=False)


@pytest.fixture(scope="session")
def qwen() -> Iterator[Any]:
    from appliance.engines.llm import LlamaLlm

    llm = LlamaLlm("qwen2.5-coder-0.5b", llm_path("qwen2.5-coder-0.5b"), context_size=4096, threads=2)
    yield llm
    llm.close()
