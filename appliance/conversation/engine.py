"""One conversation (a chat session or a phone call): turns in, a stream of events out.

A turn asks the model for one JSON answer under a grammar: speech (streamed as it is generated) or
one function call. A call is checked (schema, grounded arguments), dispatched, its result added to
the history and the model asked again, up to ``max_calls_per_turn``. Built-ins (``end_call``,
``transfer_call``) come out as events for the call layer. Closing the event stream at any point
stops generation at once; a call that was not dispatched yet is never sent.

Speech passes a ``RepeatGuard``: a reply that starts saying a sentence again stops there. A small
model often answers by copying the one assistant message it has seen, the greeting: a reply may not
open with the greeting's first word when replies seldom open with it ("Card", "Hello"), and one
that opens with the greeting's first sentence anyway is generated again, not opening with that
word, before anything of it is said.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from ..engines.types import ChoiceDiffers, LlmEngine
from .dispatch import Dispatcher
from .prompt import HistoryItem, build_prompt, clock, few_shot, system_message, turn_groups
from .repeats import RepeatGuard, distinctive_opening, first_sentence
from .results import mentions_result, read_result, result_words
from .tools import (
    BUILTINS,
    FIRST_KEY_GRAMMAR,
    KEY_OPENING,
    SAY_OPENING,
    Answer,
    StreamingAnswer,
    asked_for_in,
    function_choice_schema,
    given_in,
    humanize,
    looks_like_refusal,
    max_output_chars,
    may_become_refusal,
    normalize_arguments,
    output_schema,
    say_body_grammar,
    say_max_chars,
    ungrounded_arguments,
    validate_arguments,
)
from .types import (
    AgentConfig,
    ConversationContext,
    EndCall,
    FunctionCallFinished,
    FunctionCallStarted,
    FunctionSpec,
    TextDelta,
    Transfer,
    TurnDone,
    TurnEvent,
)

log = logging.getLogger(__name__)

APOLOGY = "I'm sorry, I couldn't do that right now. Is there anything else I can help you with?"
# Stands for the next user message when the prompt prefix is prewarmed; cut off before evaluation.
_NEXT_USER = "\u2063next\u2063"
NOT_UNDERSTOOD = "Sorry, I didn't quite get that. Could you say it again?"
GOODBYE = "Thank you for calling. Goodbye!"
TRANSFERRING = "Please hold while I transfer your call."
PROMPT_CLOCK_HOLD = timedelta(minutes=15)


class Retriever(Protocol):
    """The knowledge service's search (or a test's): chunks with a ``text`` attribute, best first."""

    async def search(
        self, account_id: str, document_ids: Sequence[str], query: str, k: int
    ) -> Sequence[Any]: ...


@dataclass
class Generation:
    """One model call within a turn, for benchmarks and call records."""

    raw: str = ""
    answer: Answer | None = None
    prompt_tokens: int = 0
    pieces: int = 0
    first_piece_s: float | None = None
    first_text_s: float | None = None
    elapsed_s: float = 0.0
    first_key: str | None = None  # "say" / "name" when the engine decided it first (fast path)


@dataclass
class TurnTrace:
    generations: list[Generation] = field(default_factory=list)
    retrieved: list[str] = field(default_factory=list)
    ungrounded: list[str] = field(default_factory=list)
    recovered_refusal: bool = False
    # The model refused after a function had answered; the caller heard the result read plainly.
    read_result: bool = False
    # A further call after a result that the caller's message did not ask for; not made.
    unasked_calls: list[str] = field(default_factory=list)


class Conversation:
    def __init__(
        self,
        agent: AgentConfig,
        llm: LlmEngine,
        context: ConversationContext,
        *,
        dispatcher: Dispatcher,
        retriever: Retriever | None = None,
        max_calls_per_turn: int = 3,
        knowledge_k: int = 3,
        history_max_items: int = 200,
        few_shot_examples: bool = False,
    ):
        self.agent = agent
        self.llm = llm
        self.context = context
        self.dispatcher = dispatcher
        self.retriever = retriever
        self.max_calls_per_turn = max_calls_per_turn
        self.knowledge_k = knowledge_k
        self.history_max_items = history_max_items
        builtins = BUILTINS if context.channel == "phone" else ()
        own = {f.name for f in agent.functions}
        self.functions: tuple[FunctionSpec, ...] = agent.functions + tuple(
            b for b in builtins if b.name not in own
        )
        # Off by default: measured on Qwen2.5-Coder-0.5B with the Qwen-style tool prompt, synthetic
        # example turns pulled the model towards speaking instead of calling (scripts/bench_brain).
        self.examples = few_shot(self.functions) if few_shot_examples else []
        self.history: list[HistoryItem] = []
        self.last_trace = TurnTrace()
        # The function whose details the agent just asked for (see ``_complete_pending``).
        self._pending: list[FunctionSpec] = []
        self._prompt_clock: datetime | None = None
        # The first sentence of the agent's greeting: no reply opens with it (see ``_generate``).
        self._greeting: tuple[str, ...] = ()

    def _now(self) -> datetime:
        """The time the system prompt states. Held for ``PROMPT_CLOCK_HOLD`` rather than advanced
        every minute: a changed system prompt invalidates llama.cpp's cached prefix, and re-reading
        ~600 prompt tokens costs seconds on a CPU, far more than a stale minute is worth."""
        now = clock(self.context)
        if (
            self._prompt_clock is None
            or now - self._prompt_clock > PROMPT_CLOCK_HOLD
            or (now < self._prompt_clock)
        ):
            self._prompt_clock = now
        return self._prompt_clock

    async def prewarm(self, words: str = "") -> None:
        """Evaluate the prompt prefix ahead of the next turn (while the welcome or a reply plays):
        system message, history so far and the opening of the next user message, so the turn only
        pays for the caller's new words. On an engine that runs background work behind urgent work
        (``schedules_background``) it is submitted as background; on others it is skipped while the
        engine has other work, where it would delay another call's turn. ``words``: the first words
        of the next user message, already known (see ``read_ahead``)."""
        if getattr(self.llm, "queue_depth", 0) and not getattr(self.llm, "schedules_background", False):
            return
        system = system_message(self.agent, self.context, self.functions, self._now())
        probe = [*self.history, HistoryItem("user", text=words.strip() + _NEXT_USER)]
        prompt = build_prompt(self.llm, system, probe, examples=self.examples, reserve_tokens=1)
        cut = prompt.text.rfind(_NEXT_USER)
        if cut <= 0:  # the template changed the text: nothing safe to cut at
            return
        stream = self.llm.stream(
            prompt.text[:cut], max_tokens=0, temperature=0.0, **self._cache_options(background=True)
        )
        async with contextlib.aclosing(stream) as pieces:  # type: ignore[type-var]
            async for _ in pieces:
                break

    async def read_ahead(self, words: str) -> None:
        """Read the words of a user message still being spoken (a partial transcript) into the
        prompt cache after the prefix ``prewarm`` reads: the turn then pays only for what differs
        from them, its last words. Nothing is answered or added to the history."""
        if words.strip():
            await self.prewarm(words)

    # -- history edits from the call layer ---------------------------------------------------------
    def snapshot(self) -> object:
        """The conversation state before a speculative turn (see ``restore``)."""
        return (list(self.history), list(self._pending))

    def restore(self, state: object) -> None:
        """Forget every turn since ``snapshot``: a turn started before the caller had finished
        (speculatively) is undone when they go on talking. Call it only once that turn's generator
        has been closed, so its clean-up cannot write to the history afterwards."""
        history, pending = cast(tuple[list[HistoryItem], list[FunctionSpec]], state)
        self.history, self._pending = list(history), list(pending)

    def end(self) -> None:
        """The conversation is over: an engine that keeps its prompt cache may give it to others."""
        release = getattr(self.llm, "release", None)
        if release is not None:
            release(self.context.session_id)

    def add_assistant_message(self, text: str) -> None:
        """Something the agent said outside a turn (the welcome message)."""
        if not self.history:
            self._greeting = (first_sentence(text),) if text.strip() else ()
        self.history.append(HistoryItem("say", text=text))

    def record_heard(self, text: str, interrupted: bool = True) -> None:
        """Replace the last spoken reply with what the caller actually heard before barging in."""
        for item in reversed(self.history):
            if item.kind == "say":
                item.text = text
                item.interrupted = interrupted
                return
            if item.kind == "user":
                break
        if text:
            self.history.append(HistoryItem("say", text=text, interrupted=interrupted))

    # -- a turn -----------------------------------------------------------------------------------
    async def turn(self, user_text: str) -> AsyncGenerator[TurnEvent, None]:
        """Answer one user message. Consume with ``contextlib.aclosing`` (or cancel the consuming
        task): closing the generator stops the generation at once and an undispatched call is
        never sent. Ends with ``TurnDone`` unless closed early."""
        self.last_trace = trace = TurnTrace()
        self.history.append(HistoryItem("user", text=user_text))
        self._bound_history()
        knowledge = await self._retrieve(user_text)
        trace.retrieved = knowledge
        called: set[str] = set()
        pending, self._pending = self._pending, []
        forced = await self._complete_pending(pending, user_text, knowledge) if pending else None
        speech_only = False
        # After a function answered, the reply must speak of its result: small models sometimes
        # refuse at that point, or make a further call nobody asked for (a transfer).
        result_seen = False
        last_result: Any = None
        for step in range(self.max_calls_per_turn + 1):
            # A function already called this turn is not offered again: small models otherwise
            # repeat the same call instead of speaking its result.
            allowed = (
                [f for f in self.functions if f.name not in called]
                if step < self.max_calls_per_turn and not speech_only
                else []
            )
            if step == 0 and forced is not None:
                answer, allowed = forced, pending
            else:
                generation = Generation()
                trace.generations.append(generation)
                # Small models refuse requests a function handles ("I'm sorry, I can't cancel
                # orders"). The first words of the first reply are held back until they are
                # clearly not such a refusal (most replies: at their first word); a refusal gets
                # one chance to become a grounded call.
                # After a result, a refusal's opening is held until the reply names something
                # the result says ("Sorry, order 12345 is delayed" is an answer, not a refusal).
                holding = (step == 0 and bool(_evidenced(allowed))) or result_seen
                said_of_result = result_words(last_result) if result_seen else frozenset()
                held = ""
                # aclosing: when our consumer stops, the generation below must stop with it at once.
                async with contextlib.aclosing(self._generate(allowed, knowledge, generation)) as deltas:
                    async for delta in deltas:
                        if holding:
                            held += delta
                            if may_become_refusal(held) and not mentions_result(held, said_of_result):
                                continue
                            holding, delta, held = False, held, ""
                        yield TextDelta(delta)
                assert generation.answer is not None
                answer = generation.answer
                if held and looks_like_refusal(held) and result_seen and answer.say is not None:
                    log.warning("reply refused after a function result: %r; reading the result", held[:120])
                    trace.read_result = True
                    held = read_result(last_result, say_max_chars(self.agent.max_tokens))
                    answer = Answer(say=held)
                elif held and looks_like_refusal(held):
                    recovered = await self._complete_pending(_evidenced(allowed), user_text, knowledge)
                    if recovered is not None:
                        trace.recovered_refusal = True
                        answer, held = recovered, ""
                if held:
                    yield TextDelta(held)
            if answer.say is not None:
                text = answer.say.strip()
                if not text:
                    yield TextDelta(NOT_UNDERSTOOD)
                    text = NOT_UNDERSTOOD
                self.history.append(HistoryItem("say", text=text))
                if text.endswith("?"):
                    self._pending = self._asked_for(text)
                yield TurnDone(text)
                return
            spec = next((f for f in allowed if f.name == answer.function), None)
            arguments = normalize_arguments(spec, answer.arguments or {}, user_text) if spec else {}
            problems = (
                validate_arguments(spec, arguments) if spec else [f"unknown function {answer.function}"]
            )
            if result_seen and spec is not None and not asked_for_in(spec, arguments, user_text, called):
                # Speak the result instead; the caller can still ask for this next turn.
                log.warning("unasked call of %s after a function result; speaking instead", spec.name)
                trace.unasked_calls.append(spec.name)
                speech_only = True
                continue
            if answer.error or problems or spec is None:
                log.warning("unusable model answer %r: %s", answer.raw[:200], answer.error or problems)
                for event in self._say(NOT_UNDERSTOOD):
                    yield event
                return
            missing = ungrounded_arguments(spec, arguments, self._grounding_sources())
            if missing:
                # The model filled in a detail the caller never gave: ask for it instead.
                trace.ungrounded = missing
                self._pending = [spec]
                if knowledge:
                    # With retrieved facts at hand the question may be one they answer (small
                    # models over-trigger functions): let the model speak, and it can ask.
                    speech_only = True
                    continue
                names = " and ".join(f"the {humanize(name)}" for name in missing)
                for event in self._say(f"Sure, I can help with that. Could you tell me {names}?"):
                    yield event
                return
            if spec.builtin:
                for event in self._builtin(spec, arguments):
                    yield event
                return
            called.add(spec.name)
            yield FunctionCallStarted(spec.name, dict(arguments))
            call_item = HistoryItem("call", name=spec.name, arguments=dict(arguments))
            self.history.append(call_item)
            result_item = HistoryItem("result", name=spec.name, ok=False, result="interrupted")
            try:
                merged = {**arguments, **dict(spec.fixed_parameters)}
                result = await self.dispatcher.dispatch(spec, merged, self._handler_context())
                result_item.ok = result.ok
                result_item.result = result.result if result.ok else result.error
                result_seen, last_result = result.ok, result.result
            finally:
                self.history.append(result_item)
            yield FunctionCallFinished(spec.name, dict(arguments), result.result, result.ok, result.error)
            if not result.ok:
                # A fixed apology: the caller must hear that it failed, whatever the model does.
                for event in self._say(APOLOGY):
                    yield event
                return
        # Unreachable: the last step offers no function, so its answer is speech.
        for event in self._say(NOT_UNDERSTOOD):  # pragma: no cover
            yield event

    def _asked_for(self, said: str) -> list[FunctionSpec]:
        """Functions whose required detail the agent's question names ("What is your order
        number?"): the caller's next message probably gives it."""
        lowered = said.lower()
        found = []
        for spec in self.functions:
            for param in spec.user_parameters:
                if not param.required or param.enum:
                    continue
                labels = {humanize(param.name).lower()}
                if 0 < len(param.description) <= 40:
                    labels.add(param.description.lower().removeprefix("the ").rstrip("."))
                if any(label and label in lowered for label in labels):
                    found.append(spec)
                    break
        return found

    async def _complete_pending(
        self, pending: Sequence[FunctionSpec], user_text: str, knowledge: Sequence[str]
    ) -> Answer | None:
        """The agent asked for a detail last turn. Small models often just chat on when the caller
        gives it ("It's 5 5 1 2 3"), so first ask for one of those calls alone (speech not allowed)
        and keep it only if every value the model filled in comes from this very message."""
        generation = Generation()
        self.last_trace.generations.append(generation)
        async with contextlib.aclosing(
            self._generate(pending, knowledge, generation, speech=False)
        ) as deltas:
            async for _ in deltas:
                pass
        answer = generation.answer
        spec = next((f for f in pending if answer is not None and f.name == answer.function), None)
        if answer is None or answer.error or spec is None:
            return None
        arguments = answer.arguments or {}
        if validate_arguments(spec, arguments) or not given_in(spec, arguments, user_text):
            return None
        return answer

    async def _generate(
        self,
        allowed: Sequence[FunctionSpec],
        knowledge: Sequence[str],
        generation: Generation,
        *,
        speech: bool = True,
    ) -> AsyncGenerator[str, None]:
        """Run one grammar-constrained generation, yielding speech deltas; sets ``generation``.
        ``speech=False`` forces a call of one of ``allowed``."""
        now = self._now()
        schema: dict[str, Any] | None = (
            output_schema(allowed, say_max_chars(self.agent.max_tokens))
            if speech
            else function_choice_schema(allowed)
        )
        assert schema is not None
        max_tokens = max_output_chars(schema)
        # The system message lists every function (a stable prompt prefix); the grammar decides
        # which of them can be called at this step.
        system = system_message(self.agent, self.context, self.functions, now)
        prompt = build_prompt(
            self.llm, system, self.history, knowledge=knowledge, examples=self.examples,
            reserve_tokens=max_tokens,
        )  # fmt: skip
        generation.prompt_tokens = prompt.tokens
        parser = StreamingAnswer()
        repeats = RepeatGuard(earlier=self._greeting)
        started = time.monotonic()
        finished = False
        can_avoid = getattr(self.llm, "supports_avoid_opening", False)
        avoid: str | None = None
        if speech and can_avoid and self._greeting and distinctive_opening(self._greeting[0]):
            # Banned from the start, not only once a copy is complete: generating the copied
            # sentence first costs its ~6 tokens, 0.3 s alone and 0.5-2 s beside other calls.
            avoid = self._greeting[0]
        try:
            text, grammar, choice = prompt.text, None, None
            if speech and getattr(self.llm, "supports_grammar", False):
                # The first key decides speech or a call. Speech then goes on after '{"say": "' fed
                # with the prompt, sparing the decode steps the model would spend writing it
                # (~200 ms on a 2-core CPU) before its first spoken word. Engines that can check
                # the key in the same decode (``choice_at``) assume speech and say if it was not.
                fused = bool(allowed) and getattr(self.llm, "supports_choice", False)
                key = await self._first_key(prompt.text) if allowed and not fused else "say"
                generation.first_key = key
                if key == "say":
                    text = prompt.text + SAY_OPENING
                    grammar, schema = say_body_grammar(say_max_chars(self.agent.max_tokens)), None
                    parser.feed(SAY_OPENING)
                    if fused:
                        choice = (len(prompt.text) + len(KEY_OPENING), FIRST_KEY_GRAMMAR, "s")
                else:
                    schema, avoid = function_choice_schema(allowed), None
            while True:
                options: dict[str, Any] = self._cache_options()
                options.update({"grammar": grammar} if grammar is not None else {"json_schema": schema})
                if choice is not None:
                    options["choice_at"] = choice
                if avoid is not None:
                    options["avoid_opening"] = avoid
                stream = self.llm.stream(
                    text, max_tokens=max_tokens, temperature=self.agent.temperature, **options
                )
                try:
                    async with contextlib.aclosing(stream) as pieces:  # type: ignore[type-var]
                        async for piece in pieces:
                            if generation.first_piece_s is None:
                                generation.first_piece_s = time.monotonic() - started
                            generation.pieces += 1
                            delta = repeats.feed(parser.feed(piece))
                            if delta:
                                if generation.first_text_s is None:
                                    generation.first_text_s = time.monotonic() - started
                                yield delta
                            if repeats.stopped:
                                break
                    copied = repeats.stopped and not repeats.text
                    if copied and avoid is None and can_avoid and self._greeting:
                        # A small model often answers by copying the one assistant message it has
                        # seen, its greeting, and then every later reply copies the two. Once more,
                        # not opening with that word; nothing was said yet.
                        log.info("reply opened with the greeting again; generating it once more")
                        avoid, choice = self._greeting[0], None
                        parser, repeats = StreamingAnswer(), RepeatGuard(earlier=self._greeting)
                        if text.endswith(SAY_OPENING):
                            parser.feed(SAY_OPENING)
                        continue
                    if repeats.stopped:
                        log.warning("reply began to repeat itself; cut after %r", repeats.text[-80:])
                    break
                except ChoiceDiffers:
                    # The model would call a function (raised before any text): generate that.
                    generation.first_key, parser = "name", StreamingAnswer()
                    text, grammar, schema, choice = prompt.text, None, function_choice_schema(allowed), None
                    avoid = None
            rest = repeats.finish()
            if rest:
                yield rest
            finished = True
        finally:
            generation.elapsed_s = time.monotonic() - started
            generation.raw = parser.raw
            if finished:
                generation.answer = (
                    Answer(say=repeats.text, truncated=True, raw=parser.raw)
                    if repeats.stopped
                    else parser.result()
                )
            elif repeats.text:
                # Cut off mid-sentence (barge-in, cancelled request): keep what was generated; the
                # call layer narrows it to what was heard with ``record_heard``.
                self.history.append(HistoryItem("say", text=repeats.text, interrupted=True))

    def _cache_options(self, *, background: bool = False) -> dict[str, Any]:
        """Prompt-cache and priority hints for engines that keep one prompt cache per conversation."""
        if not getattr(self.llm, "supports_grammar", False):
            return {}
        options: dict[str, Any] = {"cache_key": self.context.session_id}
        if background:
            options["background"] = True
        return options

    async def _first_key(self, prompt_text: str) -> str:
        """``say`` or ``name``: the key the model writes first in its answer object, greedily."""
        # One token decides: the grammar allows only "say" or "name" (or a prefix of them).
        stream = self.llm.stream(
            prompt_text + KEY_OPENING, max_tokens=1, temperature=0.0, grammar=FIRST_KEY_GRAMMAR,
            **self._cache_options(),
        )  # fmt: skip
        chosen = ""
        async with contextlib.aclosing(stream) as pieces:  # type: ignore[type-var]
            async for piece in pieces:
                chosen += piece
        return "name" if chosen.strip().startswith("n") else "say"

    def _say(self, text: str) -> Iterator[TurnEvent]:
        self.history.append(HistoryItem("say", text=text))
        yield TextDelta(text)
        yield TurnDone(text)

    def _builtin(self, spec: FunctionSpec, arguments: dict[str, Any]) -> Iterator[TurnEvent]:
        self.history.append(HistoryItem("call", name=spec.name, arguments=dict(arguments)))
        if spec.name == "end_call":
            self.history.append(HistoryItem("say", text=GOODBYE))
            yield TextDelta(GOODBYE)
            yield EndCall()
            yield TurnDone(GOODBYE)
            return
        number = str(arguments.get("number", "")).strip()
        self.history.append(HistoryItem("say", text=TRANSFERRING))
        yield TextDelta(TRANSFERRING)
        yield Transfer(number)
        yield TurnDone(TRANSFERRING)

    # -- helpers ----------------------------------------------------------------------------------
    async def _retrieve(self, user_text: str) -> list[str]:
        if self.retriever is None or not self.agent.document_ids or not user_text.strip():
            return []
        query = user_text
        previous = [i.text for i in self.history[:-1] if i.kind == "user"]
        if previous and len(user_text.split()) < 4:
            # "And the price?" means little alone; the previous question gives it a subject.
            query = f"{previous[-1]} {user_text}"
        try:
            chunks = await self.retriever.search(
                self.agent.account_id, list(self.agent.document_ids), query, self.knowledge_k
            )
        except Exception:  # a broken index must not end the call; answer without it
            log.exception("knowledge search failed for agent %s", self.agent.id)
            return []
        return [c if isinstance(c, str) else str(getattr(c, "text", "")) for c in chunks]

    def _grounding_sources(self) -> list[str]:
        sources = [i.text for i in self.history if i.kind == "user"]
        sources += [json.dumps(i.result, ensure_ascii=False) for i in self.history if i.kind == "result"]
        sources.append(self.agent.prompt)
        sources += [str(v) for v in self.context.variables.values()]
        sources += [n for n in (self.context.from_number, self.context.to_number) if n]
        return sources

    def _handler_context(self) -> dict[str, Any]:
        ctx = self.context
        return {
            "agent_id": self.agent.id,
            "session_id": ctx.session_id,
            "call_uuid": ctx.session_id if ctx.channel == "phone" else None,
            "channel": ctx.channel,
            "from": ctx.from_number,
            "to": ctx.to_number,
            "direction": ctx.direction,
        }

    def _bound_history(self) -> None:
        if len(self.history) <= self.history_max_items:
            return
        groups = turn_groups(self.history)
        while len(groups) > 1 and sum(len(g) for g in groups) > self.history_max_items:
            groups.pop(0)
        self.history = [item for group in groups for item in group]


def _evidenced(functions: Sequence[FunctionSpec]) -> list[FunctionSpec]:
    """Functions whose call can be evidenced by the caller's words: ones with a non-enum detail."""
    return [f for f in functions if not f.builtin and any(not p.enum for p in f.user_parameters)]
