from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from appliance.store import accounts
from appliance.store.accounts import Account
from appliance.store.db import Database
from tests.conftest import make_settings


async def test_created_account_has_plivo_style_id_and_only_a_hash_of_its_token(db: Database) -> None:
    async with db.sessions() as s:
        created = await accounts.create_account(s, "Acme")
    assert re.fullmatch(r"MA[A-Z0-9]{18}", created.auth_id)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", created.auth_token)
    async with db.sessions() as s:
        row = (await s.execute(select(Account).where(Account.auth_id == created.auth_id))).scalar_one()
    assert row.name == "Acme" and row.created_at.tzinfo is not None
    assert created.auth_token not in row.token_hash
    assert row.token_hash.startswith("scrypt$")


async def test_authenticate_accepts_the_token_and_refuses_anything_else(db: Database) -> None:
    async with db.sessions() as s:
        a = await accounts.create_account(s, "A")
        b = await accounts.create_account(s, "B")
    async with db.sessions() as s:
        assert (await accounts.authenticate(s, a.auth_id, a.auth_token)) is not None
        assert await accounts.authenticate(s, a.auth_id, a.auth_token[:-1]) is None
        assert await accounts.authenticate(s, a.auth_id, b.auth_token) is None
        assert await accounts.authenticate(s, "MANOSUCHACCOUNT00000", a.auth_token) is None
        assert await accounts.authenticate(s, a.auth_id, "") is None


async def test_verified_tokens_are_cached_and_a_changed_hash_invalidates_them(db: Database) -> None:
    async with db.sessions() as s:
        a = await accounts.create_account(s, "A")
    async with db.sessions() as s:
        account = await accounts.authenticate(s, a.auth_id, a.auth_token)
        assert account is not None
        assert accounts._VerifiedCache.key(account, a.auth_token) in accounts.verified_cache
        # Another process (the CLI) rotates the token: the cached old token must stop working.
        account.token_hash = accounts.hash_token("a-new-token")
        await s.commit()
    async with db.sessions() as s:
        assert await accounts.authenticate(s, a.auth_id, a.auth_token) is None
        assert await accounts.authenticate(s, a.auth_id, "a-new-token") is not None


def test_the_verified_cache_is_bounded() -> None:
    cache = accounts._VerifiedCache(capacity=3)
    keys = [("MA", "h", bytes([i])) for i in range(5)]
    for k in keys:
        cache.add(k)
    assert len(cache) == 3
    assert keys[0] not in cache and keys[4] in cache


def test_check_token_refuses_malformed_hashes() -> None:
    good = accounts.hash_token("secret")
    assert accounts.check_token(good, "secret")
    assert not accounts.check_token(good, "Secret")
    assert not accounts.check_token("plain$text", "secret")
    assert not accounts.check_token("scrypt$x$8$1$00$00", "secret")
    assert not accounts.check_token("bcrypt$16384$8$1$00$00", "secret")


async def test_plivo_credentials_are_stored_and_only_shown_masked(db: Database) -> None:
    async with db.sessions() as s:
        a = await accounts.create_account(s, "A")
    async with db.sessions() as s:
        row = await accounts.set_plivo_credentials(s, a.auth_id, "MAPLIVOAUTHID0001234", "plivo-token-wxyz")
        assert row.has_plivo_credentials
        summary = accounts.account_summary(row)
    assert summary["plivo_auth_id"] == "****1234" and summary["plivo_auth_token"] == "****wxyz"
    async with db.sessions() as s:
        stored = await accounts.get_account(s, a.auth_id)
        assert stored is not None and stored.plivo_auth_token == "plivo-token-wxyz"
        with pytest.raises(ValueError):
            await accounts.set_plivo_credentials(s, a.auth_id, "only-id", None)
        with pytest.raises(LookupError):
            await accounts.set_plivo_credentials(s, "MANOSUCH", "x", "y")
        cleared = await accounts.set_plivo_credentials(s, a.auth_id, None, None)
        assert not cleared.has_plivo_credentials


async def test_account_names_are_checked(db: Database) -> None:
    async with db.sessions() as s:
        for bad in ("", "   ", "x" * 201):
            with pytest.raises(ValueError):
                await accounts.create_account(s, bad)


async def test_cli_entry_points_migrate_a_fresh_data_dir(tmp_path: Path, database_url: str) -> None:
    # SQLite: the default file under a data dir that does not exist yet.
    overrides = {} if database_url.startswith("sqlite") else {"database_url": database_url}
    settings = make_settings(tmp_path / "fresh" / "data", **overrides)
    first = await accounts.ensure_first_account(settings)
    assert first is not None
    assert await accounts.ensure_first_account(settings) is None
    second = await accounts.create_account_cli(settings, "second")
    await accounts.set_plivo_cli(settings, second.auth_id, "PLIVOID123456", "PLIVOTOKEN987654")
    rows = await accounts.list_accounts_cli(settings)
    assert [r["auth_id"] for r in rows] == [first.auth_id, second.auth_id]
    assert rows[1]["plivo_auth_token"] == "****7654" and "PLIVOTOKEN" not in str(rows)
    assert "token_hash" not in rows[0]
    if not overrides:
        assert (tmp_path / "fresh" / "data" / "appliance.sqlite3").is_file()
