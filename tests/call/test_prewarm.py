"""The prompt warmer: which prompts it reads ahead, in what order, and that they are the ones calls
use. A recording LLM for the order and bounds; the real Qwen model for the cache a call finds."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.call.chunker import fixed_text_clauses
from appliance.call.prewarm import Greeting, PromptWarmer
from appliance.config import load_settings
from appliance.conversation import Conversation, ConversationContext, FunctionSpec, HttpDispatcher, Parameter
from appliance.conversation.types import AgentConfig
from appliance.engines.tts import PiperTts
from appliance.model_manifest import Manifest

NOW = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)


class RecordingLlm:
    """Takes prompts the way ``LlamaLlm`` does (cache key, background) and records them."""

    model_id = "recording"
    supports_grammar = True
    schedules_background = True
    context_size = 4096
    queue_depth = 0

    def __init__(self, fail_on: str | None = None):
        self.prompts: list[str] = []
        self.keys: list[str | None] = []
        self.fail_on = fail_on
        self.gate: asyncio.Event | None = None

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    def format_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        rendered = "".join(f"<{m['role']}>{m['content']}</{m['role']}>\n" for m in messages)
        return rendered + ("<assistant>" if add_generation_prompt else "")

    async def stream(self, prompt: str, *, max_tokens: int, **options: Any) -> AsyncIterator[str]:
        assert max_tokens == 0 and options.get("background") is True
        self.prompts.append(prompt)
        self.keys.append(options.get("cache_key"))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on is not None and self.fail_on in prompt:
            raise RuntimeError("decode failed")
        return
        yield  # an async generator that yields nothing, as a prewarm's stream does


@dataclass
class Registry:
    """The part of ``EngineRegistry`` the warmer uses."""

    llm: Any
    ready: bool = True
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    loaded_models: tuple[str | None, ...] = (None, "qwen")
    tts: Any = None  # the default voice, if loaded

    @property
    def status(self) -> Any:
        return SimpleNamespace(ready=self.ready)

    def peek(self, role: str, model_id: str | None = None) -> Any:
        if role == "tts":
            return self.tts if model_id is None else None
        assert role == "llm"
        return self.llm if model_id in self.loaded_models else None


def agent(n: int, **fields: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "id": f"agent-{n}", "name": f"Agent {n}", "account_id": "acct",
        "prompt": f"You answer for shop number {n}. Be brief.",
    }  # fmt: skip
    values.update(fields)
    return AgentConfig(**values)


async def settle(warmer: PromptWarmer, registry: Registry) -> None:
    registry.settled.set()
    for _ in range(100):
        await asyncio.sleep(0)
        if not warmer.pending:
            break
    await asyncio.sleep(0)


@pytest.fixture
async def dispatcher() -> AsyncIterator[HttpDispatcher]:
    d = HttpDispatcher(timeout_s=1.0, max_reply_bytes=4096)
    yield d
    await d.aclose()


async def test_start_reads_the_most_recent_agents_and_is_warming_until_done(
    dispatcher: HttpDispatcher,
) -> None:
    llm = RecordingLlm()
    llm.gate = asyncio.Event()
    registry = Registry(llm)
    warmer = PromptWarmer(registry, dispatcher, max_agents=2)  # type: ignore[arg-type]
    warmer.start([agent(3), agent(2), agent(1)])  # most recent first; one more than fits
    assert warmer.warming and [a.id for a in warmer.queued()] == ["agent-3", "agent-2"]
    registry.settled.set()
    for _ in range(20):
        await asyncio.sleep(0)
    warmer.agent_changed(agent(5))  # created meanwhile: read next, but /ready does not wait for it
    llm.gate.set()
    for _ in range(20):
        await asyncio.sleep(0)
        if llm.keys == ["prewarm:agent-3", "prewarm:agent-5"]:
            assert warmer.warming  # agent 2, a start-up read, is still to come
    await settle(warmer, registry)
    assert not warmer.warming and warmer.warmed == 3
    assert llm.keys == ["prewarm:agent-3", "prewarm:agent-5", "prewarm:agent-2"]
    # The prompt read is the phone call's: the agent's instructions, the built-ins, no caller yet.
    assert "shop number 3" in llm.prompts[0] and '"name": "end_call"' in llm.prompts[0]
    await warmer.close()


async def test_a_start_up_read_dropped_from_the_queue_does_not_keep_ready_waiting(
    dispatcher: HttpDispatcher,
) -> None:
    registry = Registry(RecordingLlm())
    warmer = PromptWarmer(registry, dispatcher, max_agents=2)  # type: ignore[arg-type]
    warmer.start([agent(2), agent(1)])
    for n in (3, 4):  # two agents created before the engines were ready push both out
        warmer.agent_changed(agent(n))
    assert not warmer.warming
    await warmer.close()


async def test_a_changed_agent_is_read_next_and_the_queue_stays_bounded(dispatcher: HttpDispatcher) -> None:
    llm = RecordingLlm()
    llm.gate = asyncio.Event()
    registry = Registry(llm)
    warmer = PromptWarmer(registry, dispatcher, max_agents=2)  # type: ignore[arg-type]
    warmer.agent_changed(agent(1))
    registry.settled.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(llm.prompts) == 1  # agent 1 is being read
    for n in (2, 3, 4, 5):
        warmer.agent_changed(agent(n))
    warmer.agent_changed(agent(4, prompt="You answer for shop number 4, now renamed."))
    assert warmer.pending == 2  # max_agents; the oldest requests were dropped
    llm.gate.set()
    await settle(warmer, registry)
    assert llm.keys == ["prewarm:agent-1", "prewarm:agent-4", "prewarm:agent-5"]
    assert "now renamed" in llm.prompts[1]  # the agent's latest version, not the one queued first
    await warmer.close()


async def test_nothing_is_read_when_off_or_when_the_engines_never_loaded(dispatcher: HttpDispatcher) -> None:
    llm = RecordingLlm()
    off = PromptWarmer(Registry(llm), dispatcher, max_agents=0)  # type: ignore[arg-type]
    off.start([agent(1)])
    off.agent_changed(agent(2))
    assert not off.enabled and off.pending == 0
    registry = Registry(llm, ready=False)
    broken = PromptWarmer(registry, dispatcher, max_agents=2)  # type: ignore[arg-type]
    broken.start([agent(1)])
    assert broken.warming
    await settle(broken, registry)
    await asyncio.sleep(0.01)
    assert llm.prompts == [] and broken.warmed == 0
    assert not broken.warming  # /ready reports the engines' error, not a wait
    await broken.close()
    await off.close()


async def test_close_stops_a_warmer_still_waiting_for_the_engines(dispatcher: HttpDispatcher) -> None:
    warmer = PromptWarmer(Registry(RecordingLlm()), dispatcher, max_agents=2)  # type: ignore[arg-type]
    warmer.agent_changed(agent(1))
    await asyncio.sleep(0)
    await asyncio.wait_for(warmer.close(), 1.0)
    assert warmer.pending == 0


async def test_a_failed_read_or_an_unloaded_model_skips_only_that_agent(dispatcher: HttpDispatcher) -> None:
    llm = RecordingLlm(fail_on="shop number 2")
    registry = Registry(llm)
    warmer = PromptWarmer(registry, dispatcher, max_agents=3)  # type: ignore[arg-type]
    warmer.agent_changed(agent(1))
    warmer.agent_changed(agent(2))
    warmer.agent_changed(agent(3, model="another-llm"))  # not loaded: its first call loads it
    await settle(warmer, registry)
    assert warmer.skipped == 1
    assert llm.keys == ["prewarm:agent-2", "prewarm:agent-1"]
    assert warmer.warmed == 1  # agent 2's read failed, agent 1's went on
    await warmer.close()


def _qwen_path() -> Any:
    settings = load_settings()
    return Manifest.load(settings.models_dir).weights(settings.models.llm, "llm", verify=False)


@pytest.mark.slow
async def test_a_call_to_an_agent_read_ahead_copies_nearly_all_of_its_prompt(
    dispatcher: HttpDispatcher,
) -> None:
    """With the real model: the first call to an agent read ahead reads at most its clock's minute;
    the first call to one not read ahead reads its whole prompt."""
    from appliance.engines.llm import LlamaLlm

    llm = LlamaLlm("qwen2.5-coder-0.5b", _qwen_path(), context_size=4096, threads=min(2, os.cpu_count() or 1))
    try:
        registry = Registry(llm)
        warmer = PromptWarmer(registry, dispatcher, max_agents=2)  # type: ignore[arg-type]
        registry.settled.set()
        lookup = FunctionSpec(
            "get_order_status", "Look up an order's delivery status", "http://127.0.0.1:9/order",
            user_parameters=(Parameter("order_id", "string", "The order number", True),),
        )  # fmt: skip
        read_ahead = agent(7, functions=(lookup,))
        not_read = agent(8, prompt="You take bookings for the Lantern Grill.")
        warmer.agent_changed(read_ahead)
        for _ in range(600):
            if warmer.warmed == 1 and not warmer.pending:
                break
            await asyncio.sleep(0.05)
        assert warmer.warmed == 1

        async def first_call(config: AgentConfig) -> Any:
            context = ConversationContext(
                session_id=f"call-{config.id}", channel="phone", from_number="+14155550100",
                to_number="+14155550199",
            )  # fmt: skip
            await Conversation(config, llm, context, dispatcher=dispatcher).prewarm()
            return llm.last_stats

        warm = await first_call(read_ahead)
        assert warm.prompt_tokens > 300
        assert warm.restored_tokens >= warm.prompt_tokens - 24, warm
        cold = await first_call(not_read)
        assert cold.prompt_tokens > 300 and cold.restored_tokens < 0.1 * cold.prompt_tokens, cold
        await warmer.close()
    finally:
        llm.close()


async def test_a_greetings_first_clause_is_made_ready_in_its_voice(
    dispatcher: HttpDispatcher, tts_engine: PiperTts
) -> None:
    """The real voice: the greeting's first clause (not the rest) is in its phrase cache at the
    call's speed, so the call replays it; a voice that is not loaded is left alone."""
    tts = PiperTts("greeting-voice", tts_engine.model_dir, threads=1)
    llm = RecordingLlm()
    registry = Registry(llm, tts=tts)
    warmer = PromptWarmer(registry, dispatcher, max_agents=2)  # type: ignore[arg-type]
    registry.settled.set()
    welcome = "Thanks for calling the Lantern Grill. We take bookings from noon until ten at night."
    first, *rest = fixed_text_clauses(welcome)
    assert rest  # more than one clause: only the first is needed ahead
    warmer.agent_changed(agent(1), Greeting(welcome, None, 1.25))
    warmer.agent_changed(agent(2), Greeting("Hello from another voice.", "other-voice"))
    for _ in range(400):
        if warmer.warmed == 2 and not warmer.pending:
            break
        await asyncio.sleep(0.025)
    assert warmer.warmed == 2 and warmer.greetings == 1  # both prompts read; one voice loaded
    assert len(tts.phrases) == 1 and (first, 1.25) in tts.phrases
    hits = tts.phrases.hits
    audio = [chunk async for chunk in tts.synthesize(first, speed=1.25)]
    assert tts.phrases.hits == hits + 1 and sum(chunk.size for chunk in audio) > tts.sample_rate // 2
    assert not await tts.warm_phrase("x" * 101)  # too long to be kept: not synthesized
    assert len(tts.phrases) == 1
    await warmer.close()
    tts.close()
