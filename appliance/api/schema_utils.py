"""Small helpers for the request/response models of the routers."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

# Request models refuse unknown fields, so a typo ("promt") is a 422 naming it, not silently ignored.
STRICT = ConfigDict(extra="forbid")


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def patch_field(**constraints: Any) -> Any:
    """A PATCH field: may be left out, but may not be null. Left out, it is ``None`` and not in
    ``model_fields_set``; given as null, pydantic rejects it against the field's non-null type."""
    return Field(None, json_schema_extra=_drop_default, **constraints)
