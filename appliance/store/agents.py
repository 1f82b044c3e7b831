"""Voice agents: prompt, models, the functions it may call and the documents it may retrieve from.

``answer_llm``, ``stt`` and ``tts`` are JSON objects (validated and given defaults at the API edge).
Functions are linked through ``agent_functions`` (ordered, cascading on either side's delete), so
``agent.functions`` yields the :class:`Function` rows in the order the user gave. Knowledge-base ids
are a JSON list: documents are owned by the knowledge module, which calls
:func:`remove_knowledgebase_id` when one is deleted.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    column,
    delete,
    func,
    insert,
    select,
    table,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .db import Base, UtcDateTime, new_id, utcnow
from .functions import Function

agent_functions = Table(
    "agent_functions",
    Base.metadata,
    Column("agent_id", String(36), ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True),
    Column(
        "function_id",
        String(36),
        ForeignKey("functions.id", ondelete="CASCADE"),
        primary_key=True,
        index=True,
    ),
    Column("position", Integer, nullable=False, default=0),
)


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    welcome_message: Mapped[str] = mapped_column(Text, default="")
    prompt: Mapped[str] = mapped_column(Text, default="")
    answer_llm: Mapped[dict[str, Any]] = mapped_column(JSON)
    stt: Mapped[dict[str, Any]] = mapped_column(JSON)
    tts: Mapped[dict[str, Any]] = mapped_column(JSON)
    knowledgebase_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    call_timeout: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)

    # Loaded with the agent (selectin), in the user's order; written only by set_function_ids.
    functions: Mapped[list[Function]] = relationship(
        secondary=agent_functions,
        order_by=agent_functions.c.position,
        lazy="selectin",
        viewonly=True,
    )

    @property
    def function_ids(self) -> list[str]:
        return [f.id for f in self.functions]


async def _set_function_ids(session: AsyncSession, agent_id: str, function_ids: list[str]) -> None:
    await session.execute(delete(agent_functions).where(agent_functions.c.agent_id == agent_id))
    unique = list(dict.fromkeys(function_ids))
    if unique:
        await session.execute(
            insert(agent_functions),
            [{"agent_id": agent_id, "function_id": f, "position": i} for i, f in enumerate(unique)],
        )


async def create_agent(
    session: AsyncSession, account_id: str, fields: dict[str, Any], function_ids: list[str]
) -> Agent:
    """Create an agent. ``function_ids`` must already be checked with ``missing_function_ids``."""
    agent = Agent(account_id=account_id, **fields)
    session.add(agent)
    await session.flush()
    await _set_function_ids(session, agent.id, function_ids)
    await session.commit()
    await session.refresh(agent, ["functions"])
    return agent


async def get_agent(session: AsyncSession, account_id: str, agent_id: str) -> Agent | None:
    """The agent with its functions loaded, or None (also for another account's agent)."""
    stmt = select(Agent).where(Agent.account_id == account_id, Agent.id == agent_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_agents(
    session: AsyncSession, account_id: str, *, limit: int, offset: int
) -> tuple[list[Agent], int]:
    where = Agent.account_id == account_id
    total = (await session.execute(select(func.count()).select_from(Agent).where(where))).scalar_one()
    stmt = (
        select(Agent).where(where).order_by(Agent.created_at.desc(), Agent.id)
        .limit(limit).offset(offset)
    )  # fmt: skip
    return list((await session.execute(stmt)).scalars()), int(total)


async def recent_agents(session: AsyncSession, limit: int) -> list[Agent]:
    """The ``limit`` most recently changed agents of every account, most recent first."""
    stmt = select(Agent).order_by(Agent.updated_at.desc(), Agent.id).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def agents_using_function(
    session: AsyncSession, account_id: str, function_id: str, limit: int
) -> list[Agent]:
    """Up to ``limit`` of the account's agents that offer this function, most recently changed first."""
    stmt = (
        select(Agent)
        .join(agent_functions, agent_functions.c.agent_id == Agent.id)
        .where(Agent.account_id == account_id, agent_functions.c.function_id == function_id)
        .order_by(Agent.updated_at.desc(), Agent.id)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def update_agent(
    session: AsyncSession, agent: Agent, changes: dict[str, Any], function_ids: list[str] | None = None
) -> Agent:
    for key, value in changes.items():
        setattr(agent, key, value)
    agent.updated_at = utcnow()
    if function_ids is not None:
        await _set_function_ids(session, agent.id, function_ids)
    await session.commit()
    await session.refresh(agent, ["functions"])
    return agent


async def delete_agent(session: AsyncSession, agent: Agent) -> None:
    await session.execute(delete(agent_functions).where(agent_functions.c.agent_id == agent.id))
    await session.delete(agent)
    await session.commit()


def _documents_table() -> Any:
    """The knowledge module's ``documents`` table (id, account_id), if that module is present."""
    from .migrate import import_table_modules

    import_table_modules()
    if "documents" not in Base.metadata.tables:
        return None
    return table("documents", column("id"), column("account_id"))


async def missing_knowledgebase_ids(session: AsyncSession, account_id: str, ids: list[str]) -> list[str]:
    """The ids that are not documents of this account (another account's count as missing)."""
    if not ids:
        return []
    documents = _documents_table()
    if documents is None:
        return list(ids)
    stmt = select(documents.c.id).where(documents.c.account_id == account_id, documents.c.id.in_(set(ids)))
    found = set((await session.execute(stmt)).scalars())
    return [i for i in ids if i not in found]


async def remove_knowledgebase_id(session: AsyncSession, account_id: str, document_id: str) -> int:
    """Drop a deleted document from every agent of the account that uses it; returns how many
    agents changed. Does not commit: the caller commits with its own delete."""
    changed = 0
    result = await session.execute(select(Agent).where(Agent.account_id == account_id))
    for agent in result.scalars():
        if document_id in agent.knowledgebase_ids:
            agent.knowledgebase_ids = [d for d in agent.knowledgebase_ids if d != document_id]
            changed += 1
    return changed
