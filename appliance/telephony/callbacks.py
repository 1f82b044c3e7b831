"""Plivo's webhook callbacks besides the answer URL: stream status and hangup (PLIVO.md §1, §3).

Stream status callbacks come in two vocabularies (``StartStream``/``StopStream``/``DroppedStream``/
``DegradedStream`` or ``started``/``stopped``/``failed``); both map onto one small set of kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

StreamStatusKind = Literal["started", "stopped", "failed", "degraded", "unknown"]

_STREAM_EVENTS: dict[str, StreamStatusKind] = {
    "startstream": "started",
    "started": "started",
    "stopstream": "stopped",
    "stopped": "stopped",
    "droppedstream": "failed",
    "failed": "failed",
    "degradedstream": "degraded",
    "degraded": "degraded",
}


@dataclass(frozen=True, slots=True)
class StreamStatus:
    kind: StreamStatusKind
    event: str  # as Plivo sent it
    call_uuid: str
    stream_id: str
    error: str


def parse_stream_status(form: Mapping[str, str]) -> StreamStatus:
    """A stream status callback's form fields -> its kind (either vocabulary; unknown kept as such)."""
    event = form.get("Event") or form.get("Status") or form.get("StreamStatus") or ""
    return StreamStatus(
        kind=_STREAM_EVENTS.get(event.strip().lower(), "unknown"),
        event=event,
        call_uuid=form.get("CallUUID", ""),
        stream_id=form.get("StreamID") or form.get("StreamId") or form.get("stream_id") or "",
        error=form.get("Error") or form.get("ErrorMessage") or "",
    )


@dataclass(frozen=True, slots=True)
class Hangup:
    call_uuid: str
    cause: str
    duration_s: int | None
    bill_duration_s: int | None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def parse_hangup(form: Mapping[str, str]) -> Hangup:
    """The hangup webhook's fields (``CallUUID``, ``HangupCause``, ``Duration``, ``BillDuration``)."""
    return Hangup(
        call_uuid=form.get("CallUUID", ""),
        cause=form.get("HangupCause") or form.get("HangupCauseName") or "",
        duration_s=_int(form.get("Duration")),
        bill_duration_s=_int(form.get("BillDuration")),
    )
