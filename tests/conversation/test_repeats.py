from __future__ import annotations

import pytest

from appliance.conversation.repeats import RepeatGuard, distinctive_opening, first_sentence

LOOP = "He was not ill-disposed. He was a young man who was kind. He was a young man who was kind. He was"


def feed(text: str, step: int) -> tuple[list[str], RepeatGuard]:
    guard = RepeatGuard()
    out = [guard.feed(text[i : i + step]) for i in range(0, len(text), step)]
    out.append(guard.finish())
    return [o for o in out if o], guard


@pytest.mark.parametrize("step", [1, 2, 3, 7, 200])
def test_a_repeated_sentence_is_dropped_and_the_reply_stops(step: int) -> None:
    out, guard = feed(LOOP, step)
    assert guard.stopped
    assert "".join(out) == guard.text == "He was not ill-disposed. He was a young man who was kind. "


@pytest.mark.parametrize("step", [1, 3, 200])
def test_a_reply_without_repeats_passes_whole(step: int) -> None:
    text = "You have the ten of clubs. You have the four of hearts too! Is that all? Thank you. Thank you."
    out, guard = feed(text, step)
    assert not guard.stopped
    assert "".join(out) == text


def test_the_first_sentence_streams_at_once_and_a_shared_opening_is_held_only_while_shared() -> None:
    guard = RepeatGuard()
    assert guard.feed("You") == "You"  # nothing said before it: never held
    assert guard.feed(" have the ten of clubs. ") == " have the ten of clubs. "
    assert guard.feed("You have the") == ""  # so far the start of the first sentence again
    assert guard.feed(" four") == ""  # "four" may still be the start of a longer word
    assert guard.feed(" of") == "You have the four of"  # it differs: everything held comes out
    assert guard.feed(" hearts") == " hearts"
    assert guard.finish() == ""
    assert guard.text == "You have the ten of clubs. You have the four of hearts"


def test_a_repeat_at_the_very_end_is_dropped_too() -> None:
    out, guard = feed("It is open until five today. It is open until five today.", 4)
    assert guard.stopped
    assert "".join(out) == "It is open until five today. "


def test_after_stopping_nothing_more_passes() -> None:
    guard = RepeatGuard()
    guard.feed("We open at nine every day. We open at nine every day. ")
    assert guard.stopped
    assert guard.feed("Something new entirely. ") == ""
    assert guard.finish() == ""


@pytest.mark.parametrize("step", [2, 200])
def test_a_loop_that_varies_one_word_stops_after_its_second_variation(step: int) -> None:
    text = (
        "He was not ill-disposed. He was a man who lived in the 19th century. He was a man who lived "
        "in the 20th century. He was a man who lived in the 30th century. He was a man who lived in the"
    )
    out, guard = feed(text, step)
    assert guard.stopped
    assert "".join(out).strip() == text[: text.index("30th century.") + len("30th century.")]


def test_two_sentences_of_the_same_shape_are_not_a_loop() -> None:
    text = "You have the ten of clubs. You have the four of clubs. Is that right?"
    out, guard = feed(text, 3)
    assert not guard.stopped and "".join(out) == text


def test_first_sentence_is_cut_at_the_first_sentence_end() -> None:
    assert first_sentence("Card table line. Which cards do you hold?") == "Card table line."
    assert first_sentence("Hello there! How are you?") == "Hello there!"
    assert first_sentence("  No end at all  ") == "No end at all"
    assert first_sentence("Costs 3.5 dollars. Fine.") == "Costs 3.5 dollars."


@pytest.mark.parametrize(
    ("sentence", "distinctive"),
    [
        ("Card table line.", True),
        ("Hello!", True),
        ("Thank you for calling Acme.", True),
        ("Acme support, this is Anna.", True),
        ("You have reached Acme.", False),  # "You have the ten of clubs." is a fine reply
        ("I'm Anna from Acme.", False),
        ("I’m Anna from Acme.", False),
        ("Sure, let's start.", False),
        ("The card table is open.", False),
        ("", False),
    ],
)
def test_a_greeting_opening_is_distinctive_unless_replies_often_open_that_way(
    sentence: str, distinctive: bool
) -> None:
    assert distinctive_opening(sentence) is distinctive


@pytest.mark.parametrize("step", [1, 4, 200])
def test_a_reply_may_not_open_with_an_earlier_sentence_it_was_given(step: int) -> None:
    guard = RepeatGuard(earlier=("Card table line.",))
    greeting = "Card table line. Which cards do you hold?"
    out = [guard.feed(greeting[i : i + step]) for i in range(0, len(greeting), step)]
    out.append(guard.finish())
    assert guard.stopped and "".join(out) == guard.text == ""  # nothing was passed on


def test_an_opening_that_only_starts_like_an_earlier_sentence_is_held_for_the_shared_words() -> None:
    guard = RepeatGuard(earlier=("Card table line.",))
    assert guard.feed("Card") == ""  # it may be the greeting again
    assert guard.feed(" tables") == ""  # "tables" may still be a longer word: not yet known
    assert guard.feed(" are open. ") == "Card tables are open. "
    assert not guard.stopped
    other = RepeatGuard(earlier=("Card table line.",))
    assert other.feed("You") == ""  # one word: it could still grow
    assert other.feed(" have") == "You have"  # "You" differs from "Card": out at once
    assert RepeatGuard(earlier=("Hi there.",)).feed("Hi there. ") == "Hi there. "  # too short to count
