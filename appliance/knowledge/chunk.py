"""Split extracted text into overlapping chunks that fit the embedding model.

all-MiniLM-L6-v2 reads at most 256 word pieces and truncates the rest, so a chunk is kept well under
that: ~600 characters of English is ~130-160 word pieces, leaving room for numbers and names that
split into many pieces. Chunks end on sentence boundaries, never span a page and prefer paragraph
boundaries; a chunk cut inside a paragraph repeats the previous chunk's last sentence(s) so a fact
that straddles the cut is whole in at least one chunk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .extract import Section

MAX_CHARS = 600
OVERLAP_CHARS = 150
# Below this a chunk is not closed at a paragraph break: tiny chunks embed poorly on their own.
MIN_CHARS = 200

# A sentence ends at . ! ? (optionally closed by a quote or bracket) followed by white space; a line
# break inside a paragraph also ends a unit (list items, table rows, headings).
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n")


@dataclass(frozen=True)
class Chunk:
    text: str
    index: int
    page: int | None


@dataclass(frozen=True)
class _Unit:
    text: str
    page: int | None
    starts_paragraph: bool


def chunk_sections(
    sections: Sequence[Section],
    *,
    max_chars: int = MAX_CHARS,
    overlap_chars: int = OVERLAP_CHARS,
    min_chars: int = MIN_CHARS,
) -> list[Chunk]:
    """Pack sentences into chunks of at most ``max_chars``, each within one page (section)."""
    if overlap_chars >= max_chars:
        raise ValueError("overlap must be smaller than the chunk size")
    chunks: list[Chunk] = []
    current: list[_Unit] = []
    size = 0

    def close(keep_overlap: bool) -> None:
        nonlocal current, size
        text = " ".join(u.text for u in current).strip()
        if text:
            chunks.append(Chunk(text, len(chunks), current[0].page))
        carried: list[_Unit] = []
        if keep_overlap:
            budget = overlap_chars
            for unit in reversed(current[1:]):
                if len(unit.text) > budget:
                    break
                carried.insert(0, unit)
                budget -= len(unit.text) + 1
        current = carried
        size = sum(len(u.text) + 1 for u in current)

    for unit in _units(sections, max_chars):
        needed = len(unit.text) + (1 if current else 0)
        if current and unit.page != current[-1].page:
            close(keep_overlap=False)  # a chunk never spans pages, so its page number is exact
        elif current and unit.starts_paragraph and size >= min_chars:
            close(keep_overlap=False)
        elif current and size + needed > max_chars:
            close(keep_overlap=True)
            # The carried overlap plus this unit may still be too long: then drop the overlap.
            if size + len(unit.text) + 1 > max_chars:
                current, size = [], 0
        current.append(unit)
        size += len(unit.text) + (1 if len(current) > 1 else 0)
    if current:
        close(keep_overlap=False)
    return chunks


def _units(sections: Iterable[Section], max_chars: int) -> Iterable[_Unit]:
    for section in sections:
        for paragraph in re.split(r"\n\s*\n", section.text):
            first = True
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = sentence.strip()
                if not sentence:
                    continue
                for piece in _split_long(sentence, max_chars):
                    yield _Unit(piece, section.page, first)
                    first = False


def _split_long(sentence: str, max_chars: int) -> Iterable[str]:
    """A sentence longer than a chunk (a table row, a run-on line) is cut at word boundaries."""
    if len(sentence) <= max_chars:
        yield sentence
        return
    words = sentence.split(" ")
    piece: list[str] = []
    length = 0
    for word in words:
        while len(word) > max_chars:  # one unbroken token (a URL, a hash): hard cut
            if piece:
                yield " ".join(piece)
                piece, length = [], 0
            yield word[:max_chars]
            word = word[max_chars:]
        if not word:
            continue
        if piece and length + 1 + len(word) > max_chars:
            yield " ".join(piece)
            piece, length = [], 0
        piece.append(word)
        length += len(word) + (1 if len(piece) > 1 else 0)
    if piece:
        yield " ".join(piece)
