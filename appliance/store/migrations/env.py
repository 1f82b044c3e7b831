"""Alembic environment. Run in-process by ``appliance.store.migrate`` with an open connection (the
normal path), or by the ``alembic`` command, which connects with the appliance's configured URL.

Head revision (keep in step with README.md here): 0003_calls
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from appliance.store.db import Base, Database
from appliance.store.migrate import import_table_modules

import_table_modules()
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    from appliance.config import load_settings

    database = Database(load_settings().resolved_database_url)
    try:
        async with database.engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await database.dispose()


def run() -> None:
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported; run against a database")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_with_own_engine())


run()
