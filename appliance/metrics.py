"""Process metrics in the Prometheus text exposition format (version 0.0.4), with no dependency.

A :class:`Registry` holds metric families (counters, gauges, histograms, each with fixed label
names) and renders them as text. :class:`ApplianceMetrics` is the appliance's own set: call
counters and per-stage turn timings are fed from call events (a :class:`CallObserver` per call sits
beside the record writer); queue depths, live calls and process figures are read at scrape time
(:meth:`ApplianceMetrics.collect`). One instance per app, which is one per process in production.

Label values come from code (stages, statuses, roles, model ids of the manifest), never from a
caller, so the number of series stays bounded.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

from .call.records import CallEvent, CallFinished, CallStarted, FunctionCallRecord, TurnRecord
from .runtime import resident_bytes

if TYPE_CHECKING:
    from .server import AppState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; suited to turn stages and voice-to-voice latency (50 ms to 10 s).
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_STAGE_KEY = re.compile(r"^([a-z][a-z0-9_]{0,40})_ms$")
_PROCESS_STARTED = time.monotonic()

LabelValues = tuple[str, ...]


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _series(name: str, labels: Mapping[str, str], value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {_format_value(value)}"
    return f"{name} {_format_value(value)}"


class _Family:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        self.name = name
        self.help = help_text
        self.labelnames: LabelValues = tuple(labelnames)
        for label in self.labelnames:
            if not _LABEL.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"bad label name {label!r} on {name}")
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def _labels(self, key: LabelValues) -> dict[str, str]:
        return dict(zip(self.labelnames, key, strict=True))

    def lines(self) -> Iterator[str]:
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.kind}"


class _ValueFamily(_Family):
    """A family with one number per label set (counters and gauges) in ``_values``."""

    _values: dict[LabelValues, float]

    def lines(self) -> Iterator[str]:
        yield from super().lines()
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            yield _series(self.name, self._labels(key), value)


class Counter(_ValueFamily):
    """A value that only goes up. Name it ``*_total``."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {} if self.labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)


class Gauge(_ValueFamily):
    """A value that goes up and down; :meth:`clear` drops every series (for scrape-time gauges)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def value(self, **labels: str) -> float | None:
        return self._values.get(self._key(labels))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


class _Buckets:
    def __init__(self, bounds: tuple[float, ...]):
        self.counts = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0


class Histogram(_Family):
    """Observations counted into cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ):
        super().__init__(name, help_text, labelnames)
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not bounds:
            raise ValueError(f"{name}: give at least one finite bucket bound")
        self.bounds = bounds
        self._series: dict[LabelValues, _Buckets] = {} if self.labelnames else {(): _Buckets(bounds)}

    def observe(self, value: float, **labels: str) -> None:
        if not math.isfinite(value):
            return
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Buckets(self.bounds)
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    series.counts[i] += 1
            series.count += 1
            series.sum += value

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return 0 if series is None else series.count

    def lines(self) -> Iterator[str]:
        yield from super().lines()
        with self._lock:
            items = sorted((key, list(s.counts), s.count, s.sum) for key, s in self._series.items())
        for key, counts, count, total in items:
            labels = self._labels(key)
            for bound, n in zip(self.bounds, counts, strict=True):
                yield _series(f"{self.name}_bucket", labels | {"le": _format_value(bound)}, n)
            yield _series(f"{self.name}_bucket", labels | {"le": "+Inf"}, count)
            yield _series(f"{self.name}_sum", labels, total)
            yield _series(f"{self.name}_count", labels, count)


_F = TypeVar("_F", bound=_Family)


