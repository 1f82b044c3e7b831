"""Conversation turns with a scripted fake LLM (deterministic, fast) and a real local handler server:
event order, streaming, dispatch with fixed parameters, failures, grounding, built-ins, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from appliance.conversation import (
    Conversation,
    ConversationContext,
    EndCall,
    FunctionCallFinished,
    FunctionCallStarted,
    HttpDispatcher,
    TextDelta,
    Transfer,
    TurnDone,
    TurnEvent,
)
from appliance.conversation.engine import APOLOGY, NOT_UNDERSTOOD
from appliance.conversation.tools import FIRST_KEY_GRAMMAR, SAY_OPENING, say_body_grammar, say_max_chars
from appliance.engines.types import ChoiceDiffers

from .conftest import HandlerServer, ScriptedLlm, closed_port_url, seed_agent


def _call(name: str, **arguments: Any) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def _say(text: str) -> str:
    return json.dumps({"say": text})


@pytest.fixture
async def dispatcher() -> AsyncIterator[HttpDispatcher]:
    d = HttpDispatcher(timeout_s=1.0, max_reply_bytes=4096)
    yield d
    await d.aclose()


def _conversation(
    llm: ScriptedLlm, dispatcher: HttpDispatcher, url: str, channel: str = "chat", **agent: Any
) -> Conversation:
    ctx = ConversationContext(
        session_id="s-1", channel=channel, from_number="+14155550100", to_number="+14155550199",  # type: ignore[arg-type]
        now=datetime(2026, 11, 25, 17, 50, tzinfo=UTC),
    )  # fmt: skip
    transfer_url = url.rsplit("/", 1)[0] + "/transfer"
    return Conversation(seed_agent(url, transfer_url=transfer_url, **agent), llm, ctx, dispatcher=dispatcher)


async def _run(conversation: Conversation, text: str) -> list[TurnEvent]:
    return [event async for event in conversation.turn(text)]


async def test_speech_streams_in_pieces_and_ends_with_turn_done(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm([_say("Hello! How can I help you today?")], piece_size=2)
    events = await _run(_conversation(llm, dispatcher, handler.url("/order")), "hi")
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 5
    assert "".join(deltas) == "Hello! How can I help you today?"
    assert events[-1] == TurnDone("Hello! How can I help you today?")
    assert llm.schemas[0] is not None and "oneOf" in llm.schemas[0]


async def test_ending_a_conversation_releases_its_prompt_cache(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    released: list[str] = []

    class CachingLlm(ScriptedLlm):
        def release(self, cache_key: str) -> None:
            released.append(cache_key)

    conversation = _conversation(CachingLlm([_say("Hi.")]), dispatcher, handler.url("/order"))
    await _run(conversation, "hi")
    assert released == []
    conversation.end()
    assert released == ["s-1"]
    # An engine without per-conversation caches has nothing to release.
    _conversation(ScriptedLlm([]), dispatcher, handler.url("/order")).end()


async def test_a_reply_that_loops_on_a_sentence_stops_at_the_repeat(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    looping = "He was not ill-disposed. " + "He was a young man who was kind. " * 20
    llm = ScriptedLlm([_say(looping)], piece_size=3)
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "tell me about him")
    kept = "He was not ill-disposed. He was a young man who was kind."
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip() == kept
    assert events[-1] == TurnDone(kept)
    assert conversation.history[-1].text == kept
    # The generation was stopped there, not read to its end.
    assert llm.closed == 1 and llm.pieces_sent * 3 < len(_say(looping)) // 4


async def test_function_call_dispatches_with_fixed_parameters_and_result_reaches_the_answer(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(
        [_call("get_order_status", order_id="12345"), _say("Your order 12345 has shipped, arriving Friday.")]
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "Where is my order 12345?")
    assert events[0] == FunctionCallStarted("get_order_status", {"order_id": "12345"})
    finished = events[1]
    assert isinstance(finished, FunctionCallFinished) and finished.ok
    assert finished.arguments == {"order_id": "12345"}  # the secret is not in the event
    assert finished.result == {"order_id": "12345", "status": "shipped, arriving Friday"}
    body = handler.bodies("/order")[0]
    assert body["arguments"] == {"order_id": "12345", "api_key": "secret-key-1"}
    assert body["context"]["agent_id"] == "agent-1" and body["context"]["session_id"] == "s-1"
    assert body["context"]["from"] == "+14155550100" and body["context"]["to"] == "+14155550199"
    # The second generation saw the handler's reply, was not offered the same function again,
    # and never saw the fixed parameter.
    assert "shipped, arriving Friday" in llm.prompts[1]
    second = json.dumps(llm.schemas[1])
    assert "get_order_status" not in second and "transfer_to_human" in second
    assert all("secret-key-1" not in p and "api_key" not in p for p in llm.prompts)
    assert isinstance(events[-1], TurnDone) and "arriving Friday" in events[-1].text


@pytest.mark.parametrize("path", ["/slow", "/fail", "/badjson", None])
async def test_handler_failure_is_spoken_and_recorded(
    dispatcher: HttpDispatcher, handler: HandlerServer, path: str | None
) -> None:
    url = handler.url(path) if path else closed_port_url()
    llm = ScriptedLlm([_call("get_order_status", order_id="12345")])
    conversation = _conversation(llm, dispatcher, url)
    events = await _run(conversation, "status of order 12345 please")
    finished = [e for e in events if isinstance(e, FunctionCallFinished)]
    assert len(finished) == 1 and not finished[0].ok and finished[0].error
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == APOLOGY
    assert events[-1] == TurnDone(APOLOGY)
    # The failure is in the history, so the next turn's prompt tells the model about it.
    assert any(item.kind == "result" and not item.ok for item in conversation.history)


async def test_ungrounded_identifier_is_not_dispatched_and_the_agent_asks(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm([_call("get_order_status", order_id="123456")])
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "I want to know where my order is")
    assert not any(isinstance(e, FunctionCallStarted) for e in events)
    assert handler.requests == []
    assert isinstance(events[-1], TurnDone) and "order id" in events[-1].text
    assert conversation.last_trace.ungrounded == ["order_id"]


async def test_invalid_model_output_becomes_a_spoken_retry(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(['{"name": "delete_everything", "arguments": {}}'])
    events = await _run(_conversation(llm, dispatcher, handler.url("/order")), "hi")
    assert events[-1] == TurnDone(NOT_UNDERSTOOD) and handler.requests == []


async def test_calls_per_turn_are_bounded(dispatcher: HttpDispatcher, handler: HandlerServer) -> None:
    llm = ScriptedLlm(
        [
            _call("get_order_status", order_id="12345"),
            _call("transfer_to_human", department="support"),
            _say("Done."),
        ]
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    conversation.max_calls_per_turn = 2
    events = await _run(conversation, "order 12345, then a human please")
    assert [e.name for e in events if isinstance(e, FunctionCallStarted)] == [
        "get_order_status", "transfer_to_human",
    ]  # fmt: skip
    assert llm.schemas[2] is not None and "oneOf" not in llm.schemas[2]  # speech only at the bound
    assert events[-1] == TurnDone("Done.")


async def test_phone_builtins_are_events_not_http(dispatcher: HttpDispatcher, handler: HandlerServer) -> None:
    llm = ScriptedLlm([_call("transfer_call", number="+14155550123"), _call("end_call")])
    conversation = _conversation(
        llm, dispatcher, handler.url("/order"), channel="phone",
        prompt="Transfer billing questions to +14155550123.",
    )  # fmt: skip
    events = await _run(conversation, "billing question please")
    assert Transfer("+14155550123") in events
    events = await _run(conversation, "bye")
    assert any(isinstance(e, EndCall) for e in events)
    assert handler.requests == []
    assert "end_call" in json.dumps(llm.schemas[0])


async def test_chat_has_no_phone_builtins(dispatcher: HttpDispatcher, handler: HandlerServer) -> None:
    llm = ScriptedLlm([_say("ok")])
    await _run(_conversation(llm, dispatcher, handler.url("/order")), "hi")
    assert "end_call" not in json.dumps(llm.schemas[0])


async def _consume_until(gen: AsyncIterator[TurnEvent], predicate: Any, sink: list[TurnEvent]) -> None:
    async for event in gen:
        sink.append(event)
        if predicate(event):
            return


async def test_cancel_during_generation_stops_it_and_sends_nothing(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm([_call("get_order_status", order_id="12345")], piece_size=2)
    llm.hold_after = 5
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events: list[TurnEvent] = []
    task = asyncio.create_task(_consume_until(conversation.turn("order 12345"), lambda e: False, events))
    await llm.holding.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert llm.closed == 1  # the LLM stream was closed, not left running
    assert events == [] and handler.requests == []


async def test_closing_the_turn_before_dispatch_sends_nothing(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm([_call("get_order_status", order_id="12345")])
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    turn = conversation.turn("order 12345")
    events: list[TurnEvent] = []
    await _consume_until(turn, lambda e: isinstance(e, FunctionCallStarted), events)
    await turn.aclose()  # e.g. the caller barged in right as the call was decided
    await asyncio.sleep(0.05)
    assert isinstance(events[-1], FunctionCallStarted)
    assert handler.requests == []


async def test_cancel_mid_speech_keeps_partial_and_record_heard_replaces_it(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm([_say("Your order has shipped and will arrive on Friday morning.")], piece_size=4)
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    turn = conversation.turn("where is my order")
    events: list[TurnEvent] = []
    await _consume_until(
        turn, lambda e: sum(len(x.text) for x in events if isinstance(x, TextDelta)) > 12, events
    )
    await turn.aclose()
    assert llm.closed == 1
    last = conversation.history[-1]
    assert last.kind == "say" and last.interrupted and "Friday" not in last.text
    conversation.record_heard("Your order")
    assert conversation.history[-1].text == "Your order" and conversation.history[-1].interrupted


async def test_history_carries_over_turns(dispatcher: HttpDispatcher, handler: HandlerServer) -> None:
    llm = ScriptedLlm([_say("What is the order number?"), _call("get_order_status", order_id="777"),
                       _say("It is being packed.")])  # fmt: skip
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    await _run(conversation, "where's my order?")
    events = await _run(conversation, "it's 777")
    assert handler.bodies("/order")[0]["arguments"]["order_id"] == "777"
    assert "What is the order number?" in llm.prompts[1] and "where's my order?" in llm.prompts[1]
    assert events[-1] == TurnDone("It is being packed.")


class _Retriever:
    def __init__(self) -> None:
        self.queries: list[tuple[str, Sequence[str], str, int]] = []

    async def search(self, account_id: str, document_ids: Sequence[str], query: str, k: int) -> list[Any]:
        self.queries.append((account_id, document_ids, query, k))
        return ["Acme Shop is open from 9 am to 6 pm, Monday to Saturday."]


async def test_retrieved_knowledge_reaches_the_prompt(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm([_say("We open at 9 am.")])
    retriever = _Retriever()
    ctx = ConversationContext(session_id="s")
    agent = seed_agent(handler.url("/order"), document_ids=("doc-1",))
    conversation = Conversation(agent, llm, ctx, dispatcher=dispatcher, retriever=retriever)
    await _run(conversation, "When do you open?")
    assert retriever.queries == [("acct-1", ["doc-1"], "When do you open?", 3)]
    assert "9 am to 6 pm" in llm.prompts[0]


async def test_detail_given_after_an_ask_completes_the_pending_call(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(
        [
            _call("get_order_status", order_id="99999"),  # invented: the agent asks instead
            _call("get_order_status", order_id="55123"),  # forced call on the follow-up
            _say("Order 55123 has shipped."),
        ]
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    await _run(conversation, "I want to check my order")
    events = await _run(conversation, "It's 5 5 1 2 3")
    assert FunctionCallStarted("get_order_status", {"order_id": "55123"}) in events
    assert llm.schemas[1] is not None and "say" not in json.dumps(llm.schemas[1])
    assert handler.bodies("/order")[0]["arguments"]["order_id"] == "55123"
    assert events[-1] == TurnDone("Order 55123 has shipped.")


async def test_a_follow_up_number_the_model_cut_short_is_sent_whole(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(
        [
            _say("Sure. What is your order id?"),
            _call("get_order_status", order_id="1"),  # the first of the digits the caller read
            _say("Order 11223 is not found."),
        ]
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    await _run(conversation, "Can you check an order for me?")
    events = await _run(conversation, "Sure, 1 1 2 2 3.")
    assert FunctionCallStarted("get_order_status", {"order_id": "11223"}) in events
    assert handler.bodies("/order")[0]["arguments"]["order_id"] == "11223"


async def test_pending_call_is_dropped_when_the_follow_up_lacks_the_detail(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(
        [
            _call("get_order_status", order_id="99999"),
            _call("get_order_status", order_id="99999"),  # still not in the caller's words
            _say("No problem, anything else?"),
        ]
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    await _run(conversation, "I want to check my order")
    events = await _run(conversation, "never mind")
    assert handler.requests == []
    assert events[-1] == TurnDone("No problem, anything else?")


async def test_a_question_naming_a_detail_makes_the_next_message_a_candidate_call(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(
        [
            _say("Of course. What is your order id?"),
            _call("get_order_status", order_id="24680"),  # forced: speech not allowed
            _say("It has shipped."),
        ]
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    await _run(conversation, "Where is my order?")
    events = await _run(conversation, "It's 24680.")
    assert FunctionCallStarted("get_order_status", {"order_id": "24680"}) in events
    assert "say" not in json.dumps(llm.schemas[1])


async def test_ungrounded_call_with_retrieved_facts_lets_the_model_speak(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm([_call("get_order_status", order_id="12345"), _say("Shipping costs 4 dollars 90.")])
    agent = seed_agent(handler.url("/order"), document_ids=("doc-1",))
    conversation = Conversation(
        agent, llm, ConversationContext(session_id="s"), dispatcher=dispatcher, retriever=_Retriever()
    )
    events = await _run(conversation, "How much is shipping?")
    assert handler.requests == []
    assert llm.schemas[1] is not None and "oneOf" not in llm.schemas[1]  # speech only
    assert events[-1] == TurnDone("Shipping costs 4 dollars 90.")


async def test_a_refusal_with_the_detail_in_the_message_becomes_the_call(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(
        [
            _say("I'm sorry, but I can't help with that."),
            _call("get_order_status", order_id="12345"),  # forced retry, grounded in the message
            _say("It has shipped."),
        ]
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "Where is my order 12345?")
    assert not any(isinstance(e, TextDelta) and "sorry" in e.text for e in events)  # never spoken
    assert FunctionCallStarted("get_order_status", {"order_id": "12345"}) in events
    assert events[-1] == TurnDone("It has shipped.") and conversation.last_trace.recovered_refusal


@pytest.mark.parametrize(
    ("reply", "released"), [("You have two orders with us.", "Y"), ("I'd be glad to help.", "I'd")]
)
async def test_a_reply_that_cannot_be_a_refusal_is_not_held_back(
    dispatcher: HttpDispatcher, handler: HandlerServer, reply: str, released: str
) -> None:
    # The agent has a function a caller's words can evidence, so refusals are held back; a reply
    # whose first word is no refusal's must reach the voice at once, not after 16 characters.
    llm = ScriptedLlm([_say(reply)], piece_size=1)
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    first: tuple[str, int] | None = None
    spoken = ""
    async for event in conversation.turn("How are my orders?"):
        if isinstance(event, TextDelta):
            if first is None:
                first = (event.text, llm.pieces_sent)
            spoken += event.text
    assert spoken == reply
    assert first is not None
    text, pieces = first
    assert text == released  # the first characters that are no refusal's opening
    assert pieces == len('{"say": "') + len(released)  # one piece a character


async def test_a_refusal_without_evidence_is_spoken(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    refusal = "I'm sorry, but I can't help with the weather."
    llm = ScriptedLlm([_say(refusal), _call("transfer_to_human", department="sales")])
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "What's the weather tomorrow?")
    assert handler.requests == []
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == refusal
    assert events[-1] == TurnDone(refusal)


class GrammarLlm(ScriptedLlm):
    """A scripted LLM that takes raw grammars, as ``LlamaLlm`` does: the conversation then asks for
    the answer's first key alone, and speech continues after an opening fed with the prompt."""

    supports_grammar = True

    def __init__(self, outputs: Sequence[str], **kwargs: Any):
        super().__init__(outputs, **kwargs)
        self.grammars: list[str | None] = []
        self.cache: list[str | None] = []
        self.background: list[bool] = []

    async def stream(  # type: ignore[override]
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        stop: Sequence[str] = (),
        grammar: str | None = None,
        cache_key: str | None = None,
        background: bool = False,
    ) -> AsyncIterator[str]:
        assert json_schema is None or grammar is None
        self.grammars.append(grammar)
        self.cache.append(cache_key)
        self.background.append(background)
        async for piece in super().stream(
            prompt, max_tokens=max_tokens, temperature=temperature, json_schema=json_schema
        ):
            yield piece


