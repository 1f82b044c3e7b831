"""The chunk index in Chroma: embedded (``PersistentClient``) by default, a ``chroma run`` server
(``HttpClient``) when ``chroma_url`` is set. Both are the same ``ClientAPI``, so one code path.

Embeddings are always computed by our own engine and handed to Chroma (``embeddings=``); the
collection's embedding function exists only so Chroma never falls back to its default one, which
would try to download a model. If anything ever asks it to embed, it refuses loudly.

Every method here blocks (SQLite/HNSW or HTTP); callers run them in worker threads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import chromadb
from chromadb.api import ClientAPI
from chromadb.api.models.Collection import Collection
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.config import Settings as ChromaSettings
from chromadb.utils.embedding_functions import register_embedding_function

from ..engines.types import FloatArray

# Chroma's own per-call batch limit is larger, but big batches hold the index lock for long.
ADD_BATCH = 256


class ChromaUnavailable(Exception):
    """The configured Chroma server cannot be reached or answered with an error."""


@register_embedding_function
class PrecomputedEmbeddings(EmbeddingFunction[Documents]):
    """Placeholder embedding function for collections whose vectors are always supplied by the
    appliance. Registered under a name so that reopening the collection (here or from a Chroma
    server's stored configuration) resolves to this class and never to Chroma's downloading default."""

    def __init__(self, model_id: str = "") -> None:
        self.model_id = model_id

    def __call__(self, input: Documents) -> Embeddings:
        raise RuntimeError(
            "the appliance computes embeddings itself; pass embeddings= to Chroma (refusing to embed)"
        )

    @staticmethod
    def name() -> str:
        return "appliance-precomputed"

    def get_config(self) -> dict[str, Any]:
        return {"model_id": self.model_id}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> PrecomputedEmbeddings:
        return PrecomputedEmbeddings(str(config.get("model_id", "")))

    def default_space(self) -> Any:
        return "cosine"

    def supported_spaces(self) -> list[Any]:
        return ["cosine"]


@dataclass(frozen=True)
class ChunkRecord:
    """One chunk as stored: text, vector and the metadata every query filters on."""

    text: str
    account_id: str
    document_id: str
    generation: str
    index: int
    page: int | None


@dataclass(frozen=True)
class Hit:
    text: str
    document_id: str
    generation: str
    index: int
    page: int | None
    score: float  # cosine similarity, 1.0 = same direction


def collection_name(model_id: str) -> str:
    """One collection per embedding model: vectors of different models must never be compared."""
    slug = re.sub(r"[^a-zA-Z0-9._-]+", "-", model_id).strip("-._") or "default"
    return f"knowledge-{slug}"[:60]


def open_client(path: Path, url: str = "") -> ClientAPI:
    settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
    if not url:
        path.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(path), settings=settings)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"chroma_url {url!r}: expected http(s)://host:port")
    ssl = parts.scheme == "https"
    try:
        return chromadb.HttpClient(
            host=parts.hostname, port=parts.port or (443 if ssl else 80), ssl=ssl, settings=settings
        )
    except Exception as exc:  # connection errors surface as assorted httpx/chromadb types
        raise ChromaUnavailable(f"cannot reach the Chroma server at {url}: {exc}") from exc


class ChunkIndex:
    def __init__(self, client: ClientAPI, model_id: str):
        self.client = client
        self.model_id = model_id
        self.collection: Collection = client.get_or_create_collection(
            collection_name(model_id),
            embedding_function=PrecomputedEmbeddings(model_id),  # type: ignore[arg-type]
            configuration={"hnsw": {"space": "cosine"}},
        )

    def add(self, records: Sequence[ChunkRecord], vectors: FloatArray) -> None:
        if len(records) != len(vectors):
            raise ValueError("one vector per chunk")
        for start in range(0, len(records), ADD_BATCH):
            batch = records[start : start + ADD_BATCH]
            self.collection.add(
                ids=[_chunk_id(r) for r in batch],
                embeddings=vectors[start : start + ADD_BATCH],
                documents=[r.text for r in batch],
                metadatas=[_metadata(r) for r in batch],
            )

    def query(self, vector: FloatArray, *, account_id: str, generations: Sequence[str], k: int) -> list[Hit]:
        """Nearest chunks among the given generations of one account's documents."""
        if not generations or k <= 0:
            return []
        where: dict[str, Any] = {
            "$and": [{"account_id": account_id}, {"generation": {"$in": list(generations)}}]
        }
        result = self.collection.query(
            query_embeddings=vector.reshape(1, -1),
            n_results=k,
            where=where,
            include=["documents", "metadatas", "distances"],
        )
        docs = (result["documents"] or [[]])[0]
        metas = (result["metadatas"] or [[]])[0]
        dists = (result["distances"] or [[]])[0]
        hits = []
        for text, meta, dist in zip(docs, metas, dists, strict=True):
            page = meta.get("page")
            hits.append(
                Hit(
                    text=text or "",
                    document_id=str(meta["document_id"]),
                    generation=str(meta["generation"]),
                    index=int(meta["chunk"]),  # type: ignore[arg-type]
                    page=int(page) if isinstance(page, int) else None,
                    score=1.0 - float(dist),
                )
            )
        return hits

    def delete_generation(self, generation: str) -> None:
        self.collection.delete(where={"generation": generation})

    def delete_document(self, document_id: str) -> None:
        self.collection.delete(where={"document_id": document_id})

    def count(self, **where: str) -> int:
        """Chunks matching every ``key=value`` given (all chunks without arguments)."""
        if not where:
            return self.collection.count()
        clauses: list[dict[str, Any]] = [{k: v} for k, v in where.items()]
        flt: dict[str, Any] = clauses[0] if len(clauses) == 1 else {"$and": clauses}
        return len(self.collection.get(where=flt, include=[])["ids"])

    def close(self) -> None:
        self.close_client(self.client)

    @staticmethod
    def close_client(client: ClientAPI) -> None:
        # Releases the embedded store's SQLite handles; ``close`` is not on the ClientAPI protocol.
        closer = getattr(client, "close", None)
        if closer is not None:
            closer()


def _chunk_id(record: ChunkRecord) -> str:
    return f"{record.document_id}:{record.generation}:{record.index}"


def _metadata(record: ChunkRecord) -> dict[str, str | int]:
    meta: dict[str, str | int] = {
        "account_id": record.account_id,
        "document_id": record.document_id,
        "generation": record.generation,
        "chunk": record.index,
    }
    if record.page is not None:  # Chroma metadata values cannot be None
        meta["page"] = record.page
    return meta
