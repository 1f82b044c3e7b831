"""The call session driven by a scripted timeline on a virtual clock, with scripted engines."""

from __future__ import annotations

import asyncio

from appliance.call.session import is_backchannel
from appliance.conversation.types import EndCall, FunctionCallFinished, FunctionCallStarted, Transfer
from appliance.engines.priority import CPU

from .fakes import ScriptedBrain, SpeculativeBrain, make_harness, tone

LONG_ANSWER = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen."


async def test_welcome_plays_first_and_is_recorded() -> None:
    h = make_harness(welcome="Hello, this is the clinic.")
    await h.start()
    await h.clock.advance(0.05)
    assert h.sink.plays(), "welcome audio starts at once"
    await h.clock.advance(1.0)
    assert h.tts.spoken == ["Hello, this is the clinic."]
    assert h.brain.assistant == ["Hello, this is the clinic."]
    (turn,) = h.recorder.turns
    assert turn.role == "agent" and not turn.interrupted and turn.heard_text == turn.text
    await h.stop()


async def test_empty_welcome_waits_for_the_caller() -> None:
    h = make_harness(welcome="   ")
    await h.start()
    await h.silence(1000)
    assert h.sink.sent == [] and h.brain.turns == []
    await h.stop()


async def test_a_caller_turn_is_transcribed_answered_and_timed() -> None:
    h = make_harness(asr_script=lambda s: "What are your hours")
    await h.start()
    await h.feed(tone(800))
    voiced_end = h.clock.now()
    await h.silence(2000)
    assert h.brain.turns == ["What are your hours"]
    assert h.tts.spoken == ["You said What are your hours."]
    first_play = h.sink.plays()[0].at
    # The turn ends ~600 ms after the last voiced frame, and audio follows at once.
    assert 0.55 <= first_play - voiced_end <= 0.75
    await h.silence(1000)
    caller, agent = h.recorder.turns
    assert caller.role == "caller" and caller.text == "What are your hours"
    t = agent.timings
    assert set(t) >= {
        "end_of_turn_ms",
        "transcript_ms",
        "first_token_ms",
        "first_clause_ms",
        "first_audio_ms",
    }
    assert 600 <= t["end_of_turn_ms"] <= t["transcript_ms"] <= t["first_token_ms"] <= t["first_clause_ms"]
    assert t["first_clause_ms"] <= t["first_audio_ms"] < 800
    await h.stop()


async def test_utterances_are_answered_in_order_even_when_asr_is_slow() -> None:
    h = make_harness()
    texts = iter(["First question", "Second question"])
    h.asr.script = lambda s: next(texts, "extra")
    h.asr.hold = asyncio.Event()
    await h.start()
    await h.feed(tone(600))
    await h.silence(800)  # turn 1 ended, its transcription is stuck
    await h.feed(tone(600))
    await h.silence(800)  # turn 2 ended too
    assert h.brain.turns == []
    h.asr.hold.set()
    await h.silence(2000)
    # Nothing is lost: the brain is asked both, in order (together, if the first reply was cut
    # before the brain saw it).
    asked = " ".join(h.brain.turns)
    assert asked.index("First question") < asked.index("Second question")
    callers = [t.text for t in h.recorder.turns if t.role == "caller"]
    assert callers == ["First question", "Second question"]
    await h.stop()


async def test_clicks_and_coughs_are_not_turns() -> None:
    h = make_harness()
    await h.start()
    for _ in range(3):
        await h.feed(tone(100))
        await h.silence(900)
    assert h.asr.calls == [] and h.brain.turns == []
    await h.stop()


async def _agent_talking(h, answer: str = LONG_ANSWER) -> None:
    h.brain.script = lambda text: [answer]
    await h.feed(tone(600))
    await h.silence(1000)
    assert h.sink.plays(), "agent is talking"


