"""Request and response models of the Voiceagent resource.

Model and voice ids left out (or null) mean the appliance's default for that role (``[models]`` in
config.toml); the stored agent always holds concrete ids, so a later change of default does not
silently change existing agents.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schema_utils import STRICT, patch_field

DEFAULT_PROMPT = (
    "You are a friendly, concise phone assistant. Answer in one or two short sentences, "
    "ask one question at a time, and never invent facts you were not given."
)
DEFAULT_CALL_TIMEOUT = 900

ObjectId = Annotated[str, Field(min_length=1, max_length=64)]
ModelId = Annotated[str, Field(min_length=1, max_length=100)]


class AnswerLlmIn(BaseModel):
    model_config = STRICT
    provider: Literal["local"] = "local"
    model: ModelId | None = Field(None, description="An installed llm id (GET /Model/); null: the default")
    temperature: float = Field(0.3, ge=0.0, le=2.0)
    max_tokens: int = Field(200, ge=1, le=4096, description="Most tokens in one answer")


class SttIn(BaseModel):
    model_config = STRICT
    provider: Literal["local"] = "local"
    model: ModelId | None = Field(None, description="An installed asr id (GET /Model/); null: the default")
    language: str = Field(
        "en", pattern=r"^[a-z]{2,3}$", description="ISO 639-1 code of the caller's language"
    )


class TtsIn(BaseModel):
    model_config = STRICT
    provider: Literal["local"] = "local"
    voice: ModelId | None = Field(
        None, description="An installed tts voice id (GET /Model/); null: the default"
    )
    speed: float = Field(1.0, ge=0.5, le=2.0)


class AnswerLlm(BaseModel):
    provider: Literal["local"]
    model: str
    temperature: float
    max_tokens: int


class Stt(BaseModel):
    provider: Literal["local"]
    model: str
    language: str


class Tts(BaseModel):
    provider: Literal["local"]
    voice: str
    speed: float


Name = Annotated[str, Field(min_length=1, max_length=200)]
WelcomeMessage = Annotated[str, Field(max_length=2000)]
Prompt = Annotated[str, Field(max_length=20000)]
CallTimeout = Annotated[int, Field(ge=10, le=14400, description="Longest call, in seconds")]
Ids = Annotated[list[ObjectId], Field(max_length=32)]


class AgentCreate(BaseModel):
    model_config = STRICT
    name: Name
    welcome_message: WelcomeMessage = Field("", description="Said when a call connects; empty: wait")
    prompt: Prompt = Field(DEFAULT_PROMPT, description="System prompt; may use {{variables}}")
    answer_llm: AnswerLlmIn = AnswerLlmIn.model_validate({})
    stt: SttIn = SttIn.model_validate({})
    tts: TtsIn = TtsIn.model_validate({})
    knowledgebase_ids: Ids = Field(default_factory=list, description="Knowledgebase document ids")
    function_ids: Ids = Field(default_factory=list, description="Function ids")
    call_timeout: CallTimeout = DEFAULT_CALL_TIMEOUT


class AgentUpdate(BaseModel):
    """Fields to change. ``answer_llm``/``stt``/``tts`` merge into the stored values (give only what
    changes); id lists are replaced whole."""

    model_config = STRICT
    name: Name = patch_field()
    welcome_message: WelcomeMessage = patch_field()
    prompt: Prompt = patch_field()
    answer_llm: AnswerLlmIn = patch_field()
    stt: SttIn = patch_field()
    tts: TtsIn = patch_field()
    knowledgebase_ids: Ids = patch_field()
    function_ids: Ids = patch_field()
    call_timeout: CallTimeout = patch_field()


class AgentPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    welcome_message: str
    prompt: str
    answer_llm: AnswerLlm
    stt: Stt
    tts: Tts
    knowledgebase_ids: list[str]
    function_ids: list[str]
    call_timeout: int
    call_url: str = Field(description="Answer URL to give Plivo")
    websocket_url: str = Field(description="The media-stream websocket of this agent")
    created_at: datetime
    updated_at: datetime
