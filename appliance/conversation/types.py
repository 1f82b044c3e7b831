"""Plain data the brain works on: an agent's configuration, a conversation's context, turn events.

These are deliberately independent of the ORM rows (``adapter.py`` converts) so the brain can be
driven by a chat session, a phone call, a benchmark or a test with the same objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

ParamType = Literal["string", "number", "integer", "boolean"]
Channel = Literal["chat", "phone"]


@dataclass(frozen=True)
class Parameter:
    """One argument the model collects from the caller."""

    name: str
    type: ParamType = "string"
    description: str = ""
    required: bool = True
    enum: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str = ""
    handler_url: str = ""
    user_parameters: tuple[Parameter, ...] = ()
    # Merged into the arguments after the model chose them; never rendered into a prompt.
    fixed_parameters: Mapping[str, Any] = field(default_factory=dict)
    # Built-ins (end_call, transfer_call) are executed by the call layer, not POSTed anywhere.
    builtin: bool = False


@dataclass(frozen=True)
class AgentConfig:
    id: str
    name: str = ""
    prompt: str = ""
    account_id: str = ""
    functions: tuple[FunctionSpec, ...] = ()
    document_ids: tuple[str, ...] = ()
    model: str | None = None
    temperature: float = 0.0
    # Upper bound on a spoken reply, in tokens (the agent's ``answer_llm.max_tokens``).
    max_tokens: int = 120


@dataclass
class ConversationContext:
    """Who is talking to whom. ``None`` means unknown: a ``{{from}}`` in the prompt then stays visible."""

    session_id: str
    channel: Channel = "chat"
    from_number: str | None = None
    to_number: str | None = None
    direction: str | None = None
    # Caller-supplied variables (the ``context`` of an outbound call).
    variables: Mapping[str, Any] = field(default_factory=dict)
    # Fixed clock for tests and benchmarks; the real time when ``None``.
    now: datetime | None = None


@dataclass(frozen=True)
class FunctionResult:
    ok: bool
    result: Any = None
    error: str | None = None
    status_code: int | None = None
    elapsed_s: float = 0.0


# -- events yielded by ``Conversation.turn`` -------------------------------------------------------


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class FunctionCallStarted:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class FunctionCallFinished:
    name: str
    arguments: dict[str, Any]
    result: Any
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class EndCall:
    pass


@dataclass(frozen=True)
class Transfer:
    number: str


@dataclass(frozen=True)
class TurnDone:
    text: str


TurnEvent = TextDelta | FunctionCallStarted | FunctionCallFinished | EndCall | Transfer | TurnDone
