"""Optional API key: `Authorization: Bearer KEY` on the /v1 routes (and /metrics with
`--metrics-api-key`) when `--api-key` is set.

The key is checked by `RequestGuard` (guard.py) before the body is read, so an unauthorised
client cannot make the server read and parse a large body. The comparison is constant-time
(hmac.compare_digest), so response times say nothing about how much of a guessed key was right.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cats_serve.server.api.errors import APIError

bearer = HTTPBearer(
    auto_error=False,
    description="The server's API key (only required when it was started with --api-key)",
)


def declare_bearer(_: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
    """Shows the bearer scheme on the /v1 routes in /openapi.json; checks nothing itself."""


def api_key_error(authorization: str | None, expected: str) -> APIError | None:
    """The 401 for an `Authorization` header that does not carry `expected`, else None."""
    if not authorization:
        return _unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`."
        )
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        key.strip().encode(), expected.encode()
    ):
        return _unauthorized("Incorrect API key provided.")
    return None


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
        reason="unauthorized",
    )
