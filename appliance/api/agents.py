"""``/v1/Account/{auth_id}/Voiceagent/``: agent CRUD.

Every reference is checked against the caller's own account and the installed models: an unknown
(or another account's) function or knowledgebase id, or a model that is not installed, is a 422
naming the field and the value.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy.ext.asyncio import AsyncSession

from ..config import Settings
from ..model_manifest import Manifest, Role
from ..store import agents as store
from ..store.accounts import Account
from ..store.agents import Agent
from ..store.functions import missing_function_ids
from .agent_schemas import AgentCreate, AgentPublic, AgentUpdate, AnswerLlmIn, SttIn, TtsIn
from .deps import AccountDep, JsonBody, ManifestDep, SessionDep, SettingsDep, StateDep
from .errors import NotFound, Unprocessable, error_responses
from .pagination import Page, PageDep, make_page

router = APIRouter(
    prefix="/v1/Account/{auth_id}/Voiceagent",
    tags=["Voiceagent"],
    responses=error_responses(400, 401, 404, 422),
)


def agent_urls(settings: Settings, auth_id: str, agent_id: str) -> tuple[str, str]:
    """(call_url, websocket_url) of an agent under the configured public base URL."""
    base = f"{settings.base_url}/v1/Account/{auth_id}/Voiceagent/{agent_id}"
    ws_base = "wss" + base[5:] if base.startswith("https") else "ws" + base[4:]
    return f"{base}/talk/", f"{ws_base}/connect/"


def to_public(agent: Agent, account: Account, settings: Settings) -> AgentPublic:
    call_url, websocket_url = agent_urls(settings, account.auth_id, agent.id)
    return AgentPublic.model_validate(
        {
            **{k: getattr(agent, k) for k in AgentPublic.model_fields if hasattr(agent, k)},
            "call_url": call_url,
            "websocket_url": websocket_url,
        }
    )


def _resolve_model(manifest: Manifest, settings: Settings, role: Role, field: str, value: str | None) -> str:
    model_id = value or str(getattr(settings.models, role))
    installed = [s.id for s in manifest.installed(role)]
    if model_id not in installed:
        raise Unprocessable(
            field,
            f"{model_id!r} is not an installed {role} model; installed: {', '.join(installed) or 'none'}.",
        )
    return model_id


def _llm_config(manifest: Manifest, settings: Settings, llm: AnswerLlmIn) -> dict[str, Any]:
    config = llm.model_dump()
    config["model"] = _resolve_model(manifest, settings, "llm", "answer_llm.model", llm.model)
    return config


def _stt_config(manifest: Manifest, settings: Settings, stt: SttIn) -> dict[str, Any]:
    config = stt.model_dump()
    config["model"] = _resolve_model(manifest, settings, "asr", "stt.model", stt.model)
    languages = manifest.get(config["model"]).params.get("languages")
    if languages and stt.language not in languages:
        raise Unprocessable(
            "stt.language", f"model {config['model']!r} understands only {', '.join(languages)}."
        )
    return config


def _tts_config(manifest: Manifest, settings: Settings, tts: TtsIn) -> dict[str, Any]:
    config = tts.model_dump()
    config["voice"] = _resolve_model(manifest, settings, "tts", "tts.voice", tts.voice)
    return config


async def _check_references(
    session: AsyncSession, account_id: str, function_ids: list[str] | None, kb_ids: list[str] | None
) -> None:
    missing = await missing_function_ids(session, account_id, function_ids or [])
    if missing:
        raise Unprocessable("function_ids", f"no such function: {', '.join(missing)}.")
    missing = await store.missing_knowledgebase_ids(session, account_id, kb_ids or [])
    if missing:
        raise Unprocessable("knowledgebase_ids", f"no such knowledgebase document: {', '.join(missing)}.")


async def _load(session: AsyncSession, account_id: str, agent_id: str) -> Agent:
    agent = await store.get_agent(session, account_id, agent_id)
    if agent is None:
        raise NotFound("Voiceagent", agent_id)
    return agent


@router.post(
    "/", status_code=201, summary="Create a voice agent", dependencies=[JsonBody],
    responses=error_responses(413, 415),
)  # fmt: skip
async def create_agent(
    body: AgentCreate, account: AccountDep, session: SessionDep, settings: SettingsDep,
    manifest: ManifestDep, state: StateDep,
) -> AgentPublic:  # fmt: skip
    configs = {
        "answer_llm": _llm_config(manifest, settings, body.answer_llm),
        "stt": _stt_config(manifest, settings, body.stt),
        "tts": _tts_config(manifest, settings, body.tts),
    }
    await _check_references(session, account.id, body.function_ids, body.knowledgebase_ids)
    fields = body.model_dump(exclude={"answer_llm", "stt", "tts", "function_ids"}) | configs
    agent = await store.create_agent(session, account.id, fields, body.function_ids)
    state.services["calls"].agents_changed([agent])
    return to_public(agent, account, settings)


@router.get("/", summary="List voice agents")
async def list_agents(
    request: Request, account: AccountDep, session: SessionDep, settings: SettingsDep, page: PageDep
) -> Page[AgentPublic]:
    rows, total = await store.list_agents(session, account.id, limit=page.limit, offset=page.offset)
    return make_page(request, page, total, [to_public(a, account, settings) for a in rows])


@router.get("/{agent_id}/", summary="Get a voice agent")
async def get_agent(
    agent_id: str, account: AccountDep, session: SessionDep, settings: SettingsDep
) -> AgentPublic:
    return to_public(await _load(session, account.id, agent_id), account, settings)


@router.patch(
    "/{agent_id}/", summary="Change a voice agent", dependencies=[JsonBody],
    responses=error_responses(413, 415),
)  # fmt: skip
async def update_agent(
    agent_id: str,
    body: AgentUpdate,
    account: AccountDep,
    session: SessionDep,
    settings: SettingsDep,
    manifest: ManifestDep,
    state: StateDep,
) -> AgentPublic:
    agent = await _load(session, account.id, agent_id)
    changes = body.model_dump(exclude_unset=True)
    # Nested settings merge ({"tts": {"speed": 1.2}} keeps the voice); only the sections given are
    # checked again, so an agent whose model was since removed can still be renamed.
    if "answer_llm" in changes:
        llm = AnswerLlmIn.model_validate({**agent.answer_llm, **changes["answer_llm"]})
        changes["answer_llm"] = _llm_config(manifest, settings, llm)
    if "stt" in changes:
        stt = SttIn.model_validate({**agent.stt, **changes["stt"]})
        changes["stt"] = _stt_config(manifest, settings, stt)
    if "tts" in changes:
        tts = TtsIn.model_validate({**agent.tts, **changes["tts"]})
        changes["tts"] = _tts_config(manifest, settings, tts)
    function_ids = changes.pop("function_ids", None)
    await _check_references(session, account.id, function_ids, changes.get("knowledgebase_ids"))
    agent = await store.update_agent(session, agent, changes, function_ids)
    state.services["calls"].agents_changed([agent])
    return to_public(agent, account, settings)


@router.delete("/{agent_id}/", status_code=204, response_class=Response, summary="Delete a voice agent")
async def delete_agent(agent_id: str, account: AccountDep, session: SessionDep) -> Response:
    await store.delete_agent(session, await _load(session, account.id, agent_id))
    return Response(status_code=204)
