"""The Starlette application factory (``uvicorn --factory server.api.app:create_app``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from server import protocol
from server.api.errors import ApiError, api_error_handler
from server.api.history import gaps, historical
from server.api.status import metrics, status
from server.api.ticks import realtime
from server.api.ws import ws_endpoint
from server.auth import ConnectionQuota, KeyStore
from server.bus import Bus
from server.config import Settings, get_settings
from server.hub import Hub
from server.latest import LatestCache
from server.metrics import make_registry
from server.protocol import CloseCode
from server.queries import QueryLog, QueryRecorder, queries_endpoint
from server.replay import FIGURES
from server.status import StatusBoard

log = logging.getLogger("tickpipe.web")
WEB_DIR = Path(__file__).resolve().parents[2] / "web"
# The dashboard's chart library, installed by `make setup` (npm ci in web/), served from here.
CHARTS_DIR = WEB_DIR / "node_modules" / "lightweight-charts" / "dist"


@dataclass
class AppState:
    settings: Settings
    redis: Redis
    bus: Bus
    hub: Hub
    keys: KeyStore
    quota: ConnectionQuota
    latest: LatestCache
    started_ns: int
    queries: QueryLog
    status: StatusBoard
    metrics: CollectorRegistry


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
                protocol.error(
                    "key_revoked", "this key was revoked; ask for a new one", fatal=True
                ),
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
                sub.send(protocol.heartbeat())
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
    from server.auth import SCOPES, KeyStoreError

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
            "replays": {"active": FIGURES.active, "open_readers": FIGURES.open_readers},
        },
        status_code=200,
    )


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # A blocking pool: a burst of 1,000 subscribes queues for a connection instead of failing.
        pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            timeout=5,
            socket_timeout=2,
            socket_connect_timeout=2,
        )
        redis = Redis(connection_pool=pool)
        bus = Bus(redis, settings.history_per_symbol)
        keys = KeyStore(settings.keys_db)
        hub = Hub(settings, bus)
        started_ns = time.time_ns()
        board = StatusBoard(settings, redis, hub, started_ns)
        st = AppState(
            settings,
            redis,
            bus,
            hub,
            keys,
            ConnectionQuota(redis, settings.max_conns_per_key),
            LatestCache(hub, bus),
            started_ns,
            QueryLog(settings.queries_db, settings.query_log_max),
            board,
            make_registry(board, hub),
        )
        app.state.tp = st
        hub.on_control = lambda _channel, _payload: enforce_revocations(st)
        await hub.start()
        bootstrap_admin(keys, settings)
        task = asyncio.create_task(maintain(st))
        flusher = asyncio.create_task(st.queries.run())
        reporter = asyncio.create_task(board.run())
        try:
            yield
        finally:
            task.cancel()
            flusher.cancel()
            reporter.cancel()
            await board.forget()
            for sub in list(hub.subscribers):
                sub.close(1001, protocol.error("shutdown", "server is restarting", fatal=True))
            await hub.stop()
            await redis.aclose()
            await pool.disconnect()
            keys.close()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await st.queries.flush()
            st.queries.close()

    routes = [
        Route("/healthz", healthz),
        Route("/status", status),
        Route("/metrics", metrics),
        Route("/queries", queries_endpoint),
        Route("/ticks/realtime", realtime),
        Route("/ticks/historical", historical),
        Route("/ticks/gaps", gaps),
        WebSocketRoute("/ws", ws_endpoint),
        Mount("/vendor/lightweight-charts", StaticFiles(directory=CHARTS_DIR, check_dir=False)),
        Mount("/", StaticFiles(directory=WEB_DIR, html=True, check_dir=False), name="web"),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={ApiError: api_error_handler}
    )
    app.add_middleware(QueryRecorder)
    return app
