"""``GET /metrics``: the process's metrics in Prometheus text format (0.0.4).

Metrics span every account, so the route is guarded: with ``metrics_token`` set, a caller must
send ``Authorization: Bearer <token>`` (compared in constant time); without one, only loopback
clients are served. The token is never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from fastapi import APIRouter, Request, Response

from ..metrics import CONTENT_TYPE
from .deps import StateDep
from .errors import ApiError, ErrorBody, error_responses

log = logging.getLogger(__name__)

router = APIRouter(tags=["status"])

_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="appliance-metrics"'}


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything else, names included."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_access(token: str, authorization: str | None, client_host: str | None) -> None:
    """Raise :class:`ApiError` (401 or 403) unless this request may read the metrics."""
    if token:
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8"), token.encode("utf-8")
        ):
            raise ApiError(
                401, "Metrics need the header 'Authorization: Bearer <metrics_token>'.", _BEARER_CHALLENGE
            )
        return
    if not is_loopback(client_host):
        raise ApiError(
            403,
            "Metrics are served only to loopback clients while no metrics_token is configured: "
            "set APPLIANCE_METRICS_TOKEN to scrape from another host.",
        )


@router.get(
    "/metrics",
    summary="Process metrics in Prometheus text format (bearer token, or loopback when none is set)",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text 0.0.4",
        },
        **error_responses(401),
        403: {"model": ErrorBody, "description": "No metrics_token is set and the client is not loopback"},
    },
)
async def metrics(request: Request, state: StateDep) -> Response:
    client = request.client.host if request.client is not None else None
    try:
        check_access(
            state.settings.metrics_token.get_secret_value(), request.headers.get("authorization"), client
        )
    except ApiError as exc:
        log.info("metrics refused to %s (%d)", client, exc.status_code)
        raise
    state.metrics.collect(state)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
