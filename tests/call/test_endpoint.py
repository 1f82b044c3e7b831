"""End-of-turn waits chosen from the words so far."""

import pytest

from appliance.call.endpoint import EndpointPolicy

POLICY = EndpointPolicy()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What are your opening hours?", POLICY.complete_ms),
        ("Ten of clubs.", POLICY.complete_ms),
        ("I'd like to book a table for two.", POLICY.complete_ms),  # one number is not a number read out
        ("I want to cancel my order and", POLICY.continuing_ms),
        ("So, um", POLICY.continuing_ms),
        ("I'm calling about the,", POLICY.continuing_ms),
        ("Well, I was wondering,", POLICY.continuing_ms),
        ("My order number is 5 5 1", POLICY.digits_ms),
        ("It's five five one two.", POLICY.digits_ms),  # digit groups: more may follow the pause
        ("My order number is 55 12", POLICY.digits_ms),
        ("hello there", POLICY.default_ms),
        ("", POLICY.default_ms),
        # Words that often end a sentence: open only while Whisper has not ended it.
        ("Hi, how are you?", POLICY.complete_ms),
        ("Okay, thank you.", POLICY.default_ms),
        ("Okay, thank you", POLICY.continuing_ms),
        ("He might have been more respectable than he was.", POLICY.default_ms),
        ("Can you hold on?", POLICY.complete_ms),
        ("My account number is", POLICY.continuing_ms),
        # Words that end a question, or else say more is coming, full stop or not.
        ("Where are you calling from?", POLICY.complete_ms),
        ("I want to.", POLICY.continuing_ms),
        ("I'm calling about.", POLICY.continuing_ms),
        # Words after which a turn goes on whatever the punctuation; trailing off.
        ("I'd like to cancel my order and.", POLICY.continuing_ms),
        ("I think so.", POLICY.continuing_ms),
        ("Well, the thing is...", POLICY.continuing_ms),
        ("I was thinking…", POLICY.continuing_ms),
    ],
)
def test_silence_after_the_words_so_far(text: str, expected: float) -> None:
    assert POLICY.silence_ms(text) == expected


def test_complete_sentences_wait_less_than_the_default_and_numbers_more() -> None:
    assert POLICY.complete_ms < POLICY.default_ms < POLICY.continuing_ms <= POLICY.digits_ms


def test_only_final_looking_words_are_answered_speculatively() -> None:
    assert POLICY.looks_final("What time do you open?")
    assert POLICY.looks_final("hello there")
    assert not POLICY.looks_final("I want to")
    assert not POLICY.looks_final("My number is 4 4 7")
    assert POLICY.looks_final("Thank you.") and POLICY.looks_final("How are you?")
    assert not POLICY.looks_final("I need it for.")
