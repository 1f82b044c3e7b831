"""Paced playout of the agent's audio: 20 ms µ-law frames sent at real time with a small lead.

Sending the whole reply at once would fill Plivo's buffer and leave nothing to pause. Keeping only
``lead_ms`` of audio ahead of the caller's ear means a pause takes effect within that lead, a resume
continues at the exact frame, and a clear loses only what was really never heard. The playout also
counts, per clause, how many frames the caller has heard: frames whose estimated play time has passed,
confirmed by ``playedStream`` for each checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from .clock import Clock

log = logging.getLogger(__name__)

FRAME_BYTES = 160  # 20 ms of 8 kHz µ-law
FRAME_S = 0.020
MULAW_SILENCE = b"\xff"


class AudioSink(Protocol):
    """Where frames go: the Plivo websocket in production, a recorder in tests."""

    async def play(self, mulaw: bytes) -> None: ...

    async def checkpoint(self, name: str) -> None: ...

    async def clear(self) -> None: ...


@dataclass(eq=False)
class Segment:
    """One clause of one reply, as the playout sees it."""

    reply_id: int
    text: str
    frames_total: int = 0
    complete: bool = False
    frames_sent: int = 0
    frames_heard: int = 0
    dropped: bool = False
    first_sent_at: float | None = None
    _remainder: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def fully_heard(self) -> bool:
        return self.complete and not self.dropped and self.frames_heard >= self.frames_total


@dataclass(frozen=True)
class _Mark:
    name: str


def heard_text(segments: list[Segment]) -> str:
    """The words the caller heard: whole clauses, then the heard fraction of the clause cut off."""
    parts: list[str] = []
    for seg in segments:
        if seg.fully_heard:
            parts.append(seg.text)
            continue
        if seg.frames_heard > 0 and seg.frames_total > 0:
            words = seg.text.split()
            n = math.floor(len(words) * min(1.0, seg.frames_heard / seg.frames_total))
            if n > 0:
                parts.append(" ".join(words[:n]))
        break
    return " ".join(parts)


class Playout:
    def __init__(
        self,
        sink: AudioSink,
        clock: Clock,
        *,
        lead_ms: float = 160.0,
        max_queued_s: float = 20.0,
    ):
        self.sink = sink
        self.clock = clock
        self.lead_s = max(FRAME_S, lead_ms / 1000.0)
        self.max_queued = max(1, int(max_queued_s / FRAME_S))
        self._queue: deque[tuple[Segment, bytes] | _Mark] = deque()
        self._queued_frames = 0
        # Frames sent whose playing is not yet confirmed or estimated: (play end time, segment).
        self._in_flight: deque[tuple[float, Segment]] = deque()
        self._marks: deque[tuple[str, int]] = deque(maxlen=256)  # checkpoint name, frames sent before it
        self._sent_total = 0
        self._play_end = 0.0  # estimated clock time the caller finishes hearing what was sent
        self.paused = False
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._checkpoint_seq = 0
        self.frames_sent = 0

    # -- producer side -----------------------------------------------------------------------
    def begin(self, reply_id: int, text: str) -> Segment:
        return Segment(reply_id, text)

    async def push(self, seg: Segment, mulaw: bytes) -> None:
        """Queue audio of a segment, waiting while the queue is full (backpressure on TTS)."""
        seg._remainder.extend(mulaw)
        while len(seg._remainder) >= FRAME_BYTES:
            await self._wait_for_space()
            if seg.dropped:
                seg._remainder.clear()
                return
            frame = bytes(seg._remainder[:FRAME_BYTES])
            del seg._remainder[:FRAME_BYTES]
            self._queue.append((seg, frame))
            self._queued_frames += 1
            seg.frames_total += 1
            self._wake.set()

    async def end(self, seg: Segment) -> None:
        """The segment is complete: pad its last frame with silence and follow it by a checkpoint."""
        if seg._remainder and not seg.dropped:
            pad = MULAW_SILENCE * (FRAME_BYTES - len(seg._remainder))
            await self.push(seg, pad)
        seg.complete = True
        if not seg.dropped:
            self._checkpoint_seq += 1
            self._queue.append(_Mark(f"r{seg.reply_id}-c{self._checkpoint_seq}"))
            self._wake.set()

    async def _wait_for_space(self) -> None:
        while self._queued_frames >= self.max_queued:
            self._space.clear()
            await self._space.wait()

    # -- control side (synchronous: never waits behind audio) ---------------------------------
    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._wake.set()

    async def clear(self) -> None:
        """Drop everything not yet heard and tell Plivo to empty its buffer. The speaking state is
        reset here, not on a checkpoint: after clearAudio pending checkpoints never come back."""
        now = self.clock.now()
        self._account(now)
        for _, seg in self._in_flight:
            seg.dropped = True
        self._in_flight.clear()
        while self._queue:
            item = self._queue.popleft()
            if not isinstance(item, _Mark):
                item[0].dropped = True
        self._queued_frames = 0
        self._marks.clear()
        self._play_end = now
        self.paused = False
        self._space.set()
        await self.sink.clear()

    def on_played(self, name: str) -> None:
        """``playedStream``: every frame sent before checkpoint ``name`` has been heard."""
        while self._marks:
            mark, sent_before = self._marks.popleft()
            if mark == name:
                while self._in_flight and self._sent_total - len(self._in_flight) < sent_before:
                    _, seg = self._in_flight.popleft()
                    seg.frames_heard += 1
                return

    # -- state ------------------------------------------------------------------------------
    @property
    def queued_frames(self) -> int:
        return self._queued_frames

    def speaking(self) -> bool:
        """Audio still queued, or sent and (by the clock) not yet finished playing."""
        return self._queued_frames > 0 or self.clock.now() < self._play_end

    def _account(self, now: float) -> None:
        while self._in_flight and self._in_flight[0][0] <= now + 1e-9:
            _, seg = self._in_flight.popleft()
            seg.frames_heard += 1

    def refresh(self) -> None:
        self._account(self.clock.now())

    async def drain(self) -> None:
        """Wait until everything queued has been sent and (by the clock) played."""
        while True:
            now = self.clock.now()
            if self._queued_frames == 0 and not any(isinstance(i, _Mark) for i in self._queue):
                if now >= self._play_end:
                    self._account(now)
                    return
                await self.clock.sleep_until(self._play_end)
            else:
                await self.clock.sleep_until(now + FRAME_S)

    # -- the pacing loop ----------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            self._account(self.clock.now())
            if self.paused or not self._queue:
                self._wake.clear()
                if self.paused or not self._queue:
                    await self._wait_wake_or_tick()
                    continue
            item = self._queue[0]
            if isinstance(item, _Mark):
                self._queue.popleft()
                self._marks.append((item.name, self._sent_total))
                await self.sink.checkpoint(item.name)
                continue
            now = self.clock.now()
            if self._play_end - now >= self.lead_s:
                # Enough is buffered at the caller's end: send the next frame when it is due.
                await self.clock.sleep_until(self._play_end - self.lead_s + 1e-6)
                continue
            self._queue.popleft()
            self._queued_frames -= 1
            self._space.set()
            seg, frame = item
            if seg.first_sent_at is None:
                seg.first_sent_at = now
            seg.frames_sent += 1
            start = max(now, self._play_end)
            self._play_end = start + FRAME_S
            self._in_flight.append((self._play_end, seg))
            self._sent_total += 1
            self.frames_sent += 1
            await self.sink.play(frame)

    async def _wait_wake_or_tick(self) -> None:
        # While idle, wake at least when in-flight frames finish so heard counts stay current.
        if self._in_flight:
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                sleeper = asyncio.ensure_future(self.clock.sleep_until(self._in_flight[-1][0]))
                try:
                    await asyncio.wait({wake, sleeper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
            finally:
                wake.cancel()
        else:
            await self._wake.wait()
