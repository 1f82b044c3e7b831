"""Calling a customer's function handler: one JSON POST, bounded in time and reply size.

Every way a handler can fail (timeout, refused connection, non-2xx, oversized or unreadable reply)
becomes a ``FunctionResult(ok=False)`` the conversation can speak about; nothing here raises.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

from .types import FunctionResult, FunctionSpec

log = logging.getLogger(__name__)


class Dispatcher(Protocol):
    async def dispatch(
        self, spec: FunctionSpec, arguments: Mapping[str, Any], context: Mapping[str, Any]
    ) -> FunctionResult: ...


class HttpDispatcher:
    """POSTs ``{"arguments": ..., "context": ...}`` to the function's ``handler_url``.

    The httpx client is shared by all conversations (connection pooling) and owned by whoever made
    this dispatcher; ``aclose`` closes it."""

    def __init__(
        self,
        *,
        timeout_s: float,
        max_reply_bytes: int,
        client: httpx.AsyncClient | None = None,
    ):
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        # Redirects are not followed: a handler URL names exactly one endpoint.
        self._client = client or httpx.AsyncClient(follow_redirects=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def dispatch(
        self, spec: FunctionSpec, arguments: Mapping[str, Any], context: Mapping[str, Any]
    ) -> FunctionResult:
        started = time.monotonic()

        def failed(error: str, status: int | None = None) -> FunctionResult:
            log.warning("function %s failed: %s", spec.name, error)
            return FunctionResult(
                ok=False, error=error, status_code=status, elapsed_s=time.monotonic() - started
            )

        if not spec.handler_url:
            return failed("the function has no handler URL")
        body = {"arguments": dict(arguments), "context": dict(context)}
        try:
            request = self._client.build_request(
                "POST",
                spec.handler_url,
                json=body,
                timeout=httpx.Timeout(self.timeout_s),
                headers={"Accept": "application/json, text/plain;q=0.9"},
            )
            # The whole exchange, body included, is bounded by the handler timeout.
            async with asyncio.timeout(self.timeout_s):
                response = await self._client.send(request, stream=True)
                try:
                    raw = await self._read_bounded(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            return failed(f"the handler did not answer within {self.timeout_s:g} seconds")
        except httpx.TimeoutException:
            return failed(f"the handler did not answer within {self.timeout_s:g} seconds")
        except _ReplyTooLarge:
            return failed(f"the handler's reply is larger than {self.max_reply_bytes} bytes")
        except httpx.HTTPError as exc:
            return failed(f"the handler could not be reached ({type(exc).__name__})")
        status = response.status_code
        if not 200 <= status < 300:
            return failed(f"the handler answered with HTTP status {status}", status)
        try:
            result = _decode(raw, response.headers.get("content-type", ""))
        except ValueError as exc:
            return failed(f"the handler's reply is not valid: {exc}", status)
        return FunctionResult(
            ok=True, result=result, status_code=status, elapsed_s=time.monotonic() - started
        )

    async def _read_bounded(self, response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise _ReplyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)


class _ReplyTooLarge(Exception):
    pass


def _decode(raw: bytes, content_type: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8 text") from exc
    if "json" in content_type.lower():
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg})") from exc
    stripped = text.strip()
    # Handlers often send JSON without the header; use it as JSON when it is.
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass
    return stripped