async def test_barge_in_pauses_fast_then_clears_and_keeps_only_heard_words() -> None:
    h = make_harness(asr_script=lambda s: "Wait, I have another question")
    await h.start()
    await _agent_talking(h)
    onset = h.clock.now()
    await h.feed(tone(200))
    # Paused: after the VAD start windows and the lead, nothing new goes out.
    last_play = h.sink.plays()[-1].at
    assert last_play - onset <= 0.1
    n = len(h.sink.plays())
    await h.feed(tone(1300))
    assert len(h.sink.plays()) == n
    assert "clear" in h.sink.kinds()
    await h.silence(1500)
    agent_turns = [t for t in h.recorder.turns if t.role == "agent"]
    first = agent_turns[0]
    assert first.interrupted
    assert first.heard_text and LONG_ANSWER.startswith(first.heard_text)
    assert len(first.heard_text.split()) < len(LONG_ANSWER.split())
    assert h.brain.heard[0] == (first.heard_text, True)
    # The barge-in's words are the next turn.
    assert h.brain.turns[-1] == "Wait, I have another question"
    assert h.session.barge_ins == 1
    await h.stop()


async def test_a_noise_burst_pauses_then_resumes_without_losing_audio() -> None:
    h = make_harness()
    await h.start()
    await _agent_talking(h)
    await h.feed(tone(120))  # a clap
    await h.silence(4000)
    assert "clear" not in h.sink.kinds()
    assert h.session.resumes == 1 and h.session.barge_ins == 0
    agent = [t for t in h.recorder.turns if t.role == "agent"]
    assert agent and not agent[0].interrupted and agent[0].heard_text == LONG_ANSWER
    # Every frame of the answer was sent: 15 words x 100 ms = 75 frames (+ padding).
    assert len(h.sink.plays()) >= 75
    await h.stop()


async def test_a_single_voiced_window_holds_the_agent_briefly_then_it_carries_on() -> None:
    h = make_harness()
    await h.start()
    await _agent_talking(h)
    blip_at = h.clock.now()
    await h.feed(tone(40))  # one VAD window: not speech, but it may be the start of it
    await h.silence(60)
    held = h.sink.plays(after=blip_at + 0.03, before=blip_at + 0.1)
    assert held == [], "paused within a frame of the first voiced window"
    await h.silence(3000)
    assert h.sink.plays(after=blip_at + 0.2), "and resumed when no speech followed"
    assert "clear" not in h.sink.kinds() and h.session.barge_ins == 0
    await h.stop()


async def test_a_backchannel_resumes_the_answer() -> None:
    h = make_harness()
    h.asr.script = lambda s: "Hello" if len(h.asr.calls) == 1 else "Mm-hmm."
    await h.start()
    h.brain.script = lambda text: [LONG_ANSWER]
    await h.feed(tone(1100))
    await h.silence(1000)
    await h.feed(tone(400))
    await h.silence(3000)
    assert "clear" not in h.sink.kinds()
    assert h.brain.turns == ["Hello"]
    assert h.session.resumes == 1
    await h.stop()


async def test_short_real_words_interrupt_once_transcribed() -> None:
    h = make_harness()
    h.asr.script = lambda s: "Hello" if len(h.asr.calls) == 1 else "Stop"
    await h.start()
    h.brain.script = lambda text: [LONG_ANSWER]
    await h.feed(tone(1100))
    await h.silence(1000)
    await h.feed(tone(400))
    await h.silence(1500)
    assert "clear" in h.sink.kinds()
    assert h.brain.turns == ["Hello", "Stop"]
    await h.stop()


async def test_quiet_audio_never_barges_in_even_if_vad_says_speech() -> None:
    h = make_harness()
    await h.start()
    await _agent_talking(h)
    # Echo-level residue: the gate stops it before the VAD/turn detector.
    h.session.config = h.session.config.__class__(min_speech_rms=10_000)
    await h.feed(tone(1500))
    await h.silence(2000)
    assert "clear" not in h.sink.kinds() and h.session.barge_ins == 0
    await h.stop()


async def test_dtmf_reaches_the_brain_as_text() -> None:
    h = make_harness()
    await h.start()
    h.session.feed_dtmf("5")
    await h.clock.advance(0.5)
    assert h.brain.turns == ["The caller pressed 5."]
    await h.stop()


