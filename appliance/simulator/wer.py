"""Word error rate for speech benchmarks and tests: text normalised the same way on both sides
(lowercase, punctuation dropped, digits spelled out), then word-level edit distance."""

from __future__ import annotations

import re

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint", "ok": "okay"}


def number_words(n: int) -> str:
    """0..999,999 as English words (``42`` -> ``forty two``); larger numbers digit by digit."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + (" " + number_words(rest) if rest else "")
    if n < 1_000_000:
        rest = n % 1000
        return number_words(n // 1000) + " thousand" + (" " + number_words(rest) if rest else "")
    return " ".join(_ONES[int(d)] for d in str(n))


def normalize_text(text: str) -> list[str]:
    """Lowercase words with punctuation stripped, digits spelled out, hyphenated words split and
    common abbreviations expanded: "Mr. Dashwood, 10 ill-disposed" -> mister dashwood ten ill disposed."""
    text = text.lower().replace("&", " and ").replace("%", " percent ")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)
    text = re.sub(r"[-_/]", " ", text)
    text = re.sub(r"[^\w\s']", " ", text)
    words = [w.strip("'") for w in text.split()]
    return [_ABBREVIATIONS.get(w, w).replace("'", "") for w in words if w]


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance in words, reference length) after :func:`normalize_text`."""
    r, h = normalize_text(ref), normalize_text(hyp)
    previous = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        current = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (rw != hw))
        previous = current
    return previous[-1], len(r)


def wer(ref: str, hyp: str) -> float:
    """Word error rate of ``hyp`` against ``ref`` (0.0 perfect; can exceed 1.0 with insertions)."""
    errors, n = word_errors(ref, hyp)
    return errors / n if n else float(errors > 0)


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """WER over many utterances: total errors / total reference words (not a mean of ratios)."""
    errors = words = 0
    for ref, hyp in pairs:
        e, n = word_errors(ref, hyp)
        errors += e
        words += n
    return errors / words if words else 0.0
