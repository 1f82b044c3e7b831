"""Accounts (tenants): Plivo-style ``auth_id`` + ``auth_token`` Basic credentials, token stored hashed.

The token is hashed with scrypt and a per-account salt and compared in constant time. Because that
hash is deliberately slow (tens of ms), a verified (auth_id, stored hash, token digest) triple is kept
in a small in-memory LRU so that only the first request of a client pays it. The stored hash is part
of the key, so a token changed by another process (the CLI) invalidates the cached entry at once.

An account may hold Plivo credentials (for outbound calls and for checking Plivo's signatures). They
are needed in clear to sign and verify, so they are stored as given; the API only ever shows them
masked (:func:`mask_secret`). Protect the database file accordingly.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import string
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base, UtcDateTime, new_id, utcnow

if TYPE_CHECKING:
    from ..config import Settings

AUTH_ID_PREFIX = "MA"
AUTH_ID_LENGTH = 20
TOKEN_LENGTH = 40
_ALNUM_UPPER = string.ascii_uppercase + string.digits
_ALNUM = string.ascii_letters + string.digits
# scrypt cost: ~16 MiB and a few tens of ms per hash; parameters are stored with each hash.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    auth_id: Mapped[str] = mapped_column(String(AUTH_ID_LENGTH), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(200))
    plivo_auth_id: Mapped[str | None] = mapped_column(String(100), default=None)
    plivo_auth_token: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    @property
    def has_plivo_credentials(self) -> bool:
        return bool(self.plivo_auth_id and self.plivo_auth_token)


@dataclass(frozen=True)
class NewAccount:
    """A just-created account and its token in clear: the only moment the token is known."""

    account: Account
    auth_token: str

    @property
    def auth_id(self) -> str:
        return self.account.auth_id


# -- credentials ----------------------------------------------------------------------------------


def generate_auth_id() -> str:
    return AUTH_ID_PREFIX + "".join(
        secrets.choice(_ALNUM_UPPER) for _ in range(AUTH_ID_LENGTH - len(AUTH_ID_PREFIX))
    )


def generate_token() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(TOKEN_LENGTH))


def hash_token(token: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        token.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32, maxmem=64 << 20
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_token(stored: str, token: str) -> bool:
    """Slow, constant-time check of ``token`` against a :func:`hash_token` string."""
    try:
        scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        actual = hashlib.scrypt(
            token.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p),
            dklen=len(digest_hex) // 2, maxmem=64 << 20,
        )  # fmt: skip
    except ValueError:
        return False
    return hmac.compare_digest(actual, bytes.fromhex(digest_hex))


class _VerifiedCache:
    """Bounded LRU of credential triples that passed :func:`check_token` in this process."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, bytes], None] = OrderedDict()

    @staticmethod
    def key(account: Account, token: str) -> tuple[str, str, bytes]:
        return (account.auth_id, account.token_hash, hashlib.sha256(token.encode()).digest())

    def __contains__(self, key: tuple[str, str, bytes]) -> bool:
        if key in self._items:
            self._items.move_to_end(key)
            return True
        return False

    def add(self, key: tuple[str, str, bytes]) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


verified_cache = _VerifiedCache()


async def verify_token(account: Account, token: str) -> bool:
    key = _VerifiedCache.key(account, token)
    if key in verified_cache:
        return True
    # The slow hash runs in a worker thread so concurrent requests are not stalled behind it.
    ok = await asyncio.to_thread(check_token, account.token_hash, token)
    if ok:
        verified_cache.add(key)
    return ok


def mask_secret(value: str | None) -> str | None:
    """``"****WXYZ"``: enough to recognise a credential, never enough to use it."""
    if not value:
        return None
    return "****" + value[-4:] if len(value) > 8 else "****"


# -- service functions ----------------------------------------------------------------------------


async def create_account(session: AsyncSession, name: str) -> NewAccount:
    name = name.strip()
    if not name or len(name) > 200:
        raise ValueError("account name must be 1 to 200 characters")
    token = generate_token()
    token_hash = await asyncio.to_thread(hash_token, token)
    for _ in range(5):
        auth_id = generate_auth_id()
        if await get_account(session, auth_id) is None:
            break
    account = Account(auth_id=auth_id, name=name, token_hash=token_hash)
    session.add(account)
    await session.commit()
    return NewAccount(account=account, auth_token=token)


async def get_account(session: AsyncSession, auth_id: str) -> Account | None:
    result = await session.execute(select(Account).where(Account.auth_id == auth_id))
    return result.scalar_one_or_none()


async def authenticate(session: AsyncSession, auth_id: str, token: str) -> Account | None:
    """The account whose credentials these are, or None. Unknown auth ids answer without hashing:
    auth ids are not secret (they appear in every URL), tokens are."""
    account = await get_account(session, auth_id)
    if account is None or not await verify_token(account, token):
        return None
    return account


async def list_accounts(session: AsyncSession) -> list[Account]:
    result = await session.execute(select(Account).order_by(Account.created_at, Account.auth_id))
    return list(result.scalars())


async def count_accounts(session: AsyncSession) -> int:
    return int((await session.execute(select(func.count()).select_from(Account))).scalar_one())


async def set_plivo_credentials(
    session: AsyncSession, auth_id: str, plivo_auth_id: str | None, plivo_auth_token: str | None
) -> Account:
    """Set (or, with both None, clear) the Plivo credentials an account uses for calls."""
    if (plivo_auth_id is None) != (plivo_auth_token is None):
        raise ValueError("give both the Plivo auth id and the Plivo auth token, or neither")
    account = await get_account(session, auth_id)
    if account is None:
        raise LookupError(f"no account with auth_id {auth_id!r}")
    account.plivo_auth_id = plivo_auth_id
    account.plivo_auth_token = plivo_auth_token
    await session.commit()
    return account


def account_summary(account: Account) -> dict[str, Any]:
    return {
        "auth_id": account.auth_id,
        "name": account.name,
        "created_at": account.created_at.isoformat(),
        "plivo_auth_id": mask_secret(account.plivo_auth_id),
        "plivo_auth_token": mask_secret(account.plivo_auth_token),
    }


# -- command-line entry points (each opens and migrates the database itself) ---------------------


async def create_account_cli(settings: Settings, name: str) -> NewAccount:
    from .migrate import opened_database

    async with opened_database(settings) as db, db.sessions() as session:
        return await create_account(session, name)


async def ensure_first_account(settings: Settings, name: str = "default") -> NewAccount | None:
    from .migrate import opened_database

    async with opened_database(settings) as db, db.sessions() as session:
        if await count_accounts(session) > 0:
            return None
        return await create_account(session, name)


async def list_accounts_cli(settings: Settings) -> list[dict[str, Any]]:
    from .migrate import opened_database

    async with opened_database(settings) as db, db.sessions() as session:
        return [account_summary(a) for a in await list_accounts(session)]


async def set_plivo_cli(
    settings: Settings, auth_id: str, plivo_auth_id: str | None, plivo_auth_token: str | None
) -> dict[str, Any]:
    from .migrate import opened_database

    async with opened_database(settings) as db, db.sessions() as session:
        account = await set_plivo_credentials(session, auth_id, plivo_auth_id, plivo_auth_token)
        return account_summary(account)
