"""The published OpenAPI document: every route described with real models and Basic auth, and a
bounded, deterministic schemathesis run against the ASGI app (real store, no engines)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.python import asgi

from appliance.server import create_app
from appliance.store.accounts import create_account_cli
from tests.conftest import Credentials, make_settings, run_coroutine_in_thread

OWN_ROUTES = {
    "/v1/Account/{auth_id}/": {"get"},
    "/v1/Account/{auth_id}/Voiceagent/": {"get", "post"},
    "/v1/Account/{auth_id}/Voiceagent/{agent_id}/": {"get", "patch", "delete"},
    "/v1/Account/{auth_id}/Function/": {"get", "post"},
    "/v1/Account/{auth_id}/Function/{function_id}/": {"get", "patch", "delete"},
    "/v1/Account/{auth_id}/Model/": {"get"},
}


async def test_every_route_has_models_and_basic_auth(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["HTTPBasic"] == {
        "type": "http", "scheme": "basic",
        "description": "HTTP Basic with the account's auth_id as user name and auth_token as password.",
    }  # fmt: skip
    schemas = doc["components"]["schemas"]
    for name in ("AgentCreate", "AgentUpdate", "AgentPublic", "FunctionCreate", "FunctionUpdate",
                 "FunctionPublic", "ErrorBody", "ModelPublic", "PageMeta"):  # fmt: skip
        assert name in schemas, name
    for path, methods in OWN_ROUTES.items():
        assert set(doc["paths"][path]) >= methods, path
        for method in methods:
            op = doc["paths"][path][method]
            assert op["security"] == [{"HTTPBasic": []}], (path, method)
            assert "401" in op["responses"] and "422" in op["responses"]
            error_ref = op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
            assert error_ref.endswith("/ErrorBody")
            ok = next(code for code in op["responses"] if code.startswith("2"))
            if ok != "204":
                assert "$ref" in str(op["responses"][ok]["content"]["application/json"]["schema"])
            if method in ("post", "patch"):
                body_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert body_ref.split("/")[-1] in schemas


async def test_docs_page_is_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200 and "openapi.json" in r.text


# -- schemathesis ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_target(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FastAPI, Credentials, dict[str, str]]]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    app_settings = make_settings(data_dir)
    # Migrate and create the account before schemathesis starts the app's lifespan in its own thread.
    created = run_coroutine_in_thread(create_account_cli(app_settings, "fuzz"))
    app = create_app(app_settings, load_engines=False)
    creds = Credentials(created.auth_id, created.auth_token)
    with asgi.get_client(app) as http:  # type: ignore[arg-type]
        fn = http.post(
            f"http://testserver{creds.base}/Function/", auth=creds.auth,
            json={"name": "existing", "handler_url": "http://127.0.0.1:9/x"},
        )  # fmt: skip
        agent = http.post(
            f"http://testserver{creds.base}/Voiceagent/", auth=creds.auth, json={"name": "existing"}
        )
    assert fn.status_code == 201 and agent.status_code == 201, (fn.text, agent.text)
    yield app, creds, {"function_id": fn.json()["id"], "agent_id": agent.json()["id"]}


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_target: tuple[FastAPI, Credentials, dict[str, str]]) -> Any:
    app, _, _ = fuzz_target
    # Fetching /openapi.json starts the app's lifespan in schemathesis's own event-loop thread.
    return schemathesis.openapi.from_asgi("/openapi.json", app)


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]
OPERATIONS = sorted((method.upper(), path) for path, methods in OWN_ROUTES.items() for method in methods)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_api_fuzz_finds_no_server_error_or_schema_violation(
    fuzz_schema: Any,
    fuzz_target: tuple[FastAPI, Credentials, dict[str, str]],
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    """25 generated requests per operation and mode (deterministic), as the account itself: no 5xx,
    and every response (errors included) matches the documented status codes and schemas."""
    _, creds, existing = fuzz_target
    operation = fuzz_schema[path][method]
    # GET and PATCH of one object aim at real objects, so they reach validation and the store.
    fixed = {"auth_id": creds.auth_id} | (existing if method in ("GET", "PATCH") else {})
    strategy = operation.as_strategy(mode, path_parameters=fixed)
    statuses: list[int] = []

    @given(case=strategy)
    @settings(max_examples=25, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(case: schemathesis.Case) -> None:
        statuses.append(case.call_and_validate(auth=creds.auth, checks=CHECKS).status_code)

    run()
    if mode is GenerationMode.POSITIVE and method != "DELETE":
        assert any(200 <= s < 300 for s in statuses), f"no valid request succeeded: {sorted(set(statuses))}"
