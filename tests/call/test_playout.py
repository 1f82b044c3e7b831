"""Paced playout on a virtual clock: pacing with a lead, pause/resume/clear, heard accounting."""

from __future__ import annotations

import asyncio

import pytest

from appliance.call.clock import VirtualClock
from appliance.call.playout import FRAME_BYTES, Playout, Segment, heard_text

from .fakes import RecordingSink


@pytest.fixture
async def rig():
    clock = VirtualClock()
    sink = RecordingSink(clock)
    playout = Playout(sink, clock, lead_ms=100)
    task = asyncio.create_task(playout.run())
    yield clock, sink, playout
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def queue(playout: Playout, text: str, n_frames: int, reply_id: int = 1) -> Segment:
    seg = playout.begin(reply_id, text)
    await playout.push(seg, b"\x00" * (FRAME_BYTES * n_frames))
    await playout.end(seg)
    return seg


async def test_frames_are_paced_at_real_time_with_a_small_lead(rig) -> None:
    clock, sink, playout = rig
    await queue(playout, "one two three four five", 100)  # 2 s of audio
    await clock.settle()
    # At once: only the lead (100 ms = 5 frames), not the whole reply.
    assert len(sink.plays()) == 5
    await clock.advance(1.0)
    assert 54 <= len(sink.plays()) <= 56
    await clock.advance(1.5)
    assert len(sink.plays()) == 100
    assert sink.kinds()[-1] == "checkpoint"
    # Never more than the lead ahead of real time.
    for i, s in enumerate(sink.plays()):
        assert i * 0.020 - s.at <= 0.100 + 1e-6


async def test_pause_stops_within_the_lead_and_resume_continues_at_the_same_frame(rig) -> None:
    clock, sink, playout = rig
    seg = await queue(playout, "a b c d e f g h i j", 100)
    await clock.advance(0.5)
    playout.pause()
    sent_at_pause = len(sink.plays())
    await clock.advance(1.0)
    assert len(sink.plays()) == sent_at_pause
    assert playout.speaking()  # still holding the rest
    playout.resume()
    await clock.advance(3.0)
    assert len(sink.plays()) == 100
    assert b"".join(s.payload for s in sink.plays()) == b"\x00" * (FRAME_BYTES * 100)
    assert seg.frames_heard == 100 and seg.fully_heard


async def test_clear_drops_the_rest_and_counts_only_heard_frames(rig) -> None:
    clock, sink, playout = rig
    first = await queue(playout, "one two three four", 40)
    second = await queue(playout, "five six seven eight", 40)
    await clock.advance(1.1)  # 55 frames played, about 5 more in flight
    await playout.clear()
    assert sink.kinds()[-1] == "clear"
    assert not playout.speaking()  # reset by the clear itself, not by a checkpoint
    assert first.fully_heard
    assert 14 <= second.frames_heard <= 16 and second.dropped
    assert heard_text([first, second]) == "one two three four five"
    await clock.advance(1.0)
    assert sink.kinds()[-1] == "clear"  # nothing more is sent after a clear


async def test_played_checkpoint_confirms_heard_frames(rig) -> None:
    clock, sink, playout = rig
    seg = await queue(playout, "hi", 5)
    await clock.settle()
    names = [s.payload for s in sink.sent if s.kind == "checkpoint"]
    assert len(names) == 1 and seg.frames_heard == 0
    playout.on_played(str(names[0]))
    assert seg.frames_heard == 5


async def test_drain_waits_until_the_audio_has_played(rig) -> None:
    clock, sink, playout = rig
    await queue(playout, "x", 50)  # 1 s
    drained = asyncio.create_task(playout.drain())
    await clock.advance(0.8)
    assert not drained.done()
    await clock.advance(0.4)
    assert drained.done()


async def test_producer_waits_when_the_queue_is_full() -> None:
    clock = VirtualClock()
    sink = RecordingSink(clock)
    playout = Playout(sink, clock, lead_ms=40, max_queued_s=0.2)  # 10 frames
    seg = playout.begin(1, "long")
    pushing = asyncio.create_task(playout.push(seg, b"\x00" * (FRAME_BYTES * 30)))
    await clock.settle()
    assert not pushing.done() and playout.queued_frames == 10
    runner = asyncio.create_task(playout.run())
    await clock.advance(1.0)
    assert pushing.done()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


def test_heard_text_takes_the_heard_fraction_of_the_cut_clause() -> None:
    a = Segment(1, "the quick brown fox", frames_total=10, complete=True, frames_heard=10)
    b = Segment(1, "jumps over the lazy dog", frames_total=10, complete=True, frames_heard=4)
    c = Segment(1, "never heard", frames_total=10, complete=True)
    assert heard_text([a, b, c]) == "the quick brown fox jumps over"
    assert heard_text([c]) == ""