async def test_end_call_says_goodbye_waits_for_playout_then_hangs_up() -> None:
    brain = ScriptedBrain(script=lambda text: ["Thanks for calling, goodbye.", EndCall()])
    h = make_harness(brain=brain)
    await h.start()
    await h.feed(tone(600))
    await h.silence(700)
    assert h.control.hangups == 0  # still saying goodbye
    await h.clock.advance(2.0)
    assert h.control.hangups == 1
    assert h.task is not None and h.task.done()
    plays = h.sink.plays()
    assert len(plays) >= 20  # 4 words of goodbye were played before hanging up
    finished = h.recorder.finished
    assert finished is not None and finished.hangup_cause == "agent_hangup"
    assert [f.name for f in h.recorder.function_calls] == ["end_call"]


async def test_end_call_without_text_still_says_goodbye() -> None:
    h = make_harness(brain=ScriptedBrain(script=lambda text: [EndCall()]))
    await h.start()
    await h.feed(tone(600))
    await h.silence(700)
    await h.clock.advance(2.0)
    assert h.tts.spoken == ["Goodbye."] and h.control.hangups == 1


async def test_transfer_goes_through_call_control() -> None:
    h = make_harness(
        brain=ScriptedBrain(script=lambda text: ["Transferring you now.", Transfer("+15550001")])
    )
    await h.start()
    await h.feed(tone(600))
    await h.silence(700)
    await h.clock.advance(3.0)
    assert h.control.transfers == ["+15550001"]
    finished = h.recorder.finished
    assert finished is not None and finished.status == "transferred"


async def test_function_calls_are_recorded() -> None:
    brain = ScriptedBrain(
        script=lambda text: [
            FunctionCallStarted("book", {"day": "monday"}),
            FunctionCallFinished("book", {"day": "monday"}, {"ok": True}, True),
            "Booked for Monday.",
        ]
    )
    h = make_harness(brain=brain)
    await h.start()
    await h.feed(tone(600))
    await h.silence(2000)
    (fc,) = h.recorder.function_calls
    assert fc.name == "book" and fc.arguments == {"day": "monday"} and fc.result == {"ok": True}
    await h.stop()


async def test_call_timeout_says_goodbye_and_hangs_up() -> None:
    h = make_harness(call_timeout_s=5.0)
    await h.start()
    await _agent_talking(h, LONG_ANSWER * 4)
    await h.clock.advance(3.5)
    assert h.control.hangups == 0
    await h.clock.advance(10.0)
    assert h.control.hangups == 1
    assert "reached the time limit for this call. Goodbye." in " ".join(h.tts.spoken[-2:])
    assert "clear" in h.sink.kinds()  # the answer in progress was cut for the goodbye
    finished = h.recorder.finished
    assert finished is not None and finished.hangup_cause == "call_timeout"


async def test_hangup_cancels_everything_and_leaves_no_task() -> None:
    before = set(asyncio.all_tasks())
    gate = asyncio.Event()
    h = make_harness(welcome="Hi.", brain=ScriptedBrain(gate=gate))
    await h.start()
    await h.feed(tone(600))
    await h.silence(800)  # the brain is now stuck waiting
    assert h.brain.turns
    assert h.brain.ended == 0
    await h.stop()
    await h.clock.settle()
    assert h.brain.cancelled == 1
    assert h.brain.ended == 1  # told once the call is over (it may give up its prompt cache)
    assert set(asyncio.all_tasks()) - before <= {asyncio.current_task()}
    finished = h.recorder.finished
    assert finished is not None and finished.hangup_cause == "caller_hangup"
    # Audio after the hang-up is ignored, not queued.
    h.session.feed_media(b"\xff" * 160)
    assert h.session._inbound.qsize() == 0


async def test_hangup_mid_answer_records_heard_part() -> None:
    h = make_harness()
    await h.start()
    await _agent_talking(h)
    await h.clock.advance(0.5)
    await h.stop()
    agent = [t for t in h.recorder.turns if t.role == "agent"]
    assert agent[-1].interrupted and LONG_ANSWER.startswith(agent[-1].heard_text or "")


