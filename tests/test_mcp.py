"""tickpipe as an MCP server, driven by the SDK's own client over streamable HTTP (``/mcp`` on a
real web process) and over stdio (``tickpipe mcp`` as a subprocess), against real Redis, a
feed, a recorder and hand-written history: every tool against REST for the same key and range,
entitlements, revocation, resource subscriptions on both protocol eras, bad arguments, the query
history, the contract document and the example agent."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import httpx2
import mcp_types as types
import orjson
import polars as pl
import pytest
import yaml
from mcp import Client, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from redis.asyncio import Redis

from server.live.bus import Bus
from server.mcp import contract
from server.ticks import Quote, Trade
from tests.harness import ROOT, TLS, WAIT_S, Stack, eventually, write_history
from tests.test_replay import END, ROWS, SYMS, T0

TRANSPORTS = ["http", "stdio"]
THROTTLE_MS = 200
CONTRACT = ROOT / "specs" / "001-tick-data-pipeline" / "contracts" / "mcp.yaml"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Feed, recorder and web, the hand-written history of test_replay, and a few symbols only
    the tests publish (so their latest ticks stay put)."""
    s = Stack(
        tmp_path_factory.mktemp("mcp"),
        recorder=True,
        recorder_flush_s=0.2,
        mcp_throttle_ms=THROTTLE_MS,
    )
    write_history(s.data_dir / "history", ROWS, "1-0", "1-9")
    s.start()
    quiet = ["ZLATEST", *(f"Z{t[:2].upper()}{n}" for t in ("http", "stdio") for n in range(1, 5))]
    asyncio.run(publish(s, *(Trade(sym, time.time_ns(), 10.0, 1.0) for sym in quiet)))
    asyncio.run(publish(s, Quote("ZLATEST", time.time_ns(), 9.5, 100.0, 10.5, 200.0)))
    try:
        yield s
    finally:
        s.stop()


async def publish(stack: Stack, *ticks: Trade | Quote) -> None:
    redis = Redis.from_url(stack.redis.url)
    try:
        await Bus(redis).publish(ticks)
    finally:
        await redis.aclose()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(stack: Stack, scopes: tuple[str, ...] = ("realtime", "historical"), **kw: Any) -> str:
    return stack.key(f"m{time.monotonic_ns()}", scopes, **kw)


def key_name(stack: Stack, key: str) -> str:
    found = stack.keys.lookup(key)
    assert found is not None
    return found.name


OnMessage = Callable[[Any], Awaitable[None]]


@contextlib.asynccontextmanager
async def connect(
    stack: Stack,
    key: str,
    transport: str,
    mode: str = "auto",
    on_message: OnMessage | None = None,
) -> AsyncIterator[Client]:
    """An MCP client of the stack: over HTTP with the key as bearer, or over stdio with
    ``tickpipe mcp`` started with the key in TICKPIPE_KEY."""
    if transport == "http":
        async with httpx2.AsyncClient(headers=auth(key), timeout=WAIT_S, verify=TLS) as http:
            url = f"{stack.base}/mcp"
            server = streamable_http_client(url, http_client=http)
            async with Client(server, mode=mode, message_handler=on_message) as client:
                yield client
        return
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "server.cli", "mcp"],
        env={**stack.env, "TICKPIPE_KEY": key},
        cwd=ROOT,
    )
    with (stack.workdir / "mcp-stdio.log").open("a") as errlog:
        server = stdio_client(params, errlog=errlog)
        async with Client(server, mode=mode, message_handler=on_message) as client:
            yield client


def answer(result: types.CallToolResult) -> dict[str, Any]:
    """A tool's structured answer, or its error body's ``error``."""
    if result.is_error:
        [content] = result.content
        assert isinstance(content, types.TextContent)
        return orjson.loads(content.text)["error"]
    assert result.structured_content is not None
    return result.structured_content


def ns(iso: str) -> int:
    """ISO-8601 UTC as the tools write it (to the nanosecond) -> integer ns."""
    base, _, frac = iso.removesuffix("Z").partition(".")
    seconds = int(dt.datetime.fromisoformat(base).replace(tzinfo=dt.UTC).timestamp())
    return seconds * 10**9 + int(frac.ljust(9, "0") or 0)


