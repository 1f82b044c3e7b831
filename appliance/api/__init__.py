"""HTTP and websocket edges: parse, authorize, call a service, shape the reply."""

from __future__ import annotations

from fastapi import FastAPI


def install_routes(app: FastAPI) -> None:
    # ROUTES: each resource's router is included here.
    from . import account, agents, body_limit, errors, functions, models_route

    errors.install_error_handlers(app)
    limit = app.state.appliance.settings.limits.max_upload_bytes + body_limit.MULTIPART_OVERHEAD
    app.add_middleware(body_limit.BodyLimitMiddleware, max_body_bytes=limit)
    for module in (account, agents, functions, models_route):
        app.include_router(module.router)
    from . import knowledgebase  # knowledge helper's router

    app.include_router(knowledgebase.router)
    from . import calls, media_ws, talk  # call helper's routers

    for call_module in (talk, media_ws, calls):
        app.include_router(call_module.router)
    from . import chat  # brain helper's router

    app.include_router(chat.router)
    from . import metrics_route  # GET /metrics (Prometheus text)

    app.include_router(metrics_route.router)
    return None
