"""The knowledge service: stores uploaded documents, indexes them off the request path, serves
retrieval to the brain.

Life of a version: the upload is checked (size, type) and written to
``documents_dir/<account>/<document>/<generation>/<filename>``; the row points at it as
``pending_generation`` and a job is queued. One worker task extracts, chunks, embeds and adds the
chunks to Chroma tagged with that generation, then swaps it in with one conditional UPDATE
(``generation = pending``) and only then deletes the previous generation's chunks and file. Search
only reads the generations rows point at, so readers see the old version until the swap and the new
one after, never a mix. A version that fails leaves the served one untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..engines.types import Embedder
from ..store.agents import remove_knowledgebase_id
from ..store.db import new_id, utcnow
from ..store.documents import Document
from .chunk import chunk_sections
from .extract import CONTENT_TYPES, DocumentError, Kind, extract, sniff
from .index import ChunkIndex, ChunkRecord, open_client

if TYPE_CHECKING:
    from ..server import AppState

log = logging.getLogger(__name__)

# Jobs waiting or running; beyond this an upload is refused (429) rather than queued without end.
MAX_PENDING_JOBS = 256
# Embedding in slices keeps a long document from holding the embedder (shared with live calls) for
# seconds at a time, and lets shutdown cancel between slices.
EMBED_SLICE = 32
DEFAULT_K = 4


class UploadTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the file is larger than the {limit}-byte upload limit")
        self.limit = limit


class IndexerBusy(Exception):
    """Too many documents are waiting to be indexed; try again later."""


@dataclass(frozen=True)
class CheckedUpload:
    """An upload that passed the request-time checks: size, non-empty, a supported type."""

    data: bytes
    filename: str
    kind: Kind

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.kind]


@dataclass(frozen=True)
class RetrievedChunk:
    text: str
    document_id: str
    document_name: str
    score: float  # cosine similarity of query and chunk, higher is closer
    page: int | None
    chunk_index: int


@dataclass(frozen=True)
class _Job:
    account_id: str
    document_id: str
    generation: str


def safe_filename(name: str, default: str = "document") -> str:
    """The last path component of a client-given name, without control or separator characters."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip().strip(".")
    if len(name) > 200:
        stem, dot, suffix = name.rpartition(".")
        name = (stem[:190] + dot + suffix[:9]) if dot and len(suffix) < 10 else name[:200]
    return name or default


