"""``/v1/Account/{auth_id}/Voiceagent/{id}/chat/``: text chat with an agent (the same brain as a
phone call), as one JSON reply or as server-sent events while the reply is generated."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from ..conversation.adapter import agent_from_row
from ..conversation.chat import ChatService, ChatSession
from ..conversation.prompt import PromptTooLong
from ..conversation.types import (
    AgentConfig,
    FunctionCallFinished,
    FunctionCallStarted,
    TextDelta,
    TurnDone,
    TurnEvent,
)
from ..engines.types import LlmEngine
from ..model_manifest import ModelError
from ..server import AppState
from ..store import agents as store
from .deps import AccountDep, JsonBody, SessionDep, StateDep
from .errors import ApiError, NotFound, error_responses

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/Account/{auth_id}/Voiceagent",
    tags=["Voiceagent"],
    responses=error_responses(400, 401, 404, 413, 415, 422, 503),
)


class ChatIn(BaseModel):
    message: str = Field(min_length=1, max_length=4000, description="What the user says")
    session_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_\-.:]+$",
        description="Continue this session (omit to start a new one)",
    )


class FunctionCallOut(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(description="The arguments the model chose (fixed ones not shown)")
    result: Any = Field(description="The handler's reply (JSON or text), or null when it failed")
    ok: bool
    error: str | None = None


class ChatOut(BaseModel):
    response: str
    session_id: str
    function_calls: list[FunctionCallOut]


async def _prepare(
    agent_id: str, account_id: str, session: AsyncSession, state: AppState, session_id: str | None
) -> tuple[ChatService, AgentConfig, LlmEngine, ChatSession]:
    row = await store.get_agent(session, account_id, agent_id)
    if row is None:
        raise NotFound("Voiceagent", agent_id)
    agent = agent_from_row(row)
    chat: ChatService | None = state.services.get("chat")
    if chat is None:
        raise ApiError(503, "The chat service is not running.")
    try:
        llm = await state.engines.llm(agent.model)
    except ModelError as exc:
        raise ApiError(503, f"The agent's model is not available: {exc}") from exc
    return chat, agent, llm, chat.sessions.get_or_create(account_id, agent.id, session_id)


@router.post(
    "/{agent_id}/chat/",
    summary="Chat with a voice agent",
    description="Send one message; the agent answers with the same prompt, knowledge base and "
    "functions as on a phone call. Pass the returned `session_id` to continue the conversation.",
    dependencies=[JsonBody],
)
async def chat(
    agent_id: str, body: ChatIn, account: AccountDep, session: SessionDep, state: StateDep
) -> ChatOut:
    service, agent, llm, chat_session = await _prepare(agent_id, account.id, session, state, body.session_id)
    calls: list[FunctionCallOut] = []
    response = ""
    try:
        async for event in service.turn(agent, llm, chat_session, body.message):
            if isinstance(event, FunctionCallFinished):
                calls.append(_call_out(event))
            elif isinstance(event, TurnDone):
                response = event.text
    except PromptTooLong as exc:
        raise ApiError(422, f"message: too long for the agent's model ({exc}).") from exc
    return ChatOut(response=response, session_id=chat_session.id, function_calls=calls)


@router.post(
    "/{agent_id}/chat/stream/",
    summary="Chat with a voice agent, streamed",
    description="Like `chat/`, answered as server-sent events while the reply is generated: "
    '`text` (`{"text"}` deltas), `function_call` (`{"name", "arguments"}`, before the handler '
    'is called), `function_result` (`{"name", "arguments", "result", "ok", "error"}`), '
    'then `done` with the same body as `chat/`, or `error` (`{"error"}`).',
    response_class=StreamingResponse,
    dependencies=[JsonBody],
)
async def chat_stream(
    agent_id: str, body: ChatIn, account: AccountDep, session: SessionDep, state: StateDep
) -> StreamingResponse:
    service, agent, llm, chat_session = await _prepare(agent_id, account.id, session, state, body.session_id)
    return StreamingResponse(
        _sse(service.turn(agent, llm, chat_session, body.message), chat_session.id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _call_out(event: FunctionCallFinished) -> FunctionCallOut:
    return FunctionCallOut(
        name=event.name, arguments=event.arguments, result=event.result, ok=event.ok, error=event.error
    )


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _sse(events: AsyncIterator[TurnEvent], session_id: str) -> AsyncIterator[bytes]:
    """Render turn events as SSE. A client that disconnects closes this generator, which closes the
    turn: generation stops and an undispatched function call is never sent."""
    calls: list[FunctionCallOut] = []
    try:
        async for event in events:
            if isinstance(event, TextDelta):
                yield _event("text", {"text": event.text})
            elif isinstance(event, FunctionCallStarted):
                yield _event("function_call", {"name": event.name, "arguments": event.arguments})
            elif isinstance(event, FunctionCallFinished):
                call = _call_out(event)
                calls.append(call)
                yield _event("function_result", call.model_dump())
            elif isinstance(event, TurnDone):
                done = ChatOut(response=event.text, session_id=session_id, function_calls=calls)
                yield _event("done", done.model_dump())
    except PromptTooLong as exc:
        yield _event("error", {"error": f"message: too long for the agent's model ({exc})."})
    except Exception:  # headers are sent already: report in-band, keep the details in the log
        log.exception("chat stream failed")
        yield _event("error", {"error": "Internal server error."})
