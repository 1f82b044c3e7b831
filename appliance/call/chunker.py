"""Cuts a stream of text deltas into speakable clauses as early as possible.

A clause is emitted at a sentence end (``.``, ``!``, ``?`` followed by a space or the end of the
stream), or at a comma/semicolon/colon/dash once it is long enough to sound natural on its own, or at a
word boundary when it grows past ``max_chars`` (a run-on reply must not hold back the audio).

With ``first_phrase_words`` the first clause may also end before a word where speakers naturally
phrase ("is", "and", "with", "because", ...; "the", "your" after a verb) once it has that many words:
the caller waits in silence for it, and on a CPU each further word of a 0.5B model's reply costs
~40 ms, and each further word of its synthesis ~20 ms. A first clause with no such place
``first_clause_max_words`` words in ends before its next word that nothing binds to.
"""

from __future__ import annotations

import re

_SENTENCE_END = ".!?…"
_CLAUSE_END = ",;:—–"
# "Dr." / "e.g." / "J." are not sentence ends worth cutting at.
_ABBREVIATION = re.compile(r"(?:\b(?:mr|mrs|ms|dr|st|vs|etc|e\.g|i\.e)\.|\b[a-z]\.)$", re.IGNORECASE)
# Words a phrase naturally starts with: verbs after a subject, conjunctions, relatives and the
# prepositions that open an adverbial phrase ("of", "to" and articles bind too tightly to cut before).
_PHRASE_START = frozenset(
    "is are was were will would can could should has have had does did "
    "and but or so because which who that if when where while "
    "with for from in on at after before until".split()
)
# ...but not right after a word the next one binds to ("what | are", "it | is", "there | are"), nor
# after a bare copula or modal ("It is | on its way" sounds broken; "You have | the ten" does not).
_BINDS_NEXT = frozenset(
    "what who whom whose where when why how which that there here it this these those "
    "i you we they he she one "
    "is are was were am be been will would can could should shall may might must do does did".split()
)
# A noun phrase's opening word: a phrase starts there after a verb ("You have | the ten of clubs")...
_NOUN_PHRASE_START = frozenset("the a an your my our their his her its this these those some every".split())
# ...but not after a word it belongs with ("of | the", "and | a", "all | the"), nor in a question
# ("What are | your hours" is one phrase).
_BINDS_NOUN_PHRASE = frozenset(
    "of to in on at for from with by about into onto over under than as like and or but nor "
    "all both half such what which whose the a an your my our their his her its this these those "
    "some every any no".split()
)
_QUESTION_WORD = frozenset("what which who whom whose how where when why".split())
# A number opens a noun phrase like a determiner ("You have | eight of spades", "It takes | 3 days"),
# but never inside a run of numbers ("5 | 5 5 1", "twenty | five").
_NUMBER_WORD = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
    "thousand million".split()
)
_WORD = re.compile(r"\S+")
# A first clause with no phrase start ``first_clause_max_words`` words in is cut before its next free
# word ("He might have been made | amiable himself."): the caller waits in silence for every word of
# it, and beside other calls on a CPU each costs 0.1-0.25 s (a small model echoing a long sentence).
# Not before a word that belongs with the one before it ("ten | of clubs", "pick | up",
# "help | you").
_BINDS_PREVIOUS = frozenset(
    "of to up down out off away back me you him her it us them myself yourself himself herself itself "
    "ourselves themselves".split()
)
# Nor after a word that modifies the next ("very | happy", "many different | kinds"), a number
# ("about three | days") or a contraction ("we'll | need").
_MODIFIES_NEXT = frozenset(
    "very so too quite really rather many much more most less few several other each not".split()
)
# After a first clause cut at a phrase start, the second may end at one too once it has this many words.
SECOND_PHRASE_WORDS = 4
# Known text (a welcome, a goodbye) has no generation to wait for: short openings ("Hello,") stay
# joined to what follows.
FIXED_FIRST_MIN_CHARS = 12


