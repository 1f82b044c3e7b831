"""MiniLmEmbedder on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.config import load_settings
from appliance.engines.embed import MAX_TOKENS, MiniLmEmbedder
from appliance.engines.priority import CPU
from appliance.model_manifest import Manifest, ModelCorrupt, ModelNotInstalled


def _model_dir() -> Path:
    settings = load_settings()
    return Manifest.load(settings.models_dir).path("all-minilm-l6-v2", "embed", verify=False)


@pytest.fixture(scope="session")
def embedder() -> Iterator[MiniLmEmbedder]:
    engine = MiniLmEmbedder("all-minilm-l6-v2", _model_dir(), threads=1)
    yield engine
    engine.close()


def test_known_similarities_match_sentence_transformers(embedder: MiniLmEmbedder) -> None:
    # The sentence-transformers quick-start example for this model prints these cosine similarities
    # (0.6660, 0.1046, 0.1411); an error in any layer, the GELU or the pooling would move them.
    v = embedder.embed_sync(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    sims = v @ v.T
    assert sims[0, 1] == pytest.approx(0.6660, abs=2e-3)
    assert sims[0, 2] == pytest.approx(0.1046, abs=2e-3)
    assert sims[1, 2] == pytest.approx(0.1411, abs=2e-3)


def test_shape_dtype_and_normalisation(embedder: MiniLmEmbedder) -> None:
    v = embedder.embed_sync(["hello", "a somewhat longer sentence about refunds and returns", "x"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert embedder.dimensions == 384
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert embedder.embed_sync([]).shape == (0, 384)


def test_paraphrases_are_closer_than_unrelated_text(embedder: MiniLmEmbedder) -> None:
    pairs = [
        ("How do I reset my password?", "I forgot my password and can't log in."),
        ("When will my order arrive?", "What is the delivery date of my package?"),
        ("I want to cancel my subscription.", "Please stop my monthly plan."),
        ("Do you open on Sundays?", "What are your weekend opening hours?"),
    ]
    unrelated = "The recipe needs two cups of flour and an egg."
    for a, b in pairs:
        va, vb, vu = embedder.embed_sync([a, b, unrelated])
        assert float(va @ vb) > float(va @ vu) + 0.3, (a, b)
    # And each query's nearest neighbour among all second halves is its own paraphrase.
    queries = embedder.embed_sync([a for a, _ in pairs])
    answers = embedder.embed_sync([b for _, b in pairs])
    assert list((queries @ answers.T).argmax(axis=1)) == list(range(len(pairs)))


def test_batch_equals_single_and_is_deterministic(embedder: MiniLmEmbedder) -> None:
    texts = ["short", "a much longer text " * 20, "medium length sentence here", "", "ünïcödé façade"]
    batch = embedder.embed_sync(texts)  # sorted and padded per batch internally
    singles = np.stack([embedder.embed_sync([t])[0] for t in texts])
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    np.testing.assert_array_equal(batch, embedder.embed_sync(texts))


def test_long_text_is_truncated_not_rejected(embedder: MiniLmEmbedder) -> None:
    head = "refund policy details " * 200  # far beyond 256 tokens
    a, b = embedder.embed_sync([head, head + " completely different ending about dinosaurs"])
    assert MAX_TOKENS == 256
    # Both are cut at the same 256 tokens, so the tail makes no difference.
    np.testing.assert_allclose(a, b, atol=1e-6)


async def test_async_embed_runs_off_the_loop(embedder: MiniLmEmbedder) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        texts = [f"document chunk number {i} about shipping and returns" for i in range(64)]
        result = await embedder.embed(texts)
    finally:
        task.cancel()
    assert result.shape == (64, 384)
    np.testing.assert_allclose(result, embedder.embed_sync(texts), atol=1e-6)
    assert ticks > 0  # the event loop kept running while the batch was computed


def test_embedding_counts_as_engine_work_while_it_runs(
    embedder: MiniLmEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LLM steps with fewer threads beside it (engines.priority)."""
    seen: list[int] = []
    real_forward = embedder._forward

    def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        seen.append(CPU.working_now)
        return real_forward(ids, mask)

    monkeypatch.setattr(embedder, "_forward", forward)
    embedder.embed_sync(["returns policy", "shipping times"])
    assert seen and all(n == 1 for n in seen)
    assert CPU.working_now == 0


def test_missing_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    src = _model_dir()
    with pytest.raises(ModelNotInstalled, match=str(tmp_path / "config.json")):
        MiniLmEmbedder("all-minilm-l6-v2", tmp_path, threads=1)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, tmp_path / name)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelCorrupt, match=str(bad)):
        MiniLmEmbedder("all-minilm-l6-v2", tmp_path, threads=1)
