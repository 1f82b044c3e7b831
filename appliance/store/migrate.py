"""Schema migrations: Alembic ``upgrade head`` run programmatically, on SQLite and PostgreSQL alike.

The app runs this at start-up (``services.open_services``) and the CLI before touching accounts, so
a fresh data dir or an older database is brought to the current schema without a separate step.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from .db import Database

if TYPE_CHECKING:
    from ..config import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Every module that declares tables on ``Base``; optional ones are owned by other parts and may not
# exist yet in a partial checkout.
TABLE_MODULES = ("accounts", "functions", "agents")
OPTIONAL_TABLE_MODULES = ("documents", "calls")


def import_table_modules() -> None:
    """Import every table module so ``Base.metadata`` is complete (autogenerate, create_all)."""
    for name in TABLE_MODULES:
        importlib.import_module(f"{__package__}.{name}")
    for name in OPTIONAL_TABLE_MODULES:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


async def upgrade(database: Database, revision: str = "head") -> None:
    async with database.engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)


def _current(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(database: Database) -> str | None:
    async with database.engine.connect() as conn:
        return await conn.run_sync(_current)


async def open_database(url: str) -> Database:
    """A :class:`Database` on ``url`` with the schema at head."""
    if url.startswith("sqlite"):
        # The sqlite file's directory must exist before the first connection.
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    database = Database(url)
    migrated = False
    try:
        await upgrade(database)
        migrated = True
    finally:
        if not migrated:
            await database.dispose()
    return database


@contextlib.asynccontextmanager
async def opened_database(settings: Settings) -> AsyncIterator[Database]:
    database = await open_database(settings.resolved_database_url)
    try:
        yield database
    finally:
        await database.dispose()
