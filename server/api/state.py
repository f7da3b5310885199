"""What the routes share: the app's state, the dependencies that hand it out, and the
/v1 router settings (the API key check)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from cats_serve.server.api.auth import declare_bearer
from cats_serve.server.api.errors import loading_error
from cats_serve.server.api.serving import ServingModel
from cats_serve.server.metrics import Metrics
from cats_serve.server.settings import Settings


class AppState:
    def __init__(self, settings: Settings, on_fatal: Callable[[str], None] | None):
        self.settings = settings
        self.metrics = Metrics()
        self.serving: ServingModel | None = None
        self.load_error: str | None = None
        self.on_fatal = on_fatal
        self.started = 0  # unix time the model became ready
        self.url: str | None = None  # where the CLI listens (for the log)


def get_state(request: Request) -> AppState:
    return request.app.state.cats


def get_serving(request: Request) -> ServingModel:
    state = get_state(request)
    if state.serving is None:
        raise loading_error()
    return state.serving


StateDep = Annotated[AppState, Depends(get_state)]
ServingDep = Annotated[ServingModel, Depends(get_serving)]


def v1_router() -> APIRouter:
    """A router for OpenAI-compatible routes: under /v1, behind the optional API key (checked
    by RequestGuard before the body is read; declared here for /openapi.json)."""
    return APIRouter(prefix="/v1", dependencies=[Depends(declare_bearer)])
