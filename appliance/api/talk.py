"""The answer URL Plivo fetches when a call reaches an agent, and the transfer XML.

``/talk/`` answers with ``<Stream>`` XML pointing at the agent's media websocket, carrying a
short-lived signed token that binds the call's metadata (the websocket itself has no credentials).
With Plivo credentials on the account, Plivo's V3 signature is required (403 otherwise). An unknown
agent or a full house gets spoken XML, never a 500: a caller is on the line.
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from plivo import plivoxml
from sqlalchemy.ext.asyncio import AsyncSession

from ..call.manager import CallManager
from ..server import AppState
from ..store.accounts import get_account
from ..store.agents import get_agent
from ..telephony.signature import public_uri
from ..telephony.stream_token import StreamClaims, TokenError
from ..telephony.xml import apology_xml, stream_xml, websocket_url
from .deps import SessionDep, StateDep

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/Account/{auth_id}/Voiceagent/{agent_id}", tags=["Calls"])

BUSY_MESSAGE = "Sorry, all of our lines are busy right now. Please call again in a few minutes. Goodbye."
XML = "text/xml"

AuthId = Annotated[str, Path(max_length=64)]
AgentId = Annotated[str, Path(max_length=64)]


async def _params(request: Request) -> dict[str, str]:
    if request.method == "POST":
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)}
    return dict(request.query_params)


def _xml(body: str, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type=XML)


_TALK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {XML: {}}},
    403: {"description": "Bad Plivo V3 signature"},
}


@router.post(
    "/talk/",
    summary="Answer URL for Plivo: Stream XML for the agent's media websocket",
    response_class=Response,
    responses=_TALK_RESPONSES,
)
async def talk(
    request: Request, auth_id: AuthId, agent_id: AgentId, state: StateDep, session: SessionDep
) -> Response:
    return await _answer(request, auth_id, agent_id, state, session)


@router.get(
    "/talk/", summary="Answer URL for Plivo (GET variant)", response_class=Response, responses=_TALK_RESPONSES
)
async def talk_get(
    request: Request, auth_id: AuthId, agent_id: AgentId, state: StateDep, session: SessionDep
) -> Response:
    return await _answer(request, auth_id, agent_id, state, session)


async def _answer(
    request: Request, auth_id: str, agent_id: str, state: AppState, session: AsyncSession
) -> Response:
    manager: CallManager = state.services["calls"]
    settings = state.settings
    params = await _params(request)
    account = await get_account(session, auth_id)
    if account is not None and account.has_plivo_credentials:
        uri = public_uri(settings.base_url, request.url.path, request.url.query)
        verdict = manager.signatures.verify(
            request.method, uri, dict(request.headers), [account.plivo_auth_token or ""],
            params if request.method == "POST" else None,
        )  # fmt: skip
        if not verdict.ok:
            log.warning("answer URL for agent %s: rejected Plivo signature (%s)", agent_id, verdict.reason)
            return _xml("<Response/>", 403)
    agent = await get_agent(session, account.id, agent_id) if account is not None else None
    if account is None or agent is None:
        log.warning("answer URL: unknown account/agent %s/%s", auth_id, agent_id)
        return _xml(apology_xml())
    call_uuid = params.get("CallUUID") or str(uuid.uuid4())
    if not manager.reserve(call_uuid):
        log.warning("answer URL: over capacity, refusing call %s", call_uuid)
        return _xml(apology_xml(BUSY_MESSAGE))
    direction = params.get("Direction", "inbound").lower()
    if direction == "outbound":
        manager.note_answered(call_uuid, params.get("ALegRequestUUID") or params.get("RequestUUID"))
    token = manager.issue_token(
        StreamClaims(call_uuid, agent.id, account.id, params.get("From", ""), params.get("To", ""), direction)
    )
    path = f"/v1/Account/{auth_id}/Voiceagent/{agent_id}/connect/"
    ws_url = websocket_url(settings.base_url, path, f"token={token}")
    return _xml(stream_xml(ws_url, extra_headers={"token": token}))


@router.api_route(
    "/transfer/",
    methods=["GET", "POST"],
    summary="Dial XML Plivo fetches when the agent transfers a call (signed, single-purpose)",
    response_class=Response,
    include_in_schema=False,
)
async def transfer_xml(request: Request, auth_id: AuthId, agent_id: AgentId, state: StateDep) -> Response:
    manager: CallManager = state.services["calls"]
    params = {**dict(request.query_params), **(await _params(request))}
    try:
        claims = manager.tokens.verify(params.get("token", ""))
    except TokenError as exc:
        log.warning("transfer XML: %s", exc.reason)
        return _xml("<Response/>", 403)
    number = params.get("to", "").strip()
    if claims.direction != "transfer" or claims.agent_id != agent_id or not number:
        return _xml("<Response/>", 403)
    dial = plivoxml.DialElement()
    dial.add(plivoxml.UserElement(number) if number.startswith("sip:") else plivoxml.NumberElement(number))
    return _xml(plivoxml.ResponseElement().add(dial).to_string(pretty=False))
