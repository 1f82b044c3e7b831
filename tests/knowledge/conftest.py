"""Fixtures of the knowledge tests: a real store (SQLite, migrated), real embedder, and a
``KnowledgeService`` on embedded Chroma and on a real ``chroma run`` server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.engines.embed import MiniLmEmbedder
from appliance.engines.types import Embedder, FloatArray
from appliance.knowledge.index import ChunkIndex, open_client
from appliance.knowledge.service import KnowledgeService
from appliance.store.accounts import create_account
from appliance.store.db import Database
from appliance.store.migrate import open_database

from . import fixtures

# Re-exported so the tests here can ask for them by name (one instance per session, see fixtures).
embedder = fixtures.embedder
chroma_server_url = fixtures.chroma_server_url

MAX_UPLOAD = 256 * 1024


class GatedEmbedder:
    """The real embedder behind a gate: texts containing ``marker`` wait until ``gate`` is set, so a
    test can hold an indexing job half-way and look at what search serves meanwhile."""

    def __init__(self, inner: Embedder, marker: str):
        self.inner = inner
        self.marker = marker
        self.model_id = inner.model_id
        self.dimensions = inner.dimensions
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def embed(self, texts: Sequence[str]) -> FloatArray:
        if any(self.marker in t for t in texts):
            self.waiting.set()
            await self.gate.wait()
        return await self.inner.embed(texts)

    def embed_sync(self, texts: Sequence[str]) -> FloatArray:
        return self.inner.embed_sync(texts)


@dataclass
class KnowledgeEnv:
    service: KnowledgeService
    database: Database
    account_a: str
    account_b: str
    data_dir: Path
    embedder: Embedder


@pytest.fixture(params=["embedded", "server"])
def chroma_url(request: pytest.FixtureRequest) -> str:
    if request.param == "embedded":
        return ""
    return str(request.getfixturevalue("chroma_server_url"))


async def open_env(
    data_dir: Path, chroma_url: str, embedder: Embedder, database: Database | None = None
) -> KnowledgeEnv:
    database = database or await open_database(f"sqlite+aiosqlite:///{data_dir / 'store.sqlite3'}")
    async with database.sessions() as session:
        a = await create_account(session, "tenant a")
        b = await create_account(session, "tenant b")
    client = await asyncio.to_thread(open_client, data_dir / "chroma", chroma_url)
    # Each test gets its own collection on the shared server: names are unique per data dir.
    index = await asyncio.to_thread(ChunkIndex, client, f"test-{data_dir.name}")

    async def get_embedder() -> Embedder:
        return embedder

    service = KnowledgeService(
        sessions=database.sessions, index=index, documents_dir=data_dir / "documents",
        embedder=get_embedder, max_upload_bytes=MAX_UPLOAD,
    )  # fmt: skip
    await service.start()
    return KnowledgeEnv(service, database, a.account.id, b.account.id, data_dir, embedder)


@pytest.fixture
async def env(tmp_path: Path, chroma_url: str, embedder: MiniLmEmbedder) -> AsyncIterator[KnowledgeEnv]:
    opened = await open_env(tmp_path, chroma_url, embedder)
    try:
        yield opened
    finally:
        await opened.service.close()
        await opened.database.dispose()
