"""One error shape for every failure: ``{"error": "<sentence>", "api_id": "<uuid>"}``.

Routes raise :class:`ApiError` (or a subclass); the framework's own 404/405/422/500 are rewritten
into the same shape by the handlers installed here, so a client never sees FastAPI's ``detail``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Sentences for statuses the framework raises on its own, with no useful detail of ours.
_STATUS_SENTENCES = {
    400: "The request could not be read.",
    401: "Authentication credentials were missing or wrong.",
    404: "No such resource.",
    405: "This method is not allowed on this resource.",
    409: "The request conflicts with the current state of the resource.",
    413: "The request body is too large.",
    415: "Unsupported content type.",
    422: "A field is missing or has a bad value; the error names it.",
    429: "Too many requests.",
    500: "Internal server error.",
}


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="What went wrong, as a sentence a person can act on")
    api_id: str = Field(description="Unique id of this response, for support and logs")


class ApiError(Exception):
    """An error with an HTTP status and a sentence for the client."""

    def __init__(self, status_code: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = dict(headers or {})


class NotFound(ApiError):
    def __init__(self, what: str, ident: str):
        super().__init__(404, f"{what} {ident!r} not found.")


class Conflict(ApiError):
    def __init__(self, message: str):
        super().__init__(409, message)


class Unprocessable(ApiError):
    """422 for a value that is well-formed but refers to something missing or not allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(422, f"{field}: {message}")
        self.field = field


class Unauthorized(ApiError):
    def __init__(self, message: str = "Authentication failed: give this account's auth_id and auth_token."):
        super().__init__(401, message, {"WWW-Authenticate": 'Basic realm="appliance"'})


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": message, "api_id": str(uuid.uuid4())}
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """Turn pydantic's error list into one sentence naming each bad field (``body.answer_llm.model``)."""
    parts: list[str] = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ())]
        # "body" alone says nothing; keep "query"/"path" because they tell where to look.
        if loc and loc[0] == "body":
            loc = loc[1:]
        name = ".".join(loc) or "body"
        msg = str(err.get("msg", "is invalid"))
        if err.get("type") == "json_invalid":
            name, msg = "body", "is not valid JSON"
        elif err.get("type") == "missing":
            msg = "is required"
        parts.append(f"{name}: {msg}")
    more = len(errors) - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "Invalid request: " + "; ".join(parts) + "."


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.message, exc.headers)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    generic = {"Not Found", "Method Not Allowed", "Internal Server Error", "Unauthorized"}
    if not detail or detail in generic:
        detail = _STATUS_SENTENCES.get(exc.status_code, "The request failed.")
    return error_response(exc.status_code, detail, exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, describe_validation_errors(exc.errors()))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this response is sent, so the traceback still reaches the log.
    log.error("unhandled error on %s %s: %r", request.method, request.url.path, exc)
    return error_response(500, _STATUS_SENTENCES[500])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for the given statuses."""
    return {
        status: {"model": ErrorBody, "description": _STATUS_SENTENCES.get(status, "Error")}
        for status in statuses
    }
