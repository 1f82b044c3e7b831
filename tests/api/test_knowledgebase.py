"""The Knowledgebase routes through the ASGI app with the real store, the real embedder and Chroma
embedded or a real ``chroma run`` server; one round trip through a real uvicorn server too."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from appliance.config import Settings
from appliance.knowledge.index import ChunkIndex, open_client
from appliance.knowledge.service import KnowledgeService
from tests.conftest import Credentials, make_settings, run_live_server
from tests.knowledge import fixtures
from tests.knowledge.docs import BROKEN_PDF, make_docx, make_image_only_pdf, make_pdf
from tests.knowledge.fixtures import load_embedder

LIMIT = 256 * 1024
SETTLE_S = 180.0
chroma_server_url = fixtures.chroma_server_url  # the session's `chroma run` server
BOTH = pytest.mark.parametrize("chroma_url", ["embedded", "server"], indirect=True)


@pytest.fixture
def chroma_url(request: pytest.FixtureRequest) -> str:
    if getattr(request, "param", "embedded") == "embedded":
        return ""
    return str(request.getfixturevalue("chroma_server_url"))


@pytest.fixture
def settings(tmp_path: Path, chroma_url: str) -> Settings:
    """Overrides the shared fixture: a small upload limit, and Chroma as parametrized."""
    return make_settings(tmp_path / "data", chroma_url=chroma_url, limits={"max_upload_bytes": LIMIT})


def kb(account: Credentials, doc_id: str = "") -> str:
    return f"{account.base}/Knowledgebase/" + (f"{doc_id}/" if doc_id else "")


def service_of(app: FastAPI) -> KnowledgeService:
    service = app.state.appliance.services["knowledge"]
    assert isinstance(service, KnowledgeService)
    return service


async def settle(app: FastAPI) -> None:
    await asyncio.wait_for(service_of(app).join(), SETTLE_S)


def assert_error(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "api_id"}
    for needle in needles:
        assert needle in body["error"], body["error"]


async def post_file(
    client: httpx.AsyncClient, account: Credentials, filename: str, data: bytes, name: str | None = None
) -> httpx.Response:
    form = {"name": name} if name is not None else None
    return await client.post(kb(account), auth=account.auth, files={"file": (filename, data)}, data=form)


FORMATS: dict[str, tuple[str, bytes, str, str]] = {
    # format: (filename, content, question, words the answer chunk must hold)
    "pdf": (
        "ferries.pdf",
        make_pdf(
            [
                "The harbour kiosk sells paper maps.",
                "The night ferry to Svalbard leaves at 23:40 from pier 7.",
            ]
        ),
        "when does the night ferry leave",
        "23:40",
    ),
    "docx": (
        "handbook.docx",
        make_docx(
            ["Staff lunch is served in the canteen on floor three."], [["Plan", "Price"], ["Gold", "49 EUR"]]
        ),
        "what does the gold plan cost",
        "49 EUR",
    ),
    "markdown": (
        "faq.md",
        b"# Pets\n\nDogs are welcome in the **lobby** but not in the spa.\n",
        "can I bring my dog",
        "Dogs are welcome",
    ),
    "text": ("notes.txt", b"The wifi password is fjord-2024.", "what is the wifi password", "fjord-2024"),
    "json": (
        "faq.json",
        json.dumps({"q": "Do you ship to Chile?", "a": "Yes, Chilean orders ship in 5 days."}).encode(),
        "shipping to Chile",
        "Chilean orders",
    ),
}
CONTENT_TYPES = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "markdown": "text/markdown", "text": "text/plain", "json": "application/json",
}  # fmt: skip


@BOTH
async def test_each_format_is_indexed_and_retrievable(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    ids: dict[str, str] = {}
    for fmt, (filename, data, _, _) in FORMATS.items():
        r = await post_file(client, account, filename, data)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["status"] == "processing" and body["size_bytes"] == len(data)
        assert body["content_type"] == CONTENT_TYPES[fmt] and body["name"] == filename
        ids[fmt] = body["id"]
    r = await client.post(
        kb(account), auth=account.auth, json={"name": "Opening hours", "text": "We open at 7am."}
    )
    assert r.status_code == 201 and r.json()["filename"] == "Opening hours.txt"
    ids["json-body"] = r.json()["id"]
    await settle(app)

    service = service_of(app)
    owner = await _account_id(app, account)
    for doc_id in ids.values():
        body = (await client.get(kb(account, doc_id), auth=account.auth)).json()
        assert body["status"] == "ready" and body["error"] is None and body["chunk_count"] >= 1, body
    for fmt, (_, _, question, words) in FORMATS.items():
        hits = await service.search(owner, list(ids.values()), question, 3)
        assert hits and hits[0].document_id == ids[fmt] and words in hits[0].text, (fmt, hits)
    hits = await service.search(owner, [ids["json-body"]], "when do you open", 1)
    assert hits[0].text == "We open at 7am." and hits[0].document_name == "Opening hours"


async def test_list_is_paginated(app: FastAPI, client: httpx.AsyncClient, account: Credentials) -> None:
    for i in range(3):
        r = await client.post(kb(account), auth=account.auth, json={"name": f"doc {i}", "text": f"Fact {i}."})
        assert r.status_code == 201
    first = (await client.get(kb(account) + "?limit=2", auth=account.auth)).json()
    assert first["meta"]["total_count"] == 3 and first["meta"]["previous"] is None
    assert [o["name"] for o in first["objects"]] == ["doc 0", "doc 1"]
    assert first["meta"]["next"] is not None
    second = (await client.get(first["meta"]["next"], auth=account.auth)).json()
    assert [o["name"] for o in second["objects"]] == ["doc 2"] and second["meta"]["next"] is None
    keys = {"id", "name", "url", "status", "error", "chunk_count", "size_bytes"}
    assert keys <= set(second["objects"][0])
    await settle(app)


async def test_download_returns_the_original(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, settings: Settings
) -> None:
    data = make_pdf(["Original bytes matter."])
    body = (await post_file(client, account, "original.pdf", data)).json()
    assert body["url"] == f"{settings.base_url}{kb(account, body['id'])}file/"
    path = body["url"].removeprefix(settings.base_url)
    r = await client.get(path, auth=account.auth)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "application/pdf"
    assert 'filename="original.pdf"' in r.headers["content-disposition"]
    assert (await client.get(path)).status_code == 401
    await settle(app)


async def test_unreachable_chroma_server_stops_start_up(tmp_path: Path) -> None:
    from appliance.knowledge.index import ChromaUnavailable
    from appliance.server import create_app

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(
        make_settings(tmp_path / "data", chroma_url=f"http://127.0.0.1:{port}"), load_engines=False
    )
    with pytest.raises(ChromaUnavailable, match=f"127.0.0.1:{port}"):
        async with app.router.lifespan_context(app):
            pass


async def test_refusals_have_clear_errors(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    assert_error(await post_file(client, account, "empty.txt", b""), 422, "file", "empty")
    assert_error(await post_file(client, account, "big.txt", b"a" * (LIMIT + 1)), 413, "file", str(LIMIT))
    assert_error(await post_file(client, account, "pic.png", b"\x89PNG\r\n\x1a\n\x00\x00"), 415, "binary")
    assert_error(await post_file(client, account, "x.txt", "caf\u00e9".encode("latin-1")), 415, "UTF-8")
    r = await client.post(
        kb(account), auth=account.auth, content=b"hello", headers={"content-type": "text/plain"}
    )
    assert_error(r, 415, "multipart/form-data")
    r = await client.post(
        kb(account), auth=account.auth, data={"name": "no file"}, files={"other": ("a", b"x")}
    )
    assert_error(r, 422, "file", "required")
    assert_error(
        await client.post(kb(account), auth=account.auth, json={"text": "x"}), 422, "name", "required"
    )
    assert_error(
        await client.post(kb(account), auth=account.auth, json={"name": "x", "text": ""}), 422, "text"
    )
    assert_error(
        await client.post(kb(account), auth=account.auth, json={"name": "x", "text": "   "}),
        422,
        "text",
        "empty",
    )
    big_text = {"name": "big", "text": "b" * (LIMIT + 1)}
    assert_error(await client.post(kb(account), auth=account.auth, json=big_text), 413, "text")
    # Nothing was stored or indexed by any of them.
    assert (await client.get(kb(account), auth=account.auth)).json()["meta"]["total_count"] == 0
    assert service_of(app).index.count(account_id=await _account_id(app, account)) == 0


@pytest.mark.parametrize(
    ("data", "words"), [(BROKEN_PDF, "damaged"), (make_image_only_pdf(), "no extractable text")],
    ids=["broken", "image-only"],
)  # fmt: skip
async def test_unreadable_pdfs_end_failed(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, data: bytes, words: str
) -> None:
    r = await post_file(client, account, "scan.pdf", data)
    assert r.status_code == 201
    await settle(app)
    body = (await client.get(kb(account, r.json()["id"]), auth=account.auth)).json()
    assert body["status"] == "failed" and words in body["error"] and body["chunk_count"] == 0
    assert service_of(app).index.count(document_id=body["id"]) == 0


@BOTH
async def test_accounts_are_isolated_both_ways(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, other_account: Credentials
) -> None:
    a = (
        await client.post(kb(account), auth=account.auth, json={"name": "A", "text": "A's code is 4417."})
    ).json()
    b = (
        await client.post(
            kb(other_account), auth=other_account.auth, json={"name": "B", "text": "B's code is 9902."}
        )
    ).json()
    await settle(app)
    for me, theirs in ((account, b["id"]), (other_account, a["id"])):
        assert_error(await client.get(kb(me, theirs), auth=me.auth), 404)
        assert_error(await client.get(kb(me, theirs) + "file/", auth=me.auth), 404)
        assert_error(await client.patch(kb(me, theirs), auth=me.auth, json={"name": "mine"}), 404)
        assert_error(await client.delete(kb(me, theirs), auth=me.auth), 404)
        listed = (await client.get(kb(me), auth=me.auth)).json()
        assert [o["id"] for o in listed["objects"]] != [theirs] and listed["meta"]["total_count"] == 1
    # Another account's credentials on this account's path: 401, never data.
    assert (await client.get(kb(account, a["id"]), auth=other_account.auth)).status_code == 401
    service = service_of(app)
    a_id, b_id = await _account_id(app, account), await _account_id(app, other_account)
    assert [h.text for h in await service.search(a_id, [a["id"], b["id"]], "code", 5)] == [
        "A's code is 4417."
    ]
    assert [h.text for h in await service.search(b_id, [a["id"], b["id"]], "code", 5)] == [
        "B's code is 9902."
    ]
    assert (await client.get(kb(account, a["id"]), auth=account.auth)).json()["name"] == "A"


@BOTH
async def test_patch_replaces_and_reindexes(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials
) -> None:
    doc = (await post_file(client, account, "v1.txt", b"The gate code is 1111.")).json()
    await settle(app)
    v1 = (await client.get(kb(account, doc["id"]), auth=account.auth)).json()
    r = await client.patch(
        kb(account, doc["id"]),
        auth=account.auth,
        files={"file": ("v2.md", b"# Codes\n\nThe gate code is 2222.\n")},
    )
    assert r.status_code == 200 and r.json()["status"] == "processing"
    assert r.json()["filename"] == "v1.txt", "the served version is still v1 until v2 is ready"
    await settle(app)
    v2 = (await client.get(kb(account, doc["id"]), auth=account.auth)).json()
    assert v2["status"] == "ready" and v2["filename"] == "v2.md" and v2["content_type"] == "text/markdown"
    assert v2["name"] == "v1.txt"  # a new file does not rename the document
    owner = await _account_id(app, account)
    hits = await service_of(app).search(owner, [doc["id"]], "gate code", 5)
    assert [h.text for h in hits] == ["Codes The gate code is 2222."]
    download = await client.get(kb(account, doc["id"]) + "file/", auth=account.auth)
    assert download.content == b"# Codes\n\nThe gate code is 2222.\n"

    # A replacement that cannot be read: refused in the background, v2 stays served.
    r = await client.patch(kb(account, doc["id"]), auth=account.auth, files={"file": ("v3.pdf", BROKEN_PDF)})
    assert r.status_code == 200
    await settle(app)
    v3 = (await client.get(kb(account, doc["id"]), auth=account.auth)).json()
    assert v3["status"] == "ready" and "damaged" in v3["error"] and v3["filename"] == "v2.md"
    assert v3["chunk_count"] == v2["chunk_count"]
    assert [h.text for h in await service_of(app).search(owner, [doc["id"]], "gate code", 5)] == [
        hits[0].text
    ]

    # Name only (JSON), then text (JSON): the error clears once a version is indexed again.
    r = await client.patch(kb(account, doc["id"]), auth=account.auth, json={"name": "Gate"})
    assert r.status_code == 200 and r.json()["name"] == "Gate" and r.json()["status"] == "ready"
    r = await client.patch(kb(account, doc["id"]), auth=account.auth, json={"text": "The gate code is 3333."})
    assert r.status_code == 200
    await settle(app)
    v4 = (await client.get(kb(account, doc["id"]), auth=account.auth)).json()
    assert v4["status"] == "ready" and v4["error"] is None and v4["name"] == "Gate" and v1["id"] == v4["id"]
    assert_error(
        await client.patch(kb(account, doc["id"]), auth=account.auth, files={"file": ("e.txt", b"")}), 422
    )
    assert_error(
        await client.patch(kb(account, str(uuid.uuid4())), auth=account.auth, json={"name": "x"}), 404
    )


@BOTH
async def test_delete_removes_row_chunks_and_file(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, settings: Settings
) -> None:
    doc = (await post_file(client, account, "d.txt", b"The lighthouse is painted white.")).json()
    await settle(app)
    service = service_of(app)
    folder = settings.documents_dir / (await _account_id(app, account)) / doc["id"]
    assert folder.exists() and service.index.count(document_id=doc["id"]) == 1
    r = await client.delete(kb(account, doc["id"]), auth=account.auth)
    assert r.status_code == 204 and r.content == b""
    assert_error(await client.get(kb(account, doc["id"]), auth=account.auth), 404)
    assert service.index.count(document_id=doc["id"]) == 0 and not folder.exists()
    assert_error(await client.delete(kb(account, doc["id"]), auth=account.auth), 404)


async def test_agents_referencing_a_deleted_document_lose_it(
    app: FastAPI, client: httpx.AsyncClient, account: Credentials, other_account: Credentials
) -> None:
    keep = (await client.post(kb(account), auth=account.auth, json={"name": "keep", "text": "Kept."})).json()
    gone = (await client.post(kb(account), auth=account.auth, json={"name": "gone", "text": "Gone."})).json()
    theirs = (
        await client.post(kb(other_account), auth=other_account.auth, json={"name": "t", "text": "T."})
    ).json()
    agents = f"{account.base}/Voiceagent/"
    # Another account's document cannot be referenced; the account's own can.
    r = await client.post(agents, auth=account.auth, json={"name": "x", "knowledgebase_ids": [theirs["id"]]})
    assert_error(r, 422, "knowledgebase_ids")
    r = await client.post(
        agents, auth=account.auth, json={"name": "a", "knowledgebase_ids": [keep["id"], gone["id"]]}
    )
    assert r.status_code == 201, r.text
    agent = r.json()
    assert (await client.delete(kb(account, gone["id"]), auth=account.auth)).status_code == 204
    after = (await client.get(f"{agents}{agent['id']}/", auth=account.auth)).json()
    assert after["knowledgebase_ids"] == [keep["id"]]
    await settle(app)


async def test_routes_need_credentials(client: httpx.AsyncClient, account: Credentials) -> None:
    some = str(uuid.uuid4())
    for method, path in (("GET", kb(account)), ("POST", kb(account)), ("GET", kb(account, some)),
                         ("PATCH", kb(account, some)), ("DELETE", kb(account, some)),
                         ("GET", kb(account, some) + "file/")):  # fmt: skip
        r = await client.request(method, path)
        assert r.status_code == 401, (method, path, r.text)


def test_openapi_documents_both_upload_bodies(app: FastAPI) -> None:
    schema: dict[str, Any] = app.openapi()
    post = schema["paths"]["/v1/Account/{auth_id}/Knowledgebase/"]["post"]
    content = post["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["required"] == ["file"]
    assert set(content["application/json"]["schema"]["required"]) == {"name", "text"}
    assert {"201", "413", "415", "422"} <= set(post["responses"])


def test_live_server_with_a_chroma_server(tmp_path: Path, chroma_server_url: str) -> None:
    """The whole stack for real: uvicorn, SQLite file, `chroma run` over HTTP, the real embedder."""
    from tests.conftest import run_coroutine_in_thread

    with run_live_server(tmp_path / "data", chroma_url=chroma_server_url) as live:
        creds = run_coroutine_in_thread(live.create_account("live kb"))
        with httpx.Client(base_url=live.base_url, auth=creds.auth, timeout=30) as http:
            data = make_pdf(["Intro page.", "The spare key is under the blue flowerpot."])
            r = http.post(kb(creds), files={"file": ("keys.pdf", data)})
            assert r.status_code == 201, r.text
            doc = r.json()
            deadline = time.monotonic() + SETTLE_S
            while (body := http.get(kb(creds, doc["id"])).json())["status"] == "processing":
                assert time.monotonic() < deadline, "indexing did not finish"
                time.sleep(0.2)
            assert body["status"] == "ready", body
            assert http.get(doc["url"]).content == data
            # What the server indexed, read straight from the Chroma server with our own client.
            index = ChunkIndex(
                open_client(tmp_path / "unused", chroma_server_url), live.settings.models.embed
            )
            try:
                stored = index.collection.get(
                    where={"document_id": doc["id"]}, include=["documents", "metadatas"]
                )
                texts, metas = stored["documents"] or [], stored["metadatas"] or []
                pages = {m["page"]: d for d, m in zip(texts, metas, strict=True)}
                assert set(pages) == {1, 2} and "flowerpot" in pages[2]
                query = load_embedder().embed_sync(["where is the spare key"])[0]
                owner, generation = str(metas[0]["account_id"]), str(metas[0]["generation"])
                top = index.query(query, account_id=owner, generations=[generation], k=1)
                assert top[0].page == 2
                assert http.delete(kb(creds, doc["id"])).status_code == 204
                assert index.count(document_id=doc["id"]) == 0
            finally:
                index.close()


async def _account_id(app: FastAPI, account: Credentials) -> str:
    from appliance.store.accounts import get_account

    async with app.state.appliance.services["db"].sessions() as session:
        row = await get_account(session, account.auth_id)
    assert row is not None
    return row.id


# -- schemathesis over the Knowledgebase routes -----------------------------------------------------

KB_OPERATIONS = [
    ("GET", "/v1/Account/{auth_id}/Knowledgebase/"),
    ("POST", "/v1/Account/{auth_id}/Knowledgebase/"),
    ("GET", "/v1/Account/{auth_id}/Knowledgebase/{document_id}/"),
    ("PATCH", "/v1/Account/{auth_id}/Knowledgebase/{document_id}/"),
    ("DELETE", "/v1/Account/{auth_id}/Knowledgebase/{document_id}/"),
    ("GET", "/v1/Account/{auth_id}/Knowledgebase/{document_id}/file/"),
]


@pytest.fixture(scope="module")
def kb_fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Credentials, str]]:
    import schemathesis
    from schemathesis.python import asgi

    from appliance.server import create_app
    from appliance.store.accounts import create_account_cli
    from tests.conftest import run_coroutine_in_thread

    app_settings = make_settings(
        tmp_path_factory.mktemp("kb-fuzz") / "data", limits={"max_upload_bytes": LIMIT}
    )
    created = run_coroutine_in_thread(create_account_cli(app_settings, "fuzz"))
    creds = Credentials(created.auth_id, created.auth_token)
    app = create_app(app_settings, load_engines=False)
    with asgi.get_client(app) as http:  # type: ignore[arg-type]
        doc = http.post(
            f"http://testserver{kb(creds)}", auth=creds.auth, json={"name": "existing", "text": "A fact."}
        )
        assert doc.status_code == 201, doc.text
    yield schemathesis.openapi.from_asgi("/openapi.json", app), creds, doc.json()["id"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize(("method", "path"), KB_OPERATIONS)
def test_fuzz_finds_no_server_error_or_schema_violation(
    kb_fuzz: tuple[Any, Credentials, str], method: str, path: str, mode: str
) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from schemathesis import GenerationMode

    schema, creds, doc_id = kb_fuzz
    checks = [
        schemathesis.checks.not_a_server_error,
        schemathesis.checks.status_code_conformance,
        schemathesis.checks.content_type_conformance,
        schemathesis.checks.response_schema_conformance,
    ]
    fixed = {"auth_id": creds.auth_id} | ({"document_id": doc_id} if method in ("GET", "PATCH") else {})
    strategy = schema[path][method].as_strategy(GenerationMode(mode), path_parameters=fixed)

    @given(case=strategy)
    @hsettings(max_examples=15, derandomize=True, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(auth=creds.auth, checks=checks)

    run()
