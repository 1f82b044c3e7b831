"""App factory. The lifespan opens the store, then loads and warms every engine in the background so
``/health`` answers at once and ``/ready`` turns 200 only when all engines are warm."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from .config import Settings
from .engines.registry import EngineRegistry
from .metrics import ApplianceMetrics
from .model_manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """Everything a request handler may reach, built once per app. Services hang off here."""

    settings: Settings
    manifest: Manifest
    engines: EngineRegistry
    # Filled in by the lifespan; typed loosely here so the api layer owns its own service types.
    services: dict[str, Any] = field(default_factory=dict)
    metrics: ApplianceMetrics = field(default_factory=ApplianceMetrics)


def create_app(settings: Settings, *, load_engines: bool = True) -> FastAPI:
    manifest = Manifest.load(settings.models_dir)
    state = AppState(settings=settings, manifest=manifest, engines=EngineRegistry(settings, manifest))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with contextlib.AsyncExitStack() as stack:
            from .services import open_services

            await open_services(state, stack)
            loader: asyncio.Task[None] | None = None
            if load_engines:
                loader = asyncio.create_task(state.engines.start(), name="engine-loader")
            try:
                yield
            finally:
                if loader is not None and not loader.done():
                    loader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await loader
        state.engines.close()

    app = FastAPI(
        title="Voice-agent appliance",
        version="0.1.0",
        description=(
            "On-prem voice agents on Plivo audio streams. Management API under /v1/Account/{auth_id}/."
        ),
        lifespan=lifespan,
    )
    app.state.appliance = state

    @app.get("/health", tags=["status"], summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["status"], summary="Readiness: 200 once every engine is warm")
    async def ready() -> JSONResponse:
        st = state.engines.status
        calls = state.services.get("calls")
        # Warm includes the LLM's prompt cache holding the recently changed agents' call prompts.
        warming = st.ready and calls is not None and calls.warmer.warming
        body = {
            "ready": st.ready and not warming,
            "loading": st.loading or warming,
            "error": st.error,
            "load_seconds": st.load_seconds,
        }
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    from .api import install_routes

    install_routes(app)
    return app
