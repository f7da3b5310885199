"""An ASGI middleware that refuses what must be refused before the body is read: a missing or
wrong API key (401) and a body over the size limit (413, from Content-Length at once, or as
soon as a body without one has sent too much)."""

from __future__ import annotations

from collections.abc import Callable

from cats_serve.server.api.auth import api_key_error
from cats_serve.server.api.errors import APIError, error_response


class RequestGuard:
    def __init__(
        self,
        app,
        *,
        api_key: str | None,
        protect_metrics: bool,
        max_body_bytes: int,
        on_refusal: Callable[[str], None],
    ):
        self.app = app
        self.api_key = api_key
        self.protect_metrics = protect_metrics
        self.max_body_bytes = max_body_bytes
        self.on_refusal = on_refusal

    def _needs_key(self, path: str) -> bool:
        if not self.api_key:
            return False
        return path.startswith("/v1") or (self.protect_metrics and path == "/metrics")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self._needs_key(scope["path"]):
            refusal = api_key_error(headers.get("authorization"), self.api_key)
            if refusal is not None:
                await self._refuse(refusal, scope, receive, send)
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._refuse(self._too_large(), scope, receive, send)
            return
        await self._guarded(scope, receive, send)

    async def _guarded(self, scope, receive, send) -> None:
        """Run the app, counting body bytes: past the limit the client gets the 413 and the app
        sees a disconnect (whatever it sends after that is dropped)."""
        received = 0
        refused = False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused = True
                    await self._refuse(self._too_large(), scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is larger than this server's limit of {self.max_body_bytes} "
            "bytes (--max-request-bytes)",
            code="request_too_large",
            reason="request_too_large",
        )

    async def _refuse(self, err: APIError, scope, receive, send) -> None:
        self.on_refusal(err.reason or "invalid_request")
        await error_response(err)(scope, receive, send)
