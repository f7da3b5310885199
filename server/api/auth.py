"""Optional API key: `Authorization: Bearer KEY` on the /v1 routes when `--api-key` is set.

The comparison is constant-time (hmac.compare_digest), so response times say nothing about how
much of a guessed key was right.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cats_serve.server.api.errors import APIError

bearer = HTTPBearer(
    auto_error=False,
    description="The server's API key (only required when it was started with --api-key)",
)


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    expected = request.app.state.cats.settings.api_key
    if not expected:
        return
    if credentials is None:
        raise _unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`."
        )
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise _unauthorized("Incorrect API key provided.")


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
        reason="unauthorized",
    )
