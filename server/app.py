"""The web process as one ASGI app (``uvicorn --factory server.app:create_app``): the REST routes,
the WebSocket endpoint and the dashboard of ``server.api``, MCP at ``/mcp`` (``server.mcp``), and
the lifespan that starts and stops the process's state (``server.api.state``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from server import wire
from server.api.errors import ApiError, api_error_handler
from server.api.history import gaps, historical
from server.api.queries import QueryRecorder, queries_endpoint
from server.api.state import AppState, close_state, open_state
from server.api.status import metrics, sources, status
from server.api.ticks import realtime
from server.api.ws import ws_endpoint
from server.auth import SCOPES, KeyStore, KeyStoreError
from server.config import Settings, get_settings
from server.mcp.http import McpEndpoint
from server.replay import FIGURES
from server.wire import CloseCode

log = logging.getLogger("tickpipe.web")
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
# The dashboard's chart library, installed by `make setup` (npm ci in web/), served from here.
CHARTS_DIR = WEB_DIR / "node_modules" / "lightweight-charts" / "dist"


def enforce_revocations(st: AppState) -> None:
    """Re-read the key file if it changed; close every socket whose key is no longer active."""
    try:
        st.keys.refresh()
    except Exception:  # a locked or damaged key file must not stop the caller
        log.exception("could not re-read API keys")
        return
    for sub in list(st.hub.subscribers):
        if not st.keys.is_active(sub.key_id):
            sub.close(
                CloseCode.KEY_REVOKED,
                wire.error("key_revoked", "this key was revoked; ask for a new one", fatal=True),
            )


async def maintain(st: AppState) -> None:
    """Every second or sooner: enforce revocations and send heartbeats; every ten rounds,
    refresh connection quotas and drop idle channels."""
    s = st.settings
    rounds = 0
    while True:
        await asyncio.sleep(min(s.key_refresh_s, s.heartbeat_s))
        rounds += 1
        enforce_revocations(st)
        now = time.monotonic()
        for sub in list(st.hub.subscribers):
            if sub.close_code is None and now - sub.last_send >= s.heartbeat_s:
                sub.last_send = now
                sub.send(wire.heartbeat())
        if rounds % 10 == 0:
            await st.quota.refresh((sub.key_id, sub.conn_id) for sub in st.hub.subscribers)
            st.latest.evict_idle()
            await st.hub.sweep()


def bootstrap_admin(keys: KeyStore, settings: Settings) -> None:
    """On first start, create an admin key and print it once with the URL."""
    url = settings.base_url
    if keys.has_admin():
        print(
            f"tickpipe is up: dashboard {url}/  WebSocket {url.replace('http', 'ws', 1)}/ws\n"
            "  get a key: .venv/bin/tickpipe keys create --name me --scopes realtime,historical",
            flush=True,
        )
        return
    try:
        secret, _ = keys.create("admin", SCOPES)
    except KeyStoreError:  # another web process made it first
        return
    print(
        f"tickpipe is up: dashboard {url}/  WebSocket {url.replace('http', 'ws', 1)}/ws\n"
        f"  admin key (shown only once, keep it): {secret}\n"
        "  more keys: .venv/bin/tickpipe keys create --name agent-1 --scopes realtime",
        flush=True,
    )


async def healthz(request: Request) -> Response:
    st: AppState = request.app.state.tp
    up = st.hub.redis_up
    return JSONResponse(
        {
            "status": "ok" if up else "degraded",
            "redis": "up" if up else "down",
            "replays": {
                "active": FIGURES.active,
                "open_readers": FIGURES.open_readers,
                "rows_held": FIGURES.rows_held,
            },
        },
        status_code=200,
    )


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()
    mcp = McpEndpoint(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        st = open_state(settings)
        app.state.tp = st
        st.hub.on_control = lambda _channel, _payload: enforce_revocations(st)
        await st.hub.start()
        await st.status.beat()  # before the first connection takes a quota slot (see live/quota.py)
        bootstrap_admin(st.keys, settings)
        task = asyncio.create_task(maintain(st))
        flusher = asyncio.create_task(st.queries.run())
        reporter = asyncio.create_task(st.status.run())
        try:
            async with mcp.serve(st):
                yield
        finally:
            task.cancel()
            flusher.cancel()
            reporter.cancel()
            await st.status.forget()
            for sub in list(st.hub.subscribers):
                sub.close(1001, wire.error("shutdown", "server is restarting", fatal=True))
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await close_state(st)

    routes = [
        Route("/healthz", healthz),
        Route("/status", status),
        Route("/metrics", metrics),
        Route("/sources", sources),
        Route("/queries", queries_endpoint),
        Route("/ticks/realtime", realtime),
        Route("/ticks/historical", historical),
        Route("/ticks/gaps", gaps),
        WebSocketRoute("/ws", ws_endpoint),
        Route("/mcp", mcp),
        Mount("/vendor/lightweight-charts", StaticFiles(directory=CHARTS_DIR, check_dir=False)),
        Mount("/", StaticFiles(directory=WEB_DIR, html=True, check_dir=False), name="web"),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={ApiError: api_error_handler}
    )
    app.add_middleware(QueryRecorder)
    return app
