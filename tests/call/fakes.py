"""Scripted fakes of our own engines and of the call's outside world, for fast timing tests.

Audio conventions: a 20 ms µ-law frame of a loud tone is "speech" for ``EnergyVad``, a frame of
silence is silence; ``ScriptedTts`` makes 100 ms of tone per word so heard-text accounting is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.audio import mulaw
from appliance.call.clock import VirtualClock
from appliance.call.records import CallInfo, MemoryRecorder
from appliance.call.session import CallSession, SessionConfig
from appliance.conversation.types import FunctionCallStarted, TextDelta, TurnDone, TurnEvent
from appliance.engines.types import FloatArray, Int16Array, Transcript

FRAME = 160


def tone(ms: float, amplitude: int = 6000, rate: int = 8000) -> Int16Array:
    t = np.arange(int(rate * ms / 1000)) / rate
    return (amplitude * np.sin(2 * np.pi * 300 * t)).astype(np.int16)


def quiet(ms: float, rate: int = 8000) -> Int16Array:
    return np.zeros(int(rate * ms / 1000), dtype=np.int16)


def frames(pcm: Int16Array) -> list[bytes]:
    data = mulaw.encode(pcm)
    return [data[i : i + FRAME] for i in range(0, len(data) - FRAME + 1, FRAME)]


class EnergyVadStream:
    """Probability 1 for a 32 ms window that is loud, 0 otherwise."""

    window_samples = 256
    sample_rate = 8000

    def __init__(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)
        self.windows = 0

    def push(self, pcm: Int16Array) -> list[float]:
        self._pending = np.concatenate([self._pending, pcm])
        out: list[float] = []
        while self._pending.size >= self.window_samples:
            win, self._pending = self._pending[:256], self._pending[256:]
            out.append(1.0 if np.sqrt(np.mean(win.astype(np.float32) ** 2)) > 1000 else 0.0)
            self.windows += 1
        return out

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)


class EnergyVad:
    def __init__(self) -> None:
        self.streams: list[EnergyVadStream] = []

    def stream(self, sample_rate: int = 8000) -> EnergyVadStream:
        s = EnergyVadStream()
        self.streams.append(s)
        return s


class ScriptedAsr:
    """Returns ``script(seconds_of_audio)``; records every call."""

    model_id = "scripted"

    def __init__(self, script: Callable[[float], str]):
        self.script = script
        self.calls: list[float] = []
        self.background: list[bool] = []  # per call: a transcription nobody waits for
        self.hold: asyncio.Event | None = None  # when given, transcriptions wait for it (slow ASR)

    async def transcribe(
        self, pcm16k: FloatArray, *, language: str | None = None, background: bool = False
    ) -> Transcript:
        await asyncio.sleep(0)
        seconds = pcm16k.size / 16000
        self.calls.append(seconds)
        self.background.append(background)
        text = self.script(seconds)
        if self.hold is not None:
            await self.hold.wait()
        return Transcript(text, seconds, 0.0)


class ScriptedTts:
    """100 ms of tone per word at 22,050 Hz, yielded word by word."""

    voice_id = "scripted"
    sample_rate = 22050

    def __init__(self) -> None:
        self.spoken: list[str] = []
        self.urgent: list[bool] = []
        self.abandonable: list[bool] = []
        self.closed = 0

    async def synthesize(
        self, text: str, *, speed: float = 1.0, urgent: bool = False, abandonable: bool = False
    ) -> AsyncIterator[Int16Array]:
        self.spoken.append(text)
        self.urgent.append(urgent)
        self.abandonable.append(abandonable)
        try:
            for _ in text.split():
                await asyncio.sleep(0)
                yield tone(100, 3000, self.sample_rate)
        finally:
            self.closed += 1


@dataclass
class ScriptedBrain:
    """Answers each turn from ``script(text) -> list of events`` (strings become TextDeltas)."""

    script: Callable[[str], list[Any]] = field(default_factory=lambda: lambda text: [f"You said {text}."])
    turns: list[str] = field(default_factory=list)
    heard: list[tuple[str, bool]] = field(default_factory=list)
    assistant: list[str] = field(default_factory=list)
    cancelled: int = 0
    gate: asyncio.Event | None = None  # when set, each turn waits for it before speaking
    ended: int = 0  # times told the call is over

    async def turn(self, text: str) -> AsyncIterator[TurnEvent]:
        self.turns.append(text)
        try:
            if self.gate is not None:
                await self.gate.wait()
            said = []
            for item in self.script(text):
                await asyncio.sleep(0)
                if isinstance(item, str):
                    for word in item.split(" "):
                        said.append(word)
                        yield TextDelta(word + " ")
                else:
                    yield item
            yield TurnDone(" ".join(said))
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise

    def record_heard(self, text: str, interrupted: bool = True) -> None:
        self.heard.append((text, interrupted))

    def add_assistant_message(self, text: str) -> None:
        self.assistant.append(text)

    def end(self) -> None:
        self.ended += 1


@dataclass
class Sent:
    at: float
    kind: str
    payload: bytes | str = b""


class RecordingSink:
    def __init__(self, clock: VirtualClock):
        self.clock = clock
        self.sent: list[Sent] = []

    async def play(self, mulaw_frame: bytes) -> None:
        self.sent.append(Sent(self.clock.now(), "play", mulaw_frame))

    async def checkpoint(self, name: str) -> None:
        self.sent.append(Sent(self.clock.now(), "checkpoint", name))

    async def clear(self) -> None:
        self.sent.append(Sent(self.clock.now(), "clear"))

    def plays(self, after: float = -1.0, before: float = 1e9) -> list[Sent]:
        return [s for s in self.sent if s.kind == "play" and after <= s.at < before]

    def kinds(self) -> list[str]:
        return [s.kind for s in self.sent]


class FakeControl:
    def __init__(self) -> None:
        self.hangups = 0
        self.transfers: list[str] = []

    async def hangup(self) -> None:
        self.hangups += 1

    async def transfer(self, number: str) -> None:
        self.transfers.append(number)


@dataclass
class Harness:
    session: CallSession
    clock: VirtualClock
    sink: RecordingSink
    brain: ScriptedBrain
    asr: ScriptedAsr
    tts: ScriptedTts
    control: FakeControl
    recorder: MemoryRecorder
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.session.run())
        await self.clock.settle()

    async def feed(self, pcm: Int16Array) -> None:
        """Send caller audio at real (virtual) time, one 20 ms frame at a time."""
        for frame in frames(pcm):
            self.session.feed_media(frame)
            await self.clock.advance(0.020)

    async def silence(self, ms: float) -> None:
        await self.feed(quiet(ms))

    async def stop(self) -> None:
        self.session.hangup("caller_hangup")
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


def make_harness(
    *,
    welcome: str = "",
    brain: ScriptedBrain | None = None,
    asr_script: Callable[[float], str] = lambda s: "hello there",
    call_timeout_s: float = 0.0,
    **config: Any,
) -> Harness:
    clock = VirtualClock(start=100.0)
    sink = RecordingSink(clock)
    brain = brain or ScriptedBrain()
    asr = ScriptedAsr(asr_script)
    tts = ScriptedTts()
    control = FakeControl()
    recorder = MemoryRecorder()
    cfg = SessionConfig(welcome_message=welcome, call_timeout_s=call_timeout_s, **config)
    session = CallSession(
        CallInfo("call-1", "acct", "agent"), cfg, vad=EnergyVad(), asr=asr, tts=tts, brain=brain,
        sink=sink, control=control, recorder=recorder, clock=clock,
    )  # fmt: skip
    return Harness(session, clock, sink, brain, asr, tts, control, recorder)


@dataclass
class SpeculativeBrain(ScriptedBrain):
    """A brain with a history that can be snapshotted and restored, so the session may answer
    speculatively. ``dispatched`` lists functions whose call went past ``FunctionCallStarted``."""

    history: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)
    restores: int = 0

    async def turn(self, text: str) -> AsyncIterator[TurnEvent]:
        self.history.append(f"user: {text}")
        async for event in super().turn(text):
            if isinstance(event, TurnDone):
                self.history.append(f"agent: {event.text}")
            yield event
            if isinstance(event, FunctionCallStarted):
                self.dispatched.append(event.name)  # resumed after the start event: dispatching

    def snapshot(self) -> object:
        return list(self.history)

    def restore(self, state: object) -> None:
        assert isinstance(state, list)
        self.restores += 1
        self.history = list(state)
