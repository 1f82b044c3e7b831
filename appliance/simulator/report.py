"""What the simulated caller measured: turns, barge-ins, agent audio segments, violations."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from appliance.simulator.audio import Pcm

STOP_TICKS = 3  # agent audio absent this many 20 ms ticks in a row = stopped


@dataclass
class Violation:
    at_ms: float
    kind: str
    reason: str
    frame: str


@dataclass
class Turn:
    label: str
    started_ms: float | None = None
    speech_onset_ms: float | None = None
    last_voiced_ms: float | None = None
    ended_ms: float | None = None
    barge_in: bool = False
    first_agent_audio_ms: float | None = None
    voice_to_voice_ms: float | None = None


@dataclass
class BargeIn:
    label: str
    kind: str
    agent_played_ms_at_start: float
    onset_ms: float | None = None
    clear_audio_ms: float | None = None
    audio_stopped_ms: float | None = None
    resumed_ms: float | None = None
    reaction_ms: float | None = None
    cleared: bool = False
    last_voiced_ms: float | None = None
    stops_broken: int = 0  # times the agent stopped, then played on while the caller still talked


@dataclass
class Segment:
    """A stretch of agent audio. ``start_ms``/``end_ms`` are on the playout timeline (20 ms per tick,
    the time base of ``agent_audio``); ``wall_*`` are when those ticks happened, the time base of
    turns and barge-ins (they differ only when the caller fell behind real time)."""

    start_ms: float
    end_ms: float
    wall_start_ms: float = 0.0
    wall_end_ms: float = 0.0


@dataclass
class CallResult:
    call_uuid: str
    stream_id: str
    answer_status: int
    answer_xml: str
    stream_url: str | None = None
    closed_by: str = ""
    duration_ms: float = 0.0
    turns: list[Turn] = field(default_factory=list)
    barge_ins: list[BargeIn] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    server_dtmf: list[str] = field(default_factory=list)
    max_playback_lead_ms: float = 0.0
    late_ticks: int = 0
    agent_audio: Pcm = field(default_factory=lambda: np.zeros(0, np.int16), repr=False)

    def segment_audio(self, segment: Segment) -> Pcm:
        a, b = int(segment.start_ms * 8), int(segment.end_ms * 8)
        return self.agent_audio[a:b]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("agent_audio")
        data["agent_audio_ms"] = len(self.agent_audio) / 8.0
        return data


def stop_and_resume(
    played: bytearray, tick_ms: list[float], onset_ms: float, until_ms: float | None = None
) -> tuple[float | None, float | None, int]:
    """When the agent stopped for the caller who began at ``onset_ms``, and when it played again.

    A stop is STOP_TICKS silent ticks in a row (a one-frame underrun from server jitter is not a
    stop). The stop that counts is the first one after which the agent stays silent until
    ``until_ms`` (the caller's last voiced frame; ``None``: the first stop counts). A stop the agent
    broke while the caller was still talking (a pause on a breath, then more of the old reply) is
    what the caller heard as the agent talking over them: such stops are counted, not timed.
    Returns ``(stopped, resumed, stops_broken)``."""
    i = next((k for k, t in enumerate(tick_ms) if t >= onset_ms), len(tick_ms))
    broken = 0
    while i + STOP_TICKS <= len(played):
        if any(played[i : i + STOP_TICKS]):
            i += 1
            continue
        resumed = next((j for j in range(i + STOP_TICKS, len(played)) if played[j]), None)
        if resumed is None or until_ms is None or tick_ms[resumed] > until_ms:
            return tick_ms[i], (tick_ms[resumed] if resumed is not None else None), broken
        broken += 1
        i = resumed
    return None, None, broken


def agent_segments(played: bytearray, tick_ms: list[float], merge_gap_ms: int) -> list[Segment]:
    """Runs of played ticks; gaps up to ``merge_gap_ms`` (pauses between clauses) are bridged."""
    spans: list[tuple[int, int]] = []
    gap_ticks = max(1, merge_gap_ms // 20)
    start = last = -1
    for i, flag in enumerate(played):
        if not flag:
            continue
        if start < 0:
            start = i
        elif i - last > gap_ticks:
            spans.append((start, last))
            start = i
        last = i
    if start >= 0:
        spans.append((start, last))
    return [Segment(a * 20.0, (b + 1) * 20.0, tick_ms[a], tick_ms[b] + 20.0) for a, b in spans]