def test_backchannel_words() -> None:
    assert is_backchannel("Mm-hmm.") and is_backchannel("okay, yeah") and is_backchannel("")
    assert not is_backchannel("wait") and not is_backchannel("okay but what about Monday")


async def test_a_failing_transcription_loses_the_turn_not_the_call() -> None:
    def broken(seconds: float) -> str:
        raise RuntimeError("decoder crashed")

    h = make_harness(asr_script=broken)
    await h.start()
    await h.feed(tone(600))
    await h.silence(1000)
    assert h.task is not None and not h.task.done()
    assert h.brain.turns == []
    h.session.feed_dtmf("1")
    await h.clock.advance(0.5)
    assert h.brain.turns == ["The caller pressed 1."]
    await h.stop()


# -- speculation and smarter end of turn --------------------------------------------------------


async def test_a_speculative_reply_is_heard_as_soon_as_a_complete_sentence_ends() -> None:
    brain = SpeculativeBrain()
    h = make_harness(brain=brain, asr_script=lambda s: "What are your hours?")
    await h.start()
    await h.feed(tone(800))
    voiced_end = h.clock.now()
    await h.silence(200)
    assert h.sink.plays() == []  # the pause has not come yet
    await h.silence(2000)
    assert brain.turns == ["What are your hours?"]
    assert h.session.speculations == 1 and h.session.speculations_dropped == 0
    # A finished sentence ends the turn after ~380 ms, not 600, and the reply is ready by then.
    first_play = h.sink.plays()[0].at
    assert 0.35 <= first_play - voiced_end <= 0.48
    await h.silence(1000)
    caller, agent = h.recorder.turns
    assert caller.role == "caller" and caller.text == "What are your hours?"
    assert agent.text == "You said What are your hours?." and not agent.interrupted
    assert agent.timings["end_of_turn_ms"] < 450
    assert brain.history == ["user: What are your hours?", "agent: You said What are your hours?."]
    await h.stop()


async def test_the_words_of_a_confirmed_barge_in_are_answered_speculatively_too() -> None:
    brain = SpeculativeBrain()
    h = make_harness(brain=brain, asr_script=lambda s: "Wait, what are your hours?")
    await h.start()
    await _agent_talking(h)
    before = (h.session.speculations, h.session.speculations_committed)
    await h.feed(tone(1300))  # long enough to be confirmed as a barge-in
    assert h.session.barge_ins == 1
    voiced_end = h.clock.now()
    await h.silence(2000)
    assert (h.session.speculations, h.session.speculations_committed) == (before[0] + 1, before[1] + 1)
    assert brain.turns[-1] == "Wait, what are your hours?"
    # Answered at the shortened end of turn of a finished question, not after a fresh transcription.
    answer_plays = [p for p in h.sink.plays() if p.at > voiced_end]
    assert answer_plays and answer_plays[0].at - voiced_end <= 0.48
    # And the session listens afresh: the next words are a normal turn, not part of a barge-in.
    await h.feed(tone(600))
    await h.silence(2000)
    assert brain.turns.count("Wait, what are your hours?") == 3
    assert h.session.barge_ins == 1
    await h.stop()


async def test_talking_on_after_a_pause_drops_the_speculative_reply_unheard() -> None:
    texts = iter(["Cancel my order.", "Cancel my order. No wait, where is it?"])
    brain = SpeculativeBrain(
        script=lambda text: (
            [FunctionCallStarted("cancel_order", {}), "Cancelled."]
            if text == "Cancel my order."
            else ["It is on its way."]
        )
    )
    h = make_harness(brain=brain, asr_script=lambda s: next(texts))
    await h.start()
    await h.feed(tone(700))
    await h.silence(330)  # the pause: speculation starts, and reaches the function call
    assert h.session.speculations == 1
    assert h.sink.plays() == []
    await h.feed(tone(700))  # the caller goes on
    resumed_end = h.clock.now()
    await h.silence(2500)
    assert h.session.speculations_dropped == 1
    assert brain.dispatched == []  # never dispatched before the turn was certain
    assert brain.restores == 1
    assert brain.history == ["user: Cancel my order. No wait, where is it?", "agent: It is on its way."]
    assert all(p.at > resumed_end for p in h.sink.plays())
    assert h.tts.spoken == ["It is on its way."]
    callers = [t.text for t in h.recorder.turns if t.role == "caller"]
    assert callers == ["Cancel my order. No wait, where is it?"]
    assert h.recorder.function_calls == []
    await h.stop()


