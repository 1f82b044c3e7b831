"""A simulated phone caller that speaks Plivo's side of the protocol (PLIVO.md §1-2, §4).

It POSTs the answer URL like Plivo (form fields, V3 signature headers when given credentials),
reads the ``<Stream>`` XML, opens the websocket, sends ``start`` and then one 20 ms µ-law ``media``
frame per tick of a monotonic clock: the script's utterances, or line noise between them. Agent
audio (``playAudio``) goes into a playback buffer that drains in real time, as on a phone:
checkpoints are acknowledged (``playedStream``) only when the audio queued before them has played,
``clearAudio`` drops the buffer and is answered with ``clearedAudio``. Everything the server sends
is validated against PLIVO.md's shapes; violations are recorded, not raised.

Timings are measured at the caller, in ms from the ``start`` message: per turn, the caller's last
voiced frame sent -> the first voiced agent audio received; per barge-in, the caller's speech onset
-> the agent audio stopping (``clearAudio`` received, or the playback buffer running dry).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection, connect

from appliance.audio import mulaw
from appliance.simulator.audio import (
    FRAME_SAMPLES,
    LineNoise,
    Pcm,
    is_voiced_mulaw,
    load_wav_8k,
    save_wav,
    to_rate,
    voiced_frames,
)
from appliance.simulator.report import (
    BargeIn,
    CallResult,
    Turn,
    Violation,
    agent_segments,
    stop_and_resume,
)
from appliance.telephony import protocol as proto
from appliance.telephony.signature import signature_headers
from appliance.telephony.xml import StreamInstruction, parse_stream_xml

TICK_S = 0.020
PLAYBACK_LIMIT_BYTES = 60 * 8000  # Plivo buffers about 60 s of agent audio
MAX_VIOLATIONS = 200
MAX_CATCH_UP_TICKS = 5  # after a stall, send at most this many frames back to back, then resync


# ------------------------------------------------------------------------------------ script


@dataclass
class Say:
    """Speak a recording. By default wait for the agent's reply to finish, then ``pause_ms``.

    ``barge_in_after_ms``: instead, start talking once the agent has played this much audio of its
    current reply (talking over it). ``kind="noise"`` marks a cough/clap/backchannel that should
    *not* count as a turn (it is still measured as a barge-in attempt).
    """

    audio: Path | Pcm
    sample_rate: int = 8000
    pause_ms: int = 400
    wait_for_agent: bool = True
    max_wait_ms: int = 20_000
    barge_in_after_ms: int | None = None
    kind: Literal["speech", "noise"] = "speech"
    label: str = ""


@dataclass
class Pause:
    ms: int


@dataclass
class Dtmf:
    digits: str
    pause_ms: int = 0
    wait_for_agent: bool = False
    max_wait_ms: int = 20_000


ScriptItem = Say | Pause | Dtmf


@dataclass
class CallerOptions:
    answer_url: str
    call_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    from_number: str = "+14155550100"
    to_number: str = "+14155550199"
    direction: Literal["inbound", "outbound"] = "inbound"
    extra_form: dict[str, str] = field(default_factory=dict)
    account_id: str = "MA00000000000000SIM1"
    auth_token: str | None = None  # when set, requests carry V3 signatures made with it
    answer_method: Literal["POST", "GET"] = "POST"
    noise_level_dbfs: float = -62.0
    background: Pcm | None = None
    background_db: float = -20.0
    agent_settle_ms: int = 800  # agent silence after which its reply counts as finished
    final_wait_ms: int = 20_000  # after the script: wait this long at most for the agent's last reply
    max_call_s: float = 600.0
    # Set when "Plivo" hangs the call up (REST hangup/transfer): the caller sends stop and closes.
    hangup_signal: asyncio.Event | None = None
    merge_gap_ms: int = 200  # agent-audio gaps shorter than this are one segment
    seed: int = 0
    http_timeout_s: float = 30.0


# ------------------------------------------------------------------------------------ caller


class _Utterance:
    def __init__(self, pcm: Pcm, turn: Turn | None, barge: BargeIn | None) -> None:
        n = -(-len(pcm) // FRAME_SAMPLES)
        padded = np.zeros(n * FRAME_SAMPLES, np.int16)
        padded[: len(pcm)] = pcm
        self.frames = padded.reshape(n, FRAME_SAMPLES)
        voiced = np.flatnonzero(voiced_frames(pcm))
        self.first_voiced = int(voiced[0]) if voiced.size else 0
        self.last_voiced = int(voiced[-1]) if voiced.size else n - 1
        self.pos = 0
        self.turn = turn
        self.barge = barge
        self.done = asyncio.Event()


class SimulatedCall:
    """One call. Use :func:`run_call`; this class is the state shared by its tasks."""

    def __init__(self, options: CallerOptions, script: list[tuple[ScriptItem, Pcm | None]]) -> None:
        self.o = options
        self.script = script
        self.result = CallResult(options.call_uuid, str(uuid.uuid4()), 0, "")
        self._ws: ClientConnection | None = None
        self._send_lock = asyncio.Lock()
        self._seq = 0
        self._chunk = 0
        self._t0 = 0.0
        self._epoch_ms = 0
        self._extra_headers = ""
        self._noise = LineNoise(
            options.noise_level_dbfs, options.seed, options.background, options.background_db
        )
        self._utterance: _Utterance | None = None
        # Playback: µ-law bytes waiting to "play", and checkpoints at byte positions of the stream.
        self._playback = bytearray()
        self._queued_total = 0
        self._played_total = 0
        self._marks: deque[tuple[int, str]] = deque()
        self._played_ticks = bytearray()  # 1 per tick where agent audio played
        self._tick_ms: list[float] = []  # when each tick happened
        self._pending_acks: deque[str] = deque()
        self._agent_chunks: list[bytes] = []
        self._tick = asyncio.Event()
        self._closed = asyncio.Event()
        # Reply tracking for wait/barge-in conditions.
        self._reply_mark_tick = 0  # agent audio played after this tick belongs to the awaited reply
        self._last_played_tick = -1
        self._played_since_mark = 0

    # ------------------------------------------------------------------ helpers
    def now_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1000.0

    def violation(self, kind: str, reason: str, frame: str | bytes = "") -> None:
        if len(self.result.violations) < MAX_VIOLATIONS:
            text = frame if isinstance(frame, str) else repr(frame[:100])
            self.result.violations.append(Violation(round(self.now_ms(), 1), kind, reason, text[:200]))

    async def _send(self, text: str) -> None:
        if self._ws is None or self._closed.is_set():
            return
        async with self._send_lock:
            try:
                await self._ws.send(text)
            except websockets.ConnectionClosed:
                self._close("server")

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ------------------------------------------------------------------ answer URL
    async def answer(self, client: httpx.AsyncClient) -> StreamInstruction | None:
        form = {
            "CallUUID": self.o.call_uuid,
            "From": self.o.from_number,
            "To": self.o.to_number,
            "Direction": self.o.direction,
            "CallStatus": "in-progress",
            "Event": "StartApp",
        }
        if self.o.direction == "outbound":
            form.setdefault("ALegUUID", self.o.call_uuid)
            form.setdefault("ALegRequestUUID", str(uuid.uuid4()))
        form.update(self.o.extra_form)
        headers: dict[str, str] = {}
        if self.o.answer_method == "POST":
            if self.o.auth_token:
                headers = signature_headers("POST", self.o.answer_url, self.o.auth_token, form)
            response = await client.post(self.o.answer_url, data=form, headers=headers)
        else:
            url = str(httpx.URL(self.o.answer_url).copy_merge_params(form))
            if self.o.auth_token:
                headers = signature_headers("GET", url, self.o.auth_token)
            response = await client.get(url, headers=headers)
        self.result.answer_status = response.status_code
        self.result.answer_xml = response.text[:100_000]
        if response.status_code != 200:
            self.violation("answer", f"answer URL returned HTTP {response.status_code}")
            return None
        if "xml" not in response.headers.get("content-type", ""):
            self.violation("answer", f"answer content-type {response.headers.get('content-type')!r}")
        try:
            stream = parse_stream_xml(response.content)
        except ValueError as exc:
            self.result.closed_by = "no-stream"
            self._note_non_stream(str(exc))
            return None
        expected = {
            "bidirectional": "true",
            "audioTrack": "inbound",
            "contentType": "audio/x-mulaw;rate=8000",
        }
        for key, value in expected.items():
            if stream.attributes.get(key) != value:
                self.violation("answer", f"<Stream {key}={stream.attributes.get(key)!r}>, expected {value!r}")
        if len(stream.attributes.get("extraHeaders", "").encode()) > 512:
            self.violation("answer", "extraHeaders over 512 bytes")
        if len(stream.url) > 2048:
            self.violation("answer", "stream URL over 2048 characters")
        self.result.stream_url = stream.url
        return stream

    def _note_non_stream(self, reason: str) -> None:
        # An apology (<Speak>+<Hangup>) is a legitimate answer, just not a stream.
        if "<Hangup" not in self.result.answer_xml:
            self.violation("answer", reason)

    # ------------------------------------------------------------------ websocket
    async def stream(self, instruction: StreamInstruction) -> None:
        headers: dict[str, str] = {}
        if self.o.auth_token:
            headers = signature_headers("GET", instruction.url, self.o.auth_token)
        self._extra_headers = instruction.attributes.get("extraHeaders", "")
        async with connect(
            instruction.url, additional_headers=headers, max_size=2**20, ping_interval=None
        ) as ws:
            self._ws = ws
            self._t0 = time.monotonic()
            self._epoch_ms = int(time.time() * 1000)
            await self._send(
                proto.encode_start(
                    sequence_number=self._next_seq(),
                    call_id=self.o.call_uuid,
                    stream_id=self.result.stream_id,
                    account_id=self.o.account_id,
                    extra_headers=self._extra_headers,
                )
            )
            try:
                async with asyncio.timeout(self.o.max_call_s), asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._ticker()), group.create_task(self._receiver())]
                    if self.o.hangup_signal is not None:
                        tasks.append(group.create_task(self._hangup_watch(self.o.hangup_signal)))
                    await self._run_script()
                    await self._hang_up("caller")
                    for task in tasks:
                        task.cancel()
            except TimeoutError:
                self.result.closed_by = "timeout"
            self._ws = None
        self.result.duration_ms = round(self.now_ms(), 1)

    def _close(self, by: str) -> None:
        if not self._closed.is_set():
            self.result.closed_by = by
            self._closed.set()
        self._tick.set()  # wake anything waiting for the next tick

    async def _hang_up(self, by: str) -> None:
        if not self._closed.is_set():
            await self._send(
                proto.encode_stop(sequence_number=self._next_seq(), stream_id=self.result.stream_id)
            )
        self._close(by)

    async def _hangup_watch(self, signal: asyncio.Event) -> None:
        await signal.wait()
        await self._hang_up("hangup")

    async def _receiver(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                self._on_message(message)
        except websockets.ConnectionClosed:
            pass
        self._close("server")

    def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.violation("binary", "binary websocket frame (Plivo expects JSON text)", message)
            return
        try:
            command = proto.parse_command(message, self.result.stream_id)
        except proto.ProtocolError as exc:
            self.violation(str(exc.kind), exc.reason, message)
            return
        now = self.now_ms()
        if isinstance(command, proto.PlayAudio):
            self._on_play(command.payload, now)
        elif isinstance(command, proto.Checkpoint):
            self.result.checkpoints.append(command.name)
            self._marks.append((self._queued_total, command.name))
        elif isinstance(command, proto.ClearAudio):
            self.result.clears.append(round(now, 1))
            # Dropped audio never plays and its checkpoints are never acknowledged.
            self._queued_total -= len(self._playback)
            self._playback.clear()
            self._marks.clear()
            for barge in self.result.barge_ins:
                if barge.onset_ms is not None and barge.clear_audio_ms is None and now >= barge.onset_ms:
                    barge.clear_audio_ms = round(now, 1)
                    barge.cleared = True
            self._send_soon(
                proto.encode_cleared_audio(sequence_number=self._next_seq(), stream_id=self.result.stream_id)
            )
        elif isinstance(command, proto.SendDtmf):
            self.result.server_dtmf.append(command.digits)

    def _send_soon(self, text: str) -> None:
        # Acks are sent by the ticker, in order, so the receiver never blocks on a send.
        self._pending_acks.append(text)

    def _on_play(self, payload: bytes, now: float) -> None:
        room = PLAYBACK_LIMIT_BYTES - len(self._playback)
        if len(payload) > room:
            self.violation("overflow", "agent queued more than Plivo's ~60 s playback buffer")
            payload = payload[: max(room, 0) // FRAME_SAMPLES * FRAME_SAMPLES]
        self._playback += payload
        self._queued_total += len(payload)
        self.result.max_playback_lead_ms = max(self.result.max_playback_lead_ms, len(self._playback) / 8.0)
        for turn in self.result.turns:
            if (
                turn.last_voiced_ms is None
                or turn.first_agent_audio_ms is not None
                or now < turn.last_voiced_ms
            ):
                continue
            if turn.barge_in and not self._cleared_after(turn.speech_onset_ms):
                continue  # still the interrupted reply, not the answer to this turn
            if is_voiced_mulaw(payload):
                turn.first_agent_audio_ms = round(now, 1)
                turn.voice_to_voice_ms = round(now - turn.last_voiced_ms, 1)

    def _cleared_after(self, t: float | None) -> bool:
        return t is not None and any(c >= t for c in self.result.clears)

    async def _ticker(self) -> None:
        next_t = time.monotonic()
        tick = 0
        while not self._closed.is_set():
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > MAX_CATCH_UP_TICKS * TICK_S:
                self.result.late_ticks += 1
                next_t = time.monotonic()  # resync rather than burst a long backlog
            await self._tick_once(tick)
            tick += 1
            next_t += TICK_S
            self._tick.set()

    async def _tick_once(self, tick: int) -> None:
        # 1. The caller's frame: the current utterance or line noise.
        utt = self._utterance
        clean = np.zeros(FRAME_SAMPLES, np.float64)
        index = -1
        if utt is not None and utt.pos < len(utt.frames):
            index = utt.pos
            clean = utt.frames[index].astype(np.float64)
            utt.pos += 1
        frame = self._noise.mix(clean)
        self._chunk += 1
        await self._send(
            proto.encode_media(
                sequence_number=self._next_seq(),
                stream_id=self.result.stream_id,
                chunk=self._chunk,
                timestamp_ms=self._epoch_ms + (self._chunk - 1) * 20,
                payload=mulaw.encode(frame),
                extra_headers=self._extra_headers,
            )
        )
        if utt is not None and index >= 0:
            self._mark_utterance(utt, index)
        # 2. Agent playback drains one frame per tick, as the phone would play it.
        played = len(self._playback) >= FRAME_SAMPLES
        if played:
            chunk = bytes(self._playback[:FRAME_SAMPLES])
            del self._playback[:FRAME_SAMPLES]
            self._played_total += FRAME_SAMPLES
            self._agent_chunks.append(chunk)
            self._last_played_tick = tick
            if tick >= self._reply_mark_tick:
                self._played_since_mark += 1
        else:
            self._agent_chunks.append(b"\xff" * FRAME_SAMPLES)
        self._played_ticks.append(1 if played else 0)
        self._tick_ms.append(round(self.now_ms(), 1))
        # 3. Checkpoints whose audio has now played, and acks owed for clearAudio.
        while self._marks and self._marks[0][0] <= self._played_total:
            name = self._marks.popleft()[1]
            self.result.acknowledged.append(name)
            await self._send(
                proto.encode_played_stream(
                    sequence_number=self._next_seq(), stream_id=self.result.stream_id, name=name
                )
            )
        while self._pending_acks:
            await self._send(self._pending_acks.popleft())

    def _mark_utterance(self, utt: _Utterance, index: int) -> None:
        now = round(self.now_ms(), 1)
        if index == utt.first_voiced:
            if utt.turn is not None:
                utt.turn.speech_onset_ms = now
            if utt.barge is not None:
                utt.barge.onset_ms = now
        if index == utt.last_voiced:
            if utt.turn is not None:
                utt.turn.last_voiced_ms = now
            if utt.barge is not None:
                utt.barge.last_voiced_ms = now
        if index == len(utt.frames) - 1:
            if utt.turn is not None:
                utt.turn.ended_ms = now
            self._utterance = None
            utt.done.set()

    # ------------------------------------------------------------------ script
    async def _wait_ticks(self, ms: float) -> None:
        deadline = time.monotonic() + ms / 1000.0
        while time.monotonic() < deadline and not self._closed.is_set():
            await self._next_tick()

    async def _next_tick(self) -> None:
        if self._closed.is_set():
            return
        self._tick.clear()
        await self._tick.wait()

    def _agent_idle_for(self) -> float:
        if self._playback:
            return 0.0
        if self._last_played_tick < 0:
            return float("inf")
        return (len(self._played_ticks) - 1 - self._last_played_tick) * 20.0

    async def _wait_for_agent_reply(self, max_wait_ms: int) -> None:
        """Until the agent has played some audio since the mark and then gone quiet for settle_ms."""
        deadline = time.monotonic() + max_wait_ms / 1000.0
        while not self._closed.is_set() and time.monotonic() < deadline:
            if self._played_since_mark > 0 and self._agent_idle_for() >= self.o.agent_settle_ms:
                return
            await self._next_tick()

    async def _wait_agent_played(self, ms: int, max_wait_ms: int) -> None:
        deadline = time.monotonic() + max_wait_ms / 1000.0
        while not self._closed.is_set() and time.monotonic() < deadline:
            # Playing now: a paced server keeps the buffer near empty between ticks.
            if self._played_since_mark * 20 >= ms and self._agent_idle_for() <= 2 * TICK_S * 1000:
                return
            await self._next_tick()

    def _set_mark(self) -> None:
        self._reply_mark_tick = len(self._played_ticks)
        self._played_since_mark = 0

    async def _run_script(self) -> None:
        await self._next_tick()
        expect_reply = False
        for item, pcm in self.script:
            if self._closed.is_set():
                return
            expect_reply = not isinstance(item, Pause)
            if isinstance(item, Pause):
                await self._wait_ticks(item.ms)
            elif isinstance(item, Dtmf):
                if item.wait_for_agent:
                    await self._wait_for_agent_reply(item.max_wait_ms)
                await self._wait_ticks(item.pause_ms)
                for digit in item.digits:
                    await self._send(
                        proto.encode_dtmf(
                            sequence_number=self._next_seq(),
                            stream_id=self.result.stream_id,
                            digit=digit,
                            timestamp_ms=int(time.time() * 1000),
                        )
                    )
                self._set_mark()
            elif pcm is not None:
                await self._say(item, pcm)
        if expect_reply and not self._closed.is_set():
            await self._wait_for_agent_reply(self.o.final_wait_ms)

    async def _say(self, item: Say, pcm: Pcm) -> None:
        label = item.label or (
            item.audio.name if isinstance(item.audio, Path) else f"say{len(self.result.turns)}"
        )
        barge: BargeIn | None = None
        if item.barge_in_after_ms is not None:
            await self._wait_agent_played(item.barge_in_after_ms, item.max_wait_ms)
            barge = BargeIn(label, item.kind, agent_played_ms_at_start=self._played_since_mark * 20.0)
            self.result.barge_ins.append(barge)
        else:
            if item.wait_for_agent:
                await self._wait_for_agent_reply(item.max_wait_ms)
            await self._wait_ticks(item.pause_ms)
        if self._closed.is_set():
            return
        turn = None
        if item.kind == "speech":
            turn = Turn(label, started_ms=round(self.now_ms(), 1), barge_in=barge is not None)
            self.result.turns.append(turn)
        utt = _Utterance(pcm, turn, barge)
        self._utterance = utt
        while not utt.done.is_set() and not self._closed.is_set():
            await self._next_tick()
        self._set_mark()

    # ------------------------------------------------------------------ results
    def finish(self) -> CallResult:
        r = self.result
        audio = b"".join(self._agent_chunks)
        r.agent_audio = mulaw.decode(audio) if audio else np.zeros(0, np.int16)
        r.segments = agent_segments(self._played_ticks, self._tick_ms, self.o.merge_gap_ms)
        for barge in r.barge_ins:
            if barge.onset_ms is not None:
                barge.audio_stopped_ms, barge.resumed_ms, barge.stops_broken = stop_and_resume(
                    self._played_ticks, self._tick_ms, barge.onset_ms, barge.last_voiced_ms
                )
            stops = [t for t in (barge.clear_audio_ms, barge.audio_stopped_ms) if t is not None]
            if barge.onset_ms is not None and stops:
                barge.reaction_ms = round(min(stops) - barge.onset_ms, 1)
        return r


def _prepare(script: Sequence[ScriptItem]) -> list[Pcm | None]:
    """Every utterance as 8 kHz int16, loaded before the call so file I/O never delays a tick."""
    out: list[Pcm | None] = []
    for item in script:
        if isinstance(item, Say):
            out.append(
                load_wav_8k(item.audio)
                if isinstance(item.audio, Path)
                else to_rate(item.audio, item.sample_rate)
            )
        else:
            out.append(None)
    return out


async def run_call(options: CallerOptions, script: Sequence[ScriptItem]) -> CallResult:
    """Place one simulated call and return what the caller measured and heard."""
    audio = await asyncio.to_thread(_prepare, script)
    call = SimulatedCall(options, list(zip(script, audio, strict=True)))
    try:
        async with httpx.AsyncClient(timeout=options.http_timeout_s) as client:
            instruction = await call.answer(client)
    except httpx.HTTPError as exc:
        call.result.closed_by = "answer-failed"
        call.violation("answer", f"answer URL request failed: {type(exc).__name__}: {exc}")
        instruction = None
    if instruction is not None:
        try:
            await call.stream(instruction)
        except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            call.result.closed_by = "connect-failed"
            call.violation("connect", f"websocket connect failed: {exc}")
    return call.finish()


def save_result(result: CallResult, wav_path: Path | None = None, json_path: Path | None = None) -> None:
    if wav_path is not None:
        save_wav(wav_path, result.agent_audio)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_json(), indent=2))
