"""Request and response models of the Function resource."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from .schema_utils import STRICT, patch_field

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
ParamType = Literal["string", "number", "integer", "boolean"]
EnumValue = str | int | float | bool


def _check_handler_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    return value


# The pattern documents the rule in the schema; the validator also insists on a host name.
HandlerUrl = Annotated[
    str,
    Field(max_length=2000, pattern=r"^https?://[^\s/?#]+([/?#]\S*)?$"),
    AfterValidator(_check_handler_url),
]
FunctionName = Annotated[
    str,
    Field(
        min_length=1, max_length=64, pattern=IDENTIFIER,
        description="Identifier the model calls: letters, digits and _, not starting with a digit",
    ),
]  # fmt: skip


def _matches(kind: ParamType, value: EnumValue) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


class UserParameter(BaseModel):
    """A value the agent collects from the caller and passes to the handler."""

    model_config = STRICT
    name: FunctionName
    type: ParamType = "string"
    description: str = Field("", max_length=1000)
    required: bool = True
    enum: list[EnumValue] | None = Field(None, min_length=1, max_length=50)

    @model_validator(mode="after")
    def _enum_matches_type(self) -> UserParameter:
        for value in self.enum or []:
            if not _matches(self.type, value):
                raise ValueError(f"enum value {value!r} is not of type {self.type}")
        return self


class FixedParameter(BaseModel):
    """A value sent to the handler as is; the model never sees it."""

    model_config = STRICT
    name: FunctionName
    value: Any = Field(description="Any JSON value")


def _unique_names(user: list[UserParameter], fixed: list[FixedParameter]) -> None:
    seen: set[str] = set()
    for name in [p.name for p in user] + [p.name for p in fixed]:
        if name in seen:
            raise ValueError(f"parameter name {name!r} is used twice (user and fixed names must differ)")
        seen.add(name)


class FunctionCreate(BaseModel):
    model_config = STRICT
    name: FunctionName
    description: str = Field("", max_length=4000, description="What it does, told to the model")
    handler_url: HandlerUrl = Field(description="The customer's endpoint POSTed to (http or https)")
    user_parameters: list[UserParameter] = Field(default_factory=list, max_length=32)
    fixed_parameters: list[FixedParameter] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _names(self) -> FunctionCreate:
        _unique_names(self.user_parameters, self.fixed_parameters)
        return self


class FunctionUpdate(BaseModel):
    """Fields to change; lists are replaced whole."""

    model_config = STRICT
    name: FunctionName = patch_field()
    description: str = patch_field(max_length=4000)
    handler_url: HandlerUrl = patch_field()
    user_parameters: list[UserParameter] = patch_field(max_length=32)
    fixed_parameters: list[FixedParameter] = patch_field(max_length=32)


class FunctionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    description: str
    handler_url: str
    user_parameters: list[UserParameter]
    fixed_parameters: list[FixedParameter]
    created_at: datetime
    updated_at: datetime


def check_parameter_names(user: list[dict[str, Any]], fixed: list[dict[str, Any]]) -> None:
    """The no-duplicate rule, for a PATCH merged with the stored lists. Raises ValueError."""
    _unique_names(
        [UserParameter.model_validate(p) for p in user], [FixedParameter.model_validate(p) for p in fixed]
    )
