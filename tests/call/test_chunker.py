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


def test_first_clause_may_end_where_a_phrase_starts() -> None:
    text = "The ten of clubs is a card in every standard deck. It is black."
    clauses = [c for _, c in feed(text, first_phrase_words=3)]
    assert clauses == ["The ten of clubs", "is a card in every standard deck.", "It is black."]
    # Only the first clause: later ones wait for punctuation as before.
    assert [c for _, c in feed(text)] == [
        "The ten of clubs is a card in every standard deck.",
        "It is black.",
    ]


def test_phrase_cut_needs_enough_words_and_a_complete_word() -> None:
    # "of" and "to" bind too tightly to cut before; "is" at the second word is too early; a verb
    # after "what" or a pronoun belongs with it.
    for text in ("It is ten to five of course.", "You said what are your hours.", "So now it is late."):
        assert [c for _, c in feed(text, first_phrase_words=3)] == [text]
    ch = ClauseChunker(first_phrase_words=3)
    assert ch.push("We have the seven of clubs is") == []  # "is" may still grow into "island"
    assert ch.push("land") == []
    assert ch.push(".") == ["We have the seven of clubs island."]
    ch = ClauseChunker(first_phrase_words=3)
    assert ch.push("We have the seven of clubs in ") == ["We have the seven of clubs"]
    assert ch.push("stock. ") == ["in stock."]


def test_a_first_sentence_ending_the_text_so_far_is_emitted_at_once() -> None:
    ch = ClauseChunker(first_phrase_words=3)
    assert ch.push("You have the ten of clubs") == []
    assert ch.push(".") == ["You have the ten of clubs."]  # no wait for the next character
    ch = ClauseChunker(first_phrase_words=3)
    assert ch.push("Is that all?") == ["Is that all?"]
    # Not when the "." may still be a decimal point or an abbreviation's.
    for text in ("It costs 3.", "Ask Dr.", "Call me at 5."):
        assert ClauseChunker(first_phrase_words=3).push(text) == [], text
    # Only the first clause; later ones wait for the next character as before.
    ch = ClauseChunker(first_phrase_words=3)
    assert ch.push("Sure. We open at nine.") == ["Sure."]
    assert ch.push(" Bye") == ["We open at nine."]


def test_first_clause_may_end_before_a_noun_phrase_after_a_verb() -> None:
    text = "You have the ten of clubs and the four of hearts."
    assert [c for _, c in feed(text, first_phrase_words=2)] == [
        "You have",
        "the ten of clubs",  # a short first clause: the second may end at a phrase start too
        "and the four of hearts.",
    ]
    # Three words first: no cut before "ten", so the first clause runs on to the next phrase start.
    assert [c for _, c in feed(text, first_phrase_words=3)] == [
        "You have the ten of clubs",
        "and the four of hearts.",
    ]
    ch = ClauseChunker(first_phrase_words=2)
    assert ch.push("You have the") == []  # "the" may still grow into "these" or "there"
    assert ch.push(" ten") == ["You have"]


def test_llm_token_deltas_cut_at_a_phrase_opening_word_as_soon_as_it_arrives() -> None:
    # From an LLM, a delta ends at a token boundary, where a lowercase word is whole: the cut
    # before "the" needs no further token.
    ch = ClauseChunker(first_phrase_words=2, token_deltas=True)
    assert ch.push("You") == [] and ch.push(" have") == []
    assert ch.push(" the") == ["You have"]
    assert ch.push(" ten of clubs.") == ["the ten of clubs."]
    ch = ClauseChunker(first_phrase_words=2, token_deltas=True)
    assert ch.push("The ten of clubs") == []
    assert ch.push(" is") == ["The ten of clubs"]
    # Not a word that may be the first piece of a longer one: a capitalised word ("In" +
    # "clusion"), a number read a digit or two at a time, a word still binding the next.
    for pieces in (["You have", " In"], ["You have", " 1"], ["It", " is"], ["You have", " them"]):
        ch = ClauseChunker(first_phrase_words=2, token_deltas=True)
        assert [c for p in pieces for c in ch.push(p)] == [], pieces
    ch = ClauseChunker(first_phrase_words=2, token_deltas=True)
    assert ch.push("You have 1") == [] and ch.push("0") == [] and ch.push(" of") == ["You have"]


def test_no_noun_phrase_cut_after_a_word_it_belongs_with_or_in_a_question() -> None:
    for text in (
        "The queen of the night is here.",  # "of | the"
        "I found all the cards.",  # "all | the"
        "What are your opening hours?",  # a question is one phrase
        "Tell me how many the deck has.",
    ):
        clauses = [c for _, c in feed(text, first_phrase_words=2)]
        assert not any(c.endswith(("of", "all", "are", "many")) for c in clauses), (text, clauses)
    assert [c for _, c in feed("What are your opening hours?", first_phrase_words=2)] == [
        "What are your opening hours?"
    ]


