"""``GET /v1/Account/{auth_id}/``: the calling account itself (Plivo credentials masked)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..store.accounts import mask_secret
from .deps import AccountDep
from .errors import error_responses

router = APIRouter(prefix="/v1/Account/{auth_id}", tags=["Account"], responses=error_responses(401, 422))


class AccountPublic(BaseModel):
    auth_id: str
    name: str
    created_at: datetime
    plivo_configured: bool = Field(description="Whether Plivo credentials are set (CLI: accounts set-plivo)")
    plivo_auth_id: str | None = Field(description="Masked: only the last 4 characters")
    plivo_auth_token: str | None = Field(description="Masked: only the last 4 characters")


@router.get("/", summary="This account")
async def get_account(account: AccountDep) -> AccountPublic:
    return AccountPublic(
        auth_id=account.auth_id,
        name=account.name,
        created_at=account.created_at,
        plivo_configured=account.has_plivo_credentials,
        plivo_auth_id=mask_secret(account.plivo_auth_id),
        plivo_auth_token=mask_secret(account.plivo_auth_token),
    )
