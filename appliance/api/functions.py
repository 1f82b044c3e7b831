"""``/v1/Account/{auth_id}/Function/``: functions an agent's model may call.

Deleting a function that agents use removes it from those agents (they keep their other functions);
it does not refuse with 409. Names are unique per account: a duplicate is a 409.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..store import functions as store
from ..store.agents import agents_using_function
from ..store.functions import Function, FunctionNameTaken
from .deps import AccountDep, JsonBody, SessionDep, StateDep
from .errors import Conflict, NotFound, Unprocessable, error_responses
from .function_schemas import FunctionCreate, FunctionPublic, FunctionUpdate, check_parameter_names
from .pagination import Page, PageDep, make_page

router = APIRouter(
    prefix="/v1/Account/{auth_id}/Function",
    tags=["Function"],
    responses=error_responses(400, 401, 404, 422),
)


async def _load(session: SessionDep, account_id: str, function_id: str) -> Function:
    function = await store.get_function(session, account_id, function_id)
    if function is None:
        raise NotFound("Function", function_id)
    return function


@router.post(
    "/", status_code=201, summary="Create a function", dependencies=[JsonBody],
    responses=error_responses(409, 413, 415),
)  # fmt: skip
async def create_function(body: FunctionCreate, account: AccountDep, session: SessionDep) -> FunctionPublic:
    try:
        function = await store.create_function(session, account.id, body.model_dump(mode="json"))
    except FunctionNameTaken as exc:
        raise Conflict(f"name: {exc}.") from None
    return FunctionPublic.model_validate(function)


@router.get("/", summary="List functions")
async def list_functions(
    request: Request, account: AccountDep, session: SessionDep, page: PageDep
) -> Page[FunctionPublic]:
    rows, total = await store.list_functions(session, account.id, limit=page.limit, offset=page.offset)
    return make_page(request, page, total, [FunctionPublic.model_validate(r) for r in rows])


@router.get("/{function_id}/", summary="Get a function")
async def get_function(function_id: str, account: AccountDep, session: SessionDep) -> FunctionPublic:
    return FunctionPublic.model_validate(await _load(session, account.id, function_id))


@router.patch(
    "/{function_id}/", summary="Change a function", dependencies=[JsonBody],
    responses=error_responses(409, 413, 415),
)  # fmt: skip
async def update_function(
    function_id: str, body: FunctionUpdate, account: AccountDep, session: SessionDep, state: StateDep
) -> FunctionPublic:
    function = await _load(session, account.id, function_id)
    changes = body.model_dump(mode="json", exclude_unset=True)
    try:
        check_parameter_names(
            changes.get("user_parameters", function.user_parameters),
            changes.get("fixed_parameters", function.fixed_parameters),
        )
    except ValueError as exc:
        raise Unprocessable("user_parameters", str(exc)) from None
    try:
        function = await store.update_function(session, function, changes)
    except FunctionNameTaken as exc:
        raise Conflict(f"name: {exc}.") from None
    # The agents offering it describe it in their prompts: read those again ahead of their calls.
    calls = state.services["calls"]
    calls.agents_changed(
        await agents_using_function(session, account.id, function.id, calls.warmer.max_agents)
    )
    return FunctionPublic.model_validate(function)


@router.delete(
    "/{function_id}/", status_code=204, response_class=Response,
    summary="Delete a function (agents using it lose it)",
)  # fmt: skip
async def delete_function(function_id: str, account: AccountDep, session: SessionDep) -> Response:
    await store.delete_function(session, await _load(session, account.id, function_id))
    return Response(status_code=204)
