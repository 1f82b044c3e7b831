"""What a call session reports about itself, as plain data. The store turns these into rows
(``appliance/store/calls.py``); tests collect them in a list. Nothing here knows about SQL or HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

Role = Literal["caller", "agent"]


@dataclass(frozen=True)
class CallInfo:
    call_uuid: str
    account_id: str
    agent_id: str
    direction: str = "inbound"
    from_number: str = ""
    to_number: str = ""
    stream_id: str = ""


@dataclass(frozen=True)
class CallStarted:
    info: CallInfo
    started_at: datetime


@dataclass(frozen=True)
class TurnRecord:
    seq: int
    role: Role
    text: str
    started_at: datetime
    ended_at: datetime
    heard_text: str | None = None
    interrupted: bool = False
    # Milliseconds from the caller's last voiced frame to each stage (agent turns that answer speech).
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FunctionCallRecord:
    turn_seq: int
    name: str
    arguments: dict[str, Any]
    result: Any
    ok: bool
    error: str | None
    at: datetime


@dataclass(frozen=True)
class CallFinished:
    ended_at: datetime
    status: str  # completed | failed | transferred
    hangup_cause: str
    # Replies started at a pause: kept because the silence held, or dropped because the caller
    # went on talking.
    speculations_committed: int = 0
    speculations_dropped: int = 0


CallEvent = CallStarted | TurnRecord | FunctionCallRecord | CallFinished


class CallRecorder(Protocol):
    def submit(self, event: CallEvent) -> None:
        """Hand over an event without waiting (the writer persists it in its own task)."""
        ...


class TeeRecorder:
    """Hands every event to each of several recorders, in order (the record writer, metrics)."""

    def __init__(self, *recorders: CallRecorder):
        self.recorders = recorders

    def submit(self, event: CallEvent) -> None:
        for recorder in self.recorders:
            recorder.submit(event)


class MemoryRecorder:
    """Keeps every event in a list: for tests and the benchmark."""

    def __init__(self) -> None:
        self.events: list[CallEvent] = []

    def submit(self, event: CallEvent) -> None:
        self.events.append(event)

    @property
    def turns(self) -> list[TurnRecord]:
        return [e for e in self.events if isinstance(e, TurnRecord)]

    @property
    def function_calls(self) -> list[FunctionCallRecord]:
        return [e for e in self.events if isinstance(e, FunctionCallRecord)]

    @property
    def finished(self) -> CallFinished | None:
        return next((e for e in self.events if isinstance(e, CallFinished)), None)