class KnowledgeService:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        index: ChunkIndex,
        documents_dir: Path,
        embedder: Callable[[], Awaitable[Embedder]],
        max_upload_bytes: int,
        max_pending_jobs: int = MAX_PENDING_JOBS,
    ):
        self.sessions = sessions
        self.index = index
        self.documents_dir = documents_dir
        self._embedder = embedder
        self.max_upload_bytes = max_upload_bytes
        self.max_pending_jobs = max_pending_jobs
        # Bounded by the slot count (``_reserve``), not by the queue, which never refuses a put.
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._slots = 0
        self._worker: asyncio.Task[None] | None = None
        # Index writes run on one thread the service owns, so shutdown can wait for a write that a
        # cancelled job left running before it closes the Chroma client under it.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knowledge-index")

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._recover()
        self._worker = asyncio.create_task(self._work(), name="knowledge-indexer")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        await asyncio.to_thread(self._writer.shutdown, True)
        await asyncio.to_thread(self.index.close)

    async def join(self) -> None:
        """Wait until every queued job is done (tests, and orderly batch imports)."""
        await self._queue.join()

    async def _recover(self) -> None:
        """Versions left pending by a crash: drop their partial chunks and index them again."""
        async with self.sessions() as session:
            rows = await session.execute(select(Document).where(Document.pending_generation.is_not(None)))
            pending = list(rows.scalars())
        for doc in pending:
            assert doc.pending_generation is not None
            job = _Job(doc.account_id, doc.id, doc.pending_generation)
            await self._write(self.index.delete_generation, job.generation)
            try:
                self._reserve()
            except IndexerBusy:
                await self._fail(job, "indexing was interrupted by a restart; upload the file again")
                continue
            log.info("re-queueing document %s interrupted while indexing", doc.id)
            self._queue.put_nowait(job)

    # -- request-time checks -------------------------------------------------------------------
    def check_upload(self, data: bytes, filename: str) -> CheckedUpload:
        """Size and type checks that answer at once (413, 415, 422); content problems that need a
        full parse (a damaged or image-only PDF) are found by the worker and reported as failed."""
        if len(data) > self.max_upload_bytes:
            raise UploadTooLarge(self.max_upload_bytes)
        name = safe_filename(filename)
        return CheckedUpload(data, name, sniff(data, name))

    # -- CRUD ----------------------------------------------------------------------------------
    async def create(self, account_id: str, name: str, upload: CheckedUpload) -> Document:
        self._reserve()
        doc = Document(
            id=new_id(), account_id=account_id, name=name.strip() or upload.filename,
            filename=upload.filename, content_type=upload.content_type, size_bytes=len(upload.data),
            status="processing", chunk_count=0, pending_generation=new_id(),
        )  # fmt: skip
        assert doc.pending_generation is not None
        job = _Job(account_id, doc.id, doc.pending_generation)
        try:
            await asyncio.to_thread(self._write_file, job, upload)
            async with self.sessions() as session:
                session.add(doc)
                await session.commit()
        except (Exception, asyncio.CancelledError):  # nothing half-stored stays behind
            # Synchronous on purpose: one small folder, and it must run even while being cancelled.
            shutil.rmtree(self._document_dir(account_id, doc.id), ignore_errors=True)
            self._release()
            raise
        self._queue.put_nowait(job)
        return doc

    async def update(
        self,
        account_id: str,
        document_id: str,
        *,
        name: str | None = None,
        upload: CheckedUpload | None = None,
    ) -> Document | None:
        """Rename and/or replace the file. A new file is indexed beside the served version, which
        stays searchable until the new one is ready (or stays for good if the new one fails)."""
        async with self.sessions() as session:
            doc = await self._load(session, account_id, document_id)
            if doc is None:
                return None
            if name is not None and name.strip():
                doc.name = name.strip()
            if upload is None:
                await session.commit()
                return doc
            self._reserve()
            job = _Job(account_id, document_id, new_id())
            try:
                await asyncio.to_thread(self._write_file, job, upload)
                superseded = doc.pending_generation
                doc.pending_generation = job.generation
                doc.status = "processing"
                doc.error = None
                if doc.generation is None or doc.chunk_count == 0:
                    # Nothing is served yet: the row describes the newest file.
                    doc.filename, doc.content_type = upload.filename, upload.content_type
                    doc.size_bytes = len(upload.data)
                await session.commit()
            except (Exception, asyncio.CancelledError):
                shutil.rmtree(self._version_dir(job), ignore_errors=True)
                self._release()
                raise
        if superseded is not None:
            # A still-queued older replacement: its job will find it is no longer pending and clean up.
            log.info("document %s: replacement %s superseded by %s", document_id, superseded, job.generation)
        self._queue.put_nowait(job)
        return doc

    async def get(self, account_id: str, document_id: str) -> Document | None:
        async with self.sessions() as session:
            return await self._load(session, account_id, document_id)

    async def list_page(self, account_id: str, *, limit: int, offset: int) -> tuple[list[Document], int]:
        async with self.sessions() as session:
            total = (
                await session.execute(
                    select(func.count()).select_from(Document).where(Document.account_id == account_id)
                )
            ).scalar_one()
            rows = await session.execute(
                select(Document)
                .where(Document.account_id == account_id)
                .order_by(Document.created_at, Document.id)
                .limit(limit)
                .offset(offset)
            )
            return list(rows.scalars()), int(total)

    async def delete(self, account_id: str, document_id: str) -> bool:
        async with self.sessions() as session:
            doc = await self._load(session, account_id, document_id)
            if doc is None:
                return False
            await session.delete(doc)
            # Agents that retrieve from it lose the reference in the same transaction.
            await remove_knowledgebase_id(session, account_id, document_id)
            await session.commit()
        # Row first: from now on search cannot name these chunks even if removing them fails. A job
        # still running for this document finds the row gone and deletes what it added.
        await self._write(self.index.delete_document, document_id)
        await asyncio.to_thread(shutil.rmtree, self._document_dir(account_id, document_id), True)
        return True

    def file_path(self, doc: Document) -> Path | None:
        """The stored original of the version the row describes, if it is on disk."""
        generation = doc.generation or doc.pending_generation
        if generation is None:
            return None
        path = self._document_dir(doc.account_id, doc.id) / generation / doc.filename
        return path if path.is_file() else None

    async def owned_ids(self, account_id: str, document_ids: Sequence[str]) -> set[str]:
        """Which of these ids are documents of this account (for validating agents' references)."""
        if not document_ids:
            return set()
        async with self.sessions() as session:
            rows = await session.execute(
                select(Document.id).where(Document.account_id == account_id, Document.id.in_(document_ids))
            )
            return set(rows.scalars())

    # -- retrieval -----------------------------------------------------------------------------
    async def search(
        self, account_id: str, document_ids: Sequence[str], query: str, k: int = DEFAULT_K
    ) -> list[RetrievedChunk]:
        """The ``k`` chunks closest to ``query`` among the served versions of the given documents
        of this account. Ids of other accounts' documents are ignored, never searched."""
        if not document_ids or not query.strip() or k <= 0:
            return []
        async with self.sessions() as session:
            rows = await session.execute(
                select(Document.id, Document.name, Document.generation).where(
                    Document.account_id == account_id,
                    Document.id.in_(list(document_ids)),
                    Document.generation.is_not(None),
                    Document.chunk_count > 0,
                )
            )
            served = {gen: (doc_id, name) for doc_id, name, gen in rows if gen}
        if not served:
            return []
        embedder = await self._embedder()
        vector = (await embedder.embed([query]))[0]
        hits = await asyncio.to_thread(
            self.index.query, vector, account_id=account_id, generations=list(served), k=k
        )
        return [
            RetrievedChunk(
                text=h.text,
                document_id=served[h.generation][0],
                document_name=served[h.generation][1],
                score=h.score,
                page=h.page,
                chunk_index=h.index,
            )  # fmt: skip
            for h in hits
            if h.generation in served
        ]

    # -- the worker ----------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._run_job(job)
            except Exception:  # recording the failure failed too (database gone?): keep serving
                log.exception("could not record the outcome of indexing document %s", job.document_id)
            finally:
                self._release()
                self._queue.task_done()

    async def _run_job(self, job: _Job) -> None:
        try:
            await self._index_version(job)
        except DocumentError as exc:
            await self._fail(job, str(exc))
        except Exception as exc:  # the worker must outlive one bad document; the log has the trace
            log.exception("indexing document %s failed", job.document_id)
            await self._fail(job, f"internal error while indexing ({type(exc).__name__})")

    async def _index_version(self, job: _Job) -> None:
        started = time.monotonic()
        if not await self._still_pending(job):
            await self._discard(job)
            return
        path = self._version_file(job)
        if path is None:
            raise DocumentError("the uploaded file is missing from the data directory")
        data = await asyncio.to_thread(path.read_bytes)
        kind = sniff(data, path.name)
        sections = await asyncio.to_thread(extract, data, kind)
        chunks = await asyncio.to_thread(chunk_sections, sections)
        embedder = await self._embedder()
        records = [
            ChunkRecord(c.text, job.account_id, job.document_id, job.generation, c.index, c.page)
            for c in chunks
        ]
        for start in range(0, len(records), EMBED_SLICE):
            batch = records[start : start + EMBED_SLICE]
            vectors = await embedder.embed([r.text for r in batch])
            await self._write(self.index.add, batch, vectors)
        if not await self._promote(job, path, kind, len(data), len(chunks)):
            await self._discard(job)
            return
        elapsed = time.monotonic() - started
        log.info("indexed document %s (%d chunks) in %.2fs", job.document_id, len(chunks), elapsed)

    async def _still_pending(self, job: _Job) -> bool:
        async with self.sessions() as session:
            current = await session.scalar(
                select(Document.pending_generation).where(Document.id == job.document_id)
            )
        return current == job.generation

    async def _promote(self, job: _Job, path: Path, kind: Kind, size: int, chunk_count: int) -> bool:
        """Swap the new version in, if it is still the one wanted; then drop the old one."""
        async with self.sessions() as session:
            old = await session.scalar(select(Document.generation).where(Document.id == job.document_id))
            result = await session.execute(
                update(Document)
                .where(Document.id == job.document_id, Document.pending_generation == job.generation)
                .values(
                    generation=job.generation,
                    pending_generation=None,
                    status="ready",
                    error=None,
                    chunk_count=chunk_count,
                    filename=path.name,
                    content_type=CONTENT_TYPES[kind],
                    size_bytes=size,
                    updated_at=utcnow(),
                )  # fmt: skip
            )
            await session.commit()
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        if old is not None and old != job.generation:
            await self._write(self.index.delete_generation, old)
            stale = self._version_dir(_Job(job.account_id, job.document_id, old))
            await asyncio.to_thread(shutil.rmtree, stale, True)
        return True

    async def _fail(self, job: _Job, message: str) -> None:
        """Record a failed version. Its chunks and (for a replacement) its file go; the served
        version, if any, stays as it was and the error is reported next to it."""
        await self._write(self.index.delete_generation, job.generation)
        async with self.sessions() as session:
            doc = await session.get(Document, job.document_id)
            if doc is None or doc.pending_generation != job.generation:
                await session.rollback()
                await asyncio.to_thread(shutil.rmtree, self._version_dir(job), True)
                return
            doc.pending_generation = None
            previous: str | None = None
            if doc.generation is not None and doc.chunk_count > 0:
                doc.status = "ready"
                doc.error = f"the replacement file was not indexed, the previous version is kept: {message}"
                drop_file = True
            else:
                # First version (or nothing served): keep the file so the user can see what failed.
                previous = doc.generation
                doc.generation = job.generation
                doc.status = "failed"
                doc.error = message
                doc.chunk_count = 0
                drop_file = False
            await session.commit()
        if drop_file:
            await asyncio.to_thread(shutil.rmtree, self._version_dir(job), True)
        elif previous is not None and previous != job.generation:
            stale = _Job(job.account_id, job.document_id, previous)
            await asyncio.to_thread(shutil.rmtree, self._version_dir(stale), True)
        log.info("document %s version %s failed: %s", job.document_id, job.generation, message)

    async def _discard(self, job: _Job) -> None:
        """A version nobody wants any more (superseded or its document deleted)."""
        await self._write(self.index.delete_generation, job.generation)
        await asyncio.to_thread(shutil.rmtree, self._version_dir(job), True)

    # -- helpers -------------------------------------------------------------------------------
    async def _write(self, fn: Callable[..., None], *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def _reserve(self) -> None:
        # The slot is held from the request's checks until the job finishes, so the awaits between
        # here and the enqueue cannot let more jobs in than the bound.
        if self._slots >= self.max_pending_jobs:
            raise IndexerBusy("too many documents are waiting to be indexed; try again shortly")
        self._slots += 1

    def _release(self) -> None:
        self._slots -= 1

    @staticmethod
    async def _load(session: AsyncSession, account_id: str, document_id: str) -> Document | None:
        doc = await session.get(Document, document_id)
        return doc if doc is not None and doc.account_id == account_id else None

    def _document_dir(self, account_id: str, document_id: str) -> Path:
        return self.documents_dir / account_id / document_id

    def _version_dir(self, job: _Job) -> Path:
        return self._document_dir(job.account_id, job.document_id) / job.generation

    def _version_file(self, job: _Job) -> Path | None:
        folder = self._version_dir(job)
        if not folder.is_dir():
            return None
        files = [p for p in folder.iterdir() if p.is_file()]
        return files[0] if len(files) == 1 else None

    def _write_file(self, job: _Job, upload: CheckedUpload) -> None:
        folder = self._version_dir(job)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".upload.part"
        tmp.write_bytes(upload.data)
        tmp.replace(folder / upload.filename)


async def open_knowledge(state: AppState, stack: contextlib.AsyncExitStack) -> KnowledgeService:
    """Open the chunk index (embedded or server), start the indexer, register its shutdown. Needs
    ``state.services["db"]`` (opened and migrated first)."""
    settings = state.settings
    database = state.services["db"]
    client = await asyncio.to_thread(open_client, settings.chroma_path, settings.chroma_url)
    try:
        index = await asyncio.to_thread(ChunkIndex, client, settings.models.embed)
    except Exception:
        await asyncio.to_thread(ChunkIndex.close_client, client)
        raise
    service = KnowledgeService(
        sessions=database.sessions, index=index, documents_dir=settings.documents_dir,
        embedder=state.engines.embed, max_upload_bytes=settings.limits.max_upload_bytes,
    )  # fmt: skip
    stack.push_async_callback(service.close)
    await service.start()
    state.services["knowledge"] = service
    return service
