"""tickpipe's web process with a ``Server-Timing`` header on HTTP responses.

tickpipe does not report how long a request took inside the server, so for the
``/ticks/realtime`` figure the benchmark starts the unchanged app (``create_app``) behind this
pass-through ASGI middleware, under uvicorn with the same options as ``tickpipe web``. The time
runs from the app being called to the response head being sent: routing, auth, the Redis round
trip and encoding; not HTTP parsing or time spent queued behind other work on the event loop.
WebSocket traffic goes straight through untouched.

Run: ``python -m bench.timed_web`` with the usual ``TICKPIPE_*`` environment.
"""

from __future__ import annotations

import time
from typing import Any

import uvicorn

from server.app import create_app as create_tickpipe_app
from server.cli import uvicorn_options
from server.config import get_settings

Scope = dict[str, Any]


class ServerTiming:
    """Adds ``Server-Timing: app;dur=<ms>`` to every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter_ns()

        async def timed_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter_ns() - started) / 1e6
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"app;dur={ms:.3f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


def create_app() -> ServerTiming:
    return ServerTiming(create_tickpipe_app())


def main() -> None:
    # The same uvicorn options as ``tickpipe web``.
    uvicorn.run(
        "bench.timed_web:create_app",
        factory=True,
        access_log=False,
        **uvicorn_options(get_settings()),
    )


if __name__ == "__main__":
    main()
