"""CPU priority between engines sharing a few cores.

On a 2-core box every engine competes for the same cores, and llama.cpp's threads, which meet at a
barrier after every layer, slow down badly when anything else runs beside them. Some work is
latency-critical: transcribing a turn and synthesizing the first clause of a reply, while the
caller waits in silence. The rest of a reply's generation is not (it only has to stay ahead of the
audio already playing). ``CpuPriority`` lets urgent work say so; the LLM checks it before each
step that holds only background work and waits, bounded, while urgent work runs, and engines that
can abandon background work under way are told when urgent work starts (``on_urgent``).

Measured on this 2-core box (scripts/bench_call): a first clause synthesized beside a running
generation took ~210 ms; alone, with both cores, ~130 ms.

Work that cannot wait runs beside the LLM anyway. Every engine's work is counted (``working_now``)
so that the LLM can step with fewer threads meanwhile (``[threads] llm_shared``, off by default).
``scripts/bench_contention`` on this 2-core box, the LLM with 2 threads / 1 thread: one decode step
44 / 70 ms alone, 79 / 91 ms beside a Piper synthesis, 89 / 80 ms beside a transcription, 120 /
143 ms beside both; the synthesis beside it 793 / 694 ms and the transcription 305 / 251 ms. One
thread trades the LLM's speed for the others'; whole calls under load were no faster either way
(docs/capacity.md). A Python thread busy 40% of the time costs a 2-thread step only 10-25%, so the
event loop does not count as work here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class CpuPriority:
    def __init__(self) -> None:
        self._urgent = 0
        self._idle = threading.Condition()
        self.yielded = 0  # times background work waited (for tests and metrics)
        self._foreground: set[int] = set()  # engines stepping latency-critical work of their own
        self._working = 0  # native work of other engines running now, urgent or not
        # Told when urgent work starts (``on_urgent``); weak, so that a dropped engine goes.
        self._on_urgent: list[weakref.WeakMethod[Callable[[], None]]] = []

    @property
    def urgent_now(self) -> int:
        return self._urgent

    def mark_foreground(self, owner: object, active: bool) -> None:
        """An engine that schedules its own urgent work (the LLM's first tokens of a reply) says
        when it is doing so, without making itself wait as ``urgent`` would."""
        if active:
            self._foreground.add(id(owner))
        else:
            self._foreground.discard(id(owner))

    @property
    def latency_critical_now(self) -> bool:
        """Someone waits in silence for work running now: background work that can be put off a
        little (synthesis of a reply's later clauses while earlier ones play) should be."""
        return bool(self._urgent or self._foreground)

    @property
    def working_now(self) -> int:
        """Engine work (transcriptions, syntheses, embeddings) running now in other threads."""
        return self._working

    @contextmanager
    def working(self) -> Iterator[None]:
        """Hold while an engine computes something that can wait (in any thread). Counted with urgent
        work in ``working_now``, beside which the LLM may step with fewer threads (``llm_shared``)."""
        with self._idle:
            self._working += 1
        try:
            yield
        finally:
            with self._idle:
                self._working -= 1

    def on_urgent(self, callback: Callable[[], None]) -> None:
        """Call the bound method ``callback`` (in the thread that starts it) whenever urgent work
        starts: an engine in the middle of background work it can abandon stops it."""
        with self._idle:
            self._on_urgent = [ref for ref in self._on_urgent if ref() is not None]
            self._on_urgent.append(weakref.WeakMethod(callback))

    @contextmanager
    def urgent(self) -> Iterator[None]:
        """Hold while doing latency-critical work (in any thread)."""
        with self._idle:
            self._urgent += 1
            self._working += 1
            callbacks = [ref() for ref in self._on_urgent]
        for callback in callbacks:
            if callback is not None:
                callback()
        try:
            yield
        finally:
            with self._idle:
                self._urgent -= 1
                self._working -= 1
                if self._urgent == 0:
                    self._idle.notify_all()

    def yield_to_urgent(self, max_wait_s: float, until: Callable[[], bool] | None = None) -> None:
        """Background work calls this at a safe point: it returns once no urgent work is running,
        after ``max_wait_s`` (urgent work must never starve the rest for long), or once ``until()``
        is true (checked when ``nudge`` is called: urgent work of the caller's own arrived)."""
        if self._urgent == 0:  # unlocked read: the common case costs nothing
            return

        def done() -> bool:
            return self._urgent == 0 or (until is not None and until())

        with self._idle:
            if not done():
                self.yielded += 1
                self._idle.wait_for(done, timeout=max_wait_s)

    def nudge(self) -> None:
        """Wake whoever waits in ``yield_to_urgent`` to check its ``until`` again."""
        with self._idle:
            self._idle.notify_all()


# One per process: the cores are shared by every engine and every call.
CPU = CpuPriority()
