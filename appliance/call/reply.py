"""A reply is an object: what the agent is saying in one turn, how far it got, what was heard.

``Voice`` turns a clause into paced audio: TTS (22,050 Hz) → stateful resample to 8 kHz → µ-law →
playout segment with a checkpoint at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..audio import mulaw
from ..audio.resample import StreamResampler
from ..engines.priority import CPU
from ..engines.types import TtsEngine
from .playout import FRAME_S, Playout, Segment, heard_text

ReplyKind = Literal["welcome", "answer", "dtmf", "goodbye"]

# A later clause's synthesis waits while another call's latency-critical work runs (a transcription,
# a first clause being generated or synthesized), as long as this much of its reply's audio is still
# queued ahead of the caller, and for at most DEFER_MAX_S: on a few cores it would slow that work.
# With that much ahead, and time to synthesize the clause again (Piper here: ~5 ms a character
# beside other work), it may also be abandoned mid-way when such work starts, and redone after it.
DEFER_AHEAD_S = 1.0
REDO_S_PER_CHAR = 0.005
DEFER_MAX_S = 1.0
DEFER_POLL_S = 0.02


@dataclass
class TurnTimings:
    """Clock times of each stage of one caller turn → agent reply."""

    onset: float | None = None
    last_voiced: float | None = None
    decided: float | None = None
    transcript: float | None = None
    first_token: float | None = None
    first_clause: float | None = None
    asr_ms: float | None = None

    def as_ms(self, first_audio: float | None) -> dict[str, Any]:
        if self.last_voiced is None:
            return {}
        base = self.last_voiced
        out: dict[str, Any] = {}
        for name, value in (
            ("end_of_turn_ms", self.decided),
            ("transcript_ms", self.transcript),
            ("first_token_ms", self.first_token),
            ("first_clause_ms", self.first_clause),
            ("first_audio_ms", first_audio),
        ):
            out[name] = None if value is None else round((value - base) * 1000.0, 1)
        if self.asr_ms is not None:
            out["asr_ms"] = round(self.asr_ms, 1)
        return out


@dataclass(eq=False)
class Reply:
    id: int
    kind: ReplyKind
    input_text: str | None = None  # what the brain was asked (None for fixed text)
    fixed_text: str | None = None
    timings: TurnTimings = field(default_factory=TurnTimings)
    segments: list[Segment] = field(default_factory=list)
    clauses: list[str] = field(default_factory=list)
    end_call: bool = False
    transfer_to: str | None = None
    started_at: float = 0.0
    task: asyncio.Task[None] | None = None
    finalized: bool = False
    got_text: bool = False
    brain_started: bool = False  # the brain has the caller's words in its history
    # Set when the reply may be heard. A speculative reply (started at a pause, before the end of
    # the turn was certain) generates and synthesizes behind a closed gate; it opens on commit.
    gate: asyncio.Event | None = None

    @property
    def held(self) -> bool:
        return self.gate is not None and not self.gate.is_set()

    async def wait_gate(self) -> None:
        if self.gate is not None:
            await self.gate.wait()

    @property
    def text(self) -> str:
        return " ".join(self.clauses)

    @property
    def heard(self) -> str:
        return heard_text(self.segments)

    @property
    def audio_sent(self) -> bool:
        return any(seg.frames_sent for seg in self.segments)

    @property
    def first_audio(self) -> float | None:
        times = [s.first_sent_at for s in self.segments if s.first_sent_at is not None]
        return min(times) if times else None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


class Voice:
    """Speaks clauses into the playout, one segment per clause."""

    def __init__(self, tts: TtsEngine, playout: Playout, *, speed: float = 1.0, out_rate: int = 8000):
        self.tts = tts
        self.playout = playout
        self.speed = speed
        self.out_rate = out_rate

    async def speak(self, reply: Reply, clause: str) -> Segment:
        """Synthesize ``clause`` and queue it for playout as it is produced. While the reply is
        held (speculative), the audio is kept here and queued the moment it is committed."""
        resampler = StreamResampler(self.tts.sample_rate, self.out_rate, dtype=np.int16)
        # The first clause is what the caller waits for in silence: it beats background work.
        urgent = not reply.segments and not reply.clauses[:-1]
        seg: Segment | None = None
        held: list[bytes] = []

        async def emit(data: bytes) -> None:
            nonlocal seg
            if seg is None:
                if reply.held:
                    held.append(data)
                    return
                seg = self.playout.begin(reply.id, clause)
                reply.segments.append(seg)
                for chunk in held:
                    await self.playout.push(seg, chunk)
                held.clear()
            await self.playout.push(seg, data)

        abandonable = False
        if not urgent:
            await self._defer_to_latency_critical_work()
            # Enough audio ahead of the caller to redo it after another call's urgent work.
            ahead_s = self.playout.queued_frames * FRAME_S
            abandonable = ahead_s > DEFER_AHEAD_S + len(clause) * REDO_S_PER_CHAR
        # aclosing: a cancelled reply must stop the synthesizer's generator now, not at GC time.
        synthesis = self.tts.synthesize(clause, speed=self.speed, urgent=urgent, abandonable=abandonable)
        async with contextlib.aclosing(synthesis) as chunks:  # type: ignore[type-var]
            async for pcm in chunks:
                out = resampler.process(np.asarray(pcm, dtype=np.int16))
                if out.size:
                    await emit(mulaw.encode(out))
        tail = resampler.flush()
        if tail.size:
            await emit(mulaw.encode(tail.astype(np.int16)))
        if seg is None:
            await reply.wait_gate()
            seg = self.playout.begin(reply.id, clause)
            reply.segments.append(seg)
            for chunk in held:
                await self.playout.push(seg, chunk)
        await self.playout.end(seg)
        return seg

    async def _defer_to_latency_critical_work(self) -> None:
        waited = 0.0
        while (
            waited < DEFER_MAX_S
            and CPU.latency_critical_now
            and self.playout.queued_frames * FRAME_S > DEFER_AHEAD_S
        ):
            await asyncio.sleep(DEFER_POLL_S)
            waited += DEFER_POLL_S