class ClauseChunker:
    def __init__(
        self,
        *,
        min_clause_chars: int = 24,
        max_chars: int = 180,
        first_min_chars: int = 4,
        first_phrase_words: int = 0,
        first_clause_max_words: int = 0,
        token_deltas: bool = False,
    ):
        self.min_clause_chars = min_clause_chars
        self.first_min_chars = first_min_chars
        self.first_phrase_words = first_phrase_words
        self.first_clause_max_words = first_clause_max_words
        # Each pushed delta ends at an LLM token boundary. A lowercase word that ends a delta is
        # then complete: BPE vocabularies hold common words whole (" these", " there" are tokens of
        # their own), so " the" is not followed by "se". Measured on Qwen2.5's tokenizer over 72k
        # tokens of English text: 6 of 13,747 lowercase phrase-opening word tokens went on with
        # letters (" on" + "nx"); a cut there is still between words, before the longer one.
        # A phrase cut then needs no token after the opening word: one decode step sooner.
        self.token_deltas = token_deltas
        self.max_chars = max_chars
        self._buf = ""
        self._emitted = 0
        self._short_first = False  # the first clause ended at a phrase start, not at punctuation

    def push(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                break
            clause, self._buf = self._buf[:cut].strip(), self._buf[cut:].lstrip()
            if _speakable(clause):
                out.append(clause)
                self._emitted += 1
        return out

    def flush(self) -> str | None:
        clause, self._buf = self._buf.strip(), ""
        if _speakable(clause):
            self._emitted += 1
            return clause
        return None

    def _find_cut(self) -> int | None:
        buf = self._buf
        min_chars = self.first_min_chars if self._soon else self.min_clause_chars
        # A punctuation mark counts only once the next character is known to be a space.
        for i in range(len(buf) - 1):
            ch = buf[i]
            if not buf[i + 1].isspace():
                continue
            if ch in _SENTENCE_END:
                if ch == "." and _ABBREVIATION.search(buf[: i + 1]):
                    continue
                return i + 1
            if ch in _CLAUSE_END and len(buf[:i].strip()) >= min_chars:
                return i + 1
        phrase_words = self._phrase_words()
        if phrase_words:
            if _ends_sentence(buf):
                # A one-sentence reply's end is followed by no space, only the end of the answer
                # object and of the generation: two more tokens the caller would wait for.
                return len(buf)
            cut = self._phrase_cut(buf, phrase_words)
            if cut is not None:
                self._short_first = self._emitted == 0
                return cut
        if len(buf) > self.max_chars:
            space = buf.rfind(" ", 0, self.max_chars)
            return space if space > 0 else self.max_chars
        return None

    @property
    def _soon(self) -> bool:
        """The first clause, and the second after a short first one, may be short: the caller is
        waiting for it (or would hear a silence mid-sentence without it)."""
        return self._emitted == 0 or (self._emitted == 1 and self._short_first)

    def _phrase_words(self) -> int:
        """Words a clause needs before it may end at a phrase start: the first clause's setting; for
        the second one too when the first was cut short that way ("You have"), since its audio is
        soon over and a second clause waiting for punctuation would leave the caller in silence
        mid-sentence; 0 (punctuation only) after that."""
        if self.first_phrase_words <= 0 or not self._soon:
            return 0
        if self._emitted == 0:
            return self.first_phrase_words
        return max(SECOND_PHRASE_WORDS, self.first_phrase_words)

    def _phrase_cut(self, buf: str, min_words: int) -> int | None:
        """Before the first complete phrase-opening word that follows ``min_words`` words."""
        words = list(_WORD.finditer(buf))
        question_at = next((i for i, w in enumerate(words) if _bare(w.group()) in _QUESTION_WORD), len(words))
        for k in range(min_words, len(words)):
            word = words[k]
            if word.end() >= len(buf) and not (self.token_deltas and _whole_word(word.group())):
                break  # not known to be complete yet ("is" may become "island")
            before = _bare(words[k - 1].group())
            if before in _BINDS_NEXT or len(buf[: word.start()].strip()) < self.first_min_chars:
                continue
            opening = word.group().lower()
            if opening in _PHRASE_START:
                return word.start()
            bare = _bare(opening)
            # Not after a word it belongs with, a number, or a question word.
            free = before not in _BINDS_NOUN_PHRASE and not _is_number(before) and question_at >= k
            if free and (opening in _NOUN_PHRASE_START or _is_number(bare)):
                return word.start()
            long_first = self._emitted == 0 and 0 < self.first_clause_max_words <= k
            if (
                free
                and long_first
                and bare not in _BINDS_PREVIOUS
                # A last word that may still grow into one of those ("my" + "self") waits a token.
                and not (word.end() >= len(buf) and any(w.startswith(bare) for w in _BINDS_PREVIOUS))
                and before not in _MODIFIES_NEXT
                and "'" not in before
            ):
                return word.start()
        return None


def _bare(word: str) -> str:
    return word.strip(".,;:!?\"'()").lower()


def _whole_word(word: str) -> bool:
    """A lowercase word of letters: when a token ends it, the word is complete (see ``token_deltas``).
    Digits are not: numbers are tokenized a digit or a few at a time."""
    return word.isalpha() and word.islower()


def _is_number(bare: str) -> bool:
    return bare in _NUMBER_WORD or bare[:1].isdigit() or bare[:1] in "$£€"


def _ends_sentence(buf: str) -> bool:
    """``buf`` ends with an unmistakable sentence end: "?" or "!", or "." after a word that is not
    an abbreviation ("3." may become "3.5", "Dr." goes on, "clubs." does not)."""
    text = buf.rstrip()
    if len(text) < 2 or text != buf:
        return False
    if text[-1] in "?!":
        return True
    return text[-1] == "." and text[-2].isalpha() and not _ABBREVIATION.search(text)


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def fixed_text_clauses(text: str) -> list[str]:
    """The clauses a known text is spoken in, one playout segment each (checkpoints say how far the
    caller got)."""
    chunker = ClauseChunker(first_min_chars=FIXED_FIRST_MIN_CHARS)
    clauses = chunker.push(text)
    rest = chunker.flush()
    return [*clauses, *([rest] if rest else [])]
