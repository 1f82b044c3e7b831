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
