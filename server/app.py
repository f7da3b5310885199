"""`create_app(settings)`: the FastAPI application; the model loads in the lifespan.

Loading runs in a worker thread after the server starts listening, so `/health` can answer 503
while the model loads and 200 once it is ready. A load failure is fatal: it is logged as one
message and handed to `on_fatal` (the CLI stops the server and exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cats_serve.server.completions import create_completion
from cats_serve.server.errors import APIError, install_error_handlers
from cats_serve.server.metrics import Metrics
from cats_serve.server.protocol import CompletionRequest, ModelCard, ModelList
from cats_serve.server.serving import ServingModel, StartupError, load_serving
from cats_serve.server.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_DRAIN_SECONDS = 10.0


class AppState:
    def __init__(self, settings: Settings, on_fatal: Callable[[str], None] | None):
        self.settings = settings
        self.metrics = Metrics()
        self.serving: ServingModel | None = None
        self.load_error: str | None = None
        self.on_fatal = on_fatal
        self.started = 0


def _state(request: Request) -> AppState:
    return request.app.state.cats


def _serving(request: Request) -> ServingModel:
    state = _state(request)
    if state.serving is None:
        raise APIError(503, "the model is still loading", type="server_error", code="loading")
    return state.serving


StateDep = Annotated[AppState, Depends(_state)]
ServingDep = Annotated[ServingModel, Depends(_serving)]


def _attach(state: AppState, serving: ServingModel) -> None:
    engine = serving.engine
    state.metrics.running.set_function(lambda: engine.num_running)
    state.metrics.waiting.set_function(lambda: engine.num_waiting)
    state.metrics.set_model_info(serving.name, serving.dtype, serving.device, serving.levels)
    engine.result_observers.append(state.metrics.observe_result)
    engine.step_observers.append(state.metrics.observe_step)
    engine.start()
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
        log.info("ready")
        return
    log.error("%s", state.load_error)
    if state.on_fatal is not None:
        state.on_fatal(state.load_error)


def create_app(
    settings: Settings, *, on_fatal: Callable[[str], None] | None = None
) -> FastAPI:
    state = AppState(settings, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(_load(state))
        yield
        loader.cancel()
        if state.serving is not None:
            await asyncio.to_thread(state.serving.engine.shutdown, SHUTDOWN_DRAIN_SECONDS)

    app = FastAPI(
        title="cats-serve",
        version=version("cats-serve"),
        description="OpenAI-compatible LLM server with CATS activation sparsity",
        lifespan=lifespan,
    )
    app.state.cats = state
    install_error_handlers(app)

    @app.get("/health")
    async def health(state: StateDep):
        if state.serving is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def server_version():
        return {"version": version("cats-serve")}

    @app.get("/metrics")
    async def metrics(state: StateDep):
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models(serving: ServingDep, state: StateDep):
        card = ModelCard(
            id=serving.name,
            created=state.started,
            max_model_len=serving.max_seq_len,
            sparsity_levels=serving.levels,
            default_sparsity=serving.default_sparsity,
        )
        return ModelList(data=[card])

    @app.post("/v1/completions")
    async def completions(
        body: CompletionRequest, request: Request, serving: ServingDep, state: StateDep
    ):
        return await create_completion(body, request, serving, state.metrics)

    return app
