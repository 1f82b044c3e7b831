"""Building the model's prompt: the agent's templated instructions, speech style, the functions,
the answer format with examples, retrieved knowledge and a history bounded by a token budget.

The order is chosen for llama.cpp's prefix cache: what is fixed for an agent comes first, what
changes every turn (retrieved facts) rides on the newest message only, so consecutive turns of a
conversation re-use the evaluated prefix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from .tools import humanize
from .types import AgentConfig, ConversationContext, FunctionSpec, Parameter

_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][\w.\-]*)\s*\}\}")
VARIABLE_MAX_CHARS = 500
CHUNK_MAX_CHARS = 700
# A handler may reply with up to ``handler_max_reply_bytes``; the model only needs the gist.
RESULT_MAX_CHARS = 1500


def template_variables(agent: AgentConfig, context: ConversationContext, now: datetime) -> dict[str, Any]:
    """Values for ``{{name}}``. Caller-supplied variables may override the clock and agent name but
    not who is calling whom. ``None`` values are treated as unknown."""
    values: dict[str, Any] = {
        "agent_name": agent.name,
        "date": now.strftime("%A, %d %B %Y"),
        "time": now.strftime("%H:%M %Z").strip(),
        "datetime": now.strftime("%A, %d %B %Y %H:%M %Z").strip(),
        "now": now.isoformat(timespec="minutes"),
    }
    for key, value in context.variables.items():
        values[str(key)] = value
        values[f"context.{key}"] = value
    identity = {
        "from": context.from_number,
        "to": context.to_number,
        "direction": context.direction,
        "session_id": context.session_id,
        "call_uuid": context.session_id if context.channel == "phone" else None,
    }
    values.update(identity)
    return values


def render_template(template: str, values: Mapping[str, Any]) -> str:
    """Replace ``{{ name }}`` with its value; an unknown name stays in the text as written."""

    def substitute(match: re.Match[str]) -> str:
        value = values.get(match.group(1))
        if value is None:
            return match.group(0)
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return text[:VARIABLE_MAX_CHARS]

    return _VARIABLE.sub(substitute, template)


SPEECH_STYLE = (
    "You are speaking with a caller on the phone: everything you say is read aloud. Reply in one to "
    "three short, natural spoken sentences. Use plain words only: no markdown, no lists, no bullet "
    "points, no emojis, no links or web addresses. Say numbers the way a person would."
)
CHAT_STYLE = (
    "You are chatting with a customer; your replies may also be read aloud. Reply in one to three "
    "short, natural sentences. Use plain words only: no markdown, no lists, no emojis, no links."
)

TOOLS_INTRO = """\
# Tools

You may call a function to help with the user's request.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

To call a function, return a json object with the function name and arguments:
{{"name": <function-name>, "arguments": <args-json-object>}}
Otherwise reply to the user with a json object holding what you say:
{{"say": "<your reply>"}}"""

FORMAT_RULES = """\
Rules:
- You cannot look anything up or change anything yourself: only the functions can. Never make up \
a status or a result, and do not refuse: call the function.
- Call a function when the user asks for what it does and has given the details it needs.
- If a detail is missing, ask for it with "say". Never invent order numbers, ids, emails, phone \
numbers, dates or times.
- After a function result, tell the user what it means in plain words."""

NO_TOOLS = """\
Reply to the user with a json object holding what you say:
{"say": "<your reply>"}"""


def describe_function(spec: FunctionSpec) -> dict[str, Any]:
    """The function's signature as the model sees it. Fixed parameters are never part of it."""
    properties: dict[str, Any] = {}
    for p in spec.user_parameters:
        prop: dict[str, Any] = {"type": p.type}
        if p.description:
            prop["description"] = p.description
        if p.enum:
            prop["enum"] = list(p.enum)
        properties[p.name] = prop
    parameters = {
        "type": "object",
        "properties": properties,
        "required": [p.name for p in spec.user_parameters if p.required],
    }
    function = {"name": spec.name, "description": spec.description or humanize(spec.name)}
    return {"type": "function", "function": {**function, "parameters": parameters}}


