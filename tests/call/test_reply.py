"""Voice: a later clause's synthesis waits, bounded, while other latency-critical work runs, and may
be abandoned for it only while enough of the reply's audio is queued ahead."""

from __future__ import annotations

import asyncio

from appliance.call.clock import VirtualClock
from appliance.call.playout import FRAME_BYTES, FRAME_S, Playout
from appliance.call.reply import DEFER_AHEAD_S, DEFER_MAX_S, REDO_S_PER_CHAR, Reply, Voice
from appliance.engines.priority import CPU

from .fakes import RecordingSink, ScriptedTts


async def _reply_with_audio_queued(playout: Playout, seconds: float) -> Reply:
    reply = Reply(1, "answer", input_text="hi")
    reply.clauses.append("First clause.")
    seg = playout.begin(reply.id, "First clause.")
    reply.segments.append(seg)
    await playout.push(seg, b"\x00" * int(FRAME_BYTES * seconds / 0.02))
    await playout.end(seg)
    reply.clauses.append("and the second one.")
    return reply


async def test_a_later_clause_waits_while_urgent_work_runs_and_audio_is_queued_ahead() -> None:
    playout = Playout(RecordingSink(VirtualClock()), VirtualClock(), lead_ms=100, max_queued_s=30)
    tts = ScriptedTts()
    voice = Voice(tts, playout)  # type: ignore[arg-type]
    reply = await _reply_with_audio_queued(playout, 3.0)
    with CPU.urgent():  # e.g. another call's transcription
        speaking = asyncio.create_task(voice.speak(reply, "and the second one."))
        await asyncio.sleep(0.2)
        assert tts.spoken == []  # put off: three seconds of this reply are still to be heard
    await asyncio.wait_for(speaking, 1.0)
    assert tts.spoken == ["and the second one."] and tts.urgent == [False]
    # With that much ahead, it may also be stopped for urgent work mid-way and redone after it...
    assert tts.abandonable == [True]
    # ...unless redoing it could outlast the audio ahead (a long clause takes long to synthesize).
    long_clause = "and then a very long clause " * 20
    ahead_s = playout.queued_frames * FRAME_S
    assert DEFER_AHEAD_S + len("and the second one.") * REDO_S_PER_CHAR < ahead_s
    assert DEFER_AHEAD_S + len(long_clause) * REDO_S_PER_CHAR > ahead_s
    await asyncio.wait_for(voice.speak(reply, long_clause), 1.0)
    assert tts.abandonable == [True, False]


async def test_no_wait_when_little_audio_is_ahead_or_nothing_urgent_and_never_unbounded() -> None:
    playout = Playout(RecordingSink(VirtualClock()), VirtualClock(), lead_ms=100, max_queued_s=30)
    tts = ScriptedTts()
    voice = Voice(tts, playout)  # type: ignore[arg-type]
    short = await _reply_with_audio_queued(playout, 0.4)
    with CPU.urgent():
        await asyncio.wait_for(voice.speak(short, "and the second one."), 0.15)  # would starve
    assert len(tts.spoken) == 1
    assert tts.abandonable == [False]  # a redo could leave the caller in silence
    long = await _reply_with_audio_queued(playout, 5.0)
    await asyncio.wait_for(voice.speak(long, "and the second one."), 0.15)  # nothing urgent
    assert len(tts.spoken) == 2
    loop = asyncio.get_running_loop()
    with CPU.urgent():  # urgent work that never ends: the clause goes after DEFER_MAX_S
        started = loop.time()
        await asyncio.wait_for(voice.speak(long, "and the second one."), DEFER_MAX_S + 1.0)
        assert DEFER_MAX_S - 0.1 <= loop.time() - started
    assert len(tts.spoken) == 3
