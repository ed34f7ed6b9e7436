"""``tickpipe mcp``: the MCP server over stdio, for an agent host that starts it as a subprocess.

It runs next to the deployment, with the same settings, and reads Redis and the history store
itself: its own hub (one pub/sub connection) for latest ticks and resource subscriptions, the
store's files for history, and the same key and query-history files as the web process. So it
needs no web process for ticks and bars, and its answers come from the same functions as REST's.
What only the web process knows, the service status, it asks the web process for over HTTP.

The key in ``TICKPIPE_KEY`` is the agent's, not the operator's: every request is checked
against it (looked up again each time, so a revocation refuses the next request and ends its
subscriptions within ``key_refresh_s``), and every call is recorded under its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import ssl
import sys
from typing import Any

import httpx
from mcp.server.stdio import stdio_server

from server.api.errors import ApiError
from server.api.state import AppState, close_state, open_state
from server.auth import ApiKey
from server.config import Settings
from server.mcp.server import McpService, status_times
from server.mcp.tools import StatusReader

HOUSEKEEPING_S = 10.0


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for the process's status reads (a new one loads the CA bundle again: 30
    ms of CPU on a 2-vCPU machine, per call)."""
    return httpx.create_ssl_context()


def remote_status(settings: Settings, secret: str) -> StatusReader:
    """The service status as the web process at ``base_url`` answers ``GET /status``."""

    async def read(key: ApiKey) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {secret}"} if key.has_scope("admin") else {}
        try:
            async with httpx.AsyncClient(timeout=5, verify=_tls()) as http:
                r = await http.get(f"{settings.base_url}/status", headers=headers)
            body = r.json()
        except (httpx.HTTPError, ValueError):
            raise ApiError(
                503,
                "unavailable",
                f"the web process at {settings.base_url} does not answer; start it (make run), "
                "or set TICKPIPE_PUBLIC_URL to where it runs",
            ) from None
        if "error" in body:
            error = body["error"]
            raise ApiError(r.status_code, error["code"], error["message"])
        return status_times(body)

    return read


async def _housekeeping(st: AppState) -> None:
    """What the web process's upkeep does for the parts used here: drop idle cache entries and
    channels."""
    while True:
        await asyncio.sleep(HOUSEKEEPING_S)
        st.latest.evict_idle()
        await st.hub.sweep()


async def _exit_now(st: AppState) -> None:
    """Store what the query history holds in memory, then end the process (exit status 0)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(st.queries.flush(), 10)
    os._exit(0)


async def run_stdio(settings: Settings) -> int:
    """Serve MCP on stdin/stdout until the host closes it; 2 if the key is missing or invalid."""
    secret = settings.key
    st = open_state(settings)  # its status board stays idle: it would report a web process
    if not secret or st.keys.lookup(secret) is None:
        print(
            "error: set TICKPIPE_KEY to an active API key (create one with 'tickpipe keys create "
            "--name agent-1 --scopes realtime,historical')",
            file=sys.stderr,
        )
        await close_state(st)
        return 2
    service = McpService(st, "stdio", remote_status(settings, secret), secret)
    await st.hub.start()
    tasks = [
        asyncio.create_task(st.queries.run()),
        asyncio.create_task(service.enforce(lambda _connection: False)),
        asyncio.create_task(_housekeeping(st)),
    ]
    # The host closes stdin to end the session and sends SIGTERM when the process is not gone
    # soon after (the SDK's client: 2 s). The read of stdin blocks a thread that nothing can
    # interrupt, so on a signal store the query history (the calls just made) and exit at once.
    stopping: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.append(loop.create_task(_exit_now(st))))
    try:
        async with stdio_server() as (read, write):
            await service.server.run(read, write, service.server.create_initialization_options())
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        service.subscriptions.close()
        await close_state(st)
    return 0
