from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.engines.embed import MiniLmEmbedder
from appliance.knowledge.extract import UnreadableDocument, UnsupportedType
from appliance.knowledge.service import IndexerBusy, KnowledgeService, UploadTooLarge
from appliance.store.documents import Document

from .conftest import MAX_UPLOAD, GatedEmbedder, KnowledgeEnv, open_env
from .docs import BROKEN_PDF, make_image_only_pdf, make_pdf

SETTLE_S = 180.0  # generous: the CPU is shared by many test runs


async def settle(service: KnowledgeService) -> None:
    await asyncio.wait_for(service.join(), SETTLE_S)


async def upload(env: KnowledgeEnv, data: bytes, filename: str, account: str | None = None) -> Document:
    service = env.service
    return await service.create(account or env.account_a, filename, service.check_upload(data, filename))


async def texts_for(
    env: KnowledgeEnv, doc_ids: list[str], query: str, account: str | None = None
) -> list[str]:
    hits = await env.service.search(account or env.account_a, doc_ids, query, 3)
    return [h.text for h in hits]


async def test_upload_is_indexed_in_the_background(env: KnowledgeEnv) -> None:
    data = b"Our refund window is 30 days from delivery.\n\nThe head office is in Trondheim."
    doc = await upload(env, data, "policy.txt")
    assert doc.status == "processing" and doc.chunk_count == 0 and doc.size_bytes == len(data)
    await settle(env.service)
    ready = await env.service.get(env.account_a, doc.id)
    assert ready is not None and ready.status == "ready" and ready.error is None
    assert ready.chunk_count >= 1 and ready.generation is not None and ready.pending_generation is None
    stored = env.service.file_path(ready)
    assert stored is not None and stored.read_bytes() == data
    assert stored.parent.parent == env.data_dir / "documents" / env.account_a / doc.id
    hits = await env.service.search(env.account_a, [doc.id], "where is the head office", 3)
    assert "Trondheim" in hits[0].text
    assert hits[0].document_id == doc.id and hits[0].document_name == "policy.txt" and hits[0].page is None
    assert env.service.index.count(document_id=doc.id, account_id=env.account_a) == ready.chunk_count


async def test_pdf_chunks_carry_page_numbers(env: KnowledgeEnv) -> None:
    pages = ["The kiosk sells maps.", "The ferry leaves at noon.", "The museum is closed on Mondays."]
    doc = await upload(env, make_pdf(pages), "guide.pdf")
    await settle(env.service)
    hits = await env.service.search(env.account_a, [doc.id], "when does the ferry leave", 1)
    assert hits[0].page == 2 and "noon" in hits[0].text


@pytest.mark.parametrize(
    ("data", "error"),
    [(BROKEN_PDF, "damaged"), (make_image_only_pdf(), "no extractable text")],
    ids=["broken-pdf", "image-only-pdf"],
)
async def test_unreadable_pdf_fails_with_a_reason_and_leaves_no_chunks(
    env: KnowledgeEnv, data: bytes, error: str
) -> None:
    doc = await upload(env, data, "scan.pdf")
    await settle(env.service)
    failed = await env.service.get(env.account_a, doc.id)
    assert failed is not None and failed.status == "failed" and error in (failed.error or "")
    assert failed.chunk_count == 0 and failed.pending_generation is None
    assert env.service.index.count(document_id=doc.id) == 0
    assert await env.service.search(env.account_a, [doc.id], "anything", 3) == []
    # The original stays downloadable, so the user can see what was refused.
    assert env.service.file_path(failed) is not None


def test_request_time_checks(env: KnowledgeEnv) -> None:
    service = env.service
    with pytest.raises(UploadTooLarge):
        service.check_upload(b"a" * (MAX_UPLOAD + 1), "big.txt")
    with pytest.raises(UnsupportedType):
        service.check_upload(b"\x00\x01\x02binary", "x.txt")
    with pytest.raises(UnreadableDocument):
        service.check_upload(b"", "empty.txt")
    checked = service.check_upload(b"# Title\n\nSome *text*.\n", "../../etc/notes.md")
    assert checked.filename == "notes.md" and checked.content_type == "text/markdown"


