"""`create_app(settings)`: the FastAPI application; the model loads in the lifespan.

Loading runs in a worker thread after the server starts listening, so `/health` can answer 503
while the model loads and 200 once it is ready. A load failure is fatal: it is logged as one
message and handed to `on_fatal` (the CLI stops the server and exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from cats_serve.server.api.errors import install_error_handlers
from cats_serve.server.api.guard import RequestGuard
from cats_serve.server.api.openapi import add_stream_schemas
from cats_serve.server.api.routes import chat, completions, models, ops
from cats_serve.server.api.serving import ServingModel, StartupError, load_serving
from cats_serve.server.api.state import AppState
from cats_serve.server.settings import Settings

log = logging.getLogger(__name__)


def _attach(state: AppState, serving: ServingModel) -> None:
    engine = serving.engine
    state.metrics.running.set_function(lambda: engine.num_running)
    state.metrics.waiting.set_function(lambda: engine.num_waiting)
    state.metrics.set_model_info(
        serving.name, serving.dtype, serving.weights, serving.device, serving.levels
    )
    engine.result_observers.append(state.metrics.observe_result)
    engine.step_observers.append(state.metrics.observe_step)
    engine.start()
    state.started = int(time.time())
    state.serving = serving


async def _load(state: AppState) -> None:
    try:
        serving = await asyncio.to_thread(load_serving, state.settings)
    except StartupError as exc:
        state.load_error = str(exc)
    except Exception as exc:  # anything else is a bug, but still one clear line for the user
        log.exception("startup failed")
        state.load_error = f"startup failed: {exc}"
    else:
        _attach(state, serving)
        where = f" at {state.url}" if state.url else ""
        log.info("ready: serving %s on %s%s", serving.name, serving.device, where)
        return
    log.error("%s", state.load_error)
    if state.on_fatal is not None:
        state.on_fatal(state.load_error)


def create_app(settings: Settings, *, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    state = AppState(settings, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load(state))
        yield
        loader.cancel()
        if state.serving is not None:
            await asyncio.to_thread(state.serving.engine.shutdown, settings.shutdown_drain_seconds)

    app = FastAPI(
        title="cats-serve",
        version=version("cats-serve"),
        description="OpenAI-compatible LLM server with CATS activation sparsity. Extension "
        "fields: `sparsity` and `ignore_eos` in requests; `sparsity` (the realised MLP "
        "sparsity) in responses; `sparsity_levels`, `default_sparsity` and `max_model_len` in "
        "model cards.",
        lifespan=lifespan,
    )
    app.state.cats = state
    install_error_handlers(app, on_refusal=state.metrics.observe_refusal)
    app.add_middleware(
        RequestGuard,
        api_key=settings.api_key,
        protect_metrics=settings.metrics_api_key,
        max_body_bytes=settings.max_request_bytes,
        on_refusal=state.metrics.observe_refusal,
    )
    if settings.cors_origins:  # outermost: a browser's preflight needs no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    for routes in (ops, completions, chat, models):
        app.include_router(routes.router)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = add_stream_schemas(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi
    return app