async def test_a_speculative_function_call_is_dispatched_once_the_turn_is_certain() -> None:
    brain = SpeculativeBrain(
        script=lambda text: [
            FunctionCallStarted("get_hours", {}),
            FunctionCallFinished("get_hours", {}, "9-5", True, None),
            "We open at nine.",
        ]
    )
    h = make_harness(brain=brain, asr_script=lambda s: "When do you open?")
    await h.start()
    await h.feed(tone(700))
    await h.silence(300)
    assert brain.dispatched == []  # held at the call until the silence holds
    await h.silence(1500)
    assert brain.dispatched == ["get_hours"]
    assert [c.name for c in h.recorder.function_calls] == ["get_hours"]
    assert " ".join(h.tts.spoken) == "We open at nine."  # "We open | at nine." with phrase cuts
    await h.stop()


async def test_a_quick_pause_starts_the_reply_only_while_no_other_engine_work_runs() -> None:
    brain = SpeculativeBrain()
    h = make_harness(
        brain=brain, asr_script=lambda s: "What are your hours?", pause_ms=200, quick_pause_ms=120
    )
    await h.start()
    await h.feed(tone(800))
    await h.silence(170)  # past the quick pause (128 ms), before the usual one (224 ms)
    assert len(h.asr.calls) == 1 and h.session.speculations == 1
    await h.silence(1500)
    assert h.session.speculations_committed == 1
    # Another call's synthesis (or transcription) on the cores: the quick pause is passed up.
    await h.feed(tone(800))
    with CPU.working():
        await h.silence(170)
        assert len(h.asr.calls) == 1 and h.session.speculations == 1
        await h.silence(80)  # the usual pause
        assert len(h.asr.calls) == 2 and h.session.speculations == 2
    await h.silence(1500)
    assert h.session.speculations_committed == 2 and h.session.speculations_dropped == 0
    assert brain.turns == ["What are your hours?"] * 2
    await h.stop()


async def test_a_half_read_number_is_not_cut_off_at_the_usual_silence() -> None:
    brain = SpeculativeBrain()
    h = make_harness(brain=brain, asr_script=lambda s: "My order number is 5 5 1", speculate_within_ms=0)
    await h.start()
    await h.feed(tone(900))
    await h.silence(1000)  # longer than the default 600 ms: a plain detector would have answered
    assert brain.turns == [] and h.session.speculations == 0 and h.sink.plays() == []
    await h.silence(1000)
    assert brain.turns == ["My order number is 5 5 1"]
    await h.stop()


async def test_a_long_wait_for_more_words_starts_the_reply_held_back_before_it_ends() -> None:
    """A half-read number waits 1400 ms for the next digits; the reply starts (unheard) once the end
    is 700 ms away, and is heard the moment the silence holds."""
    brain = SpeculativeBrain()
    h = make_harness(brain=brain, asr_script=lambda s: "My order number is 5 5 1")
    await h.start()
    await h.feed(tone(900))
    voiced_end = h.clock.now()
    await h.silence(600)
    assert h.session.speculations == 0 and brain.turns == []  # the end is still 800 ms away
    await h.silence(250)
    assert h.session.speculations == 1 and brain.turns == ["My order number is 5 5 1"]
    assert h.sink.plays() == []  # held back: the caller may read on
    await h.silence(1500)
    assert h.session.speculations_committed == 1 and h.session.speculations_dropped == 0
    first_play = h.sink.plays()[0].at
    assert 1.35 <= first_play - voiced_end <= 1.5  # at the end of the turn, not a reply's time later
    assert brain.history == ["user: My order number is 5 5 1", "agent: You said My order number is 5 5 1."]
    await h.stop()


