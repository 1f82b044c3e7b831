"""Dependencies every router shares: the app state, a DB session, the authenticated account.

Import the ``Annotated`` aliases in route signatures::

    from .deps import AccountDep, SessionDep, StateDep

    @router.get("/Thing/")
    async def list_things(account: AccountDep, session: SessionDep) -> ...

``AccountDep`` reads the ``{auth_id}`` path parameter, so it only fits routes under
``/v1/Account/{auth_id}/``; it answers 401 (with ``WWW-Authenticate``) unless the HTTP Basic
credentials are that account's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from email.message import Message
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from sqlalchemy.ext.asyncio import AsyncSession

from ..config import Settings
from ..model_manifest import Manifest
from ..server import AppState
from ..store.accounts import Account, authenticate
from ..store.db import Database
from .errors import ApiError, Unauthorized

# auto_error=False: we answer missing credentials ourselves, in the shared error shape.
basic_auth = HTTPBasic(
    auto_error=False,
    realm="appliance",
    description="HTTP Basic with the account's auth_id as user name and auth_token as password.",
)


def get_state(request: Request) -> AppState:
    return request.app.state.appliance


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(request: Request) -> Settings:
    return get_state(request).settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_manifest(request: Request) -> Manifest:
    return get_state(request).manifest


ManifestDep = Annotated[Manifest, Depends(get_manifest)]


def get_database(request: Request) -> Database:
    database = get_state(request).services.get("db")
    if database is None:
        raise RuntimeError("the store is not open (services not started)")
    return database


DatabaseDep = Annotated[Database, Depends(get_database)]


async def db_session(database: DatabaseDep) -> AsyncIterator[AsyncSession]:
    """One session per request, closed (and rolled back if uncommitted) when the request ends."""
    async with database.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(db_session)]

AuthIdPath = Annotated[
    str, Path(description="The account's auth_id (also the Basic auth user name)", max_length=64)
]


async def current_account(
    auth_id: AuthIdPath,
    session: SessionDep,
    credentials: Annotated[HTTPBasicCredentials | None, Depends(basic_auth)],
) -> Account:
    if credentials is None:
        raise Unauthorized("Authentication required: use HTTP Basic with your auth_id and auth_token.")
    if credentials.username != auth_id:
        raise Unauthorized("The auth_id in the URL does not match the credentials.")
    account = await authenticate(session, credentials.username, credentials.password)
    if account is None:
        raise Unauthorized("Wrong auth_id or auth_token.")
    return account


AccountDep = Annotated[Account, Depends(current_account)]


def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON. Add as ``dependencies=[Depends(require_json)]``."""
    content_type = request.headers.get("content-type")
    if content_type:
        message = Message()
        message["content-type"] = content_type
        subtype = message.get_content_subtype()
        if message.get_content_maintype() == "application" and (
            subtype == "json" or subtype.endswith("+json")
        ):
            return
    raise ApiError(415, f"Unsupported content type {content_type or '(none)'}: send application/json.")


JsonBody = Depends(require_json)
