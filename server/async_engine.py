"""The asyncio side of the engine: submit a request, await its events, abort on cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cats_serve.server.engine import Engine
from cats_serve.server.engine_types import GenerationRequest, RequestResult, TokenEvent


async def stream_request(
    engine: Engine, request: GenerationRequest
) -> AsyncIterator[TokenEvent | RequestResult]:
    """Yield the request's TokenEvents and finally its RequestResult.

    Raises EngineError before the first event if the engine refuses the request. If the
    consumer stops early (client gone, task cancelled) the request is aborted, which frees its
    cache slot at the engine's next step.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenEvent | RequestResult] = asyncio.Queue()

    def sink(event: TokenEvent | RequestResult) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(queue.put_nowait, event)

    engine.submit(request, sink)
    finished = False
    try:
        while True:
            event = await queue.get()
            if isinstance(event, RequestResult):
                finished = True
            yield event
            if finished:
                return
    finally:
        if not finished:
            engine.abort(request.request_id)