async def test_fast_path_feeds_the_say_opening_after_the_first_key(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:

    answer = "Hello! How can I help?"
    llm = GrammarLlm(["say", json.dumps(answer)[1:] + "}"], piece_size=2)
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "hi")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer
    assert events[-1] == TurnDone(answer)
    key_prompt, say_prompt = llm.prompts
    assert key_prompt.endswith('<assistant>{"') and llm.grammars[0] == FIRST_KEY_GRAMMAR
    assert say_prompt == key_prompt[:-2] + SAY_OPENING
    assert llm.grammars[1] == say_body_grammar(say_max_chars(conversation.agent.max_tokens))
    assert conversation.last_trace.generations[0].first_key == "say"
    # Both steps name the conversation, so an engine with prompt caches keeps returning to one.
    assert llm.cache == ["s-1", "s-1"]
    # The history holds the whole answer object, as the model would have written it.
    assert conversation.history[-1].text == answer


async def test_fast_path_a_call_continues_under_the_functions_grammar(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = GrammarLlm(
        ["name", _call("get_order_status", order_id="12345"), "say", '12345 has shipped."}'], piece_size=4
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "Where is order 12345?")
    assert [e.name for e in events if isinstance(e, FunctionCallStarted)] == ["get_order_status"]
    # The call's generation had no speech in its grammar: the key was already decided.
    call_schema = llm.schemas[1]
    assert call_schema is not None and "say" not in json.dumps(call_schema)
    assert llm.grammars[1] is None
    assert events[-1] == TurnDone("12345 has shipped.")


class ChoosingLlm(GrammarLlm):
    """A scripted LLM that checks the first key in the same decode (``choice_at``): a scripted
    output of ``ChoiceDiffers`` stands for the model choosing a function there."""

    supports_choice = True

    def __init__(self, outputs: Sequence[str | ChoiceDiffers], **kwargs: Any):
        super().__init__([o for o in outputs if isinstance(o, str)], **kwargs)
        self.differs = [isinstance(o, ChoiceDiffers) for o in outputs]
        self.choices: list[tuple[int, str, str] | None] = []

    async def stream(self, prompt: str, *, choice_at: Any = None, **kwargs: Any) -> AsyncIterator[str]:  # type: ignore[override]
        self.choices.append(choice_at)
        if self.differs.pop(0):
            self.prompts.append(prompt)
            raise ChoiceDiffers("name")
        async for piece in super().stream(prompt, **kwargs):
            yield piece


async def test_fused_path_checks_the_first_key_in_the_say_generation(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    answer = "Hello! How can I help?"
    llm = ChoosingLlm([json.dumps(answer)[1:] + "}"], piece_size=2)
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "hi")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer
    (say_prompt,) = llm.prompts  # one generation: no separate first-key step
    assert say_prompt.endswith("<assistant>" + SAY_OPENING)
    (choice,) = llm.choices
    assert choice is not None
    offset, grammar, expected = choice
    assert say_prompt[:offset].endswith('<assistant>{"') and grammar == FIRST_KEY_GRAMMAR and expected == "s"
    assert conversation.last_trace.generations[0].first_key == "say"
    assert conversation.history[-1].text == answer


async def test_fused_path_falls_back_to_the_functions_grammar_when_the_model_would_call_one(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ChoosingLlm(
        [ChoiceDiffers("name"), _call("get_order_status", order_id="12345"), '12345 has shipped."}'],
        piece_size=4,
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "Where is order 12345?")
    assert [e.name for e in events if isinstance(e, FunctionCallStarted)] == ["get_order_status"]
    assert not any(isinstance(e, TextDelta) and "{" in e.text for e in events)
    first, call = llm.prompts[:2]
    assert first.endswith(SAY_OPENING) and call == first[: -len(SAY_OPENING)]
    assert llm.choices[1] is None  # the function's generation checks nothing
    assert llm.choices[2] is not None and llm.prompts[2].endswith(SAY_OPENING)  # the answer after it
    call_schema = llm.schemas[0]
    assert call_schema is not None and "say" not in json.dumps(call_schema)
    assert conversation.last_trace.generations[0].first_key == "name"
    assert events[-1] == TurnDone("12345 has shipped.")


async def test_prewarm_evaluates_up_to_the_next_user_message_and_yields_to_other_work(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(["x", "x"])
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    conversation.add_assistant_message("Welcome!")
    await conversation.prewarm()
    (prompt,) = llm.prompts
    assert prompt.endswith("<user>")  # the next user message's opening, nothing after it
    assert "Welcome!" in prompt
    llm.queue_depth = 1  # type: ignore[attr-defined]  # another call's generation is running
    await conversation.prewarm()
    assert len(llm.prompts) == 1


async def test_prewarm_runs_as_background_work_on_an_engine_that_schedules_it(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = GrammarLlm(["x"])
    llm.schedules_background = True  # type: ignore[attr-defined]
    llm.queue_depth = 1  # type: ignore[attr-defined]  # another call's generation is running
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    conversation.add_assistant_message("Welcome!")
    await conversation.prewarm()
    assert len(llm.prompts) == 1 and llm.prompts[0].endswith("<user>")
    assert llm.background == [True]


async def test_words_read_ahead_are_the_start_of_the_turns_prompt(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = GrammarLlm(["", "say", json.dumps("It has not shipped yet.")[1:] + "}"])
    llm.schedules_background = True  # type: ignore[attr-defined]
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    conversation.add_assistant_message("Welcome!")
    await conversation.read_ahead("  ")  # nothing said yet: nothing to read
    assert llm.prompts == []
    await conversation.read_ahead("I placed an order last week and ")
    (ahead,) = llm.prompts
    assert ahead.endswith("<user>I placed an order last week and") and llm.background == [True]
    assert conversation.history[-1].text == "Welcome!"  # nothing answered or recorded
    await _run(conversation, "I placed an order last week and it has not come yet.")
    assert llm.prompts[1].startswith(ahead)  # the turn's prompt goes on from the words read ahead
    assert conversation.history[-1].text == "It has not shipped yet."


async def test_a_refusal_after_a_result_is_never_spoken_and_the_result_is_read(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    refusal = "I'm sorry, but I can't assist with that request."
    llm = ScriptedLlm([_call("get_order_status", order_id="12345"), _say(refusal)])
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "Where is my order 12345?")
    spoken = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert "assist" not in spoken and "shipped, arriving Friday" in spoken
    done = events[-1]
    assert isinstance(done, TurnDone) and done.text == spoken
    assert conversation.last_trace.read_result
    assert conversation.history[-1].text == spoken  # the model is told what the caller heard


async def test_an_apology_that_speaks_of_the_result_is_released_at_its_first_fact(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    reply = "Sorry, order 777 is still being packed."
    llm = ScriptedLlm([_call("get_order_status", order_id="777"), _say(reply)], piece_size=1)
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    deltas = [e.text for e in await _run(conversation, "Where is order 777?") if isinstance(e, TextDelta)]
    assert "".join(deltas) == reply and not conversation.last_trace.read_result
    assert deltas[0] == "Sorry, order 777"  # held while it could be a refusal, not to its end
    assert len(deltas) > 10


async def test_a_further_call_the_caller_did_not_ask_for_is_not_made(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ScriptedLlm(
        [
            _call("get_order_status", order_id="12345"),
            _call("transfer_to_human", department="sales"),
            _say("Your order 12345 has shipped and arrives Friday."),
        ]
    )
    conversation = _conversation(llm, dispatcher, handler.url("/order"))
    events = await _run(conversation, "Where is my order 12345?")
    assert [e.name for e in events if isinstance(e, FunctionCallStarted)] == ["get_order_status"]
    assert handler.bodies("/transfer") == []
    assert llm.schemas[2] is not None and "oneOf" not in llm.schemas[2]  # speech only
    assert events[-1] == TurnDone("Your order 12345 has shipped and arrives Friday.")
    assert conversation.last_trace.unasked_calls == ["transfer_to_human"]
    assert [item.kind for item in conversation.history] == ["user", "call", "result", "say"]


class AvoidingLlm(ChoosingLlm):
    """A scripted LLM that can be told not to open with a word (``avoid_opening``)."""

    supports_avoid_opening = True

    def __init__(self, outputs: Sequence[str | ChoiceDiffers], **kwargs: Any):
        super().__init__(outputs, **kwargs)
        self.avoided: list[str | None] = []

    async def stream(  # type: ignore[override]
        self, prompt: str, *, avoid_opening: str | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        self.avoided.append(avoid_opening)
        async for piece in super().stream(prompt, **kwargs):
            yield piece


GREETING = "Card table line. Which cards do you hold?"
# Replies often open with "You": only a copy of the whole first sentence is caught.
PLAIN_GREETING = "You have reached the card table. Which cards do you hold?"


async def test_a_reply_may_not_open_with_a_distinctive_greeting_word_from_the_start(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = AvoidingLlm(['You have the five of clubs."}'], piece_size=2)
    conversation = _conversation(llm, dispatcher, handler.url("/order"), channel="phone")
    conversation.add_assistant_message(GREETING)
    events = await _run(conversation, "5 5")
    assert events[-1] == TurnDone("You have the five of clubs.")
    assert llm.avoided == ["Card table line."]  # one generation, told at once
    assert llm.choices[0] is not None  # the first key is still checked in the same decode


async def test_a_reply_that_copies_a_distinctive_greeting_anyway_is_not_said(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = AvoidingLlm([GREETING + '"}'], piece_size=2)
    conversation = _conversation(llm, dispatcher, handler.url("/order"), channel="phone")
    conversation.add_assistant_message(GREETING)
    events = await _run(conversation, "5 5")
    assert not any(isinstance(e, TextDelta) and "Card" in e.text for e in events)
    assert events[-1] == TurnDone(NOT_UNDERSTOOD)
    assert llm.avoided == ["Card table line."]  # already avoided: not generated again


async def test_a_reply_that_opens_with_the_greeting_is_generated_again_not_opening_that_way(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = AvoidingLlm([PLAIN_GREETING + '"}', 'You have the five of clubs."}'], piece_size=2)
    conversation = _conversation(llm, dispatcher, handler.url("/order"), channel="phone")
    conversation.add_assistant_message(PLAIN_GREETING)
    events = await _run(conversation, "5 5")
    # Nothing of the copied greeting was said: its first sentence was held while it matched.
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "You have the five of clubs."
    assert events[-1] == TurnDone("You have the five of clubs.")
    assert llm.avoided == [None, "You have reached the card table."]
    assert llm.choices[1] is None  # the first key was already checked
    assert llm.prompts[1] == llm.prompts[0] and llm.prompts[1].endswith(SAY_OPENING)
    assert [item.text for item in conversation.history if item.kind == "say"] == [
        PLAIN_GREETING,
        "You have the five of clubs.",
    ]


async def test_the_greetings_later_sentences_and_other_openings_pass_at_once(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = AvoidingLlm(['Which cards do you hold?"}', 'You have reached it."}'], piece_size=2)
    conversation = _conversation(llm, dispatcher, handler.url("/order"), channel="phone")
    conversation.add_assistant_message(PLAIN_GREETING)
    for reply in ("Which cards do you hold?", "You have reached it."):
        events = await _run(conversation, "hmm")
        assert events[-1] == TurnDone(reply)
    assert llm.avoided == [None, None]


async def test_without_an_engine_that_can_avoid_it_a_copied_greeting_is_not_said(
    dispatcher: HttpDispatcher, handler: HandlerServer
) -> None:
    llm = ChoosingLlm([GREETING + '"}'], piece_size=2)
    conversation = _conversation(llm, dispatcher, handler.url("/order"), channel="phone")
    conversation.add_assistant_message(GREETING)
    events = await _run(conversation, "5 5")
    assert not any(isinstance(e, TextDelta) and "Card" in e.text for e in events)
    assert events[-1] == TurnDone(NOT_UNDERSTOOD)
