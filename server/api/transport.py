"""The web process's TCP connections: uvicorn's HTTP and WebSocket protocols with the two time
limits uvicorn lacks, so a peer can hold a connection only while it takes part.

* ``HeadTimeoutHttp``: a request head (request line and headers) must be complete within
  ``request_head_timeout_s`` of the connection opening, or of the first byte of a later request
  on a kept-alive one; otherwise ``408`` and the connection is closed. uvicorn times out only an
  idle kept-alive connection, so a peer sending a head byte by byte held a socket forever.
* ``ClosingWebSockets``: once the endpoint is done with a WebSocket, the peer has
  ``slow_close_timeout_s`` to complete the close; then the TCP connection is aborted. Closing a
  transport flushes what is queued first, so a peer that never reads held the connection, and
  megabytes queued for it, until it left.

uvicorn builds protocol instances itself (and pickles its config for worker processes), so these
read the process's settings the way ``create_app`` does. ``uvicorn_options`` selects them.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from server.config import get_settings

log = logging.getLogger("tickpipe.web")


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"


class HeadTimeoutHttp(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol; a request head that is not complete in time gets ``408``."""

    head_timer: asyncio.TimerHandle | None = None

    # The ignore below: uvicorn annotates its parameter as a BaseTransport; a TCP
    # server's is always a Transport, which the head timer needs.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timeout_s = get_settings().request_head_timeout_s
        self._start_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head_timer()  # a later request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        log.info(
            "closing a connection from %s: no complete request head within %gs",
            _peer(self.client),
            self.head_timeout_s,
        )
        body = (
            f"request timeout: the request line and headers did not arrive within "
            f"{self.head_timeout_s:g}s; send the whole request head at once\n"
        ).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        if self.transport.get_write_buffer_size():  # the peer does not read either
            self.transport.abort()
        else:
            self.transport.close()


class ClosingWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol; a peer that does not complete the close is cut off."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.close_timeout = get_settings().slow_close_timeout_s  # uvicorn's wait for the echo

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            self.loop.call_later(self.close_timeout, self._abort)

    def _abort(self) -> None:
        if not self.disconnected:
            log.info(
                "aborting the connection of %s: it did not complete the close within %gs",
                _peer(self.client),
                self.close_timeout,
            )
            self.transport.abort()
