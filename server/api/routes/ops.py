"""Operational routes, public even with an API key: health, version, Prometheus metrics."""

from __future__ import annotations

from importlib.metadata import version

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cats_serve.server.api.errors import LOADING_RETRY_AFTER_SECONDS
from cats_serve.server.api.responses import Health, VersionInfo
from cats_serve.server.api.state import StateDep

router = APIRouter()


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "Loading, or loading failed"}},
    summary="200 once the model is ready, 503 before",
)
async def health(state: StateDep):
    if state.serving is None:
        status = "failed" if state.load_error else "loading"
        body = Health(status=status, error=state.load_error)
        retry = {} if state.load_error else {"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)}
        return JSONResponse(body.model_dump(), status_code=503, headers=retry)
    return Health(status="ok")


@router.get("/version", response_model=VersionInfo, summary="The server's version")
async def server_version(state: StateDep):
    weights = state.serving.weights if state.serving is not None else None
    return VersionInfo(version=version("cats-serve"), weights=weights)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    summary="Prometheus metrics",
)
async def metrics(state: StateDep):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
