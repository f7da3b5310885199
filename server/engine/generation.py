"""The engine requests of one API call (prompts x n), submitted together, their events merged.

`submit()` runs in the handler before any response is sent, so a refusal (full queue, context
length) becomes an HTTP status rather than a broken stream; it is all or nothing. `events()`
yields `(choice index, event)` until every request has finished. `abort()` stops whatever has
not finished; the engine frees those cache slots at its next step. Handlers call it in a
`finally`, so a client that goes away (a cancelled task) never leaves work behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from functools import partial

from cats_serve.server.engine.engine import Engine
from cats_serve.server.engine.types import GenerationRequest, RequestResult, TokenEvent

Event = TokenEvent | RequestResult


class Generation:
    def __init__(self, engine: Engine, requests: list[GenerationRequest]):
        self.engine = engine
        self.requests = requests
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._submitted = 0
        self._finished: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self) -> None:
        """Submit every request; if one is refused, abort the others and re-raise."""
        self._loop = asyncio.get_running_loop()
        try:
            for index, request in enumerate(self.requests):
                self.engine.submit(request, partial(self._sink, index))
                self._submitted += 1
        except BaseException:
            self.abort()
            raise

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while len(self._finished) < self._submitted:
            index, event = await self._queue.get()
            if isinstance(event, RequestResult):
                self._finished.add(index)
            yield index, event

    def abort(self) -> None:
        for index in range(self._submitted):
            if index not in self._finished:
                self.engine.abort(self.requests[index].request_id)
        self._finished.update(range(self._submitted))

    def _sink(self, index: int, event: Event) -> None:
        # engine thread: hand the event to the event loop, never block
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # RuntimeError: the loop closed in between; nobody is listening any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))
