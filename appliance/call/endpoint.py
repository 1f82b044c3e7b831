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

# Words after which a turn is almost never over, whatever Whisper put after them: it often closes
# a caller's pause mid-sentence with a full stop ("I want to cancel my order and.").
CONTINUATIONS = frozenset("and or but so because cause um uh er erm hmm the a an my our your".split())
# Words that end a question ("Where are you calling from?", "What is it for?") but otherwise mean
# more is coming, full stop or not ("I want to.", "I'm calling about.").
OPEN_UNLESS_ASKED = frozenset("like to of for with at from by about as if which i i'm it's its we".split())
# Words that end many a sentence ("How are you?", "Thank you.", "I'll take that.", "Hold on.",
# "than he was."): more is coming only when Whisper did not end the sentence there. After a full
# stop the turn waits the default, not the short wait of other complete sentences.
OPEN_UNLESS_ENDED = frozenset("is are was were that who when then you in on".split())
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
        last, end = words[-1], tokens[-1]
        if tokens[-3:] == [".", ".", "."]:
            end = "…"  # the caller trailed off
        if last in CONTINUATIONS:
            return self.continuing_ms
        if _is_number(last) and _digit_count(words) >= self.min_digits:
            return self.digits_ms
        if end in (",", ";", ":", "-", "…"):
            return self.continuing_ms
        asked = end in ("?", "!")
        if last in OPEN_UNLESS_ASKED and not asked:
            return self.continuing_ms
        if last in OPEN_UNLESS_ENDED:
            return self.complete_ms if asked else self.default_ms if end == "." else self.continuing_ms
        return self.complete_ms if asked or end == "." else self.default_ms


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
