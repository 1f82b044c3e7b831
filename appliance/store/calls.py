"""Call records: one row per call, one per transcript turn, one per function call.

Rows are written while the call goes on (a writer task per call drains the session's events), so a
record survives a crash; calls still marked ``live`` at start-up are closed as failed.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..call.records import CallEvent, CallFinished, CallStarted, FunctionCallRecord, TurnRecord
from .db import Base, UtcDateTime, utcnow

log = logging.getLogger(__name__)

LIVE = "live"
WRITER_QUEUE_MAX = 2000


class Call(Base):
    __tablename__ = "calls"

    call_uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    # No foreign key: a call record outlives a deleted agent.
    agent_id: Mapped[str] = mapped_column(String(36), index=True)
    direction: Mapped[str] = mapped_column(String(16), default="inbound")
    from_number: Mapped[str] = mapped_column(String(64), default="")
    to_number: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16), default=LIVE, index=True)
    hangup_cause: Mapped[str | None] = mapped_column(String(64), default=None)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)

    turns: Mapped[list[CallTurn]] = relationship(
        order_by="CallTurn.seq", lazy="selectin", cascade="all, delete-orphan"
    )
    function_calls: Mapped[list[CallFunctionCall]] = relationship(
        order_by="CallFunctionCall.id", lazy="selectin", cascade="all, delete-orphan"
    )


class CallTurn(Base):
    __tablename__ = "call_turns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_uuid: Mapped[str] = mapped_column(
        String(64), ForeignKey("calls.call_uuid", ondelete="CASCADE"), index=True
    )
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text, default="")
    heard_text: Mapped[str | None] = mapped_column(Text, default=None)
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    ended_at: Mapped[datetime] = mapped_column(UtcDateTime())
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class CallFunctionCall(Base):
    __tablename__ = "call_function_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    call_uuid: Mapped[str] = mapped_column(
        String(64), ForeignKey("calls.call_uuid", ondelete="CASCADE"), index=True
    )
    turn_seq: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    arguments: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[Any] = mapped_column(JSON, nullable=True, default=None)
    ok: Mapped[bool] = mapped_column(Boolean, default=True)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


# -- queries ------------------------------------------------------------------------------------


async def get_call(session: AsyncSession, account_id: str, call_uuid: str) -> Call | None:
    stmt = select(Call).where(Call.account_id == account_id, Call.call_uuid == call_uuid)
    return (await session.execute(stmt)).scalar_one_or_none()


async def call_exists(session: AsyncSession, call_uuid: str) -> bool:
    stmt = select(Call.call_uuid).where(Call.call_uuid == call_uuid)
    return (await session.execute(stmt)).first() is not None


async def list_calls(
    session: AsyncSession, account_id: str, *, limit: int, offset: int, agent_id: str | None = None
) -> tuple[list[Call], int]:
    where = [Call.account_id == account_id]
    if agent_id:
        where.append(Call.agent_id == agent_id)
    total = (await session.execute(select(func.count()).select_from(Call).where(*where))).scalar_one()
    stmt = (
        select(Call).where(*where).order_by(Call.started_at.desc(), Call.call_uuid)
        .limit(limit).offset(offset)
    )  # fmt: skip
    return list((await session.execute(stmt)).scalars()), int(total)


async def close_stale_calls(session: AsyncSession) -> int:
    """Calls left ``live`` by a process that died: they cannot still be running here."""
    result = await session.execute(
        update(Call)
        .where(Call.status == LIVE)
        .values(status="failed", hangup_cause="appliance_restart", ended_at=utcnow())
    )
    await session.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _fmt(dt: datetime | None) -> str | None:
    return dt.isoformat().replace("+00:00", "Z") if dt is not None else None


def call_public(call: Call) -> dict[str, Any]:
    duration = None
    if call.ended_at is not None:
        duration = round((call.ended_at - call.started_at).total_seconds(), 3)
    return {
        "call_uuid": call.call_uuid,
        "agent_id": call.agent_id,
        "direction": call.direction,
        "from": call.from_number,
        "to": call.to_number,
        "status": call.status,
        "hangup_cause": call.hangup_cause,
        "start_time": _fmt(call.started_at),
        "end_time": _fmt(call.ended_at),
        "duration": duration,
        "transcript": [
            {
                "seq": t.seq,
                "who": t.role,
                "text": t.text,
                "heard_text": t.heard_text,
                "interrupted": t.interrupted,
                "start_time": _fmt(t.started_at),
                "end_time": _fmt(t.ended_at),
                "timings": t.timings or {},
            }
            for t in call.turns
        ],
        "function_calls": [
            {
                "turn": f.turn_seq,
                "name": f.name,
                "arguments": f.arguments,
                "result": f.result,
                "ok": f.ok,
                "error": f.error,
                "time": _fmt(f.at),
            }
            for f in call.function_calls
        ],
    }


# -- the writer ----------------------------------------------------------------------------------


class CallRecordWriter:
    """Persists one call's events in order, in its own task, so the session never waits on the DB.

    ``submit`` never blocks; ``run`` returns after the ``CallFinished`` event is stored."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], call_uuid: str):
        self.sessions = sessions
        self.call_uuid = call_uuid
        self._queue: asyncio.Queue[CallEvent] = asyncio.Queue(maxsize=WRITER_QUEUE_MAX)
        self.dropped = 0

    def submit(self, event: CallEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("call %s: record queue full, dropped %s", self.call_uuid, type(event).__name__)

    async def run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._write(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed write loses one record, never the call
                log.exception("call %s: writing %s failed", self.call_uuid, type(event).__name__)
            if isinstance(event, CallFinished):
                return

    async def _write(self, event: CallEvent) -> None:
        async with self.sessions() as session:
            if isinstance(event, CallStarted):
                info = event.info
                existing = await session.get(Call, info.call_uuid)
                if existing is None:
                    session.add(
                        Call(
                            call_uuid=info.call_uuid, account_id=info.account_id, agent_id=info.agent_id,
                            direction=info.direction, from_number=info.from_number[:64],
                            to_number=info.to_number[:64], status=LIVE, started_at=event.started_at,
                        )
                    )  # fmt: skip
                else:
                    existing.status = LIVE
            elif isinstance(event, TurnRecord):
                session.add(
                    CallTurn(
                        call_uuid=self.call_uuid, seq=event.seq, role=event.role, text=event.text,
                        heard_text=event.heard_text, interrupted=event.interrupted,
                        started_at=event.started_at, ended_at=event.ended_at, timings=event.timings,
                    )
                )  # fmt: skip
            elif isinstance(event, FunctionCallRecord):
                session.add(
                    CallFunctionCall(
                        call_uuid=self.call_uuid, turn_seq=event.turn_seq, name=event.name[:100],
                        arguments=event.arguments, result=_jsonable(event.result), ok=event.ok,
                        error=event.error, at=event.at,
                    )
                )  # fmt: skip
            elif isinstance(event, CallFinished):
                await session.execute(
                    update(Call)
                    .where(Call.call_uuid == self.call_uuid)
                    .values(status=event.status, hangup_cause=event.hangup_cause, ended_at=event.ended_at)
                )
            await session.commit()


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return str(value)