def system_message(
    agent: AgentConfig,
    context: ConversationContext,
    functions: Sequence[FunctionSpec],
    now: datetime,
) -> str:
    parts = []
    instructions = render_template(agent.prompt, template_variables(agent, context, now)).strip()
    if instructions:
        parts.append(instructions)
    if agent.name:
        parts.append(f"You are {agent.name}.")
    parts.append(SPEECH_STYLE if context.channel == "phone" else CHAT_STYLE)
    if functions:
        tools = "\n".join(json.dumps(describe_function(f), ensure_ascii=False) for f in functions)
        parts.append(TOOLS_INTRO.format(tools=tools))
        parts.append(FORMAT_RULES)
    else:
        parts.append(NO_TOOLS)
    # Minute resolution: the prefix cache survives every turn within the same minute.
    parts.append(f"Now it is {now.strftime('%A, %d %B %Y, %H:%M %Z').strip()}.")
    return "\n\n".join(parts)


# -- history --------------------------------------------------------------------------------------

Kind = Literal["user", "say", "call", "result"]


@dataclass
class HistoryItem:
    """One entry of a conversation. ``call`` and ``result`` items belong to the preceding user
    turn and are dropped together with it."""

    kind: Kind
    text: str = ""
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    ok: bool = True
    interrupted: bool = False


def render_item(item: HistoryItem) -> dict[str, str]:
    if item.kind == "user":
        return {"role": "user", "content": item.text}
    if item.kind == "say":
        return {"role": "assistant", "content": json.dumps({"say": item.text}, ensure_ascii=False)}
    if item.kind == "call":
        body = {"name": item.name, "arguments": item.arguments}
        return {"role": "assistant", "content": json.dumps(body, ensure_ascii=False)}
    payload = item.result if item.ok else {"error": item.result or "the function failed"}
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return {"role": "user", "content": f"Result of {item.name}: {text[:RESULT_MAX_CHARS]}"}


def _example_value(param: Parameter) -> Any:
    if param.enum:
        return param.enum[0]
    if param.type in ("integer", "number"):
        return 2
    if param.type == "boolean":
        return True
    lowered = param.name.lower()
    if "email" in lowered:
        return "sam@example.com"
    if any(word in lowered for word in ("id", "number", "code", "phone")):
        return "48213"
    return "blue"


def _request_phrase(spec: FunctionSpec) -> str:
    what = (spec.description or humanize(spec.name)).rstrip(".")
    return f"Can you {what[:1].lower()}{what[1:]}?"


def few_shot(functions: Sequence[FunctionSpec]) -> list[HistoryItem]:
    """Example exchanges with the agent's own functions, rendered as earlier turns: a greeting, each
    function called when the request comes with its details, its result spoken, and one request
    without its detail (ask for it). Small models follow demonstrated turns far better than rules.
    Values are made up; the grounding check stops the model from copying them into a real call."""
    items = [HistoryItem("user", text="Hello!"), HistoryItem("say", text="Hello! How can I help you today?")]
    ask_example: tuple[FunctionSpec, list[Parameter]] | None = None
    for spec in functions:
        required = [p for p in spec.user_parameters if p.required]
        args = {p.name: _example_value(p) for p in required}
        details = " ".join(f"My {humanize(p.name)} is {args[p.name]}." for p in required)
        items.append(HistoryItem("user", text=f"{_request_phrase(spec)} {details}".strip()))
        items.append(HistoryItem("call", name=spec.name, arguments=args))
        if spec.builtin:
            continue
        items.append(HistoryItem("result", name=spec.name, result={"result": "done"}))
        items.append(HistoryItem("say", text="That's done. Is there anything else I can help you with?"))
        asked = [p for p in required if not p.enum]
        if asked and ask_example is None:
            ask_example = (spec, asked)
    if ask_example is not None:
        spec, asked = ask_example
        names = " and ".join(f"the {humanize(p.name)}" for p in asked)
        items.append(HistoryItem("user", text=_request_phrase(spec)))
        items.append(HistoryItem("say", text=f"Sure, I can do that. What is {names}?"))
        items.append(HistoryItem("user", text="Actually, never mind. Thanks, that's all."))
        items.append(HistoryItem("say", text="No problem. Have a great day!"))
    return items


