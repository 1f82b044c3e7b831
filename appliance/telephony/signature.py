"""Plivo V3 webhook signatures (PLIVO.md §4): validation with replay protection, and signing for tests.

Plivo signs ``URI[?sorted query][.sorted POST params].nonce`` with HMAC-SHA256 of the auth token.
The URI is the *public* one Plivo called, so it is rebuilt from the configured public base URL (a
reverse proxy changes scheme, host and port of what the local request sees).

The SDK's ``validate_v3_signature`` is used for http(s) URIs. It rejects ws:// and wss:// (its URI
validator only allows http[s]), and the websocket upgrade is signed as a GET on the full URI, so for
those schemes the same SDK primitives it is built from compute the expected value.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from plivo.exceptions import PlivoRestError
from plivo.utils import validate_v3_signature
from plivo.utils.signature_v3 import construct_get_url, construct_post_url, get_signature_v3

SIGNATURE_HEADER = "x-plivo-signature-v3"
MAIN_ACCOUNT_SIGNATURE_HEADER = "x-plivo-signature-ma-v3"
NONCE_HEADER = "x-plivo-signature-v3-nonce"

Params = Mapping[str, str | Sequence[str]]


def public_uri(base_url: str, path: str, query: str = "") -> str:
    """The URI Plivo called: configured public base URL + request path (+ raw query string).

    ``path`` is the path the application saw; a base URL with its own path prefix (the appliance
    mounted under ``/voice`` by a proxy) keeps that prefix.
    """
    parts = urlsplit(base_url.rstrip("/"))
    return urlunsplit((parts.scheme, parts.netloc, parts.path + "/" + path.lstrip("/"), query, ""))


def _params(params: Params | None) -> dict[str, str | list[str]]:
    # The SDK mutates the dict it is given (GET merges the query into it): always hand it a copy.
    out: dict[str, str | list[str]] = {}
    for key, value in (params or {}).items():
        out[key] = value if isinstance(value, str) else list(value)
    return out


def compute_signature(
    method: str, uri: str, nonce: str, auth_token: str, params: Params | None = None
) -> str:
    """The V3 signature Plivo would send for this request (base64 HMAC-SHA256)."""
    method = method.upper()
    if method == "GET":
        base = construct_get_url(uri, _params(params)).decode("utf-8")
    elif method == "POST":
        base = construct_post_url(uri, _params(params)).decode("utf-8")
    else:
        raise ValueError(f"Plivo signs GET and POST requests only, not {method}")
    signature: bytes = get_signature_v3(auth_token.encode(), base, nonce.encode())
    return signature.decode("ascii")


def _matches(method: str, uri: str, nonce: str, token: str, candidate: str, params: Params | None) -> bool:
    if uri.startswith(("http://", "https://")):
        try:
            return bool(validate_v3_signature(method, uri, nonce, token, candidate, _params(params)))
        except PlivoRestError:  # the SDK's argument validation: not a signature we can accept
            return False
    expected = compute_signature(method, uri, nonce, token, params)
    return hmac.compare_digest(expected.encode(), candidate.encode())


def signature_headers(
    method: str,
    uri: str,
    auth_token: str,
    params: Params | None = None,
    *,
    nonce: str | None = None,
    main_account_token: str | None = None,
) -> dict[str, str]:
    """Headers a Plivo request would carry (the fake Plivo and the simulated caller use this)."""
    nonce = nonce or str(secrets.randbelow(10**20)).zfill(20)
    headers = {
        "X-Plivo-Signature-V3": compute_signature(method, uri, nonce, auth_token, params),
        "X-Plivo-Signature-V3-Nonce": nonce,
    }
    if main_account_token:
        headers["X-Plivo-Signature-Ma-V3"] = compute_signature(method, uri, nonce, main_account_token, params)
    return headers


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str  # "" when ok; why not otherwise (for logs, never for the caller)


class NonceCache:
    """Nonces already accepted, each remembered for ``ttl_s``; at most ``max_entries`` (oldest go first)."""

    def __init__(
        self, ttl_s: float = 600.0, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ):
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        # Verification may run on worker threads as well as the loop.
        self._lock = threading.Lock()

    def add(self, nonce: str) -> bool:
        """Record ``nonce``; False if it was already seen within the TTL (a replay)."""
        now = self._clock()
        with self._lock:
            while self._seen:
                oldest, expires = next(iter(self._seen.items()))
                if expires > now and len(self._seen) < self._max:
                    break
                del self._seen[oldest]
            seen_until = self._seen.get(nonce)
            if seen_until is not None and seen_until > now:
                return False
            self._seen[nonce] = now + self._ttl
            self._seen.move_to_end(nonce)
            return True

    def __len__(self) -> int:
        return len(self._seen)


class SignatureVerifier:
    """Checks a Plivo request's V3 signature headers against one or more auth tokens.

    ``X-Plivo-Signature-V3`` (signed with the (sub)account token) and ``X-Plivo-Signature-Ma-V3``
    (signed with the main account token) are both accepted; each may hold several comma-separated
    signatures and any match is valid. A nonce is accepted once per TTL: a replayed request fails.
    """

    def __init__(self, nonces: NonceCache | None = None) -> None:
        self.nonces = nonces or NonceCache()

    def verify(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        auth_tokens: Iterable[str],
        params: Params | None = None,
    ) -> Verdict:
        lowered = {k.lower(): v for k, v in headers.items()}
        nonce = lowered.get(NONCE_HEADER, "").strip()
        if not nonce:
            return Verdict(False, "missing X-Plivo-Signature-V3-Nonce")
        candidates = [
            sig.strip()
            for header in (SIGNATURE_HEADER, MAIN_ACCOUNT_SIGNATURE_HEADER)
            for sig in lowered.get(header, "").split(",")
            if sig.strip()
        ]
        if not candidates:
            return Verdict(False, "missing X-Plivo-Signature-V3")
        tokens = [t for t in auth_tokens if t]
        if not tokens:
            return Verdict(False, "no auth token configured")
        method = method.upper()
        matched = any(
            _matches(method, uri, nonce, token, candidate, params)
            for token in tokens
            for candidate in candidates
        )
        if not matched:
            return Verdict(False, "signature mismatch")
        # Only a valid request may consume its nonce, or forged requests could burn real ones.
        if not self.nonces.add(nonce):
            return Verdict(False, "nonce already used (replay)")
        return Verdict(True, "")