async def test_accounts_never_see_each_other(env: KnowledgeEnv) -> None:
    a_doc = await upload(env, b"Tenant A secret: the vault code is 4417.", "a.txt", env.account_a)
    b_doc = await upload(env, b"Tenant B secret: the vault code is 9902.", "b.txt", env.account_b)
    await settle(env.service)
    service = env.service
    # Search by the other account's ids, or by both, returns only the caller's own chunks.
    assert await texts_for(env, [b_doc.id], "vault code", env.account_a) == []
    assert await texts_for(env, [a_doc.id], "vault code", env.account_b) == []
    both = await texts_for(env, [a_doc.id, b_doc.id], "vault code", env.account_b)
    assert both and all("9902" in t for t in both)
    assert await service.get(env.account_b, a_doc.id) is None
    assert await service.update(env.account_b, a_doc.id, name="stolen") is None
    assert await service.delete(env.account_b, a_doc.id) is False
    assert (await service.list_page(env.account_b, limit=10, offset=0))[1] == 1
    assert await service.owned_ids(env.account_b, [a_doc.id, b_doc.id]) == {b_doc.id}
    still = await service.get(env.account_a, a_doc.id)
    assert still is not None and still.name == "a.txt" and still.status == "ready"


async def test_replacement_is_atomic(tmp_path: Path, chroma_url: str, embedder: MiniLmEmbedder) -> None:
    gated = GatedEmbedder(embedder, marker="ZEBRA")
    env = await open_env(tmp_path, chroma_url, gated)
    service = env.service
    try:
        doc = await upload(env, b"The vault code is 1111.", "codes.txt")
        await settle(service)
        v1 = await service.get(env.account_a, doc.id)
        assert v1 is not None and v1.generation
        old_file = service.file_path(v1)

        new = service.check_upload(b"The vault code is 2222 ZEBRA.", "codes-v2.txt")
        during = await service.update(env.account_a, doc.id, upload=new)
        assert during is not None and during.status == "processing"
        await asyncio.wait_for(gated.waiting.wait(), SETTLE_S)
        # Half-way: the new version is being embedded; readers still get exactly the old one.
        assert await texts_for(env, [doc.id], "vault code") == ["The vault code is 1111."]
        mid = await service.get(env.account_a, doc.id)
        assert mid is not None and mid.generation == v1.generation and mid.chunk_count == v1.chunk_count
        assert service.file_path(mid) == old_file

        gated.gate.set()
        await settle(service)
        v2 = await service.get(env.account_a, doc.id)
        assert v2 is not None and v2.status == "ready" and v2.error is None
        assert v2.generation != v1.generation and v2.filename == "codes-v2.txt"
        assert await texts_for(env, [doc.id], "vault code") == ["The vault code is 2222 ZEBRA."]
        assert service.index.count(generation=str(v1.generation)) == 0
        assert old_file is not None and not old_file.exists()
    finally:
        gated.gate.set()
        await service.close()
        await env.database.dispose()


async def test_failed_replacement_keeps_the_served_version(env: KnowledgeEnv) -> None:
    service = env.service
    doc = await upload(env, b"The vault code is 1111.", "codes.txt")
    await settle(service)
    v1 = await service.get(env.account_a, doc.id)
    assert v1 is not None
    await service.update(env.account_a, doc.id, upload=service.check_upload(BROKEN_PDF, "codes.pdf"))
    await settle(service)
    after = await service.get(env.account_a, doc.id)
    assert after is not None and after.status == "ready"
    assert "previous version is kept" in (after.error or "") and "damaged" in (after.error or "")
    assert (after.generation, after.chunk_count, after.filename) == (
        v1.generation,
        v1.chunk_count,
        "codes.txt",
    )
    assert await texts_for(env, [doc.id], "vault code") == ["The vault code is 1111."]
    assert service.file_path(after) is not None
    versions = list((env.data_dir / "documents" / env.account_a / doc.id).iterdir())
    assert [p.name for p in versions] == [v1.generation], "the refused file is not kept"
    assert service.index.count(document_id=doc.id) == v1.chunk_count


async def test_rename_does_not_reindex(env: KnowledgeEnv) -> None:
    doc = await upload(env, b"Parking is free after six.", "p.txt")
    await settle(env.service)
    before = await env.service.get(env.account_a, doc.id)
    renamed = await env.service.update(env.account_a, doc.id, name="Parking rules")
    assert renamed is not None and renamed.name == "Parking rules" and renamed.status == "ready"
    assert renamed.generation == before.generation  # type: ignore[union-attr]
    hits = await env.service.search(env.account_a, [doc.id], "parking", 1)
    assert hits[0].document_name == "Parking rules"


async def test_newer_replacement_supersedes_a_queued_one(env: KnowledgeEnv) -> None:
    service = env.service
    doc = await upload(env, b"Version one says the colour is red.", "c.txt")
    await service.update(env.account_a, doc.id, upload=service.check_upload(b"Version two: green.", "c.txt"))
    await service.update(env.account_a, doc.id, upload=service.check_upload(b"Version three: blue.", "c.txt"))
    await settle(service)
    final = await service.get(env.account_a, doc.id)
    assert final is not None and final.status == "ready"
    assert await texts_for(env, [doc.id], "colour") == ["Version three: blue."]
    assert service.index.count(document_id=doc.id) == final.chunk_count == 1
    assert len(list((env.data_dir / "documents" / env.account_a / doc.id).iterdir())) == 1