def knowledge_note(chunks: Sequence[str]) -> str:
    if not chunks:
        return ""
    lines = "\n".join(f"- {' '.join(c.split())[:CHUNK_MAX_CHARS]}" for c in chunks)
    return (
        "\n\n(Facts from the knowledge base that may help; answer from them, and if they do not "
        f"cover the question say you don't know:\n{lines})"
    )


def turn_groups(history: Sequence[HistoryItem]) -> list[list[HistoryItem]]:
    groups: list[list[HistoryItem]] = []
    for item in history:
        if item.kind == "user" or not groups:
            groups.append([item])
        else:
            groups[-1].append(item)
    return groups


class PromptTooLong(Exception):
    """Even the newest message alone does not fit the model's context."""


@dataclass(frozen=True)
class BuiltPrompt:
    text: str
    tokens: int
    dropped_groups: int


def build_prompt(
    llm: Any,
    system: str,
    history: Sequence[HistoryItem],
    *,
    knowledge: Sequence[str] = (),
    examples: Sequence[HistoryItem] = (),
    reserve_tokens: int,
) -> BuiltPrompt:
    """Render system + history into the model's chat template, dropping the oldest turns until the
    prompt plus ``reserve_tokens`` (the answer) fits ``llm.context_size``. The newest user message
    carries the retrieved facts. A newest message too long on its own is cut from its start."""
    budget = llm.context_size - reserve_tokens
    groups = turn_groups(history)
    dropped = 0
    while True:
        kept = [item for group in groups[dropped:] for item in group]
        text = _render(llm, system, kept, knowledge, examples)
        tokens = llm.count_tokens(text)
        if tokens <= budget:
            return BuiltPrompt(text, tokens, dropped)
        if dropped < len(groups) - 1:
            dropped += 1
            continue
        return _fit_last_group(
            llm, system, groups[-1] if groups else [], knowledge, budget, dropped, examples
        )


def _render(
    llm: Any,
    system: str,
    items: Sequence[HistoryItem],
    knowledge: Sequence[str],
    examples: Sequence[HistoryItem] = (),
) -> str:
    messages = [{"role": "system", "content": system}] + [render_item(e) for e in examples]
    last_user = max((i for i, it in enumerate(items) if it.kind == "user"), default=-1)
    for index, item in enumerate(items):
        message = render_item(item)
        if index == last_user and knowledge:
            message["content"] += knowledge_note(knowledge)
        messages.append(message)
    return str(llm.format_chat(messages))


def _fit_last_group(
    llm: Any,
    system: str,
    group: list[HistoryItem],
    knowledge: Sequence[str],
    budget: int,
    dropped: int,
    examples: Sequence[HistoryItem],
) -> BuiltPrompt:
    # First give up the knowledge, then shorten the longest texts (oldest words go first).
    for facts in (knowledge, ()):
        text = _render(llm, system, group, facts, examples)
        tokens = llm.count_tokens(text)
        if tokens <= budget:
            return BuiltPrompt(text, tokens, dropped)
    items = [HistoryItem(**vars(item)) for item in group]
    for _ in range(12):
        longest = max(items, key=lambda it: len(it.text), default=None)
        if longest is None or len(longest.text) < 8:
            break
        longest.text = longest.text[len(longest.text) // 2 :]
        text = _render(llm, system, items, (), examples)
        tokens = llm.count_tokens(text)
        if tokens <= budget:
            return BuiltPrompt(text, tokens, dropped)
    raise PromptTooLong(f"the prompt needs more than {budget} tokens even without history")


def clock(context: ConversationContext) -> datetime:
    return context.now or datetime.now(UTC)
