import os
from pathlib import Path

import pytest

from appliance.telephony.stream_token import StreamClaims, StreamTokens, TokenError, load_or_create_secret

CLAIMS = StreamClaims(
    call_uuid="3f1c2d4e-0000-4000-8000-123456789abc",
    agent_id="9a8b7c6d-0000-4000-8000-abcdef012345",
    account_id="MA0123456789ABCDEFGH",
    from_number="+14155550100",
    to_number="sip:agent@phone.plivo.com",
    direction="inbound",
)


def _tokens(now: list[float]) -> StreamTokens:
    return StreamTokens(b"k" * 32, ttl_s=300, clock=lambda: now[0])


def test_round_trip_carries_all_metadata_in_letters_and_digits() -> None:
    now = [1_700_000_000.0]
    token = _tokens(now).issue(CLAIMS)
    assert token.isalnum() and len("token=" + token) <= 512
    claims = _tokens(now).verify(token)
    assert claims.call_uuid == CLAIMS.call_uuid and claims.to_number == CLAIMS.to_number
    assert claims.account_id == CLAIMS.account_id and claims.direction == "inbound"
    assert claims.expires_at == 1_700_000_300


def test_expired_token_is_refused() -> None:
    now = [1_700_000_000.0]
    token = _tokens(now).issue(CLAIMS)
    now[0] += 301
    with pytest.raises(TokenError, match="expired"):
        _tokens(now).verify(token)


@pytest.mark.parametrize("position", [0, 10, 40, -3, -1])
def test_tampered_token_is_refused(position: int) -> None:
    now = [1_700_000_000.0]
    token = _tokens(now).issue(CLAIMS)
    chars = list(token)
    chars[position] = "A" if chars[position] != "A" else "B"
    with pytest.raises(TokenError):
        _tokens(now).verify("".join(chars))


def test_other_secret_and_garbage_are_refused() -> None:
    now = [1_700_000_000.0]
    token = _tokens(now).issue(CLAIMS)
    with pytest.raises(TokenError, match="signature"):
        StreamTokens(b"z" * 32, ttl_s=300, clock=lambda: now[0]).verify(token)
    for bad in ["", "abc-def", "A" * 1000, "AAAA"]:
        with pytest.raises(TokenError):
            _tokens(now).verify(bad)


def test_long_sip_uris_are_cut_not_refused() -> None:
    now = [1_700_000_000.0]
    claims = StreamClaims("c", "a", "acc", "sip:" + "x" * 200 + "@h", "+1", "outbound")
    verified = _tokens(now).verify(_tokens(now).issue(claims))
    assert len(verified.from_number) == 64


def test_secret_is_created_once_private_and_reused(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path / "data")
    assert len(first) == 32
    assert os.stat(tmp_path / "data" / "stream_token.key").st_mode & 0o777 == 0o600
    assert load_or_create_secret(tmp_path / "data") == first
