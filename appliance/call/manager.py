"""The call service: owns every live call session of the process.

It issues stream tokens for answered calls, enforces ``max_concurrent_calls``, refuses a second
websocket for a call that already ran, builds a session (engines, brain, record writer) when Plivo's
stream starts, places outbound calls and hangs calls up through Plivo's REST API. No HTTP here: the
api layer hands in the websocket as an :class:`AudioSink` and feeds the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..conversation import Conversation, ConversationContext, HttpDispatcher
from ..conversation.adapter import agent_from_row
from ..runtime import HeapTrimmer
from ..store.agents import recent_agents
from ..store.calls import CallRecordWriter, call_exists, close_stale_calls
from ..telephony.rest import PlivoApiError, PlivoRest
from ..telephony.signature import SignatureVerifier
from ..telephony.stream_token import StreamClaims, StreamTokens, load_or_create_secret
from .playout import AudioSink
from .prewarm import Greeting, PromptWarmer
from .records import CallInfo, TeeRecorder
from .session import CallSession, SessionConfig

if TYPE_CHECKING:
    from ..server import AppState
    from ..store.accounts import Account
    from ..store.agents import Agent

log = logging.getLogger(__name__)

FINISHED_MEMORY = 10_000  # call uuids remembered as finished (the DB is the fallback)
PENDING_TTL_S = 120.0  # an answered call must open its stream within this
OUTBOUND_TTL_S = 600.0
OUTBOUND_MAX = 1000


class CallRefused(Exception):
    """The stream may not start (finished call, duplicate, over capacity, unknown agent)."""


@dataclass
class LiveCall:
    info: CallInfo
    session: CallSession
    writer: CallRecordWriter
    rest: PlivoRest | None
    task: asyncio.Task[None] | None = None


@dataclass
class _Outbound:
    agent_id: str
    context: dict[str, Any]
    created: float = field(default_factory=time.monotonic)


class PlivoCallControl:
    """Hang-up and transfer of one call through the account's Plivo REST credentials."""

    def __init__(self, rest: PlivoRest | None, call_uuid: str, transfer_url: str):
        self.rest = rest
        self.call_uuid = call_uuid
        self.transfer_url = transfer_url

    async def hangup(self) -> None:
        if self.rest is None:
            log.warning("call %s: no Plivo credentials on the account; cannot hang up", self.call_uuid)
            return
        await self.rest.hangup(self.call_uuid)

    async def transfer(self, number: str) -> None:
        if self.rest is None:
            log.warning("call %s: no Plivo credentials on the account; cannot transfer", self.call_uuid)
            return
        from urllib.parse import quote

        await self.rest.transfer(self.call_uuid, f"{self.transfer_url}&to={quote(number)}")