async def rest(stack: Stack, bearer: str | None, path: str, **params: Any) -> httpx.Response:
    async with stack.http() as http:
        return await http.get(path, params=params, headers=auth(bearer) if bearer else None)


def without_age(entry: dict[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    for kind in ("trade", "quote"):
        if out.get(kind):
            out[kind] = {k: v for k, v in out[kind].items() if k not in ("age_ms", "time")}
    return out


# -- the tool list and the contract --


def test_contract_document_matches_the_code() -> None:
    """specs/.../contracts/mcp.yaml is what `python -m server.mcp.contract` writes."""
    assert yaml.safe_load(CONTRACT.read_text()) == contract.document()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tools_are_listed_with_the_contracts_schemas(stack: Stack, transport: str) -> None:
    documented = {t["name"]: t for t in contract.document()["tools"]}
    for mode in ("auto", "legacy"):
        async with connect(stack, new_key(stack), transport, mode) as client:
            listed = (await client.list_tools()).tools
            caps = client.server_capabilities
        assert [t.name for t in listed] == list(documented)
        for tool in listed:
            doc = documented[tool.name]
            assert tool.description == doc["description"]
            assert tool.input_schema == doc["inputSchema"]
            assert tool.output_schema == doc["outputSchema"]
        assert caps.resources is not None and caps.resources.subscribe is True


# -- every tool against REST --


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_tool_answers_what_rest_answers(stack: Stack, transport: str) -> None:
    key = new_key(stack)
    async with connect(stack, key, transport) as c:
        latest = answer(await c.call_tool("latest_ticks", {"symbols": ["zlatest"]}))
        bars = answer(
            await c.call_tool(
                "bars", {"symbols": ["AAA", "BBB"], "start": T0, "end": END, "interval": "1s"}
            )
        )
        summary = await c.call_tool(
            "tick_summary", {"symbol": "CCC", "start": "2026-03-02T14:30:00Z", "end": END}
        )
        export = answer(
            await c.call_tool(
                "history_export", {"symbols": SYMS, "start": T0, "end": END, "format": "arrow"}
            )
        )
        gaps = answer(await c.call_tool("gaps", {"symbols": SYMS, "start": T0, "end": END}))
        symbols = answer(await c.call_tool("list_symbols", {}))
        status = answer(await c.call_tool("service_status", {}))

    realtime = (await rest(stack, key, "/ticks/realtime", symbols="ZLATEST")).json()
    assert [without_age(t) for t in latest["ticks"]] == [without_age(t) for t in realtime["ticks"]]
    assert ns(latest["ticks"][0]["trade"]["time"]) == realtime["ticks"][0]["trade"]["ts"]

    r = await rest(stack, key, "/ticks/historical", symbols="AAA,BBB", start=T0, end=END,
                   interval="1s")  # fmt: skip
    expected = r.json()["rows"]
    got = [dict(zip(bars["columns"], row, strict=True)) for row in bars["rows"]]
    assert [{**b, "start": ns(b["start"])} for b in got] == expected
    assert bars["count"] == len(expected) > 0 and bars["gaps"] == 0

    ticks = pl.DataFrame(
        (await rest(stack, key, "/ticks/historical", symbols="CCC", start=T0, end=END,
                    limit=100_000)).json()["rows"]
    )  # fmt: skip
    trades = ticks.filter(pl.col("type") == "trade")
    quotes = ticks.filter(pl.col("type") == "quote")
    s = answer(summary)
    assert (s["trades"], s["quotes"]) == (trades.height, quotes.height)
    assert (ns(s["first_time"]), ns(s["last_time"])) == (ticks["ts"].min(), ticks["ts"].max())
    assert (s["high"], s["low"]) == (trades["price"].max(), trades["price"].min())
    assert s["first_price"] == trades["price"][0] and s["last_price"] == trades["price"][-1]
    vwap = (trades["price"] * trades["size"]).sum() / trades["size"].sum()
    assert s["vwap"] == pytest.approx(vwap)
    assert s["spread"]["mean"] == pytest.approx((quotes["ask"] - quotes["bid"]).mean())
    rest_gaps = (await rest(stack, key, "/ticks/gaps", symbols="CCC", start=T0, end=END)).json()
    assert (s["gaps"], s["missing"]) == (1, rest_gaps["gaps"][0]["missing"])
    [content] = summary.content
    assert isinstance(content, types.TextContent) and len(content.text.splitlines()) <= 6

    async with httpx.AsyncClient(timeout=WAIT_S, verify=TLS) as http:
        exported = await http.get(export["url"], headers=auth(key))
    assert exported.status_code == 200
    assert exported.headers["content-type"] == export["media_type"]
    assert pl.read_ipc_stream(exported.content).height == export["ticks"] == len(ROWS)

    every = (await rest(stack, key, "/ticks/gaps", symbols=",".join(SYMS), start=T0,
                        end=END)).json()  # fmt: skip
    assert gaps["count"] == every["count"] == 1 and not gaps["truncated"]
    [g], [want] = gaps["gaps"], every["gaps"]
    assert (g["sym"], g["from_seq"], g["to_seq"], g["missing"]) == (
        want["sym"], want["from_seq"], want["to_seq"], want["missing"]
    )  # fmt: skip
    assert (ns(g["after"]), ns(g["before"])) == (want["after_ts"], want["before_ts"])

    by_sym = {row["sym"]: row for row in symbols["symbols"]}
    assert by_sym["AAA"]["stored"] and not by_sym["AAA"]["live"]
    assert by_sym["AAPL"]["live"] and by_sym["AAPL"]["age_s"] is not None
    assert set(status) == {"status", "server_time", "detail"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_admin_key_gets_the_full_service_status(stack: Stack, transport: str) -> None:
    key = new_key(stack, ("admin",))
    async with connect(stack, key, transport) as c:
        status = answer(await c.call_tool("service_status", {}))
    full = (await rest(stack, key, "/status")).json()
    assert {p["id"] for p in status["services"]} == {p["id"] for p in full["services"]}
    assert {"rates", "symbols", "errors"} <= set(status)


# -- entitlements and keys --


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_key_limited_to_aapl_cannot_see_msft_through_any_tool_or_resource(
    stack: Stack, transport: str
) -> None:
    key = new_key(stack, symbols=["AAPL"])
    rng = {"start": T0, "end": END}
    calls = {
        "latest_ticks": {"symbols": ["AAPL", "MSFT"]},
        "bars": {"symbols": ["MSFT"], "interval": "1m", **rng},
        "tick_summary": {"symbol": "MSFT", **rng},
        "history_export": {"symbols": ["MSFT"], **rng},
        "gaps": {"symbols": ["MSFT"], **rng},
    }
    async with connect(stack, key, transport) as c:
        for name, args in calls.items():
            error = answer(await c.call_tool(name, args))
            assert (error["code"], error["symbols"]) == ("not_entitled", ["MSFT"]), name
        listed = answer(await c.call_tool("list_symbols", {}))
        assert [s["sym"] for s in listed["symbols"]] == ["AAPL"]
        resources = (await c.list_resources()).resources
        assert [r.uri for r in resources] == ["tick://AAPL/latest"]
        assert (
            orjson.loads(
                (await c.read_resource("tick://AAPL/latest")).contents[0].text  # type: ignore[union-attr]
            )["sym"]
            == "AAPL"
        )
        with pytest.raises(MCPError) as read:
            await c.read_resource("tick://MSFT/latest")
        assert read.value.error.data["code"] == "not_entitled"
        with pytest.raises(MCPError) as listen:
            async with c.listen(resource_subscriptions=["tick://MSFT/latest"]):
                pass
        assert listen.value.error.data["code"] == "not_entitled"
    async with connect(stack, key, transport, mode="legacy") as c:
        with pytest.raises(MCPError) as sub:
            await c.subscribe_resource("tick://MSFT/latest")
        assert sub.value.error.data["code"] == "not_entitled"
    rest_error = (await rest(stack, key, "/ticks/realtime", symbols="AAPL,MSFT")).json()
    assert rest_error["error"]["code"] == "not_entitled"


async def test_missing_or_wrong_key_is_refused_over_http_with_the_rest_message(
    stack: Stack,
) -> None:
    async with httpx.AsyncClient(timeout=WAIT_S, verify=TLS) as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        for headers in ({}, auth("tp_not-a-key")):
            r = await http.post(f"{stack.base}/mcp", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error["data"]["code"] == "unauthorized"
            assert "Bearer" in error["message"] or "revoked" in error["message"]


async def test_stdio_without_a_valid_key_exits_with_how_to_get_one(stack: Stack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "mcp"],
        env={**stack.env, "TICKPIPE_KEY": "tp_wrong"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,  # the process imports the MCP SDK, Polars and DuckDB first
    )
    assert out.returncode == 2
    assert "TICKPIPE_KEY" in out.stderr and "keys create" in out.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_revoked_key_is_refused_mid_session_and_its_subscription_ends(
    stack: Stack, transport: str
) -> None:
    key = new_key(stack)
    async with connect(stack, key, transport) as c:
        assert not (await c.call_tool("latest_ticks", {"symbols": ["AAPL"]})).is_error
        async with c.listen(resource_subscriptions=["tick://AAPL/latest"]) as sub:
            events = aiter(sub)
            await asyncio.wait_for(anext(events), WAIT_S)  # AAPL trades all the time
            assert stack.cli("keys", "revoke", key_name(stack, key)).returncode == 0

            async def refused() -> bool:
                try:
                    result = await c.call_tool("latest_ticks", {"symbols": ["AAPL"]})
                except MCPError as exc:  # HTTP: the request is refused at the door
                    assert exc.error.data["code"] == "unauthorized"
                    return True
                if result.is_error:  # stdio: a tool error
                    assert answer(result)["code"] == "key_revoked"
                    return True
                return False

            await eventually(refused)

            async def drained() -> None:
                async for _event in sub:
                    pass

            await asyncio.wait_for(drained(), WAIT_S)  # the server ended the stream


# -- subscriptions --


# The 2025 path is deprecated by the 2026-07-28 revision, and still what most agent hosts speak.
@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resource_subscription_2025_updates_match_realtime_and_stop_after_unsubscribe(
    stack: Stack, transport: str
) -> None:
    one, two = (f"Z{transport[:2].upper()}{n}" for n in (1, 2))
    key = new_key(stack)
    updates: asyncio.Queue[str] = asyncio.Queue()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.put_nowait(message.params.uri)

    async with connect(stack, key, transport, mode="legacy", on_message=on_message) as c:
        assert c.protocol_version != "2026-07-28"
        await c.subscribe_resource(f"tick://{one}/latest")
        await c.subscribe_resource(f"tick://{two}/latest")
        await publish(stack, Trade(one, time.time_ns(), 11.25, 7.0, side="buy"))
        uri = await asyncio.wait_for(updates.get(), WAIT_S)
        assert uri == f"tick://{one}/latest"
        read = await c.read_resource(uri)
        entry = orjson.loads(read.contents[0].text)  # type: ignore[union-attr]
        realtime = (await rest(stack, key, "/ticks/realtime", symbols=one)).json()["ticks"][0]
        assert without_age(entry) == without_age(realtime)
        assert entry["trade"]["price"] == 11.25

        await c.unsubscribe_resource(f"tick://{one}/latest")
        await publish(stack, Trade(one, time.time_ns(), 11.5, 1.0))
        await publish(stack, Trade(two, time.time_ns(), 12.0, 1.0))
        # Both ticks reach the hub in this order; had `one` still been subscribed, its update
        # would come first.
        assert await asyncio.wait_for(updates.get(), WAIT_S) == f"tick://{two}/latest"

        # Throttled: a burst of ticks gives at most one update per period.
        began = time.monotonic()
        for i in range(20):
            await publish(stack, Trade(two, time.time_ns(), 12.0 + i / 100, 1.0))
            await asyncio.sleep(0.05)
        await asyncio.sleep(THROTTLE_MS / 1000 * 2)
        await eventually(updates.qsize, what="an update of the burst")  # however late it comes
        seen = updates.qsize()
        elapsed = time.monotonic() - began
        assert 1 <= seen <= elapsed / (THROTTLE_MS / 1000) + 2, (seen, elapsed)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_listen_stream_2026_updates_match_realtime(stack: Stack, transport: str) -> None:
    three, four = (f"Z{transport[:2].upper()}{n}" for n in (3, 4))
    key = new_key(stack)
    async with connect(stack, key, transport) as c:
        assert c.protocol_version == "2026-07-28"
        uris = [f"tick://{three}/latest", f"tick://{four}/latest"]
        async with c.listen(resource_subscriptions=uris) as sub:
            assert sub.honored.resource_subscriptions == uris
            events = aiter(sub)
            await publish(stack, Quote(four, time.time_ns(), 20.0, 5.0, 20.5, 6.0))
            event = await asyncio.wait_for(anext(events), WAIT_S)
            assert event.uri == uris[1]  # type: ignore[union-attr]
            read = await c.read_resource(event.uri)  # type: ignore[union-attr]
            entry = orjson.loads(read.contents[0].text)  # type: ignore[union-attr]
            realtime = (await rest(stack, key, "/ticks/realtime", symbols=four)).json()["ticks"]
            assert without_age(entry) == without_age(realtime[0])
            assert entry["quote"]["bid"] == 20.0
        # Leaving the block is the unsubscribe; the session goes on.
        assert not (await c.call_tool("latest_ticks", {"symbols": [three]})).is_error


# -- bad arguments --


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bad_arguments_get_tool_errors_with_the_rest_codes(
    stack: Stack, transport: str
) -> None:
    key = new_key(stack)
    day = {"start": T0, "end": END}
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("latest_ticks", {"symbols": ["NOPE"]}, "unknown_symbol", "no feed"),
        ("bars", {"symbols": ["NOPE"], "interval": "1m", **day}, "unknown_symbol", "spelling"),
        ("bars", {"symbols": ["AAA"], "interval": "1m", "start": END, "end": T0},
         "bad_parameter", "start must be before end"),
        ("bars", {"symbols": ["AAA"], "interval": "1s", "start": "2020-01-01",
                  "end": "2026-01-01"}, "range_too_large", "interval"),
        ("bars", {"symbols": ["AAA"], "interval": "7m", **day}, "bad_parameter", "interval"),
        ("bars", {"symbols": ["AAA"], "interval": "1m", "start": T0}, "bad_parameter", "end"),
        ("bars", {"symbols": ["AAA"], "interval": "1m", "size": 3, **day},
         "bad_parameter", "unknown argument"),
        ("tick_summary", {"symbol": "A$PL", **day}, "invalid_symbol", "A-Z"),
        ("gaps", {"symbols": ["AAA"], "start": "yesterday", "end": END},
         "bad_parameter", "ISO-8601"),
        ("history_export", {"symbols": ["AAA"], "format": "xlsx", **day},
         "bad_parameter", "format"),
        ("latest_ticks", {"symbols": []}, "bad_parameter", "symbols"),
        ("no_such_tool", {}, "bad_parameter", "list_symbols"),
    ]  # fmt: skip
    async with connect(stack, key, transport) as c:
        for name, args, code, words in cases:
            result = await c.call_tool(name, args)
            assert result.is_error, (name, args)
            error = answer(result)
            assert error["code"] == code, (name, args, error)
            assert words in error["message"], (name, args, error)
        with pytest.raises(MCPError) as bad_uri:
            await c.read_resource("tick://AAPL/oldest")
        assert bad_uri.value.error.data["code"] == "bad_parameter"
        # Nothing crashed: the session still answers.
        assert not (await c.call_tool("latest_ticks", {"symbols": ["AAPL"]})).is_error
    for params, code in [
        ({"symbols": "AAA", "start": END, "end": T0}, "bad_parameter"),
        ({"symbols": "AAA", "start": T0, "end": END, "interval": "7m"}, "bad_parameter"),
        ({"symbols": "NOPE", "start": T0, "end": END}, "unknown_symbol"),
    ]:
        r = await rest(stack, key, "/ticks/historical", **params)
        assert r.json()["error"]["code"] == code


# -- query history --


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_calls_appear_in_the_query_history_with_the_tool_name(
    stack: Stack, transport: str
) -> None:
    key = new_key(stack)
    admin = new_key(stack, ("admin",))
    name = key_name(stack, key)
    async with connect(stack, key, transport) as c:
        await c.call_tool("latest_ticks", {"symbols": ["AAPL"]})
        await c.call_tool("bars", {"symbols": ["AAA"], "start": T0, "end": END, "interval": "5m"})
        await c.call_tool("bars", {"symbols": ["AAA"], "start": END, "end": T0, "interval": "1m"})
        await c.read_resource("tick://AAPL/latest")

    async def recorded() -> bool:
        r = await rest(stack, admin, "/queries", key=name)
        return len(r.json()["queries"]) >= 4

    await eventually(recorded)
    queries = (await rest(stack, admin, "/queries", key=name)).json()["queries"][::-1]
    assert [(q["endpoint"], q["status"]) for q in queries] == [
        ("mcp:latest_ticks", "ok"),
        ("mcp:bars", "ok"),
        ("mcp:bars", "bad_parameter"),
        ("mcp:resources/read", "ok"),
    ]
    assert orjson.loads(queries[1]["params"])["interval"] == "5m"
    assert queries[0]["rows"] == 1 and queries[1]["bytes"] > 0


async def test_stdio_told_to_stop_right_after_a_call_keeps_the_call_in_the_query_history(
    stack: Stack,
) -> None:
    """A host ends a stdio session by closing stdin and sends SIGTERM when the process is not
    gone 2 s later (the SDK's client; a busy machine gets there): the call just answered is in
    /queries all the same, and the process exits cleanly."""
    key = new_key(stack)
    admin = new_key(stack, ("admin",))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "mcp"],
        env={**stack.env, "TICKPIPE_KEY": key},
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(message: dict[str, Any]) -> dict[str, Any] | None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(orjson.dumps({"jsonrpc": "2.0", **message}) + b"\n")
        proc.stdin.flush()
        return orjson.loads(proc.stdout.readline()) if "id" in message else None

    try:
        hello = {"name": "t", "version": "1"}
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": hello}
        assert "result" in await asyncio.to_thread(
            ask, {"id": 1, "method": "initialize", "params": init}
        )
        await asyncio.to_thread(ask, {"method": "notifications/initialized"})
        call = {"name": "latest_ticks", "arguments": {"symbols": ["AAPL"]}}
        reply = await asyncio.to_thread(ask, {"id": 2, "method": "tools/call", "params": call})
        assert reply is not None and reply["result"]["isError"] is False
        proc.send_signal(signal.SIGTERM)  # at once: stdin still open
        assert await asyncio.to_thread(proc.wait, WAIT_S) == 0
    finally:
        proc.kill()
        proc.wait()
    r = await rest(stack, admin, "/queries", key=key_name(stack, key))
    assert [q["endpoint"] for q in r.json()["queries"]] == ["mcp:latest_ticks"]


# -- the example agent --


def test_example_agent_fetches_bars_and_acts_on_live_updates(stack: Stack) -> None:
    out = subprocess.run(
        [sys.executable, "examples/mcp_agent.py", "--url", stack.base, "--key",
         new_key(stack), "--symbol", "AAPL", "--minutes", "1", "--updates", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,  # imports, a minute of bars and 3 live updates, on a busy machine
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("AAPL ") and "trades" in lines[0]
    assert any(line.startswith("bars: ") for line in lines)
    decisions = [line for line in lines if line.split()[:1] in (["BUY"], ["SELL"], ["HOLD"])]
    assert len(decisions) == 3
    assert lines[-1] == "done: 3 updates of AAPL"
