"""The Plivo media websocket of one call: frames in to the call session, commands out.

Frames are parsed by the protocol codec; a malformed frame is logged and skipped (the call goes
on). The stream must present the token the answer URL issued (query string or ``extraHeaders``)
and match its call; a second connection for a call that already ran is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ..call.manager import CallManager, CallRefused, LiveCall
from ..store.accounts import get_account
from ..store.agents import get_agent
from ..telephony import protocol as proto
from ..telephony.stream_token import TokenError

log = logging.getLogger(__name__)

router = APIRouter(tags=["Calls"])

START_TIMEOUT_S = 10.0
POLICY_VIOLATION = 1008
MAX_LOGGED_ERRORS = 20  # per call: a peer spewing junk must not flood the log


class WebSocketSink:
    """The session's audio sink: playAudio / checkpoint / clearAudio on the websocket."""

    def __init__(self, websocket: WebSocket, stream_id: str):
        self.websocket = websocket
        self.stream_id = stream_id
        self.closed = False
        self.on_closed: Callable[[], None] | None = None
        self._lock = asyncio.Lock()

    async def play(self, mulaw: bytes) -> None:
        await self._send(proto.encode_play_audio(mulaw))

    async def checkpoint(self, name: str) -> None:
        await self._send(proto.encode_checkpoint(self.stream_id, name))

    async def clear(self) -> None:
        await self._send(proto.encode_clear_audio(self.stream_id))

    async def _send(self, text: str) -> None:
        if self.closed:
            return
        try:
            async with self._lock:
                await self.websocket.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            # The peer is gone: the call is over, whatever was still to be said.
            log.info("stream %s: send failed (%s); ending the call", self.stream_id, type(exc).__name__)
            self.closed = True
            if self.on_closed is not None:
                self.on_closed()


async def _receive(websocket: WebSocket) -> str | bytes | None:
    """The next frame, or None once the socket is closed."""
    try:
        message = await websocket.receive()
    except (WebSocketDisconnect, RuntimeError):
        return None
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    if text is not None:
        return str(text)
    data = message.get("bytes")
    return bytes(data) if data is not None else b""


class _ErrorLog:
    def __init__(self, label: str):
        self.label = label
        self.count = 0

    def __call__(self, exc: proto.ProtocolError) -> None:
        self.count += 1
        if self.count <= MAX_LOGGED_ERRORS:
            log.warning("stream %s: skipped malformed frame (%s): %s", self.label, exc.kind, exc.reason)


async def _close(websocket: WebSocket, code: int = 1000, reason: str = "") -> None:
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.close(code, reason)


@router.websocket("/v1/Account/{auth_id}/Voiceagent/{agent_id}/connect/")
async def media_stream(websocket: WebSocket, auth_id: str, agent_id: str) -> None:
    state = websocket.app.state.appliance
    manager: CallManager = state.services["calls"]
    await websocket.accept()
    decoder = proto.StreamDecoder()
    errors = _ErrorLog(f"{auth_id}/{agent_id}")
    start: proto.Start | None = None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while start is None:
                frame = await _receive(websocket)
                if frame is None:
                    return
                try:
                    event = decoder.feed(frame)
                except proto.ProtocolError as exc:
                    errors(exc)
                    continue
                if isinstance(event, proto.Start):
                    start = event
                elif isinstance(event, proto.Stop):
                    return
    except TimeoutError:
        await _close(websocket, POLICY_VIOLATION, "no start event")
        return

    token = websocket.query_params.get("token") or start.extra_headers.get("token", "")
    try:
        claims = manager.tokens.verify(token)
    except TokenError as exc:
        log.warning("stream for agent %s refused: %s", agent_id, exc.reason)
        await _close(websocket, POLICY_VIOLATION, "bad token")
        return
    if claims.agent_id != agent_id or claims.call_uuid != start.call_id:
        log.warning("stream refused: token is for call %s, start says %s", claims.call_uuid, start.call_id)
        await _close(websocket, POLICY_VIOLATION, "token does not match the call")
        return
    if start.media_format != proto.MediaFormat("audio/x-mulaw", 8000):
        log.warning("stream %s: unsupported media format %s", start.stream_id, start.media_format)
        await _close(websocket, POLICY_VIOLATION, "media format must be audio/x-mulaw at 8000 Hz")
        return
    async with state.services["db"].sessions() as db:
        account = await get_account(db, auth_id)
        agent = await get_agent(db, account.id, agent_id) if account is not None else None
    if account is None or agent is None or account.id != claims.account_id:
        await _close(websocket, POLICY_VIOLATION, "unknown agent")
        return
    sink = WebSocketSink(websocket, start.stream_id)
    try:
        live = await manager.open_call(claims, start.stream_id, sink, account, agent)
    except CallRefused as exc:
        log.warning("stream for call %s refused: %s", claims.call_uuid, exc)
        await _close(websocket, POLICY_VIOLATION, str(exc))
        return
    sink.on_closed = lambda: live.session.hangup("socket_closed")
    await _serve(websocket, decoder, live, manager, errors)


async def _serve(
    websocket: WebSocket,
    decoder: proto.StreamDecoder,
    live: LiveCall,
    manager: CallManager,
    errors: _ErrorLog,
) -> None:
    session = live.session
    runner = asyncio.create_task(manager.run(live), name=f"call-{live.info.call_uuid}")
    live.task = runner

    async def receive_loop() -> None:
        while True:
            frame = await _receive(websocket)
            if frame is None:
                session.hangup("socket_closed")
                return
            try:
                event = decoder.feed(frame)
            except proto.ProtocolError as exc:
                errors(exc)
                continue
            if isinstance(event, proto.Media):
                session.feed_media(event.payload)
            elif isinstance(event, proto.Dtmf):
                for digit in event.digit:
                    session.feed_dtmf(digit)
            elif isinstance(event, proto.PlayedStream):
                session.played(event.name)
            elif isinstance(event, proto.ClearedAudio):
                session.cleared()
            elif isinstance(event, proto.Stop):
                session.hangup("stop")
                return
            elif isinstance(event, proto.PlayFailed | proto.StreamError):
                log.warning("call %s: Plivo reports %s", live.info.call_uuid, event)

    receiver = asyncio.create_task(receive_loop(), name=f"call-rx-{live.info.call_uuid}")
    try:
        await asyncio.wait({runner, receiver}, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.wait({runner})
    finally:
        receiver.cancel()
        if not runner.done():
            session.hangup("server_shutdown", status="failed")
            runner.cancel()
        results = await asyncio.gather(runner, receiver, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("call %s ended with an error: %r", live.info.call_uuid, result)
        await _close(websocket)