class Registry:
    """Metric families in registration order; renders them as Prometheus text."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def _add(self, family: _F) -> _F:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} registered twice")
        self._families[family.name] = family
        return family

    def counter(self, name: str, help_text: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labelnames))

    def gauge(self, name: str, help_text: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labelnames))

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self._add(Histogram(name, help_text, labelnames, buckets))

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families.values():
            lines.extend(family.lines())
        return "\n".join(lines) + "\n"


class ApplianceMetrics:
    """The appliance's metrics. Call events come in through :meth:`observe_call`; everything else
    is read from the app when scraped (:meth:`collect`)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        # Calls.
        self.calls_active = r.gauge("appliance_calls_active", "Calls with a live media stream now.")
        self.calls_capacity = r.gauge(
            "appliance_calls_capacity", "Most calls served at once (limits.max_concurrent_calls)."
        )
        self.calls_started = r.counter("appliance_calls_started_total", "Calls whose media stream started.")
        self.calls_finished = r.counter(
            "appliance_calls_finished_total", "Calls that ended, by final status.", ["status"]
        )
        self.calls_refused = r.counter(
            "appliance_calls_refused_total",
            "Calls refused because every line was taken (at the answer URL or the stream start).",
        )
        # Turns.
        self.agent_turns = r.counter("appliance_agent_turns_total", "Agent turns recorded (replies spoken).")
        self.barge_ins = r.counter(
            "appliance_barge_ins_total", "Agent turns cut short by the caller (not by the call ending)."
        )
        self.speculations = r.counter(
            "appliance_speculative_replies_total",
            "Replies started at a pause before the end of the turn was certain, by outcome "
            "(committed: the silence held; dropped: the caller went on talking).",
            ["outcome"],
        )
        self.function_calls = r.counter(
            "appliance_function_calls_total", "Function calls the agent made, by outcome.", ["outcome"]
        )
        self.stage_seconds = r.histogram(
            "appliance_turn_stage_seconds",
            "Seconds from the caller's last voiced frame to each stage of the agent's answer "
            "(end_of_turn, transcript, first_token, first_clause, first_audio); asr is the "
            "transcription's own duration.",
            ["stage"],
        )
        self.voice_to_voice = r.histogram(
            "appliance_voice_to_voice_seconds",
            "Seconds from the caller's last voiced frame to the agent's first audio frame sent.",
        )
        # Engines, read at scrape time.
        self.engines_ready = r.gauge(
            "appliance_engines_ready", "1 once every default engine is loaded and warm."
        )
        self.engine_queue_depth = r.gauge(
            "appliance_engine_queue_depth",
            "Requests submitted to a loaded engine and not yet finished (running or queued).",
            ["role", "model"],
        )
        self.engine_busy = r.gauge(
            "appliance_engine_busy", "1 while the engine's worker is inside a request.", ["role", "model"]
        )
        self.phrase_cache_lookups = r.gauge(
            "appliance_tts_phrase_cache_lookups",
            "Short clauses looked up in a voice's cache of synthesized phrases since start, by outcome "
            "(hit: replayed without synthesis).",
            ["model", "outcome"],
        )
        self.abandoned_background_work = r.gauge(
            "appliance_engine_abandoned_background_work",
            "Pieces of background work (LLM prompt steps, synthesized sentences) an engine stopped "
            "mid-way since start because urgent work began; each is done again later.",
            ["role", "model"],
        )
        # The process.
        self.resident_memory = r.gauge(
            "appliance_process_resident_memory_bytes", "Resident memory of the appliance process."
        )
        self.open_fds = r.gauge(
            "appliance_process_open_fds", "Open file descriptors of the appliance process."
        )
        self.uptime = r.gauge("appliance_uptime_seconds", "Seconds since the appliance process started.")

    def observe_call(self) -> CallObserver:
        """A recorder for one call's events (give it the same events as the record writer)."""
        return CallObserver(self)

    def collect(self, state: AppState) -> None:
        """Read the scrape-time figures from the app: live calls, engine queues, the process."""
        manager = state.services.get("calls")
        live = getattr(manager, "live", None)
        self.calls_active.set(len(live) if live is not None else 0)
        self.calls_capacity.set(state.settings.limits.max_concurrent_calls)
        self.engines_ready.set(1 if state.engines.status.ready else 0)
        self.engine_queue_depth.clear()
        self.engine_busy.clear()
        self.phrase_cache_lookups.clear()
        self.abandoned_background_work.clear()
        for spec in state.manifest:
            engine = state.engines.peek(spec.role, spec.id)
            if engine is None:
                continue
            depth = getattr(engine, "queue_depth", None)
            if isinstance(depth, int | float):
                self.engine_queue_depth.set(depth, role=spec.role, model=spec.id)
            busy = getattr(engine, "busy", None)
            if isinstance(busy, bool):
                self.engine_busy.set(1 if busy else 0, role=spec.role, model=spec.id)
            phrases = getattr(engine, "phrases", None)
            if phrases is not None:
                self.phrase_cache_lookups.set(phrases.hits, model=spec.id, outcome="hit")
                self.phrase_cache_lookups.set(phrases.misses, model=spec.id, outcome="miss")
            abandoned = getattr(engine, "abandoned", None)
            if isinstance(abandoned, int):
                self.abandoned_background_work.set(abandoned, role=spec.role, model=spec.id)
        self.uptime.set(round(time.monotonic() - _PROCESS_STARTED, 3))
        rss, fds = _process_figures()
        if rss is not None:
            self.resident_memory.set(rss)
        if fds is not None:
            self.open_fds.set(fds)

    def render(self) -> str:
        return self.registry.render()


class CallObserver:
    """Turns one call's events into metrics; a :class:`~appliance.call.records.CallRecorder`.

    An interrupted agent turn counts as a barge-in unless the call's end comes right after it (the
    session records the reply it was speaking as interrupted when the caller hangs up)."""

    def __init__(self, metrics: ApplianceMetrics):
        self.metrics = metrics
        self._cut_turn = False  # the last event was an interrupted agent turn

    def submit(self, event: CallEvent) -> None:
        m = self.metrics
        if self._cut_turn and not isinstance(event, CallFinished):
            m.barge_ins.inc()
        self._cut_turn = False
        if isinstance(event, CallStarted):
            m.calls_started.inc()
        elif isinstance(event, CallFinished):
            m.calls_finished.inc(status=event.status or "unknown")
            if event.speculations_committed:
                m.speculations.inc(event.speculations_committed, outcome="committed")
            if event.speculations_dropped:
                m.speculations.inc(event.speculations_dropped, outcome="dropped")
        elif isinstance(event, FunctionCallRecord):
            m.function_calls.inc(outcome="ok" if event.ok else "error")
        elif isinstance(event, TurnRecord) and event.role == "agent":
            m.agent_turns.inc()
            self._cut_turn = event.interrupted
            self._observe_timings(event.timings)

    def _observe_timings(self, timings: Mapping[str, object]) -> None:
        for key, value in timings.items():
            match = _STAGE_KEY.match(key)
            if match is None or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            seconds = float(value) / 1000.0
            self.metrics.stage_seconds.observe(seconds, stage=match.group(1))
            if key == "first_audio_ms":
                self.metrics.voice_to_voice.observe(seconds)


def _process_figures() -> tuple[int | None, int | None]:
    """Resident bytes and open descriptors from /proc (None where there is no /proc)."""
    rss = resident_bytes()
    fds: int | None = None
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return rss, fds
