from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.engines.embed import MiniLmEmbedder
from appliance.knowledge.index import ChunkIndex, ChunkRecord, PrecomputedEmbeddings, open_client


@pytest.fixture
def index(tmp_path: Path, chroma_url: str) -> Iterator[ChunkIndex]:
    client = open_client(tmp_path / "chroma", chroma_url)
    idx = ChunkIndex(client, f"test-{tmp_path.name}")
    yield idx
    idx.close()


def _records(account: str, doc: str, gen: str, texts: list[str]) -> list[ChunkRecord]:
    return [ChunkRecord(t, account, doc, gen, i, i + 1) for i, t in enumerate(texts)]


def test_chroma_is_never_allowed_to_embed(index: ChunkIndex) -> None:
    with pytest.raises(Exception, match="refusing to embed"):
        index.collection.query(query_texts=["anything"], n_results=1)
    with pytest.raises(Exception, match="refusing to embed"):
        index.collection.add(ids=["x"], documents=["some text"])


def test_reopened_collection_resolves_to_our_embedding_function(
    index: ChunkIndex, tmp_path: Path, chroma_url: str
) -> None:
    # Opened without an embedding function, Chroma rebuilds one from the stored configuration: it
    # must be ours (registered by name), never the downloading default.
    client = open_client(tmp_path / "chroma", chroma_url)
    try:
        collection = client.get_collection(index.collection.name)
        assert isinstance(collection.configuration.get("embedding_function"), PrecomputedEmbeddings)
        assert collection.configuration_json["hnsw"]["space"] == "cosine"
        with pytest.raises(Exception, match="refusing to embed"):
            collection.query(query_texts=["anything"], n_results=1)
    finally:
        ChunkIndex.close_client(client)


def test_query_filters_by_account_and_generation(index: ChunkIndex, embedder: MiniLmEmbedder) -> None:
    texts = ["Refunds are paid within 30 days.", "The office is in Bergen."]
    for account, doc, gen in (("acc-a", "doc-1", "g1"), ("acc-a", "doc-1", "g2"), ("acc-b", "doc-2", "g3")):
        recs = _records(account, doc, gen, texts)
        index.add(recs, embedder.embed_sync(texts))
    query = embedder.embed_sync(["how long do refunds take"])[0]

    hits = index.query(query, account_id="acc-a", generations=["g1"], k=5)
    assert [(h.generation, h.text) for h in hits] == [("g1", texts[0]), ("g1", texts[1])]
    assert hits[0].page == 1 and hits[0].index == 0
    assert 0.4 < hits[0].score <= 1.0 and hits[0].score > hits[1].score
    # Another account's generation id is never matched, even when named explicitly.
    assert index.query(query, account_id="acc-a", generations=["g3"], k=5) == []
    assert index.query(query, account_id="acc-a", generations=[], k=5) == []
    assert index.count(generation="g2") == 2 and index.count(account_id="acc-b") == 2


def test_identical_text_scores_one_and_deletes_are_precise(
    index: ChunkIndex, embedder: MiniLmEmbedder
) -> None:
    texts = ["Alpha fact.", "Beta fact.", "Gamma fact."]
    vectors = embedder.embed_sync(texts)
    index.add(_records("a", "d1", "g1", texts), vectors)
    index.add(_records("a", "d2", "g2", texts), vectors)
    hit = index.query(vectors[1], account_id="a", generations=["g1"], k=1)[0]
    assert hit.text == "Beta fact." and hit.score == pytest.approx(1.0, abs=1e-3)
    index.delete_generation("g1")
    assert index.count(generation="g1") == 0 and index.count(generation="g2") == 3
    index.delete_document("d2")
    assert index.count() == 0


def test_add_checks_vector_count(index: ChunkIndex) -> None:
    with pytest.raises(ValueError):
        index.add(_records("a", "d", "g", ["one", "two"]), np.zeros((1, 384), dtype=np.float32))


async def test_large_batches_are_split(index: ChunkIndex) -> None:
    texts = [f"chunk {i}" for i in range(600)]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(600, 384)).astype(np.float32)
    await asyncio.to_thread(index.add, _records("a", "d", "g", texts), vectors)
    assert index.count(document_id="d") == 600
