"""Prompt building: templating edge cases, what the model is (not) shown, the token budget."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from appliance.conversation.prompt import (
    HistoryItem,
    PromptTooLong,
    build_prompt,
    render_template,
    system_message,
    template_variables,
)
from appliance.conversation.types import AgentConfig, ConversationContext

from .conftest import ScriptedLlm, seed_agent

NOW = datetime(2026, 11, 25, 17, 50, tzinfo=UTC)


def _context(**kwargs: object) -> ConversationContext:
    fields: dict[str, object] = {"session_id": "call-1", "channel": "phone", "now": NOW}
    fields.update(kwargs)
    return ConversationContext(**fields)  # type: ignore[arg-type]


def test_template_fills_call_context_and_caller_variables() -> None:
    agent = AgentConfig(id="a", name="Ava")
    ctx = _context(
        from_number="+14155550100", to_number="+14155550199", direction="outbound",
        variables={"customer_name": "Dana", "balance": 12.5, "tags": ["vip"]},
    )  # fmt: skip
    values = template_variables(agent, ctx, NOW)
    text = render_template(
        "Hi {{customer_name}} ({{ context.customer_name }}), call from {{from}} to {{ to }} "
        "[{{direction}}] on {{date}} at {{time}}; {{agent_name}}; owes {{balance}} {{tags}}",
        values,
    )
    assert text == (
        "Hi Dana (Dana), call from +14155550100 to +14155550199 [outbound] on Wednesday, 25 November "
        '2026 at 17:50 UTC; Ava; owes 12.5 ["vip"]'
    )


@pytest.mark.parametrize(
    "template",
    [
        "Hello {{unknown}} and {{ also_unknown }}",
        "{{",
        "}}",
        "{{}}",
        "{{ }}",
        "{{{from}}}",
        "{{1abc}}",
        "{single}",
        "{{from",
        "{{ weird-name }}",
    ],
)
def test_template_never_crashes_and_keeps_unknowns_visible(template: str) -> None:
    values = template_variables(AgentConfig(id="a"), _context(), NOW)
    text = render_template(template, values)
    assert "unknown" not in template or text == template
    if template == "{{{from}}}":
        assert text == "{{{from}}}"  # from is unknown (None) in this context: left as written


def test_caller_variables_cannot_override_who_is_calling() -> None:
    ctx = _context(from_number="+1555", variables={"from": "+1999", "date": "next Monday"})
    values = template_variables(AgentConfig(id="a"), ctx, NOW)
    assert render_template("{{from}} {{date}}", values) == "+1555 next Monday"


def test_template_values_are_bounded() -> None:
    values = template_variables(AgentConfig(id="a"), _context(variables={"v": "x" * 10_000}), NOW)
    assert len(render_template("{{v}}", values)) == 500


def test_system_message_lists_functions_but_never_fixed_parameters() -> None:
    agent = seed_agent("http://127.0.0.1:1/order", prompt="Caller is {{from}}.")
    text = system_message(agent, _context(from_number="+14155550100"), agent.functions, NOW)
    assert "Caller is +14155550100." in text
    assert '"name": "get_order_status"' in text and '"required": ["order_id"]' in text
    assert '"enum": ["sales", "support"]' in text
    assert "api_key" not in text and "secret-key-1" not in text
    assert "no markdown" in text
    assert "Wednesday, 25 November 2026" in text


def test_history_is_dropped_oldest_first_to_fit_the_budget() -> None:
    llm = ScriptedLlm([], context_size=1200)
    history = []
    for i in range(40):
        history.append(HistoryItem("user", text=f"question number {i} " + "blah " * 10))
        history.append(HistoryItem("say", text=f"answer number {i}"))
    history.append(HistoryItem("user", text="the newest question"))
    built = build_prompt(llm, "system text", history, reserve_tokens=300)
    assert built.tokens <= 1200 - 300
    assert "the newest question" in built.text
    assert "question number 0 " not in built.text
    assert "question number 39" in built.text  # recent turns survive
    assert built.dropped_groups > 0


def test_knowledge_rides_on_the_newest_user_message_only() -> None:
    llm = ScriptedLlm([])
    history = [
        HistoryItem("user", text="first"),
        HistoryItem("say", text="ok"),
        HistoryItem("user", text="what are your hours?"),
    ]
    built = build_prompt(llm, "sys", history, knowledge=["We open at 9 am."], reserve_tokens=100)
    assert built.text.index("We open at 9 am.") > built.text.index("what are your hours?")
    assert built.text.count("We open at 9 am.") == 1


def test_an_oversized_newest_message_is_cut_not_overflowed() -> None:
    llm = ScriptedLlm([], context_size=600)
    history = [HistoryItem("user", text="word " * 5000 + "final words")]
    built = build_prompt(llm, "sys", history, knowledge=["fact " * 300], reserve_tokens=200)
    assert built.tokens <= 400
    assert "final words" in built.text


def test_a_system_prompt_too_big_for_the_model_raises() -> None:
    llm = ScriptedLlm([], context_size=300)
    with pytest.raises(PromptTooLong):
        build_prompt(llm, "s" * 5000, [HistoryItem("user", text="hi")], reserve_tokens=100)
