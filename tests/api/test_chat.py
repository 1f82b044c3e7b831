"""The chat API over the real app and store, with a real local function handler. A scripted LLM is
placed in the engine registry for deterministic flows; one test uses the real Qwen model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import Credentials
from tests.conversation import conftest as brain_fixtures
from tests.conversation.conftest import HandlerServer, ScriptedLlm

# The loopback function-handler server, shared with the brain's tests.
handler_server = brain_fixtures.handler_server
handler = brain_fixtures.handler

MODEL = "qwen2.5-coder-0.5b"


def _call(name: str, **arguments: Any) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def _say(text: str) -> str:
    return json.dumps({"say": text})


def _install_llm(app: FastAPI, llm: Any) -> None:
    # The registry hands out one engine per model id; put ours where the agent's model would load.
    app.state.appliance.engines._loaded[("llm", MODEL)] = llm


async def _make_agent(client: httpx.AsyncClient, acct: Credentials, handler: HandlerServer) -> str:
    function = {
        "name": "get_order_status",
        "description": "Look up the delivery status of a customer's order by its order number",
        "handler_url": handler.url("/order"),
        "user_parameters": [
            {"name": "order_id", "type": "string", "description": "The order number", "required": True}
        ],
        "fixed_parameters": [{"name": "api_key", "value": "secret-key-1"}],
    }
    r = await client.post(f"{acct.base}/Function/", auth=acct.auth, json=function)
    assert r.status_code == 201, r.text
    agent = {
        "name": "Ava",
        "prompt": "You are the assistant of Acme Shop. Help customers with their orders.",
        "function_ids": [r.json()["id"]],
        "answer_llm": {"provider": "local", "model": MODEL},
    }
    r = await client.post(f"{acct.base}/Voiceagent/", auth=acct.auth, json=agent)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_chat_calls_the_function_and_keeps_history(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, handler: HandlerServer
) -> None:
    agent_id = await _make_agent(client, account, handler)
    llm = ScriptedLlm(
        [_say("Sure. What is the order number?"), _call("get_order_status", order_id="12345"),
         _say("Your order has shipped and arrives Friday.")]
    )  # fmt: skip
    _install_llm(app, llm)
    url = f"{account.base}/Voiceagent/{agent_id}/chat/"
    r = await client.post(url, auth=account.auth, json={"message": "Where is my order?"})
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["response"] == "Sure. What is the order number?" and first["function_calls"] == []
    r = await client.post(
        url, auth=account.auth, json={"message": "It's 12345", "session_id": first["session_id"]}
    )
    body = r.json()
    assert body["session_id"] == first["session_id"]
    assert body["response"] == "Your order has shipped and arrives Friday."
    assert body["function_calls"] == [
        {
            "name": "get_order_status",
            "arguments": {"order_id": "12345"},
            "result": {"order_id": "12345", "status": "shipped, arriving Friday"},
            "ok": True,
            "error": None,
        }
    ]
    assert handler.bodies("/order")[0]["arguments"] == {"order_id": "12345", "api_key": "secret-key-1"}
    assert "Where is my order?" in llm.prompts[1]  # the session's history reached the model


async def test_chat_reports_handler_failure(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, handler: HandlerServer
) -> None:
    agent_id = await _make_agent(client, account, handler)
    r = await client.get(f"{account.base}/Function/", auth=account.auth)
    function_id = r.json()["objects"][0]["id"]
    await client.patch(
        f"{account.base}/Function/{function_id}/",
        auth=account.auth,
        json={"handler_url": handler.url("/fail")},
    )
    _install_llm(app, ScriptedLlm([_call("get_order_status", order_id="12345")]))
    r = await client.post(
        f"{account.base}/Voiceagent/{agent_id}/chat/", auth=account.auth, json={"message": "order 12345?"}
    )
    body = r.json()
    assert body["function_calls"][0]["ok"] is False and "500" in body["function_calls"][0]["error"]
    assert "couldn't" in body["response"]


async def test_chat_stream_emits_deltas_and_function_events(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, handler: HandlerServer
) -> None:
    agent_id = await _make_agent(client, account, handler)
    _install_llm(
        app, ScriptedLlm([_call("get_order_status", order_id="777"), _say("It is being packed right now.")])
    )
    events: list[tuple[str, Any]] = []
    async with client.stream(
        "POST", f"{account.base}/Voiceagent/{agent_id}/chat/stream/", auth=account.auth,
        json={"message": "status of order 777"},
    ) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [n for n, _ in events]
    assert names[0] == "function_call" and names[1] == "function_result" and names[-1] == "done"
    assert names.count("text") > 3  # the reply arrived in pieces
    assert "".join(d["text"] for n, d in events if n == "text") == "It is being packed right now."
    done = events[-1][1]
    assert done["response"] == "It is being packed right now." and done["function_calls"][0]["ok"]


@pytest.mark.parametrize(
    ("payload", "status"),
    [({}, 422), ({"message": ""}, 422), ({"message": "hi", "session_id": "bad id!"}, 422)],
)
async def test_chat_validates_input(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, handler: HandlerServer,
    payload: dict[str, Any], status: int,
) -> None:  # fmt: skip
    agent_id = await _make_agent(client, account, handler)
    r = await client.post(f"{account.base}/Voiceagent/{agent_id}/chat/", auth=account.auth, json=payload)
    assert r.status_code == status and "error" in r.json()


async def test_chat_is_scoped_to_the_account(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, other_account: Credentials,
    handler: HandlerServer,
) -> None:  # fmt: skip
    agent_id = await _make_agent(client, account, handler)
    r = await client.post(
        f"{other_account.base}/Voiceagent/{agent_id}/chat/", auth=other_account.auth, json={"message": "hi"}
    )
    assert r.status_code == 404
    r = await client.post(f"{account.base}/Voiceagent/{agent_id}/chat/", json={"message": "hi"})
    assert r.status_code == 401


def test_sessions_are_bounded_in_number_and_age() -> None:
    from appliance.conversation.chat import ChatSessions

    sessions = ChatSessions(max_sessions=2, ttl_s=3600)
    a = sessions.get_or_create("acct", "agent", "a")
    sessions.get_or_create("acct", "agent", "b")
    sessions.get_or_create("acct", "agent", "c")
    assert len(sessions) == 2
    assert sessions.get_or_create("acct", "agent", "a") is not a  # the oldest was dropped
    assert sessions.get_or_create("acct", "other-agent", "c").history == []  # scoped per agent
    expiring = ChatSessions(max_sessions=10, ttl_s=0.0)
    first = expiring.get_or_create("acct", "agent", "x")
    assert expiring.get_or_create("acct", "agent", "x") is not first


@pytest.mark.slow
async def test_chat_with_the_real_model(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, handler: HandlerServer
) -> None:
    agent_id = await _make_agent(client, account, handler)
    r = await client.post(
        f"{account.base}/Voiceagent/{agent_id}/chat/", auth=account.auth,
        json={"message": "Where is my order 12345?"}, timeout=300,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["name"] for c in body["function_calls"]] == ["get_order_status"]
    assert body["function_calls"][0]["arguments"] == {"order_id": "12345"}
    assert handler.bodies("/order")[0]["arguments"]["api_key"] == "secret-key-1"
    assert "shipped" in body["response"].lower() or "friday" in body["response"].lower()
