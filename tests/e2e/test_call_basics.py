"""A real call through uvicorn with every real engine: welcome, a spoken question, an answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.simulator.caller import Say
from appliance.simulator.wer import normalize_text, wer

from .conftest import CallRig

CARD_PROMPT = (
    "You are the dealer at a card table, on the phone. The caller names playing cards. Reply with one "
    "short sentence that names the same cards, for example: 'You have the ten of clubs.'"
)


async def test_welcome_then_a_spoken_question_gets_a_spoken_answer(rig: CallRig, speech_dir: Path) -> None:
    agent = await rig.agent(welcome_message="Welcome to the card table.", prompt=CARD_PROMPT)
    result = await rig.call(agent, [Say(speech_dir / "cards/001.wav", pause_ms=300, max_wait_ms=120_000)])
    assert not result.violations, result.violations
    record = await rig.record(result.call_uuid)
    assert len(result.segments) >= 2, (result.to_json(), record)  # welcome, then the answer
    welcome = await rig.transcribe(result.segment_audio(result.segments[0]))
    # Our own TTS through 8 kHz µ-law and back: tiny.en may hear one word wrong ("car table").
    assert "welcome" in welcome and wer("welcome to the card table", welcome) <= 0.2, welcome
    turn = result.turns[0]
    assert turn.voice_to_voice_ms is not None, result.to_json()
    answer_audio = np.concatenate([result.segment_audio(s) for s in result.segments[1:]])
    answer = normalize_text(await rig.transcribe(answer_audio))
    record = await rig.record(result.call_uuid)
    who = [t["who"] for t in record["transcript"]]
    assert who[:3] == ["agent", "caller", "agent"], record["transcript"]
    caller = record["transcript"][1]
    heard = normalize_text(caller["text"])
    # "ten of clubs" through 8 kHz µ-law (and a line's noise floor, different in every run): tiny.en
    # sometimes hears "clubs" as "close"; one word of the three may be wrong, the number may not.
    assert wer("ten of clubs", caller["text"]) <= 1 / 3, caller["text"]
    assert "ten" in heard, caller["text"]
    # The spoken answer names the card the agent heard ("You have the ten of clubs"): the number
    # always, and the suit whenever the caller's "clubs" was heard as such.
    assert "ten" in answer, (answer, heard)
    if "clubs" in heard:
        assert any(word.startswith("club") for word in answer), (answer, heard)
    timings = record["transcript"][2]["timings"]
    for key in ("end_of_turn_ms", "transcript_ms", "first_token_ms", "first_clause_ms", "first_audio_ms"):
        assert timings[key] is not None and timings[key] > 0, timings
    assert record["status"] == "completed"
    print("voice-to-voice (caller side) ms:", turn.voice_to_voice_ms, "server timings:", timings)
