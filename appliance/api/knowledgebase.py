"""``/v1/Account/{auth_id}/Knowledgebase/``: documents an agent may retrieve from.

A document is created from a multipart upload (``file``, optional ``name``) or from JSON
(``{"name", "text"}``). Size and type are checked at once (413, 415, 422); parsing, chunking and
embedding run in the background and the document's ``status`` goes ``processing`` → ``ready`` or
``failed`` (with ``error``). PATCH with a new file re-indexes; the old version keeps answering until
the new one is ready, and stays if the new one fails (``status`` ready, ``error`` says why).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from email.message import Message
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from ..knowledge.extract import CONTENT_TYPES, DocumentError, UnsupportedType
from ..knowledge.service import CheckedUpload, IndexerBusy, KnowledgeService, UploadTooLarge
from ..store.accounts import Account
from ..store.documents import Document
from .deps import AccountDep, SettingsDep, StateDep
from .errors import ApiError, NotFound, Unprocessable, describe_validation_errors, error_responses
from .pagination import Page, PageDep, make_page
from .schema_utils import STRICT

router = APIRouter(
    prefix="/v1/Account/{auth_id}/Knowledgebase",
    tags=["Knowledgebase"],
    responses=error_responses(400, 401, 404, 422),
)

NAME_MAX = 255
_READ_CHUNK = 1 << 20
# The original comes back with its sniffed type; a JSON document is any JSON value, the rest bytes.
_FILE_CONTENT: dict[str, Any] = {
    ct: {"schema": {} if ct == "application/json" else {"type": "string", "format": "binary"}}
    for ct in CONTENT_TYPES.values()
}
DocumentId = Annotated[str, Path(description="The document's id", max_length=64)]


class KnowledgebasePublic(BaseModel):
    id: str
    name: str
    url: str = Field(description="Downloads the stored original (same Basic auth as the API)")
    status: Literal["processing", "ready", "failed"]
    error: str | None = Field(description="Why indexing failed (also set when a replacement failed)")
    chunk_count: int = Field(description="Chunks of the served version in the index")
    size_bytes: int
    filename: str
    content_type: str
    created_at: datetime
    updated_at: datetime


class KnowledgebaseText(BaseModel):
    """A document given as text rather than as a file."""

    model_config = STRICT
    name: str = Field(min_length=1, max_length=NAME_MAX)
    text: str = Field(min_length=1)


class KnowledgebaseTextUpdate(BaseModel):
    model_config = STRICT
    name: str | None = Field(None, min_length=1, max_length=NAME_MAX)
    text: str | None = Field(None, min_length=1)


def _body_doc(description: str, json_model: type[BaseModel], file_required: bool) -> dict[str, Any]:
    form: dict[str, Any] = {
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "PDF, DOCX, Markdown, UTF-8 text"},
            "name": {"type": "string", "minLength": 1, "maxLength": NAME_MAX},
        },
    }
    if file_required:
        form["required"] = ["file"]
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }


def _public(doc: Document, account: Account, base_url: str) -> KnowledgebasePublic:
    return KnowledgebasePublic(
        id=doc.id, name=doc.name,
        url=f"{base_url}/v1/Account/{account.auth_id}/Knowledgebase/{doc.id}/file/",
        status=doc.status,  # type: ignore[arg-type]
        error=doc.error, chunk_count=doc.chunk_count, size_bytes=doc.size_bytes, filename=doc.filename,
        content_type=doc.content_type, created_at=doc.created_at, updated_at=doc.updated_at,
    )  # fmt: skip


def _service(state: StateDep) -> KnowledgeService:
    service = state.services.get("knowledge")
    if service is None:
        raise RuntimeError("the knowledge service is not open (services not started)")
    assert isinstance(service, KnowledgeService)
    return service


def _media_type(request: Request) -> str:
    message = Message()
    message["content-type"] = request.headers.get("content-type", "")
    return message.get_content_type() if request.headers.get("content-type") else ""


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while chunk := await upload.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise UploadTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


async def _check(service: KnowledgeService, data: bytes, filename: str) -> CheckedUpload:
    try:
        # Sniffing decodes (or unzips) up to the upload limit: off the event loop.
        return await asyncio.to_thread(service.check_upload, data, filename)
    except UploadTooLarge as exc:
        raise ApiError(413, f"file: {exc}.") from None
    except UnsupportedType as exc:
        raise ApiError(415, f"file: {exc}.") from None
    except DocumentError as exc:
        raise Unprocessable("file", f"{exc}.") from None


async def _parse(
    request: Request, service: KnowledgeService, *, creating: bool
) -> tuple[str | None, CheckedUpload | None]:
    """The (name, checked upload) of a multipart or JSON body; either may be None on PATCH."""
    media = _media_type(request)
    if media == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:
            name_field = form.get("name")
            file_field = form.get("file")
            if name_field is not None and not isinstance(name_field, str):
                raise Unprocessable("name", "must be a text field, not a file")
            if isinstance(name_field, str) and not 1 <= len(name_field.strip()) <= NAME_MAX:
                raise Unprocessable("name", f"must be 1 to {NAME_MAX} characters")
            if file_field is None:
                if creating:
                    raise Unprocessable("file", "is required (multipart field 'file')")
                return name_field, None
            if not isinstance(file_field, UploadFile):
                raise Unprocessable("file", "must be a file upload")
            try:
                data = await _read_limited(file_field, service.max_upload_bytes)
            except UploadTooLarge as exc:
                raise ApiError(413, f"file: {exc}.") from None
            filename = file_field.filename or (name_field or "document")
        upload = await _check(service, data, filename)
        return (name_field or (upload.filename if creating else None)), upload
    if media == "application/json" or media.endswith("+json"):
        raw = await request.body()
        model: type[BaseModel] = KnowledgebaseText if creating else KnowledgebaseTextUpdate
        try:
            body = model.model_validate_json(raw)
        except ValidationError as exc:
            raise ApiError(422, describe_validation_errors(exc.errors())) from None
        name: str | None = getattr(body, "name", None)
        text: str | None = getattr(body, "text", None)
        if text is None:
            return name, None
        data = text.encode()
        if len(data) > service.max_upload_bytes:
            raise ApiError(413, f"text: {UploadTooLarge(service.max_upload_bytes)}.")
        try:
            upload = await asyncio.to_thread(service.check_upload, data, f"{name or 'document'}.txt")
        except DocumentError as exc:
            raise Unprocessable("text", f"{exc}.") from None
        return name, upload
    raise ApiError(
        415, f"Unsupported content type {media or '(none)'}: send multipart/form-data or application/json."
    )


def _busy(exc: IndexerBusy) -> ApiError:
    return ApiError(429, f"{str(exc).capitalize()}.", {"Retry-After": "10"})


@router.post(
    "/", status_code=201, summary="Upload a document (multipart file, or JSON name + text)",
    responses=error_responses(413, 415, 429),
    openapi_extra=_body_doc("A file upload or a text document", KnowledgebaseText, file_required=True),
)  # fmt: skip
async def create_document(
    request: Request, account: AccountDep, state: StateDep, settings: SettingsDep
) -> KnowledgebasePublic:
    service = _service(state)
    name, upload = await _parse(request, service, creating=True)
    assert upload is not None
    try:
        doc = await service.create(account.id, name or upload.filename, upload)
    except IndexerBusy as exc:
        raise _busy(exc) from None
    return _public(doc, account, settings.base_url)


@router.get("/", summary="List documents")
async def list_documents(
    request: Request, account: AccountDep, state: StateDep, settings: SettingsDep, page: PageDep
) -> Page[KnowledgebasePublic]:
    rows, total = await _service(state).list_page(account.id, limit=page.limit, offset=page.offset)
    return make_page(request, page, total, [_public(r, account, settings.base_url) for r in rows])


@router.get("/{document_id}/", summary="Get a document and its indexing status")
async def get_document(
    document_id: DocumentId, account: AccountDep, state: StateDep, settings: SettingsDep
) -> KnowledgebasePublic:
    doc = await _service(state).get(account.id, document_id)
    if doc is None:
        raise NotFound("Knowledgebase", document_id)
    return _public(doc, account, settings.base_url)


@router.patch(
    "/{document_id}/", summary="Rename a document and/or replace its file (re-indexes)",
    responses=error_responses(413, 415, 429),
    openapi_extra=_body_doc("A new name and/or file or text", KnowledgebaseTextUpdate, file_required=False),
)  # fmt: skip
async def update_document(
    document_id: DocumentId, request: Request, account: AccountDep, state: StateDep, settings: SettingsDep
) -> KnowledgebasePublic:
    service = _service(state)
    if await service.get(account.id, document_id) is None:  # 404 before reading a large body
        raise NotFound("Knowledgebase", document_id)
    name, upload = await _parse(request, service, creating=False)
    try:
        doc = await service.update(account.id, document_id, name=name, upload=upload)
    except IndexerBusy as exc:
        raise _busy(exc) from None
    if doc is None:
        raise NotFound("Knowledgebase", document_id)
    return _public(doc, account, settings.base_url)


@router.delete(
    "/{document_id}/", status_code=204, response_class=Response,
    summary="Delete a document, its stored file and its chunks",
)  # fmt: skip
async def delete_document(document_id: DocumentId, account: AccountDep, state: StateDep) -> Response:
    if not await _service(state).delete(account.id, document_id):
        raise NotFound("Knowledgebase", document_id)
    return Response(status_code=204)


@router.get(
    "/{document_id}/file/", summary="Download the stored original", response_class=FileResponse,
    responses={200: {"content": _FILE_CONTENT, "description": "The original file, with its sniffed type"}},
)  # fmt: skip
async def download_document(document_id: DocumentId, account: AccountDep, state: StateDep) -> FileResponse:
    service = _service(state)
    doc = await service.get(account.id, document_id)
    if doc is None:
        raise NotFound("Knowledgebase", document_id)
    path = service.file_path(doc)
    if path is None:
        raise ApiError(404, f"The stored file of Knowledgebase {document_id!r} is missing.")
    return FileResponse(path, media_type=doc.content_type, filename=doc.filename)
