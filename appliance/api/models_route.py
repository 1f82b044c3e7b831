"""``GET /v1/Account/{auth_id}/Model/``: models and voices installed on this box, for agent configs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from ..model_manifest import Role
from .deps import AccountDep, ManifestDep, SettingsDep
from .errors import error_responses
from .pagination import Page, PageDep, make_page

router = APIRouter(prefix="/v1/Account/{auth_id}/Model", tags=["Model"], responses=error_responses(401, 422))

# Where each role's id goes in a Voiceagent (roles the agent does not choose have none).
USED_AS: dict[str, str | None] = {
    "llm": "answer_llm.model",
    "asr": "stt.model",
    "tts": "tts.voice",
    "vad": None,
    "embed": None,
}


class ModelPublic(BaseModel):
    id: str
    role: Literal["vad", "asr", "llm", "tts", "embed"]
    description: str
    default: bool = Field(description="The appliance's default for this role")
    used_as: str | None = Field(description="The Voiceagent field that takes this id, if any")
    size_bytes: int


@router.get("/", summary="List installed models and voices")
async def list_models(
    request: Request,
    account: AccountDep,
    manifest: ManifestDep,
    settings: SettingsDep,
    page: PageDep,
    role: Annotated[Role | None, Query(description="Only models of this role")] = None,
) -> Page[ModelPublic]:
    specs = manifest.installed(role)
    objects = [
        ModelPublic(
            id=s.id,
            role=s.role,
            description=s.description,
            default=getattr(settings.models, s.role) == s.id,
            used_as=USED_AS[s.role],
            size_bytes=s.size,
        )  # fmt: skip
        for s in specs
    ]
    return make_page(request, page, len(objects), objects[page.offset : page.offset + page.limit])
