"""Calls: place an outbound call, read call records, hang up a live call.

``POST /Voiceagent/{id}/Call/`` asks Plivo (REST) to dial out with ``answer_url`` = the agent's
``call_url``; the call's ``context`` fills the prompt's variables once Plivo fetches that URL.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from ..call.manager import CallManager
from ..store import calls as store
from ..store.agents import get_agent
from ..telephony.rest import PlivoApiError
from .agents import agent_urls
from .deps import AccountDep, JsonBody, SessionDep, StateDep
from .errors import ApiError, Conflict, NotFound, error_responses
from .pagination import Page, PageDep, make_page

router = APIRouter(
    prefix="/v1/Account/{auth_id}", tags=["Calls"], responses=error_responses(400, 401, 404, 422)
)

MAX_CONTEXT_KEYS = 50


class OutboundCall(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    from_: str = Field(alias="from", min_length=1, max_length=64, description="Caller id (your Plivo number)")
    to: str = Field(min_length=1, max_length=64, description="Number or SIP URI to call")
    context: dict[str, Any] = Field(
        default_factory=dict, description="Variables for the agent's prompt ({{name}} placeholders)"
    )


class CallFiredPublic(BaseModel):
    message: str
    request_uuid: str
    api_id: str


class TranscriptTurn(BaseModel):
    seq: int
    who: str
    text: str
    heard_text: str | None
    interrupted: bool
    start_time: str | None
    end_time: str | None
    timings: dict[str, Any]


class FunctionCallPublic(BaseModel):
    turn: int
    name: str
    arguments: dict[str, Any]
    result: Any
    ok: bool
    error: str | None
    time: str | None


class CallPublic(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    call_uuid: str
    agent_id: str
    direction: str
    from_: str = Field(alias="from")
    to: str
    status: str
    hangup_cause: str | None
    start_time: str | None
    end_time: str | None
    duration: float | None
    transcript: list[TranscriptTurn]
    function_calls: list[FunctionCallPublic]


@router.post(
    "/Voiceagent/{agent_id}/Call/",
    status_code=201,
    dependencies=[JsonBody],
    response_model=CallFiredPublic,
    summary="Place an outbound call with this agent",
    responses=error_responses(409, 502),
)
async def place_call(
    agent_id: str, body: OutboundCall, account: AccountDep, session: SessionDep, state: StateDep
) -> CallFiredPublic:
    agent = await get_agent(session, account.id, agent_id)
    if agent is None:
        raise NotFound("Voiceagent", agent_id)
    if len(body.context) > MAX_CONTEXT_KEYS:
        raise ApiError(422, f"context: at most {MAX_CONTEXT_KEYS} variables")
    if not account.has_plivo_credentials:
        raise Conflict("This account has no Plivo credentials; set them before placing calls.")
    manager: CallManager = state.services["calls"]
    call_url, _ = agent_urls(state.settings, account.auth_id, agent.id)
    try:
        request_uuid = await manager.place_call(
            account, agent.id, call_url, body.from_, body.to, body.context
        )
    except PlivoApiError as exc:
        raise ApiError(502, f"Plivo refused the call: {exc}") from exc
    return CallFiredPublic(message="call fired", request_uuid=request_uuid, api_id=str(uuid.uuid4()))


@router.get("/Call/", response_model=Page[CallPublic], summary="List call records, newest first")
async def list_calls(
    request: Request, account: AccountDep, session: SessionDep, page: PageDep, agent_id: str | None = None
) -> Page[CallPublic]:
    rows, total = await store.list_calls(
        session, account.id, limit=page.limit, offset=page.offset, agent_id=agent_id
    )
    objects = [CallPublic.model_validate(store.call_public(r)) for r in rows]
    return make_page(request, page, total, objects)


@router.get("/Call/{call_uuid}/", response_model=CallPublic, summary="One call record with its transcript")
async def get_call(call_uuid: str, account: AccountDep, session: SessionDep) -> CallPublic:
    row = await store.get_call(session, account.id, call_uuid)
    if row is None:
        raise NotFound("Call", call_uuid)
    return CallPublic.model_validate(store.call_public(row))


@router.delete("/Call/{call_uuid}/", status_code=204, summary="Hang up a live call")
async def hangup_call(call_uuid: str, account: AccountDep, state: StateDep) -> Response:
    manager: CallManager = state.services["calls"]
    if not await manager.hangup(account, call_uuid):
        raise NotFound("Live call", call_uuid)
    return Response(status_code=204)
