"""A tiny scripted agent speaking the server side of the Plivo stream protocol, for caller tests.

Answer URL ``POST /talk`` returns Stream XML; ``/ws`` is the media websocket. Behaviour:
after each caller utterance (voiced frames, then ``silence_frames`` of line noise) it replies with
``reply_ms`` of tone, sent all at once (``paced=False``) or one frame per 20 ms, then a checkpoint.
With ``clear_on_barge_in``, caller speech during its reply gets a ``clearAudio``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from appliance.audio import mulaw
from appliance.simulator.audio import dbfs
from appliance.telephony import protocol as proto
from appliance.telephony.signature import SignatureVerifier, Verdict
from appliance.telephony.xml import apology_xml, stream_xml


def tone(ms: int, freq: float = 440.0, level: float = 8000.0) -> np.ndarray:
    t = np.arange(ms * 8) / 8000.0
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def voice(ms: int) -> np.ndarray:
    """A crude voiced sound (harmonics of 150 Hz), loud enough to be speech, not noise."""
    t = np.arange(ms * 8) / 8000.0
    sig = np.zeros_like(t)
    for k in range(1, 6):
        sig += np.sin(2 * np.pi * 150 * k * t) / k
    return (3000 * sig).astype(np.int16)


@dataclass
class FakeAgent:
    base_url: str = ""
    auth_token: str | None = None
    reply_ms: int = 600
    paced: bool = True
    silence_frames: int = 10
    clear_on_barge_in: bool = False
    welcome_ms: int = 0
    apology: bool = False
    refuse_ws: bool = False
    extra_commands: list[str] = field(default_factory=list)  # sent right after start
    forms: list[dict[str, str]] = field(default_factory=list)
    answer_verdicts: list[Verdict] = field(default_factory=list)
    ws_verdicts: list[Verdict] = field(default_factory=list)
    events: list[tuple[float, Any]] = field(default_factory=list)
    media_times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checkpoint_sent_at: dict[str, float] = field(default_factory=dict)
    verifier: SignatureVerifier = field(default_factory=SignatureVerifier)


def build_app(agent: FakeAgent) -> Starlette:
    async def talk(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        agent.forms.append(form)
        if agent.auth_token:
            uri = agent.base_url + request.url.path
            agent.answer_verdicts.append(
                agent.verifier.verify("POST", uri, request.headers, [agent.auth_token], form)
            )
        if agent.apology:
            return Response(apology_xml(), media_type="application/xml")
        ws = agent.base_url.replace("http", "ws", 1) + "/ws?token=T0K3N"
        xml = stream_xml(ws, extra_headers={"token": "T0K3N", "agentId": "a1"})
        return Response(xml, media_type="application/xml")

    async def media(websocket: WebSocket) -> None:
        if agent.auth_token:
            uri = agent.base_url.replace("http", "ws", 1) + websocket.url.path + "?" + websocket.url.query
            agent.ws_verdicts.append(agent.verifier.verify("GET", uri, websocket.headers, [agent.auth_token]))
        if agent.refuse_ws:
            await websocket.close(code=1008)
            return
        await websocket.accept()
        decoder = proto.StreamDecoder()
        stream_id = ""
        voiced_run = silent_run = 0
        speaking_until = 0.0
        turn = 0
        sender: asyncio.Task[None] | None = None

        async def reply(ms: int, name: str) -> None:
            audio = mulaw.encode(tone(ms))
            if agent.paced:
                for i in range(0, len(audio), 160):
                    await websocket.send_text(proto.encode_play_audio(audio[i : i + 160]))
                    await asyncio.sleep(0.02)
            else:
                for frame in proto.iter_play_audio(audio):
                    await websocket.send_text(frame)
            agent.checkpoint_sent_at[name] = time.monotonic()
            await websocket.send_text(proto.encode_checkpoint(stream_id, name))

        try:
            while True:
                text = await websocket.receive_text()
                now = time.monotonic()
                try:
                    event = decoder.feed(text)
                except proto.ProtocolError as exc:
                    agent.errors.append(str(exc))
                    continue
                if not isinstance(event, proto.Media):
                    agent.events.append((now, event))
                if isinstance(event, proto.Start):
                    stream_id = event.stream_id
                    for cmd in agent.extra_commands:
                        await websocket.send_text(cmd.replace("STREAM", stream_id))
                    if agent.welcome_ms:
                        speaking_until = time.monotonic() + agent.welcome_ms / 1000
                        sender = asyncio.create_task(reply(agent.welcome_ms, "welcome"))
                elif isinstance(event, proto.Stop):
                    break
                elif isinstance(event, proto.Media):
                    agent.media_times.append(time.monotonic())
                    loud = dbfs(mulaw.decode(event.payload)) > -40
                    if loud:
                        voiced_run += 1
                        silent_run = 0
                        if agent.clear_on_barge_in and voiced_run == 5 and time.monotonic() < speaking_until:
                            if sender is not None:
                                sender.cancel()
                            await websocket.send_text(proto.encode_clear_audio(stream_id))
                            speaking_until = 0.0
                    else:
                        silent_run += 1
                        if voiced_run >= 5 and silent_run == agent.silence_frames:
                            turn += 1
                            voiced_run = 0
                            speaking_until = time.monotonic() + agent.reply_ms / 1000
                            sender = asyncio.create_task(reply(agent.reply_ms, f"turn-{turn}"))
                        if silent_run > agent.silence_frames:
                            voiced_run = 0
        except WebSocketDisconnect:
            pass
        finally:
            if sender is not None:
                sender.cancel()

    return Starlette(routes=[Route("/talk", talk, methods=["POST"]), WebSocketRoute("/ws", media)])