async def test_delete_removes_row_chunks_and_file(env: KnowledgeEnv) -> None:
    doc = await upload(env, b"The lighthouse is painted white.", "l.txt")
    await settle(env.service)
    assert env.service.index.count(document_id=doc.id) == 1
    assert await env.service.delete(env.account_a, doc.id) is True
    assert await env.service.get(env.account_a, doc.id) is None
    assert env.service.index.count(document_id=doc.id) == 0
    assert not (env.data_dir / "documents" / env.account_a / doc.id).exists()
    assert await env.service.delete(env.account_a, doc.id) is False


async def test_delete_while_indexing_leaves_nothing(
    tmp_path: Path, chroma_url: str, embedder: MiniLmEmbedder
) -> None:
    gated = GatedEmbedder(embedder, marker="ZEBRA")
    env = await open_env(tmp_path, chroma_url, gated)
    try:
        doc = await upload(env, b"A ZEBRA fact that is deleted mid-way.", "z.txt")
        await asyncio.wait_for(gated.waiting.wait(), SETTLE_S)
        assert await env.service.delete(env.account_a, doc.id)
        gated.gate.set()
        await settle(env.service)
        assert env.service.index.count(document_id=doc.id) == 0
        assert not (env.data_dir / "documents" / env.account_a / doc.id).exists()
    finally:
        gated.gate.set()
        await env.service.close()
        await env.database.dispose()


async def test_interrupted_indexing_is_resumed_after_restart(
    tmp_path: Path, chroma_url: str, embedder: MiniLmEmbedder
) -> None:
    gated = GatedEmbedder(embedder, marker="ZEBRA")
    env = await open_env(tmp_path, chroma_url, gated)
    doc = await upload(env, b"The ZEBRA crossing is outside the north gate.", "gate.txt")
    await asyncio.wait_for(gated.waiting.wait(), SETTLE_S)
    await env.service.close()  # a shutdown (or crash) in the middle of the job
    row = await _row(env, doc.id)
    assert row.status == "processing" and row.pending_generation is not None

    # Same store and data dir, a fresh service: the job is found and finished.
    again = await open_env(tmp_path, chroma_url, embedder, database=env.database)
    try:
        await settle(again.service)
        done = await again.service.get(env.account_a, doc.id)
        assert done is not None and done.status == "ready" and done.chunk_count == 1
        hits = await again.service.search(env.account_a, [doc.id], "where is the crossing", 3)
        assert [h.text for h in hits] == ["The ZEBRA crossing is outside the north gate."]
    finally:
        await again.service.close()
        await env.database.dispose()


async def test_the_queue_is_bounded(tmp_path: Path, chroma_url: str, embedder: MiniLmEmbedder) -> None:
    gated = GatedEmbedder(embedder, marker="ZEBRA")
    env = await open_env(tmp_path, chroma_url, gated)
    env.service.max_pending_jobs = 1
    try:
        await upload(env, b"ZEBRA one.", "1.txt")
        with pytest.raises(IndexerBusy):
            await upload(env, b"Two.", "2.txt")
        assert (await env.service.list_page(env.account_a, limit=10, offset=0))[1] == 1
        gated.gate.set()
        await settle(env.service)
        await upload(env, b"Three.", "3.txt")  # a slot is free again
        await settle(env.service)
    finally:
        gated.gate.set()
        await env.service.close()
        await env.database.dispose()


async def _row(env: KnowledgeEnv, doc_id: str) -> Document:
    async with env.database.sessions() as session:
        row = await session.get(Document, doc_id)
    assert row is not None
    return row


async def test_document_lifecycle_on_postgresql(
    tmp_path: Path, postgres_url: str, embedder: MiniLmEmbedder
) -> None:
    from appliance.store.migrate import open_database

    env = await open_env(tmp_path, "", embedder, database=await open_database(postgres_url))
    service = env.service
    try:
        doc = await upload(env, b"The vault code is 1111.", "codes.txt")
        await settle(service)
        await service.update(
            env.account_a, doc.id, upload=service.check_upload(b"The vault code is 2222.", "c.txt")
        )
        await settle(service)
        assert await texts_for(env, [doc.id], "vault code") == ["The vault code is 2222."]
        assert await texts_for(env, [doc.id], "vault code", env.account_b) == []
        await service.update(env.account_a, doc.id, upload=service.check_upload(BROKEN_PDF, "c.pdf"))
        await settle(service)
        kept = await service.get(env.account_a, doc.id)
        assert kept is not None and kept.status == "ready" and "damaged" in (kept.error or "")
        assert await service.delete(env.account_a, doc.id)
        assert service.index.count(document_id=doc.id) == 0
    finally:
        await service.close()
        await env.database.dispose()
