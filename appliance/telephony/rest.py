"""Plivo REST calls the appliance makes (PLIVO.md §3), over the plivo SDK, safe to await.

The SDK is blocking (``requests``), so every call runs in a worker thread. It also keeps per-client
state (a retry counter and a base URI it rewrites on every voice request), so each operation gets
its own client rather than sharing one across threads.

The API base URL is configurable (``settings.plivo_api_base_url``) so tests point it at a fake. The
SDK resets ``client.base_uri`` to its module constant before every voice request; a subclass whose
``base_uri`` ignores those writes keeps requests on the configured host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import plivo
from plivo import exceptions as plivo_errors

PLIVO_API_BASE_URL = "https://api.plivo.com"
T = TypeVar("T")


class PlivoApiError(Exception):
    """A Plivo REST call failed (bad credentials, validation, server error, network)."""


@dataclass(frozen=True, slots=True)
class CallFired:
    request_uuid: str
    message: str
    api_id: str


class _Client(plivo.RestClient):
    def __init__(self, auth_id: str, auth_token: str, api_base_url: str, timeout: float) -> None:
        self._fixed_base_uri = api_base_url.rstrip("/") + "/v1/Account"
        super().__init__(auth_id, auth_token, timeout=timeout)

    @property
    def base_uri(self) -> str:
        return self._fixed_base_uri

    @base_uri.setter
    def base_uri(self, _value: str) -> None:
        # The SDK assigns its hard-coded host before each request: keep the configured one.
        pass


def _field(response: Any, name: str) -> str:
    if response is None:
        return ""
    value = getattr(response, name, None)
    if value is None and isinstance(response, dict):
        value = response.get(name)
    return "" if value is None else str(value)


class PlivoRest:
    """Make, hang up and transfer calls for one Plivo account."""

    def __init__(self, auth_id: str, auth_token: str, *, api_base_url: str = "", timeout_s: float = 10.0):
        self.auth_id = auth_id
        self._auth_token = auth_token
        self._base = api_base_url or PLIVO_API_BASE_URL
        self._timeout = timeout_s

    def _client(self) -> _Client:
        try:
            return _Client(self.auth_id, self._auth_token, self._base, self._timeout)
        except plivo_errors.PlivoRestError as exc:
            raise PlivoApiError(f"invalid Plivo credentials: {exc}") from exc

    async def _run(self, op: Callable[[_Client], T]) -> T:
        def work() -> T:
            with self._client() as client:
                return op(client)

        try:
            return await asyncio.to_thread(work)
        except plivo_errors.PlivoRestError as exc:
            raise PlivoApiError(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:  # requests' connection errors derive from OSError
            raise PlivoApiError(f"Plivo API unreachable: {exc}") from exc

    async def make_call(
        self,
        from_number: str,
        to_number: str,
        answer_url: str,
        *,
        hangup_url: str | None = None,
        ring_timeout_s: int | None = None,
        time_limit_s: int | None = None,
    ) -> CallFired:
        extra: dict[str, Any] = {}
        if ring_timeout_s is not None:
            extra["ring_timeout"] = ring_timeout_s
        if time_limit_s is not None:
            extra["time_limit"] = time_limit_s

        def op(client: _Client) -> Any:
            return client.calls.create(
                from_=from_number,
                to_=to_number,
                answer_url=answer_url,
                answer_method="POST",
                hangup_url=hangup_url,
                hangup_method="POST",
                **extra,
            )

        response = await self._run(op)
        return CallFired(
            _field(response, "request_uuid"), _field(response, "message"), _field(response, "api_id")
        )

    async def hangup(self, call_uuid: str) -> bool:
        """Hang up a live call. False if Plivo says it has already ended (404), which is not an error."""

        def op(client: _Client) -> bool:
            try:
                client.calls.delete(call_uuid)
            except plivo_errors.ResourceNotFoundError:
                return False
            return True

        return await self._run(op)

    async def transfer(
        self, call_uuid: str, aleg_url: str, *, legs: str = "aleg", aleg_method: str = "POST"
    ) -> None:
        """Send the call's A leg to ``aleg_url`` (new XML instructions, e.g. a ``<Dial>``)."""

        def op(client: _Client) -> Any:
            return client.calls.transfer(call_uuid, legs=legs, aleg_url=aleg_url, aleg_method=aleg_method)

        await self._run(op)
