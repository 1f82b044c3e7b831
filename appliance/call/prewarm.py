"""Reads agents' call prompts into the LLM's prompt cache before their calls come in.

A call's first answer needs its agent's system prompt evaluated: about 450 tokens with the phone
built-ins, 4-6 s of prompt reading on a 2-core CPU. A call reads it itself while its welcome plays,
but a short welcome and a quick question leave less time than that, so the first call to an agent
after the server started, or after the agent was created or changed, answered its first turn in
3-4 s. Later calls copy the evaluated cells from another slot and do not pay.

So the prompt is read as soon as it is known: at start-up for the most recently changed agents
(``/ready`` waits for these), and whenever an agent, or a function it offers, is created or
changed. Each read is a background generation of the LLM engine (``Conversation.prewarm`` with a
phone context): urgent work (a caller waiting) goes first, and the call then copies the cells,
paying only for what differs (the clock's minute, caller details its prompt names, its welcome).

A call placed within a few seconds of creating its agent still reads part of the prompt itself. The
prompt's order cannot fix that: putting what every agent shares (style, rules, the built-ins) first
would let all agents share one read, but it was measured to cost tool-call accuracy (bench_brain,
phone: right tool 1.0 -> 0.58-0.83).

One worker reads one prompt at a time, the most recent request first; requests wait in a queue
bounded by ``max_agents`` (older ones are dropped: their slots would be reused before their calls
came anyway).

The agent's greeting is made ready the same way, first: its first clause is synthesized into the
voice's phrase cache (~150 ms of synthesis on 2 cores), so the first call hears the welcome as soon
as later calls do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..conversation import Conversation, ConversationContext
from ..conversation.types import AgentConfig
from .chunker import fixed_text_clauses

if TYPE_CHECKING:
    from ..conversation import HttpDispatcher
    from ..engines.registry import EngineRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Greeting:
    """What a call to an agent says first, and in which voice."""

    text: str
    voice: str | None = None  # None: the default voice
    speed: float = 1.0


class PromptWarmer:
    def __init__(self, engines: EngineRegistry, dispatcher: HttpDispatcher, *, max_agents: int):
        self.engines = engines
        self.dispatcher = dispatcher
        self.max_agents = max_agents
        self._queue: OrderedDict[str, tuple[AgentConfig, Greeting | None]] = OrderedDict()
        self._startup: set[str] = set()  # start-up reads not finished yet (``warming``)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.warmed = 0  # prompts read (for tests and the log)
        self.skipped = 0  # agents on a model that is not loaded: their first call loads and reads it
        self.greetings = 0  # greetings' first clauses made ready in their voice's phrase cache

    @property
    def enabled(self) -> bool:
        return self.max_agents > 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def warming(self) -> bool:
        """Start-up reads are still under way (``/ready`` waits for them: the calls arriving right
        after a restart would otherwise each read their prompt in front of their first answer)."""
        return bool(self._startup)

    def queued(self) -> list[AgentConfig]:
        """The prompts waiting to be read, the next one first."""
        return [agent for agent, _ in reversed(self._queue.values())]

    def queued_greeting(self, agent_id: str) -> Greeting | None:
        """The greeting waiting to be made ready with ``agent_id``'s prompt, if any."""
        entry = self._queue.get(agent_id)
        return entry[1] if entry is not None else None

    def start(self, recent: Sequence[AgentConfig], greetings: Mapping[str, Greeting] | None = None) -> None:
        """At server start: ``recent`` agents, most recently changed first."""
        self.agents_changed(recent, greetings)
        self._startup = set(self._queue)

    def agent_changed(self, agent: AgentConfig, greeting: Greeting | None = None) -> None:
        """An agent was created or changed: read its prompt ahead of its next call."""
        self.agents_changed([agent], {agent.id: greeting} if greeting is not None else None)

    def agents_changed(
        self, agents: Sequence[AgentConfig], greetings: Mapping[str, Greeting] | None = None
    ) -> None:
        """Agents changed, most recently first: the first is read first, and only ``max_agents``.
        ``greetings``: by agent id, what their calls say first."""
        if self.enabled:
            for agent in reversed(agents[: self.max_agents]):
                self._push(agent, (greetings or {}).get(agent.id))

    def _push(self, agent: AgentConfig, greeting: Greeting | None) -> None:
        self._queue.pop(agent.id, None)
        self._queue[agent.id] = (agent, greeting)
        while len(self._queue) > self.max_agents:
            dropped, _ = self._queue.popitem(last=False)
            self._startup.discard(dropped)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="prompt-warmer")

    async def _run(self) -> None:
        await self.engines.settled.wait()
        if not self.engines.status.ready:
            self._startup.clear()
            log.info("prompt warmer: engines not ready; nothing read ahead")
            return
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                _, (agent, greeting) = self._queue.popitem(last=True)
                try:
                    if greeting is not None:
                        await self._greet(greeting)
                    await self._warm(agent)
                finally:
                    self._startup.discard(agent.id)

    async def _warm(self, agent: AgentConfig) -> None:
        # Only an engine already loaded: loading another model here would take memory for an agent
        # that may never be called (its first call loads it and reads its prompt itself).
        llm = self.engines.peek("llm", agent.model)
        if llm is None:
            self.skipped += 1
            return
        started = time.monotonic()
        try:
            context = ConversationContext(session_id=f"prewarm:{agent.id}", channel="phone")
            await Conversation(agent, llm, context, dispatcher=self.dispatcher).prewarm()
        except Exception:  # only a saving is lost; the call reads its prompt itself
            log.warning("prompt warmer: reading agent %s's prompt failed", agent.id, exc_info=True)
            return
        self.warmed += 1
        log.info("prompt warmer: agent %s's call prompt read in %.1f s", agent.id, time.monotonic() - started)

    async def _greet(self, greeting: Greeting) -> None:
        """The greeting's first clause into its voice's phrase cache: the rest is synthesized while
        the first plays. Only a voice already loaded, like the LLM above."""
        tts = self.engines.peek("tts", greeting.voice)
        warm = getattr(tts, "warm_phrase", None)
        clauses = fixed_text_clauses(greeting.text)
        if warm is None or not clauses:
            return
        try:
            if await warm(clauses[0], speed=greeting.speed):
                self.greetings += 1
        except Exception:  # only a saving is lost; the call synthesizes it itself
            log.warning("prompt warmer: synthesizing a greeting failed", exc_info=True)

    async def close(self) -> None:
        self._queue.clear()
        self._startup.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
