"""Turn detection on scripted VAD probability sequences (one per 32 ms window)."""

from __future__ import annotations

import numpy as np

from appliance.call.turns import (
    SpeechDiscarded,
    SpeechPaused,
    SpeechStarted,
    TurnDetector,
    TurnEnded,
    UtteranceBuffer,
)

W = 0.032


def run(
    probs: list[float], *, eot: float = 600, min: float = 200, pause: float = 250, quick: float = 0
) -> list[tuple[float, object]]:
    det = TurnDetector(end_of_turn_silence_ms=eot, min_utterance_ms=min, pause_ms=pause, quick_pause_ms=quick)
    out: list[tuple[float, object]] = []
    for i, p in enumerate(probs):
        now = (i + 1) * W
        out.extend((now, e) for e in det.push(p, now))
    return out


def of(events: list[tuple[float, object]], kind: type) -> list[tuple[float, object]]:
    return [(t, e) for t, e in events if isinstance(e, kind)]


def test_speech_then_silence_is_one_turn_ending_after_the_silence() -> None:
    events = run([0.0] * 5 + [0.9] * 20 + [0.05] * 30)
    started = of(events, SpeechStarted)
    ended = of(events, TurnEnded)
    assert len(started) == 1 and len(ended) == 1
    t_end, end = ended[0]
    assert isinstance(end, TurnEnded)
    # Onset is the start of the first voiced window (window 6 -> starts at 5 * 32 ms).
    assert abs(end.onset - 5 * W) < 1e-9
    assert abs(end.last_voiced - 25 * W) < 1e-9
    # The decision comes once 600 ms of silence (19 windows of 32 ms) have passed, not before.
    assert 0.6 <= end.decided - end.last_voiced < 0.6 + W
    assert end.voiced_ms == 20 * 32


def test_a_single_loud_window_is_not_speech() -> None:
    events = run([0.0, 0.99, 0.0, 0.0, 0.99, 0.0] * 5)
    assert events == []


def test_a_click_shorter_than_min_utterance_is_discarded() -> None:
    events = run([0.9] * 4 + [0.0] * 25, min=200)  # 128 ms voiced
    assert of(events, SpeechStarted)
    assert not of(events, TurnEnded)
    assert len(of(events, SpeechDiscarded)) == 1


def test_short_dips_below_threshold_do_not_end_the_turn() -> None:
    # Words with 200 ms gaps between them: one turn.
    probs = ([0.9] * 10 + [0.1] * 6) * 4 + [0.0] * 25
    assert len(of(run(probs), TurnEnded)) == 1
    assert len(of(run(probs), SpeechStarted)) == 1


def test_hysteresis_keeps_speech_between_the_two_thresholds() -> None:
    probs = [0.9] * 3 + [0.4] * 10 + [0.0] * 25
    ((_, end),) = of(run(probs), TurnEnded)
    assert isinstance(end, TurnEnded)
    assert end.voiced_ms == 13 * 32
    # 0.4 alone never starts speech.
    assert run([0.4] * 40) == []


def test_pause_event_comes_before_the_end_of_turn() -> None:
    events = run([0.9] * 15 + [0.0] * 25)
    ((t_pause, pause),) = of(events, SpeechPaused)
    ((t_end, _),) = of(events, TurnEnded)
    assert t_pause < t_end
    assert 0.25 <= t_pause - 15 * W < 0.25 + W


def test_a_quick_pause_comes_first_then_the_usual_one_each_once_per_silence() -> None:
    # Two words with a 160 ms gap, then silence: a quick pause in the gap (the caller goes on) and
    # one in the final silence, which then also gets the usual pause.
    probs = [0.9] * 15 + [0.0] * 5 + [0.9] * 10 + [0.0] * 25
    pauses = of(run(probs, pause=200, quick=120), SpeechPaused)
    kinds = [(round(t / W), e.quick) for t, e in pauses]  # type: ignore[attr-defined]
    assert kinds == [(19, True), (34, True), (37, False)]  # 4 and 7 windows into the silences
    # Off (0) or not shorter than the usual pause: only the usual pause.
    for quick in (0, 200, 300):
        pauses = of(run(probs, pause=200, quick=quick), SpeechPaused)
        assert [e.quick for _, e in pauses] == [False], quick  # type: ignore[attr-defined]


def test_utterance_buffer_keeps_preroll_and_is_bounded() -> None:
    buf = UtteranceBuffer(16000, max_seconds=1.0, preroll_ms=100)
    for i in range(50):  # 1 s of 20 ms chunks before speech
        buf.append(np.full(320, i, dtype=np.float32))
    assert 1600 <= len(buf) < 1600 + 320
    buf.start()
    for _ in range(200):  # 4 s of speech, more than the cap
        buf.append(np.ones(320, dtype=np.float32))
    assert len(buf) <= 16000 + 320
    audio = buf.take()
    assert audio.size == 16000
    assert len(buf) == 0 and not buf.collecting


def test_utterance_buffer_preroll_contains_the_audio_just_before_start() -> None:
    buf = UtteranceBuffer(16000, preroll_ms=100)
    for i in range(10):
        buf.append(np.full(320, i, dtype=np.float32))
    buf.start()
    buf.append(np.full(320, 99, dtype=np.float32))
    audio = buf.take()
    assert audio[-1] == 99
    assert set(np.unique(audio[:-320]).tolist()) <= {4.0, 5.0, 6.0, 7.0, 8.0, 9.0}
