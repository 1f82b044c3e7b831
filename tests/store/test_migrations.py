from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from appliance.store.db import Base, Database
from appliance.store.migrate import alembic_config, current_revision, import_table_modules, upgrade


def _diff(conn: Connection) -> list[object]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def test_the_revisions_form_one_linear_chain() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())
    assert revisions[-1].down_revision is None
    assert all(not isinstance(r.down_revision, tuple) for r in revisions)


async def test_upgrade_head_builds_exactly_the_declared_schema(db: Database) -> None:
    import_table_modules()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert await current_revision(db) == head
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
        assert {"accounts", "functions", "agents", "agent_functions"} <= await conn.run_sync(_tables)


async def test_upgrade_is_idempotent_and_downgrade_round_trips(db: Database) -> None:
    await upgrade(db)  # already at head: nothing to do, no error
    async with db.engine.begin() as conn:
        await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_tables) <= {"alembic_version"}
    await upgrade(db)
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