def test_after_a_short_first_clause_the_second_comes_soon_and_the_third_waits_for_punctuation() -> None:
    ch = ClauseChunker(first_phrase_words=2)
    assert ch.push("He was not ") == []
    assert ch.push("an ill") == ["He was not"]
    # The second clause needs four words before a phrase start ("who"), then goes.
    assert ch.push("-disposed young man who") == []
    assert ch.push(" was kind to everyone he met in town and ") == [
        "an ill-disposed young man",
    ]
    # The third waits for punctuation: "and" no longer cuts.
    assert ch.push("all of his friends") == []
    assert ch.push(". ") == ["who was kind to everyone he met in town and all of his friends."]
    # Or at a comma, however short.
    ch = ClauseChunker(first_phrase_words=2)
    assert ch.push("You have the eight") == ["You have"]
    assert ch.push(" of spades, four of clubs, seven") == ["the eight of spades,"]
    assert ch.push(" of hearts.") == []
    assert ch.flush() == "four of clubs, seven of hearts."
    # A second clause that ends the reply goes at once, without waiting for the next character.
    ch = ClauseChunker(first_phrase_words=2)
    assert ch.push("You have the ten") == ["You have"]
    assert ch.push(" of clubs.") == ["the ten of clubs."]
    # After a first clause that ended at punctuation, the second waits for punctuation as before.
    ch = ClauseChunker(first_phrase_words=2)
    assert ch.push("Sure. We open at nine and close") == ["Sure."]
    assert ch.push(" at five.") == []


def test_a_number_opens_a_noun_phrase_but_a_run_of_numbers_stays_whole() -> None:
    for text, first in (
        ("You have eight of spades, four of clubs.", "You have"),
        ("You have 8 of spades and 4 of clubs.", "You have"),
        ("That costs $12 per month.", "That costs"),
    ):
        assert [c for _, c in feed(text, first_phrase_words=2)][0] == first, text
    numbers = {"five", "one", "twenty", "2", "5", "4", "1"}
    for text in (
        "Your number is 5 5 5 1 2 3 4 today.",
        "I heard five five five one two three four.",
        "We have twenty five tables.",
        "Your order 1 2 3 4 will arrive today.",
    ):
        clauses = [c for _, c in feed(text, first_phrase_words=2)]
        assert " ".join(clauses) == text
        for clause, after in zip(clauses, clauses[1:], strict=False):
            assert not (clause.split()[-1] in numbers and after.split()[0] in numbers), (text, clauses)
    assert [c for _, c in feed("Please wait 2 minutes.", first_phrase_words=2)][0] == "Please wait"


def test_no_cut_right_after_a_copula_or_modal() -> None:
    for text in ("It is on its way.", "The ten of clubs is a card.", "We can help with that."):
        clauses = [c for _, c in feed(text, first_phrase_words=2)]
        assert not any(c.split()[-1] in ("is", "can") for c in clauses[:-1]), clauses
    assert [c for _, c in feed("The ten of clubs is a card.", first_phrase_words=2)][0] == "The ten of clubs"


def test_a_long_first_clause_with_no_phrase_start_is_cut_before_a_free_word() -> None:
    # An echoed sentence has no phrase start: it is cut once five words are in, before a word that
    # nothing before it binds to.
    ch = ClauseChunker(first_phrase_words=2, first_clause_max_words=5, token_deltas=True)
    pieces = ["He", " might", " have", " been", " made", " amiable", " himself", "."]
    emitted = [(i, c) for i, p in enumerate(pieces) for c in ch.push(p)]
    assert emitted == [(5, "He might have been made"), (7, "amiable himself.")]
    # A word that may still grow into one the cut may not come before waits for the next token.
    ch = ClauseChunker(first_phrase_words=2, first_clause_max_words=5, token_deltas=True)
    assert [
        c for p in ["Marianne", " Dashwood", " soon", " quietly", " walked", " aw"] for c in ch.push(p)
    ] == []
    assert ch.push("ay") == []  # not before "away"
    assert ch.push(" again") == ["Marianne Dashwood soon quietly walked away"]
    for text, first in (
        ("You are still more respectable than he was.", "You are still more respectable"),
        ("Unfortunately we do not currently offer weekend delivery.", "Unfortunately we do not currently"),
    ):
        assert [c for _, c in feed(text, first_phrase_words=2, first_clause_max_words=5)][0] == first, text
    # Never before a word that belongs with the one before it or after one the next belongs with,
    # inside a number run or a question; only the first clause; and not where phrase cuts are off
    # (a known text such as a welcome).
    for text in (
        "Certainly I would be happy to help you with that.",  # "happy | to", "help | you"
        "It is ten to five of course.",
        "What would you like to know about the deck?",
    ):
        assert [c for _, c in feed(text, first_phrase_words=2, first_clause_max_words=5)] == [text], text
    assert [c for _, c in feed("Welcome to the city library information line.")] == [
        "Welcome to the city library information line."
    ]
    assert [
        c
        for _, c in feed(
            "I heard five five five one two three four.", first_phrase_words=2, first_clause_max_words=5
        )
    ] == [
        "I heard",
        "five five five one two three four.",
    ]
    text = "Sure. We have seen many different kinds of card games here."
    assert [c for _, c in feed(text, first_phrase_words=2, first_clause_max_words=5)] == ["Sure.", text[6:]]
    # Off (0): the old behaviour, the whole echoed sentence in one clause.
    assert [c for _, c in feed("He might have been made amiable himself.", first_phrase_words=2)] == [
        "He might have been made amiable himself."
    ]
    for text, kept in (
        ("Delivery usually takes about three days to arrive.", "three days"),
        ("Yes I would be very happy to help you today.", "very happy"),
        ("Honestly I really think we'll need more time.", "we'll need"),
    ):
        clauses = [c for _, c in feed(text, first_phrase_words=2, first_clause_max_words=5)]
        assert any(kept in c for c in clauses), (text, clauses)
    # After a first clause cut short, the second waits for a phrase start: no five-word cut there.
    text = "You have the really quite lovely shiny old queen today."
    assert [c for _, c in feed(text, first_phrase_words=2, first_clause_max_words=5)] == [
        "You have",
        "the really quite lovely shiny old queen today.",
    ]
