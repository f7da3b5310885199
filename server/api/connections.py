"""uvicorn's h11 protocol with a deadline for a new connection's first request head.

uvicorn closes idle keep-alive connections (`--timeout-keep-alive`) but waits forever for the
first request of a new connection, so a client that opens connections and sends nothing (or
trickles its headers, "slowloris") holds them open. With this protocol a connection that has
not sent a whole request head within `header_timeout` seconds of connecting is closed.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout: float) -> type[H11Protocol]:
    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(header_timeout, self._head_overdue)

        def _head_overdue(self) -> None:
            if self.cycle is None:  # no request head has arrived yet
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