async def test_reading_on_before_the_held_reply_starts_leaves_nothing_behind() -> None:
    texts = iter(["My order number is 5 5 1", "My order number is 5 5 1 2 3 4."])
    brain = SpeculativeBrain()
    h = make_harness(brain=brain, asr_script=lambda s: next(texts))
    await h.start()
    await h.feed(tone(900))
    await h.silence(500)  # transcribed; its held reply would start at ~700 ms of silence
    await h.feed(tone(600))  # the next digit group comes first
    await h.silence(2000)
    assert h.session.speculations == 1 and h.session.speculations_dropped == 0  # only the last words
    assert brain.turns == ["My order number is 5 5 1 2 3 4."]
    assert brain.restores == 0
    assert [t.text for t in h.recorder.turns if t.role == "caller"] == ["My order number is 5 5 1 2 3 4."]
    await h.stop()


async def test_reading_on_after_the_held_reply_started_drops_it_unheard() -> None:
    texts = iter(["My order number is 5 5 1", "My order number is 5 5 1 2 3 4."])
    brain = SpeculativeBrain()
    h = make_harness(brain=brain, asr_script=lambda s: next(texts))
    await h.start()
    await h.feed(tone(900))
    await h.silence(1000)  # the held reply has started
    assert h.session.speculations == 1 and h.sink.plays() == []
    await h.feed(tone(600))
    resumed_end = h.clock.now()
    await h.silence(2000)
    assert h.session.speculations_dropped == 1 and brain.restores == 1
    whole = "My order number is 5 5 1 2 3 4."
    assert brain.history == [f"user: {whole}", f"agent: You said {whole}."]
    assert all(p.at > resumed_end for p in h.sink.plays())
    await h.stop()


async def test_without_speculation_the_turn_waits_for_the_full_silence() -> None:
    brain = SpeculativeBrain()
    h = make_harness(
        brain=brain, asr_script=lambda s: "What are your hours?", speculative=False, smart_end_of_turn=False
    )
    await h.start()
    await h.feed(tone(800))
    voiced_end = h.clock.now()
    await h.silence(2000)
    assert h.session.speculations == 0
    assert 0.55 <= h.sink.plays()[0].at - voiced_end <= 0.75
    await h.stop()


async def test_only_the_first_clause_of_a_reply_is_synthesized_urgently() -> None:
    brain = ScriptedBrain(script=lambda text: ["First part, here it is.", "Then a second sentence."])
    h = make_harness(brain=brain, asr_script=lambda s: "tell me")
    await h.start()
    await h.feed(tone(700))
    await h.silence(3000)
    assert len(h.tts.spoken) >= 2
    assert h.tts.urgent[0] is True and not any(h.tts.urgent[1:])
    assert h.tts.abandonable[0] is False
    await h.stop()


async def test_the_call_record_counts_committed_and_dropped_speculations() -> None:
    from appliance.call.records import CallFinished

    texts = iter(["Book a table.", "Book a table. For two.", "Thanks."])
    h = make_harness(brain=SpeculativeBrain(), asr_script=lambda s: next(texts, "Thanks."))
    await h.start()
    await h.feed(tone(700))
    await h.silence(300)  # speculation 1
    await h.feed(tone(500))  # ... dropped: the caller goes on
    await h.silence(2500)  # speculation 2, committed
    await h.stop()
    (finished,) = [e for e in h.recorder.events if isinstance(e, CallFinished)]
    assert (finished.speculations_committed, finished.speculations_dropped) == (1, 1)


async def test_speech_starting_as_the_agent_finishes_never_leaves_the_agent_paused() -> None:
    """The first voiced window pauses the agent at once (a hold). If the agent's audio runs out
    before the caller's speech is certain, no barge-in owns that pause any more; the answer to the
    caller's words must still be heard, whatever the offset."""
    stuck = []
    for offset_ms in range(0, 420, 20):
        h = make_harness(asr_script=lambda s: "what time do you open")
        await h.start()
        h.brain.script = lambda text: ["one two three."]
        await h.feed(tone(600))
        await h.silence(700)  # the turn ends and the 300 ms answer starts
        answer_start = h.sink.plays()[0].at
        await h.silence(max(0.0, (answer_start - h.clock.now()) * 1000 + offset_ms))
        await h.feed(tone(900))
        voiced_end = h.clock.now()
        await h.silence(2500)
        if not h.sink.plays(after=voiced_end):
            stuck.append(offset_ms)
        await h.stop()
    assert stuck == [], f"no answer when the caller started {stuck} ms into a 300 ms answer"


