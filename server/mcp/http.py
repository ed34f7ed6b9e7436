"""``/mcp`` on the web process: the SDK's streamable HTTP transport behind a tickpipe key check.

Every request (POST, the GET stream, DELETE) must carry ``Authorization: Bearer <key>``. A
missing, unknown or revoked key is refused before the SDK sees the request: HTTP 401 with a
JSON-RPC error whose ``data.code`` is the REST code, so an MCP client shows tickpipe's message.
The key goes into the scope as the SDK's ``AuthenticatedUser``, so the session manager binds a
2025-revision session to the key that opened it (another key gets 404 for its id), and as
``tickpipe.key`` for the handlers.

The SDK's own ``TokenVerifier``/``AuthSettings`` is not used: it is an OAuth 2.1
resource-server integration (an issuer URL, protected-resource metadata, OAuth-shaped 401s),
and tickpipe keys are opaque bearer keys checked against the key file.

The SDK (about half of a web process's import time) loads on the first request to ``/mcp``,
in a thread so live fan-out goes on meanwhile, and its session manager starts then; a web
process nobody asks for MCP never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import orjson
from starlette.authentication import AuthCredentials
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from server.api.errors import ApiError, key_from_header
from server.api.state import AppState
from server.config import Settings

if TYPE_CHECKING:
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from server.mcp.server import McpService

SESSION_HEADER = "mcp-session-id"


class SessionActivity:
    """When each 2025-revision HTTP session was last used, as the SDK judges idleness: a session
    with no request in flight (the GET stream counts while open) for ``idle_s`` is gone, and so
    is one the client DELETEd. Its subscriptions end then. Sessions gone that long are forgotten
    here too, so the record stays as small as the set of live sessions."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._in_flight: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._deleted: set[str] = set()
        self._next_sweep = time.monotonic() + idle_s

    @contextlib.contextmanager
    def request(self, session_id: str | None, method: str) -> Iterator[None]:
        if session_id is None:
            yield
            return
        self._in_flight[session_id] = self._in_flight.get(session_id, 0) + 1
        try:
            yield
        finally:
            now = time.monotonic()
            self._in_flight[session_id] -= 1
            self._last[session_id] = now
            if method == "DELETE":
                self._deleted.add(session_id)
            if now >= self._next_sweep:
                self._sweep(now)

    def ended(self, session_id: str) -> bool:
        if session_id in self._deleted:
            self._forget(session_id)
            return True
        if self._in_flight.get(session_id, 0):
            return False
        last = self._last.get(session_id)
        if last is not None and time.monotonic() - last < self.idle_s:
            return False
        self._forget(session_id)
        return True

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.idle_s
        for session_id, last in list(self._last.items()):
            if not self._in_flight.get(session_id) and now - last >= self.idle_s:
                self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        self._deleted.discard(session_id)
        self._last.pop(session_id, None)
        self._in_flight.pop(session_id, None)


class _Sdk:
    """The SDK's pieces and tickpipe's handlers on it, imported on first use (see above)."""

    def __init__(self) -> None:
        from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
        from mcp.server.auth.provider import AccessToken
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
        from mcp.server.transport_security import TransportSecuritySettings

        from server.mcp import server

        self.AuthenticatedUser = AuthenticatedUser
        self.AccessToken = AccessToken
        self.StreamableHTTPSessionManager = StreamableHTTPSessionManager
        self.TransportSecuritySettings = TransportSecuritySettings
        self.server = server


async def _refuse(sdk: _Sdk, exc: ApiError, send: Send) -> None:
    error = sdk.server.request_error(exc).error
    body = orjson.dumps(
        {"jsonrpc": "2.0", "id": None, "error": error.model_dump(mode="json", exclude_none=True)}
    )
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if exc.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class McpEndpoint:
    """The ASGI app at ``/mcp``; ``serve(st)`` runs it for the life of the web process: the
    SDK's session manager starts with the first request and stops when ``serve`` ends."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.activity = SessionActivity(settings.mcp_session_idle_s)
        self.service: McpService | None = None
        self._manager: StreamableHTTPSessionManager | None = None
        self._st: AppState | None = None
        self._sdk: asyncio.Task[_Sdk] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def serve(self, st: AppState) -> AsyncIterator[None]:
        """Accept requests for ``st``; on exit stop the session manager and the upkeep of
        subscriptions if the first request started them."""
        self._st, self._stop = st, asyncio.Event()
        try:
            yield
        finally:
            self._st = None
            runner, self._runner, self._ready = self._runner, None, None
            if runner is not None:
                self._stop.set()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await runner

    async def _load(self) -> _Sdk:
        if self._sdk is None:
            self._sdk = asyncio.create_task(asyncio.to_thread(_Sdk))
        return await asyncio.shield(self._sdk)

    async def _started(self, sdk: _Sdk, st: AppState) -> None:
        if self._runner is None or self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._runner = asyncio.create_task(self._run(sdk, st, self._ready))
        await asyncio.shield(self._ready)

    async def _run(self, sdk: _Sdk, st: AppState, ready: asyncio.Future[None]) -> None:
        try:
            mcp = sdk.server
            service = mcp.McpService(st, "http", lambda key: mcp.board_status(st, key))
            manager = sdk.StreamableHTTPSessionManager(
                app=service.server,
                # Host/Origin checks guard servers a web page could reach without credentials;
                # every request here needs a bearer key, which a page from elsewhere does not have.
                security_settings=sdk.TransportSecuritySettings(
                    enable_dns_rebinding_protection=False
                ),
                session_idle_timeout=self.settings.mcp_session_idle_s,
            )
            async with manager.run():
                upkeep = asyncio.create_task(service.enforce(self.activity.ended))
                self.service, self._manager = service, manager
                ready.set_result(None)
                try:
                    await self._stop.wait()
                finally:
                    self.service = self._manager = None
                    upkeep.cancel()
                    service.subscriptions.close()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        sdk = await self._load()
        st = self._st
        if st is None:
            await _refuse(sdk, ApiError(503, "unavailable", "the server is starting; retry"), send)
            return
        headers = Headers(scope=scope)
        try:
            key = key_from_header(st.keys, headers.get("authorization"))
        except ApiError as exc:
            await _refuse(sdk, exc, send)
            return
        await self._started(sdk, st)
        manager = self._manager
        if manager is None:  # serve() ended meanwhile: the process is stopping
            await _refuse(sdk, ApiError(503, "unavailable", "the server is stopping; retry"), send)
            return
        scopes = sorted(key.scopes)
        token = sdk.AccessToken(token=key.id, client_id=key.id, scopes=scopes)
        scope["user"] = sdk.AuthenticatedUser(token)
        scope["auth"] = AuthCredentials(scopes)
        scope[sdk.server.KEY_SCOPE] = key
        with self.activity.request(headers.get(SESSION_HEADER), scope["method"]):
            await manager.handle_request(scope, receive, send)
