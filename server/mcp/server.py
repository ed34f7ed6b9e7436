"""The MCP server object shared by both transports: the SDK's low-level ``Server`` with
tickpipe's handlers. Every request is checked against the caller's API key (scopes and symbol
entitlements exactly as REST checks them) and recorded in the query history as ``mcp:<name>``.

The caller's key: over HTTP the ``/mcp`` endpoint has already looked it up from the bearer
header (``server.mcp.http``); over stdio it is ``TICKPIPE_KEY``, looked up again on every
request so a revocation refuses the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import mcp_types as types
import orjson
from mcp.server import Server
from mcp.server.caching import CacheHint
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError

from server.api.errors import ApiError, require_scope
from server.api.state import AppState
from server.api.ticks import latest_ticks
from server.auth import ApiKey
from server.mcp import contract
from server.mcp.resources import ListenStream, Subscriptions, live_symbol, resource_uri, symbol_of
from server.mcp.tools import TOOLS, StatusReader, iso, latest_with_times

log = logging.getLogger("tickpipe.mcp")
R = TypeVar("R")
KEY_SCOPE = "tickpipe.key"  # where the /mcp endpoint leaves the caller's ApiKey in the ASGI scope
STDIO = "stdio"  # the connection id of the one stdio connection


def _jsonrpc_code(status: int) -> int:
    if status in (401, 403):
        return types.INVALID_REQUEST
    if status in (404, 422):
        return types.INVALID_PARAMS
    return types.INTERNAL_ERROR


def request_error(exc: ApiError) -> MCPError:
    """A REST error as a JSON-RPC error: same message, the tickpipe code in ``data.code``."""
    return MCPError(_jsonrpc_code(exc.status), exc.message, data={"code": exc.code, **exc.extra})


def tool_error(exc: ApiError) -> types.CallToolResult:
    """A REST error as a tool error: the REST body as the text a model reads."""
    body = {"error": {"code": exc.code, "message": exc.message, **exc.extra}}
    text = orjson.dumps(body).decode()
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


def _text_of(result: types.CallToolResult) -> str:
    first = result.content[0]
    return first.text if isinstance(first, types.TextContent) else ""


def _internal() -> ApiError:
    return ApiError(
        500, "internal_error", "tickpipe failed to answer; retry, and tell its operator if it "
        "keeps failing (the server log has the details)"
    )  # fmt: skip


class McpService:
    """tickpipe's MCP handlers over one process's state (the web process's, or the stdio
    process's own), for one transport."""

    def __init__(
        self,
        st: AppState,
        transport: Literal["http", "stdio"],
        status: StatusReader,
        secret: str | None = None,
    ) -> None:
        self.st = st
        self.settings = st.settings
        self.transport = transport
        self.status_for = status
        self._secret = secret
        self.specs = contract.tools(self.settings.mcp_max_rows)
        self._tool_list = [
            types.Tool(
                name=spec.name,
                title=spec.title,
                description=spec.description,
                input_schema=contract.input_schema(spec),
                output_schema=contract.output_schema(spec),
                annotations=types.ToolAnnotations(
                    read_only_hint=spec.read_only, open_world_hint=False
                ),
            )
            for spec in self.specs.values()
        ]
        self._schemas = {t.name: t.input_schema for t in self._tool_list}
        self.subscriptions = Subscriptions(st.hub, self.settings.mcp_throttle_ms / 1000)
        # Answers depend on the key and on live data: nothing may be served from a cache.
        private = CacheHint(ttl_ms=0, scope="private")
        self.server: Server[Any] = Server(
            contract.SERVER_NAME,
            version="0.1.0",
            instructions=contract.INSTRUCTIONS,
            cache_hints={
                m: private for m in ("tools/list", "resources/list", "resources/templates/list")
            }
            | {"resources/read": private},
            get_tool_input_schema=self._schemas.get,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_templates,
            on_read_resource=self._read_resource,
            on_subscribe_resource=self._subscribe,
            on_unsubscribe_resource=self._unsubscribe,
            on_subscriptions_listen=self._listen,
        )

    # -- who is asking --

    def caller(self, ctx: ServerRequestContext[Any, Any]) -> ApiKey:
        """The key of this request, still active; else a 401."""
        request = ctx.request
        if request is not None:
            key: ApiKey | None = request.scope.get(KEY_SCOPE)
            if key is None:  # the endpoint always sets it; never serve without a key
                raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <key>'")
            return key
        keys = self.st.keys
        keys.refresh()
        key = keys.lookup(self._secret)
        if key is None:
            raise ApiError(
                401,
                "key_revoked",
                "the key in TICKPIPE_KEY is unknown or was revoked; ask for a new one and restart "
                "the MCP server with it",
            )
        return key

    def connection_id(self, ctx: ServerRequestContext[Any, Any]) -> str:
        request = ctx.request
        if request is None:
            return STDIO
        session: str | None = request.headers.get("mcp-session-id")
        if session is None:
            raise ApiError(
                422,
                "bad_parameter",
                "resources/subscribe needs a session (protocol 2025-*): initialize first, or use "
                "subscriptions/listen (2026-07-28)",
            )
        return session

    def record(
        self,
        key: ApiKey | None,
        name: str,
        params: object,
        rows: int | None,
        nbytes: int | None,
        started: tuple[int, float],
        status: str,
    ) -> None:
        ts, t0 = started
        self.st.queries.record(
            None if key is None else key.name,
            f"mcp:{name}",
            orjson.dumps(params, default=str).decode(),
            rows,
            nbytes,
            (time.perf_counter() - t0) * 1000,
            status,
            ts,
        )

    async def _answer(
        self,
        ctx: ServerRequestContext[Any, Any],
        name: str,
        params: object,
        answer: Callable[[ApiKey], Awaitable[tuple[R, int | None]]],
    ) -> R:
        """Run a non-tool request for the caller's key, record it, and turn a REST error into a
        JSON-RPC error."""
        started = (time.time_ns(), time.perf_counter())
        key = None
        try:
            key = self.caller(ctx)
            result, rows = await answer(key)
        except ApiError as exc:
            self.record(key, name, params, None, None, started, exc.code)
            raise request_error(exc) from None
        except MCPError:
            raise
        except Exception:
            log.exception("MCP %s failed", name)
            self.record(key, name, params, None, None, started, "internal_error")
            raise request_error(_internal()) from None
        self.record(key, name, params, rows, None, started, "ok")
        return result

    # -- tools --

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self._tool_list)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        started = (time.time_ns(), time.perf_counter())
        arguments = params.arguments or {}
        key: ApiKey | None = None
        rows: int | None = None
        try:
            spec = self.specs.get(params.name)
            if spec is None:
                raise ApiError(
                    422,
                    "bad_parameter",
                    f"no tool named {params.name[:40]!r}; the tools are "
                    f"{', '.join(self.specs)} (tools/list describes them)",
                )
            key = self.caller(ctx)
            if spec.scope is not None:
                require_scope(key, spec.scope)
            answer = await TOOLS[spec.name](self, key, contract.parse_args(spec, arguments))
            rows, status, text = answer.rows, "ok", answer.text
            result = types.CallToolResult(
                content=[types.TextContent(type="text", text=text)],
                structured_content=answer.data,
            )
        except ApiError as exc:
            result, status = tool_error(exc), exc.code
            text = _text_of(result)
        except Exception:
            log.exception("MCP tool %s failed", params.name)
            result, status = tool_error(_internal()), "internal_error"
            text = _text_of(result)
        self.record(key, params.name[:64], arguments, rows, len(text), started, status)
        return result

    # -- resources --

    async def _list_resources(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        async def answer(key: ApiKey) -> tuple[types.ListResourcesResult, int]:
            if not key.has_scope("realtime"):
                return types.ListResourcesResult(resources=[]), 0
            try:
                live = await self.st.bus.known_symbols()
            except Exception:
                raise ApiError(
                    503, "unavailable", "live data store (Redis) unreachable; retry shortly"
                ) from None
            syms = sorted(s for s in live if key.allows(s))[: contract.MAX_SYMBOLS_LISTED]
            resources = [
                types.Resource(
                    uri=resource_uri(sym),
                    name=sym,
                    title=f"{sym}: latest trade and quote",
                    description=f"The latest trade and quote of {sym}, as latest_ticks gives "
                    "them; subscribe to hear when it changes",
                    mime_type="application/json",
                )
                for sym in syms
            ]
            return types.ListResourcesResult(resources=resources), len(resources)

        return await self._answer(ctx, "resources/list", {}, answer)

    async def _list_templates(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        template = types.ResourceTemplate(
            uri_template=contract.RESOURCE_TEMPLATE,
            name="latest",
            title="Latest trade and quote of a symbol",
            description="The latest trade and quote of SYMBOL (JSON, as latest_ticks gives "
            "them). Subscribe to hear when it changes, at most once per "
            f"{self.settings.mcp_throttle_ms} ms; then read it again. Needs the realtime scope.",
            mime_type="application/json",
        )
        return types.ListResourceTemplatesResult(resource_templates=[template])

    async def _read_resource(
        self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)

        async def answer(key: ApiKey) -> tuple[types.ReadResourceResult, int]:
            sym = await live_symbol(self.st, key, uri)
            body = await latest_ticks(self.st, [sym])
            [entry] = latest_with_times(body)["ticks"]
            text = orjson.dumps(entry).decode()
            content = types.TextResourceContents(uri=uri, text=text, mime_type="application/json")
            return types.ReadResourceResult(contents=[content]), 1

        return await self._answer(ctx, "resources/read", {"uri": uri}, answer)

    async def _subscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)

        async def answer(key: ApiKey) -> tuple[types.EmptyResult, int]:
            sym = await live_symbol(self.st, key, uri)
            subs = self.subscriptions.session(self.connection_id(ctx), key.id)
            subs.notify = ctx.session.send_resource_updated
            subs.uris[sym] = uri
            await subs.watch.watch([sym])
            return types.EmptyResult(), 1

        return await self._answer(ctx, "resources/subscribe", {"uri": uri}, answer)

    async def _unsubscribe(
        self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        uri = str(params.uri)

        async def answer(key: ApiKey) -> tuple[types.EmptyResult, int]:
            sym = symbol_of(uri)
            conn_id = self.connection_id(ctx)
            subs = self.subscriptions.sessions.get(conn_id)
            if subs is not None and subs.uris.pop(sym, None) is not None:
                subs.watch.unwatch([sym])
                if not subs.uris:
                    self.subscriptions.end_session(conn_id)
            return types.EmptyResult(), 1

        return await self._answer(ctx, "resources/unsubscribe", {"uri": uri}, answer)

    async def _listen(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        requested = list(params.notifications.resource_subscriptions or [])

        async def answer(key: ApiKey) -> tuple[ListenStream, int]:
            uris: dict[str, str] = {}
            for uri in requested:  # every one is checked before the stream is acknowledged
                uris.setdefault(await live_symbol(self.st, key, uri), uri)
            stream = self.subscriptions.stream(key.id, uris)
            try:
                if uris:
                    await stream.watch.watch(list(uris))
            except BaseException:
                self.subscriptions.end_stream(stream)
                raise
            return stream, len(uris)

        stream = await self._answer(ctx, "subscriptions/listen", {"uris": requested}, answer)
        try:
            result: types.SubscriptionsListenResult = await stream.handler(ctx, params)
            return result
        finally:
            self.subscriptions.end_stream(stream)

    # -- upkeep --

    async def enforce(self, ended: Callable[[str], bool]) -> None:
        """Every ``key_refresh_s``: end the subscriptions of revoked keys and of connections
        that are gone (``ended``). The stdio process re-reads the key file itself; the web
        process's own loop does that there."""
        while True:
            await asyncio.sleep(self.settings.key_refresh_s)
            if self.transport == "stdio":
                try:
                    self.st.keys.refresh()
                except Exception:  # a locked key file must not end the server
                    log.exception("could not re-read API keys")
                    continue
            self.subscriptions.enforce(self.st.keys.is_active, ended)


async def board_status(st: AppState, key: ApiKey) -> dict[str, Any]:
    """What ``GET /status`` of this web process answers ``key``: every part for admin keys."""
    board = st.status
    if not key.has_scope("admin"):
        return status_times(board.summary())
    if board.report is None:
        raise ApiError(503, "unavailable", "status is being gathered; retry in a second")
    return status_times(board.report)


def status_times(report: dict[str, Any]) -> dict[str, Any]:
    """A status answer with its ``server_time`` as ISO-8601 UTC, like every MCP time."""
    return {**report, "server_time": iso(report["server_time"])}
