"""Short-lived signed tokens that authenticate the media websocket and carry the call's metadata.

Plivo's websocket has no credentials of its own, so the answer URL hands out a token (in the
websocket URL's query and/or ``extraHeaders``) binding call UUID, agent and account, plus From, To
and Direction, which the ``start`` message does not carry. The token is letters and digits only
(unpadded base32 of fields + truncated HMAC-SHA256), as ``extraHeaders`` values must be.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SECRET_FILE = "stream_token.key"
_VERSION = 1
_MAC_BYTES = 16  # 128-bit truncated HMAC: ample for a token that lives minutes
_SEP = "\x1f"  # unit separator: cannot occur in phone numbers, SIP URIs or ids
MAX_TOKEN_CHARS = 500  # "token=" + 500 still fits the 512-byte extraHeaders
MAX_NUMBER_CHARS = 64  # From/To are informational: long SIP URIs are cut, not refused


class TokenError(ValueError):
    """The token is malformed, tampered with, or expired (``reason`` says which)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StreamClaims:
    call_uuid: str
    agent_id: str
    account_id: str
    from_number: str = ""
    to_number: str = ""
    direction: str = ""
    expires_at: int = 0  # unix seconds; set by issue()


def load_or_create_secret(data_dir: Path) -> bytes:
    """The server's token key, created once (0600) in the data dir and reused across restarts."""
    path = data_dir / SECRET_FILE
    if path.exists():
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    # Write then rename, so a concurrent reader never sees a half-written key.
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    os.replace(tmp, path)
    return secret


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _b32decode(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded)


class StreamTokens:
    """Issues and verifies stream tokens with one server secret."""

    def __init__(self, secret: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("stream token secret must be at least 16 bytes")
        self._secret = secret
        self._ttl = ttl_s
        self._clock = clock

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, claims: StreamClaims) -> str:
        expires = int(self._clock() + self._ttl)
        fields = (
            claims.call_uuid,
            claims.agent_id,
            claims.account_id,
            claims.from_number[:MAX_NUMBER_CHARS],
            claims.to_number[:MAX_NUMBER_CHARS],
            claims.direction,
        )
        if any(_SEP in f for f in fields):
            raise ValueError("stream token fields may not contain control characters")
        body = struct.pack(">BI", _VERSION, expires) + _SEP.join(fields).encode("utf-8")
        token = _b32encode(body + self._mac(body))
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"stream token of {len(token)} chars is too long for extraHeaders")
        return token

    def verify(self, token: str) -> StreamClaims:
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isalnum():
            raise TokenError("malformed token")
        try:
            raw = _b32decode(token)
        except (binascii.Error, ValueError) as exc:
            raise TokenError("malformed token") from exc
        # Trailing bits of unpadded base32 are free: only the canonical spelling is the token.
        if len(raw) < 5 + _MAC_BYTES or _b32encode(raw) != token:
            raise TokenError("malformed token")
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise TokenError("bad token signature")
        version, expires = struct.unpack(">BI", body[:5])
        if version != _VERSION:
            raise TokenError("unknown token version")
        if self._clock() >= expires:
            raise TokenError("token expired")
        try:
            fields = body[5:].decode("utf-8").split(_SEP)
        except UnicodeDecodeError as exc:
            raise TokenError("malformed token") from exc
        if len(fields) != 6:
            raise TokenError("malformed token")
        call_uuid, agent_id, account_id, from_number, to_number, direction = fields
        return StreamClaims(call_uuid, agent_id, account_id, from_number, to_number, direction, expires)
