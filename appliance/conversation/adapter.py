"""From the store's rows (``appliance.store.agents.Agent`` with its ``functions``) to the brain's
plain configuration. Duck-typed on purpose: the brain does not import the ORM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .types import AgentConfig, FunctionSpec, Parameter

_TYPES = {"string", "number", "integer", "boolean"}


def parameter_from_dict(raw: Mapping[str, Any]) -> Parameter:
    kind = str(raw.get("type") or "string")
    enum = raw.get("enum")
    return Parameter(
        name=str(raw["name"]),
        type=kind if kind in _TYPES else "string",  # type: ignore[arg-type]
        description=str(raw.get("description") or ""),
        required=bool(raw.get("required", True)),
        enum=tuple(enum) if enum else None,
    )


def function_from_row(row: Any) -> FunctionSpec:
    fixed: Sequence[Mapping[str, Any]] = row.fixed_parameters or []
    return FunctionSpec(
        name=row.name,
        description=row.description or "",
        handler_url=row.handler_url or "",
        user_parameters=tuple(parameter_from_dict(p) for p in (row.user_parameters or [])),
        fixed_parameters={str(p["name"]): p.get("value") for p in fixed},
    )


def agent_from_row(row: Any) -> AgentConfig:
    llm: Mapping[str, Any] = row.answer_llm or {}
    return AgentConfig(
        id=row.id,
        name=row.name or "",
        prompt=row.prompt or "",
        account_id=row.account_id,
        functions=tuple(function_from_row(f) for f in row.functions),
        document_ids=tuple(row.knowledgebase_ids or ()),
        model=llm.get("model"),
        temperature=float(llm.get("temperature") or 0.0),
        max_tokens=int(llm.get("max_tokens") or 120),
    )
