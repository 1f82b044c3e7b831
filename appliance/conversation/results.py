"""What a function's result says, for the reply that follows it: the words that show a reply
speaks of the result, and a plain reading of it for when the model will not."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from .tools import humanize

# Words too common to show that a reply speaks of a result ("not", "the").
_COMMON = frozenset(
    "the and for not but are was were has have had you your our its with from this that any "
    "yes true false none null".split()
)
_TOKEN = re.compile(r"[a-z0-9]+")
READING_OPENING = "Here's what I found: "
_READING_MAX_FIELDS = 8


def _scalars(value: Any, key: str = "", depth: int = 0) -> Iterator[tuple[str, str]]:
    """(key, text) for each scalar inside ``value``, nested objects and lists flattened."""
    if depth > 3:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _scalars(v, humanize(str(k)), depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _scalars(item, key, depth + 1)
    elif isinstance(value, bool) or value is None:
        return
    else:
        text = str(value).strip()
        if text:
            yield key, text


def result_words(result: Any) -> frozenset[str]:
    """The distinctive words and numbers of a result's values: a reply that uses none of them
    does not speak of the result."""
    words: set[str] = set()
    for _, text in _scalars(result):
        for token in _TOKEN.findall(text.lower()):
            if any(c.isdigit() for c in token) or (len(token) >= 3 and token not in _COMMON):
                words.add(token)
    return frozenset(words)


def mentions_result(text: str, words: frozenset[str]) -> bool:
    return any(token in words for token in _TOKEN.findall(text.lower()))


def read_result(result: Any, max_chars: int) -> str:
    """A plain spoken reading of a result ("Here's what I found: status shipped, arriving Friday."),
    what the caller hears when the model answers a successful result with a refusal."""
    parts = []
    for key, text in _scalars(result):
        parts.append(f"{key} {text}" if key else text)
        if len(parts) == _READING_MAX_FIELDS:
            break
    if not parts:
        return "That's done."
    body = "; ".join(parts).rstrip(".")
    limit = max(0, max_chars - len(READING_OPENING) - 1)
    if len(body) > limit:
        body = body[:limit].rsplit(" ", 1)[0].rstrip(",;")
    return f"{READING_OPENING}{body}."
