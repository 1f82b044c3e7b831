"""How long to wait for more words, once the words so far are known (smarter end of turn).

A fixed silence either cuts callers off or makes every answer late. Once the early transcript of a
pause is in, its last words say a lot: a complete sentence ("Where is my order?") is very likely the
end of the turn, while a trailing "and", a filler ("um") or a half-read number ("my order number is
five five one ...", read in digit groups with pauses between them) almost never is.

Rules, not a model: they cost nothing, are easy to reason about, and are measured by
``scripts/bench_call`` (latency) and ``tests/call/test_endpoint.py`` (the cases). Whisper punctuates
its output, which is what "complete" relies on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Words after which a turn is almost never over.
CONTINUATIONS = frozenset(
    "and or but so because cause then um uh er erm hmm like the a an to of for with my our your "
    "is are was were it's its that which who if when i i'm we you at in on from by about as".split()
)
_NUMBER_WORDS = frozenset(
    "zero oh one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety "
    "hundred thousand double triple".split()
)
_TOKEN = re.compile(r"[a-z0-9']+|[.?!,;:…-]")


@dataclass(frozen=True)
class EndpointPolicy:
    complete_ms: float = 380.0  # after a finished sentence
    default_ms: float = 600.0  # nothing to go on
    continuing_ms: float = 1100.0  # trailing conjunction, filler, article, preposition
    digits_ms: float = 1400.0  # in the middle of reading out a number
    min_digits: int = 3  # this many digits or number words make it a number being read

    def looks_final(self, text: str) -> bool:
        """Worth answering speculatively: nothing in the words says more is coming."""
        return self.silence_ms(text) <= self.default_ms

    def silence_ms(self, text: str) -> float:
        """The silence that should end a turn whose words so far are ``text``."""
        tokens = _TOKEN.findall(text.lower())
        words = [t for t in tokens if t[0].isalnum()]
        if not words:
            return self.default_ms
        last = words[-1]
        if last in CONTINUATIONS:
            return self.continuing_ms
        if _is_number(last) and _digit_count(words) >= self.min_digits:
            return self.digits_ms
        ends_sentence = tokens[-1] in (".", "?", "!", "…")
        if tokens[-1] in (",", ";", ":", "-"):
            return self.continuing_ms
        return self.complete_ms if ends_sentence else self.default_ms


def _is_number(word: str) -> bool:
    return word.isdigit() or word in _NUMBER_WORDS


def _digit_count(words: list[str]) -> int:
    """Digits read out in the trailing run of numbers ("five five one", "55 12")."""
    count = 0
    for word in reversed(words):
        if word.isdigit():
            count += len(word)
        elif word in _NUMBER_WORDS:
            count += 1
        else:
            break
    return count
