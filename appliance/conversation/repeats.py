"""Stops a spoken reply that starts saying a sentence again.

Greedy decoding of a small model can fall into a loop ("He was a young man who was not
ill-disposed. He was a young man who was not ill-disposed. ..."), which a caller would hear until
the reply's token limit: half a minute of the same sentence. The guard passes speech through as it
streams, except a sentence that, word for word so far, is the start of one already said: that is
held until it either turns into something new (then it is passed on at once) or ends as a repeat
(then it is dropped and the reply stops there).

Only later sentences can be held, never the first, so the first clause's latency is untouched; a
new sentence that merely opens like an earlier one ("You have the ...") is held for the few words
they share.

A loop can also vary one word ("He was a man who lived in the 19th century. ... in the 20th century.
... in the 30th century."): such a sentence is only known for one at its end, when it has been passed
on, so the reply stops after the ``max_variations``-th sentence that differs from an earlier one of
the same length in a single word (a short list of the same shape, "You have the ten of clubs. You
have the four of clubs.", still goes through).
"""

from __future__ import annotations

import re

# A sentence ends at ".", "!", "?" or "…" followed by whitespace (or at the end of the reply). The
# whitespace goes with it: the clause chunker downstream cuts a sentence only once it sees it.
_SENTENCE_END = re.compile(r"[.!?…]+\s+")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD.findall(text))


def _one_word_apart(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1


# Words a reply may well open with whatever was said before it ("You have ...", "Sure, ..."). A
# greeting opening with one of them is only caught when its whole first sentence comes again.
_COMMON_OPENINGS = frozenset(
    "a an the i i'm i'll i've i'd you you're you've you'll we we're we've we'll it it's this that "
    "these those there here he she they my your our his her their its yes no yeah sure okay ok "
    "alright right well so now then of certainly absolutely great perfect got let let's please "
    "sorry what which who how when where why can could would will do does did is are was were "
    "have has had".split()
)


def distinctive_opening(sentence: str) -> bool:
    """``sentence`` opens with a word a reply seldom opens with ("Card table line.", "Hello!",
    "Thank you for calling"), so that a reply opening with it is the sentence said again."""
    words = _words(sentence.replace("’", "'"))
    return bool(words) and words[0] not in _COMMON_OPENINGS


def first_sentence(text: str) -> str:
    """``text`` up to its first sentence end (all of it when there is none)."""
    end = _SENTENCE_END.search(text + " ")
    return text[: end.end()].strip() if end is not None else text.strip()


class RepeatGuard:
    """Feed the reply's text deltas; pass on what ``feed`` and ``finish`` return. ``stopped`` turns
    true when the reply began to repeat a sentence of at least ``min_words`` words: stop generating.
    ``earlier``: sentences said before this reply that it may not say again either, its first
    sentence included (the agent's greeting); the first sentence is then held while it matches one."""

    def __init__(
        self,
        *,
        min_words: int = 3,
        max_variations: int = 2,
        variation_min_words: int = 5,
        earlier: tuple[str, ...] = (),
    ):
        self.min_words = min_words
        self.max_variations = max_variations
        self.variation_min_words = variation_min_words
        self._variations = 0
        self.stopped = False
        self.text = ""  # everything passed on
        # Earlier sentences' words (long enough to count).
        self._said: list[tuple[str, ...]] = [w for w in map(_words, earlier) if len(w) >= min_words]
        self._sentence = ""  # the sentence in progress
        self._passed = 0  # how much of it has been passed on
        self._new = False  # it no longer matches the start of an earlier sentence

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self._sentence += delta
        out: list[str] = []
        while (end := _SENTENCE_END.search(self._sentence)) is not None:
            cut = end.end()
            if self._ends_in_repeat(self._sentence[:cut]):
                self.stopped = True
                break
            out.append(self._take(cut))
            if self._variations >= self.max_variations:
                self.stopped = True
                break
        if not self.stopped:
            out.append(self._release())
        text = "".join(out)
        self.text += text
        return text

    def finish(self) -> str:
        """The held rest of the reply, unless it is a whole repeat."""
        if self.stopped or self._ends_in_repeat(self._sentence):
            self.stopped = self.stopped or bool(_words(self._sentence))
            return ""
        self._new = True
        text = self._release()
        self.text += text
        return text

    def _ends_in_repeat(self, sentence: str) -> bool:
        words = _words(sentence)
        return not self._new and len(words) >= self.min_words and words in self._said

    def _take(self, cut: int) -> str:
        """Pass on the rest of a complete sentence and start the next."""
        sentence, self._sentence = self._sentence[:cut], self._sentence[cut:]
        words = _words(sentence)
        if len(words) >= self.variation_min_words and any(_one_word_apart(words, s) for s in self._said):
            self._variations += 1
        if len(words) >= self.min_words:
            self._said.append(words)
        text, self._passed, self._new = sentence[self._passed :], 0, False
        return text

    def _release(self) -> str:
        """Pass on the sentence in progress, unless its complete words so far could still be the
        start of an earlier sentence."""
        if not self._new:
            complete = self._sentence
            if complete and not complete[-1].isspace():
                complete = complete[: max(complete.rfind(" "), 0)]  # the last word may still grow
            words = _words(complete)
            self._new = not any(said[: len(words)] == words for said in self._said)
        if not self._new:
            return ""
        text, self._passed = self._sentence[self._passed :], len(self._sentence)
        return text
