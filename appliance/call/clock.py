"""The session's notion of time. Production uses the event loop's monotonic clock; tests hand in a
virtual clock so pacing, turn-taking and timeouts run in milliseconds without real waiting."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep_until(self, deadline: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


class VirtualClock:
    """Time moves only when a test calls ``advance``; sleepers wake in deadline order and every ready
    task gets to run between wake-ups, so a scripted timeline is deterministic."""

    def __init__(self, start: float = 0.0):
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    async def settle(self, rounds: int = 20) -> None:
        """Let every runnable task run until nothing changes (bounded)."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance(self, seconds: float, step: float | None = None) -> None:
        """Move time forward by ``seconds`` in small steps, waking sleepers as their deadline passes."""
        end = self._now + seconds
        await self.settle()
        while True:
            next_deadline = self._sleepers[0][0] if self._sleepers else end
            target = min(end, next_deadline, self._now + step) if step else min(end, next_deadline)
            self._now = max(self._now, target)
            while self._sleepers and self._sleepers[0][0] <= self._now + 1e-12:
                _, _, fut = heapq.heappop(self._sleepers)
                if not fut.done():
                    fut.set_result(None)
            await self.settle()
            if self._now >= end - 1e-12:
                break