class CallManager:
    def __init__(self, state: AppState):
        self.state = state
        settings = state.settings
        self.settings = settings
        self.tokens = StreamTokens(load_or_create_secret(settings.data_dir), settings.call.stream_token_ttl_s)
        self.signatures = SignatureVerifier()
        self.live: dict[str, LiveCall] = {}
        self._pending: OrderedDict[str, float] = OrderedDict()  # answered, stream not yet open
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._outbound: OrderedDict[str, _Outbound] = OrderedDict()
        self._contexts: OrderedDict[str, dict[str, Any]] = OrderedDict()  # call uuid -> outbound context
        self._vad_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad")
        self._dispatcher = HttpDispatcher(
            timeout_s=settings.limits.handler_timeout_s,
            max_reply_bytes=settings.limits.handler_max_reply_bytes,
        )
        self._closing = False
        self._heap = HeapTrimmer()
        # Never more agents than LLM slots but one: a call arriving needs a slot to copy into.
        self.warmer = PromptWarmer(
            state.engines, self._dispatcher,
            max_agents=min(settings.call.prewarm_agents, max(0, settings.llm.slots - 1)),
        )  # fmt: skip

    def agents_changed(self, agents: Sequence[Agent]) -> None:
        """Agents (most recently changed first) were created or changed, or a function they offer:
        their next calls should find their prompts read."""
        self.warmer.agents_changed([agent_from_row(a) for a in agents], greetings(agents))

    # -- answer URL ------------------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending and next(iter(self._pending.values())) < now:
            self._pending.popitem(last=False)
        while self._outbound and next(iter(self._outbound.values())).created + OUTBOUND_TTL_S < now:
            self._outbound.popitem(last=False)

    def reserve(self, call_uuid: str) -> bool:
        """Hold a line for an answered call; False when every line is taken."""
        self._expire()
        if call_uuid in self._pending or call_uuid in self.live:
            return True
        if self._closing or len(self.live) + len(self._pending) >= self.settings.limits.max_concurrent_calls:
            self.state.metrics.calls_refused.inc()
            return False
        self._pending[call_uuid] = time.monotonic() + PENDING_TTL_S
        return True

    def note_answered(self, call_uuid: str, request_uuid: str | None) -> None:
        """An outbound call we placed was answered: its context moves to the call uuid."""
        if request_uuid and request_uuid in self._outbound:
            out = self._outbound.pop(request_uuid)
            self._contexts[call_uuid] = out.context
            while len(self._contexts) > OUTBOUND_MAX:
                self._contexts.popitem(last=False)

    def issue_token(self, claims: StreamClaims) -> str:
        return self.tokens.issue(claims)

    # -- the media stream ------------------------------------------------------------------------
    async def is_finished(self, call_uuid: str) -> bool:
        if call_uuid in self._finished:
            return True
        async with self.state.services["db"].sessions() as session:
            return await call_exists(session, call_uuid)

    async def open_call(
        self, claims: StreamClaims, stream_id: str, sink: AudioSink, account: Account, agent: Agent
    ) -> LiveCall:
        call_uuid = claims.call_uuid
        if call_uuid in self.live:
            raise CallRefused("this call already has a live stream")
        if await self.is_finished(call_uuid):
            raise CallRefused("this call has already ended")
        self._pending.pop(call_uuid, None)
        if self._closing or len(self.live) >= self.settings.limits.max_concurrent_calls:
            self.state.metrics.calls_refused.inc()
            raise CallRefused("over capacity")
        engines = self.state.engines
        stt = agent.stt or {}
        greeting = greeting_of(agent)
        llm_cfg = agent.answer_llm or {}
        vad = await engines.vad()
        asr = await engines.asr(stt.get("model"))
        tts = await engines.tts(greeting.voice)
        llm = await engines.llm(llm_cfg.get("model"))
        info = CallInfo(
            call_uuid=call_uuid, account_id=account.id, agent_id=agent.id,
            direction=claims.direction or "inbound", from_number=claims.from_number,
            to_number=claims.to_number, stream_id=stream_id,
        )  # fmt: skip
        context = ConversationContext(
            session_id=call_uuid, channel="phone", from_number=claims.from_number or None,
            to_number=claims.to_number or None, direction=info.direction,
            variables=self._contexts.pop(call_uuid, {}),
        )  # fmt: skip
        brain = Conversation(
            agent_from_row(agent), llm, context, dispatcher=self._dispatcher,
            retriever=self.state.services.get("knowledge"),
        )  # fmt: skip
        cs = self.settings.call
        config = SessionConfig(
            welcome_message=greeting.text, call_timeout_s=float(agent.call_timeout or 0),
            end_of_turn_silence_ms=cs.end_of_turn_silence_ms, min_utterance_ms=cs.min_utterance_ms,
            barge_in_min_speech_ms=cs.barge_in_min_speech_ms, playout_lead_ms=cs.playout_lead_ms,
            pause_ms=cs.pause_ms, quick_pause_ms=cs.quick_pause_ms,
            smart_end_of_turn=cs.smart_end_of_turn, speculative=cs.speculative,
            speculate_within_ms=cs.speculate_within_ms, read_ahead_ms=cs.read_ahead_ms,
            first_phrase_words=cs.first_phrase_words, first_clause_max_words=cs.first_clause_max_words,
            tts_speed=greeting.speed, language=stt.get("language") or "en",
        )  # fmt: skip
        rest = self.rest_for(account)
        transfer_token = self.tokens.issue(
            StreamClaims(call_uuid, agent.id, account.id, direction="transfer")
        )
        transfer_url = (
            f"{self.settings.base_url}/v1/Account/{account.auth_id}/Voiceagent/{agent.id}/transfer/"
            f"?token={transfer_token}"
        )
        writer = CallRecordWriter(self.state.services["db"].sessions, call_uuid)
        session = CallSession(
            info, config, vad=vad, asr=asr, tts=tts, brain=brain, sink=sink,
            control=PlivoCallControl(rest, call_uuid, transfer_url),
            recorder=TeeRecorder(writer, self.state.metrics.observe_call()),
            vad_executor=self._vad_executor,
        )  # fmt: skip
        live = LiveCall(info, session, writer, rest)
        self.live[call_uuid] = live
        return live

    async def run(self, live: LiveCall) -> None:
        """Run a session and its record writer to the end, then forget the call."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(live.writer.run(), name=f"call-writer-{live.info.call_uuid}")
                await live.session.run()
        finally:
            self.live.pop(live.info.call_uuid, None)
            self._finished[live.info.call_uuid] = None
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
        if not self._closing and self._heap.available and (self._heap.due() or not self.live):
            # The call's buffers are free now; give their pages back (soak: RSS otherwise creeps).
            # Always when the box falls idle: a trim costs a few ms and nobody is waiting.
            await asyncio.to_thread(self._heap.trim)

    # -- REST: outbound and hang-up -----------------------------------------------------------
    def rest_for(self, account: Account) -> PlivoRest | None:
        if not account.has_plivo_credentials:
            return None
        return PlivoRest(
            account.plivo_auth_id or "", account.plivo_auth_token or "",
            api_base_url=self.settings.plivo_api_base_url,
        )  # fmt: skip

    async def place_call(
        self, account: Account, agent_id: str, answer_url: str, from_number: str, to_number: str,
        context: Mapping[str, Any],
    ) -> str:  # fmt: skip
        rest = self.rest_for(account)
        if rest is None:
            raise PlivoApiError("the account has no Plivo credentials: set them to place calls")
        fired = await rest.make_call(from_number, to_number, answer_url)
        self._expire()
        self._outbound[fired.request_uuid] = _Outbound(agent_id, dict(context))
        while len(self._outbound) > OUTBOUND_MAX:
            self._outbound.popitem(last=False)
        return fired.request_uuid

    async def hangup(self, account: Account, call_uuid: str) -> bool:
        """Hang up a live call of this account. False if it is not live here."""
        live = self.live.get(call_uuid)
        if live is None or live.info.account_id != account.id:
            return False
        if live.rest is not None:
            try:
                await live.rest.hangup(call_uuid)
            except PlivoApiError:
                log.exception("call %s: Plivo hang-up failed; ending the stream anyway", call_uuid)
        live.session.hangup("api_hangup")
        return True

    async def close(self) -> None:
        """Shutdown: end every live call and wait (bounded) for its record to be written."""
        self._closing = True
        for live in list(self.live.values()):
            live.session.hangup("appliance_shutdown", status="failed")
        tasks = [t for t in (live.task for live in self.live.values()) if t is not None]
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await asyncio.gather(*tasks, return_exceptions=True)
        await self.warmer.close()
        await self._dispatcher.aclose()
        self._vad_executor.shutdown(wait=False, cancel_futures=True)


def greeting_of(agent: Agent) -> Greeting:
    """What the agent's calls say first, and in which voice."""
    tts: Mapping[str, Any] = agent.tts or {}
    return Greeting(agent.welcome_message or "", tts.get("voice"), float(tts.get("speed") or 1.0))


def greetings(agents: Sequence[Agent]) -> dict[str, Greeting]:
    return {agent.id: greeting_of(agent) for agent in agents}


async def open_calls(state: AppState, stack: contextlib.AsyncExitStack) -> CallManager:
    """Open the call service (needs ``db``): close calls a dead process left live, register shutdown."""
    async with state.services["db"].sessions() as session:
        stale = await close_stale_calls(session)
    if stale:
        log.warning("closed %d call(s) left live by a previous run as failed", stale)
    manager = CallManager(state)
    state.services["calls"] = manager
    stack.push_async_callback(manager.close)
    if manager.warmer.enabled:
        async with state.services["db"].sessions() as session:
            recent = await recent_agents(session, manager.warmer.max_agents)
            manager.warmer.start([agent_from_row(a) for a in recent], greetings(recent))
    return manager
