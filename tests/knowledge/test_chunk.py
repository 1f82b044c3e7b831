from __future__ import annotations

import re

import pytest

from appliance.knowledge.chunk import MAX_CHARS, chunk_sections
from appliance.knowledge.extract import Section


def _sentences(n: int, topic: str = "item") -> str:
    return " ".join(f"Sentence {i} is about {topic} number {i} and nothing else." for i in range(n))


def test_short_text_is_one_chunk() -> None:
    chunks = chunk_sections([Section("One short fact. Another short fact.")])
    assert [c.text for c in chunks] == ["One short fact. Another short fact."]
    assert chunks[0].index == 0 and chunks[0].page is None


def test_chunks_respect_the_size_limit_and_end_on_sentences() -> None:
    chunks = chunk_sections([Section(_sentences(60))])
    assert len(chunks) > 5
    for chunk in chunks:
        assert len(chunk.text) <= MAX_CHARS
        assert chunk.text.startswith("Sentence ") and chunk.text.endswith("nothing else.")
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_every_sentence_survives_and_cuts_inside_a_paragraph_overlap() -> None:
    text = _sentences(40)
    chunks = chunk_sections([Section(text)], max_chars=300, overlap_chars=120)
    seen = set()
    for chunk in chunks:
        seen.update(re.findall(r"Sentence (\d+) ", chunk.text))
    assert seen == {str(i) for i in range(40)}
    for before, after in zip(chunks, chunks[1:], strict=False):
        last_of_before = "Sentence " + before.text.rsplit("Sentence ", 1)[1]
        first_of_after = after.text.split(" Sentence ", 1)[0]
        assert last_of_before in after.text, "the cut repeats the last sentence(s)"
        assert first_of_after in before.text and len(first_of_after) < 120


def test_paragraph_breaks_are_preferred_and_not_overlapped() -> None:
    first = _sentences(4, "apples")
    second = _sentences(4, "pears")
    chunks = chunk_sections([Section(first + "\n\n" + second)], max_chars=600, min_chars=100)
    assert [c.text for c in chunks] == [first, second]


def test_pages_are_kept_per_chunk() -> None:
    sections = [Section(_sentences(3, f"page {p}"), page=p) for p in (1, 2, 3)]
    chunks = chunk_sections(sections, max_chars=400, min_chars=100)
    assert [c.page for c in chunks] == [1, 2, 3]
    assert all(f"page {c.page}" in c.text for c in chunks)


def test_overlong_sentence_and_unbroken_token_are_split() -> None:
    words = " ".join(f"word{i}" for i in range(300))
    token = "x" * 1500
    chunks = chunk_sections([Section(words + ". " + token)], max_chars=200, overlap_chars=50)
    assert all(0 < len(c.text) <= 200 for c in chunks)
    assert "".join(c.text for c in chunks if c.text.startswith("x")).count("x") == 1500


def test_overlap_must_be_smaller_than_chunk() -> None:
    with pytest.raises(ValueError):
        chunk_sections([Section("text")], max_chars=100, overlap_chars=100)


def test_chunk_fits_the_embedding_model_window(embedder: object) -> None:
    """The default chunk size stays under all-MiniLM-L6-v2's 256 word pieces (it truncates beyond)."""
    from tokenizers import Tokenizer

    from appliance.engines.embed import MiniLmEmbedder

    assert isinstance(embedder, MiniLmEmbedder)
    tokenizer = Tokenizer.from_file(str(embedder.model_dir / "tokenizer.json"))
    # Numbers, codes and names split into many word pieces: the worst realistic case.
    text = " ".join(
        f"Order A{i}X-{i * 7919} shipped to Kristiansand on 2024-0{i % 9 + 1}-1{i % 10}." for i in range(80)
    )
    for chunk in chunk_sections([Section(text)]):
        assert len(tokenizer.encode(chunk.text).ids) <= 256
