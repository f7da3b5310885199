"""What the routes share: the app's state, the dependencies that hand it out, and the
/v1 router settings (the API key check)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from cats_serve.server.api.auth import require_api_key
from cats_serve.server.api.errors import APIError
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


def get_state(request: Request) -> AppState:
    return request.app.state.cats


def get_serving(request: Request) -> ServingModel:
    state = get_state(request)
    if state.serving is None:
        raise APIError(
            503, "the model is still loading", type="server_error", code="loading", reason="loading"
        )
    return state.serving


StateDep = Annotated[AppState, Depends(get_state)]
ServingDep = Annotated[ServingModel, Depends(get_serving)]


def v1_router() -> APIRouter:
    """A router for OpenAI-compatible routes: under /v1, behind the optional API key."""
    return APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
