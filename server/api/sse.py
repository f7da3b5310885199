"""Server-Sent Events: `data: {json}` events, `data: [DONE]`, and a response that always
notices a client that goes away.

Starlette's StreamingResponse only listens for the disconnect under ASGI spec < 2.4 and otherwise
learns of it at the next write; a request waiting in the queue writes nothing for a while. This
response always listens, and always calls `on_close` at the end, however the stream ended, so the
handler can abort the engine requests at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from cats_serve.server.api.errors import APIError

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict) -> str:
    data = payload.model_dump() if isinstance(payload, BaseModel) else payload
    # ASCII-only JSON: raw U+0085, U+2028 or U+2029 in generated text would be line breaks to
    # clients that split the stream like str.splitlines (httpx's aiter_lines does), cutting an
    # event in two.
    return f"data: {json.dumps(data)}\n\n"


def error_event(err: APIError) -> str:
    return sse_event(err.body())


def chunk_exclusions(body, sparsity) -> set[str]:
    """Chunk fields to leave out: `usage` is null on every chunk but the last when usage was
    asked for (as OpenAI does) and absent otherwise; `sparsity` only rides on last chunks."""
    out = set() if body.include_usage else {"usage"}
    if sparsity is None:
        out.add("sparsity")
    return out


async def _guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass events through; an error mid-stream becomes an error event, then [DONE]."""
    try:
        async for event in events:
            yield event
    except APIError as err:
        yield error_event(err)
        yield DONE
    except Exception:
        log.exception("error while streaming")
        yield error_event(APIError(500, "internal server error", type="server_error"))
        yield DONE


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            _guarded(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()
