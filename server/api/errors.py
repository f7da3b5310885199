"""Errors in OpenAI's nested shape: `{"error": {"message", "type", "param", "code"}}`.

Every error the API returns goes through `error_response`, so clients (the `openai` package maps
status codes to exception classes) see one shape. Refused requests are reported to `on_refusal`
with a short stable reason (a bounded metrics label).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cats_serve.server.api.responses import ErrorBody, ErrorResponse
from cats_serve.server.engine.types import (
    ContextLengthError,
    EngineError,
    EngineStoppedError,
    QueueFullError,
    UnknownSparsityError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
LOADING_RETRY_AFTER_SECONDS = 5  # the model loads in seconds to a minute


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote any string a client
    sent, and an escaped one always encodes (a lone surrogate cannot be written as UTF-8)."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error answer. `reason`, when set, is counted as a refused request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers
        self.reason = reason

    def body(self) -> dict:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


def error_response(err: APIError) -> JSONResponse:
    return ErrorJSONResponse(err.body(), status_code=err.status, headers=err.headers)


def loading_error() -> APIError:
    return APIError(
        503,
        "the model is still loading",
        type="server_error",
        code="loading",
        headers={"Retry-After": str(LOADING_RETRY_AFTER_SECONDS)},
        reason="loading",
    )


def model_not_found(name: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist. Available: {served}",
        type="not_found_error",
        param="model",
        code="model_not_found",
        reason="model_not_found",
    )


def from_engine_error(exc: EngineError) -> APIError:
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            reason=exc.reason,
        )
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), type="server_error", code="shutting_down", reason=exc.reason)
    if isinstance(exc, ContextLengthError):
        return APIError(
            400, str(exc), param="max_tokens", code="context_length_exceeded", reason=exc.reason
        )
    if isinstance(exc, UnknownSparsityError):
        return APIError(400, str(exc), param="sparsity", code="unknown_sparsity", reason=exc.reason)
    return APIError(400, str(exc), reason=exc.reason)


def _validation_error(exc: RequestValidationError) -> APIError:
    messages, params = [], []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            messages.append(f"the request body is not valid JSON ({detail})".replace(" ()", ""))
            params.append(None)
            continue
        # loc is ("body", field, ...); union members add their type names, which say nothing
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_type_tag(p)]
        param = ".".join(loc) or None
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":  # OpenAI's own words for an unknown field
            messages.append(f"Unrecognized request argument supplied: {param}")
            params.append(param)
            continue
        if err.get("type") == "field_error":  # a model validator's error about one field
            name = (err.get("ctx") or {}).get("name")
            param = ".".join([*loc, name]) if name else param
            messages.append(message)
            params.append(param)
            continue
        messages.append(f"{param}: {message}" if param else message)
        params.append(param)
    unique = list(dict.fromkeys(messages)) or ["invalid request"]
    return APIError(
        400,
        "; ".join(unique[:5]),
        param=params[0] if params else None,
        code="invalid_value",
        reason="invalid_request",
    )


def _is_type_tag(part) -> bool:
    # pydantic names the union member it tried: "str", "list[str]", "function-after[...]"
    text = str(part)
    return text in ("str", "int", "float", "bool") or "[" in text


def install_error_handlers(app: FastAPI, on_refusal: Callable[[str], None] | None = None) -> None:
    def respond(err: APIError) -> JSONResponse:
        if err.reason and on_refusal is not None:
            on_refusal(err.reason)
        return error_response(err)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return respond(exc)

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError):
        return respond(from_engine_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return respond(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return respond(APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return respond(
            APIError(500, "internal server error", type="server_error", reason="internal_error")
        )