class ReadAheadBrain(SpeculativeBrain):
    """Records the words it is given to read ahead, and the turns answered before each."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[tuple[str, int]] = []
        self.reading: asyncio.Event | None = None  # when given, each read waits for it (a busy LLM)
        self.reads_cancelled = 0

    async def read_ahead(self, words: str) -> None:
        self.read.append((words, len(self.turns)))
        if self.reading is not None:
            try:
                await self.reading.wait()
            except asyncio.CancelledError:
                self.reads_cancelled += 1
                raise


SENTENCE = "and mister john dashwood had then leisure to consider how much there might be prudently"


def _words_by_time(seconds: float) -> str:
    """What a transcription of the first ``seconds`` says: 3 words a second."""
    words = SENTENCE.split()
    return " ".join(words[: max(1, min(len(words), int(seconds * 3)))])


def _read_ahead_of(seconds: float) -> str:
    """The words read ahead from a transcription of ``seconds``: all but the last (it may be cut
    off mid-way), with a capital first letter as in the turn's own transcript."""
    words = " ".join(_words_by_time(seconds).split()[:-1])
    return words[:1].upper() + words[1:]


async def test_a_long_utterance_is_read_ahead_while_the_caller_speaks() -> None:
    brain = ReadAheadBrain()
    h = make_harness(brain=brain, asr_script=_words_by_time)
    await h.start()
    await h.feed(tone(1800))
    assert brain.read == [] and h.asr.calls == []  # not 2 s of speech yet
    await h.feed(tone(600))
    (first,) = h.asr.calls
    assert brain.read == [(_read_ahead_of(first), 0)]  # before any turn was answered
    assert brain.read[0][0].startswith("And mister john")
    await h.feed(tone(2000))
    second = h.asr.calls[1]
    assert second - first >= 1.9  # the next after 2 s more speech, not at every window
    assert brain.read[1] == (_read_ahead_of(second), 0)
    await h.silence(1500)
    assert len(brain.turns) == 1 and brain.turns[0].startswith(brain.read[-1][0])
    assert h.session.read_aheads == 2
    # Nobody waits for the words read ahead: their transcriptions do not make others give way.
    assert h.asr.background[:2] == [True, True] and not any(h.asr.background[2:])
    await h.stop()


async def test_no_read_ahead_for_short_turns_while_others_wait_or_when_off() -> None:
    brain = ReadAheadBrain()
    h = make_harness(brain=brain, asr_script=_words_by_time)
    await h.start()
    await h.feed(tone(1500))
    await h.silence(1500)
    assert brain.turns and brain.read == []  # a short turn reads its words itself
    with CPU.urgent():  # another caller waits for a transcription: the cores are theirs
        await h.feed(tone(2500))
        assert brain.read == []
    await h.feed(tone(100))  # asked again on the next voiced window
    assert len(brain.read) == 1
    await h.silence(1500)
    await h.stop()

    brain = ReadAheadBrain()
    h = make_harness(brain=brain, asr_script=_words_by_time, read_ahead_ms=0)
    await h.start()
    await h.feed(tone(5000))
    await h.silence(1500)
    assert brain.turns and brain.read == []
    await h.stop()


async def test_a_read_ahead_still_waiting_for_the_llm_is_withdrawn_when_the_reply_starts() -> None:
    brain = ReadAheadBrain()
    brain.reading = asyncio.Event()  # never set: the LLM is busy with other calls
    h = make_harness(brain=brain, asr_script=_words_by_time)
    await h.start()
    await h.feed(tone(2400))
    assert len(brain.read) == 1 and brain.reads_cancelled == 0
    await h.silence(1500)
    # Left queued, it would run after the reply and overwrite the reply's cells with old words.
    assert len(brain.turns) == 1 and brain.reads_cancelled == 1
    await h.stop()
