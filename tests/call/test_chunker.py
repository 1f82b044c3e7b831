from __future__ import annotations

from appliance.call.chunker import ClauseChunker


def feed(text: str, step: int = 3, **kw: int) -> list[tuple[int, str]]:
    """Feed ``text`` in small deltas; return (chars fed when emitted, clause)."""
    ch = ClauseChunker(**kw)
    out = []
    for i in range(0, len(text), step):
        for clause in ch.push(text[i : i + step]):
            out.append((i + step, clause))
    rest = ch.flush()
    if rest:
        out.append((len(text), rest))
    return out


def test_sentences_are_emitted_as_soon_as_they_end() -> None:
    text = "Hello there. We open at nine in the morning! Anything else?"
    out = feed(text)
    assert [c for _, c in out] == ["Hello there.", "We open at nine in the morning!", "Anything else?"]
    # The first sentence comes out right after its period is followed by a space, not at the end.
    assert out[0][0] <= text.index(".") + 4


def test_long_clause_is_cut_at_a_comma_but_a_short_one_is_not() -> None:
    text = "Sure, our opening hours on weekdays are nine to five, so do call, and on weekends ten to two."
    clauses = [c for _, c in feed(text)]
    # The first clause may be a single word: the caller waits in silence for it.
    assert clauses[0] == "Sure,"
    # Later ones are cut at a comma only once long enough to sound natural alone.
    assert clauses[1] == "our opening hours on weekdays are nine to five,"
    assert clauses[2] == "so do call, and on weekends ten to two."  # "so do call," is too short


def test_abbreviations_and_decimals_do_not_cut() -> None:
    clauses = [c for _, c in feed("Dr. Smith charges 3.5 dollars per minute. Bye.")]
    assert clauses == ["Dr. Smith charges 3.5 dollars per minute.", "Bye."]


def test_run_on_text_is_cut_at_a_word_boundary() -> None:
    text = " ".join(["word"] * 100)
    clauses = [c for _, c in feed(text, max_chars=60)]
    assert all(len(c) <= 60 for c in clauses)
    assert " ".join(clauses) == text


def test_punctuation_only_is_not_speakable() -> None:
    assert feed("... !") == []
