"""Functions: customer endpoints an agent's model may call, with the parameters it must collect.

``user_parameters`` and ``fixed_parameters`` are stored as JSON lists of plain dicts, validated at
the API edge (``appliance.api.functions``): user parameters are ``{"name", "type", "description",
"required", "enum"?}``, fixed ones ``{"name", "value"}`` (sent to the handler, never to the model).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text, UniqueConstraint, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base, UtcDateTime, new_id, utcnow


class Function(Base):
    __tablename__ = "functions"
    # The model calls functions by name, so two functions of one account may not share a name.
    __table_args__ = (UniqueConstraint("account_id", "name", name="uq_functions_account_id_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    handler_url: Mapped[str] = mapped_column(String(2000))
    user_parameters: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    fixed_parameters: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)


class FunctionNameTaken(Exception):
    def __init__(self, name: str):
        super().__init__(f"a function named {name!r} already exists in this account")
        self.name = name


async def name_taken(
    session: AsyncSession, account_id: str, name: str, exclude_id: str | None = None
) -> bool:
    stmt = select(Function.id).where(Function.account_id == account_id, Function.name == name)
    if exclude_id is not None:
        stmt = stmt.where(Function.id != exclude_id)
    return (await session.execute(stmt.limit(1))).first() is not None


async def create_function(session: AsyncSession, account_id: str, fields: dict[str, Any]) -> Function:
    if await name_taken(session, account_id, fields["name"]):
        raise FunctionNameTaken(fields["name"])
    function = Function(account_id=account_id, **fields)
    session.add(function)
    await session.commit()
    return function


async def get_function(session: AsyncSession, account_id: str, function_id: str) -> Function | None:
    stmt = select(Function).where(Function.account_id == account_id, Function.id == function_id)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_functions(
    session: AsyncSession, account_id: str, *, limit: int, offset: int
) -> tuple[list[Function], int]:
    where = Function.account_id == account_id
    total = (await session.execute(select(func.count()).select_from(Function).where(where))).scalar_one()
    stmt = (
        select(Function).where(where).order_by(Function.created_at.desc(), Function.id)
        .limit(limit).offset(offset)
    )  # fmt: skip
    return list((await session.execute(stmt)).scalars()), int(total)


async def update_function(session: AsyncSession, function: Function, changes: dict[str, Any]) -> Function:
    name = changes.get("name")
    if name is not None and await name_taken(session, function.account_id, name, exclude_id=function.id):
        raise FunctionNameTaken(name)
    for key, value in changes.items():
        setattr(function, key, value)
    function.updated_at = utcnow()
    await session.commit()
    return function


async def delete_function(session: AsyncSession, function: Function) -> None:
    """Delete a function; agents that used it simply lose it (their other functions stay)."""
    from .agents import agent_functions

    # The foreign key cascades too; deleting the links explicitly keeps that true even on a SQLite
    # connection opened without foreign-key enforcement.
    await session.execute(delete(agent_functions).where(agent_functions.c.function_id == function.id))
    await session.delete(function)
    await session.commit()


async def missing_function_ids(session: AsyncSession, account_id: str, ids: list[str]) -> list[str]:
    """The ids in ``ids`` that are not functions of this account (another account's count as missing)."""
    if not ids:
        return []
    stmt = select(Function.id).where(Function.account_id == account_id, Function.id.in_(set(ids)))
    found = set((await session.execute(stmt)).scalars())
    return [i for i in ids if i not in found]
