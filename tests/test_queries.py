"""Query history: every REST query and WebSocket subscribe/unsubscribe, recorded per key."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import polars as pl

from server.history.store import write_file
from server.ticks import STORED_SCHEMA
from tests.harness import Stack, eventually, next_event, send


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def history(stack: Stack, admin: str, **params: Any) -> list[dict]:
    """``GET /queries`` as the admin key ``admin``."""
    async with stack.http() as http:
        r = await http.get("/queries", params=params, headers=auth(admin))
    assert r.status_code == 200, r.text
    return r.json()["queries"]


async def wait_for(stack: Stack, admin: str, name: str, n: int) -> list[dict]:
    """The history of key ``name`` once it holds ``n`` records."""
    got: list[dict] = await eventually(
        lambda: history(stack, admin, key=name), lambda got: len(got) >= n, what=f"{n} records"
    )
    return got


def stored_rows(stack: Stack) -> list[tuple]:
    """Every row of the query history's SQLite file (none while it is not there yet)."""
    try:
        db = sqlite3.connect(f"file:{stack.data_dir / 'queries.sqlite3'}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        return db.execute("SELECT * FROM queries").fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()


async def flushed(stack: Stack, name: str, n: int) -> list[tuple]:
    """The rows in SQLite once ``n`` of key ``name`` are there: the web process flushes about
    twice a second, later on a busy machine (a fixed 1.2 s failed under load)."""
    rows: list[tuple] = await eventually(
        lambda: stored_rows(stack),
        lambda rows: sum(any(name == str(v) for v in r) for r in rows) >= n,
        every=0.2,
        what=f"{n} queries of {name} in SQLite",
    )
    return rows


async def test_rest_query_is_recorded_with_key_params_status_and_duration(stack: Stack) -> None:
    admin = stack.key("q-admin-1", ["admin"])
    key = stack.key("q-rest")
    async with stack.http() as http:
        r = await http.get("/ticks/realtime?symbols=AAPL,MSFT", headers=auth(key))
    assert r.status_code == 200
    [q] = await wait_for(stack, admin, "q-rest", 1)
    assert q["key"] == "q-rest"
    assert q["endpoint"] == "/ticks/realtime"
    assert q["params"] == "symbols=AAPL,MSFT"
    assert q["status"] == "200"
    assert q["bytes"] == len(r.content)
    assert q["duration_ms"] > 0
    assert abs(q["ts"] - time.time_ns()) < 10e9


async def test_ws_subscribe_and_unsubscribe_are_recorded_with_accepted_symbols(
    stack: Stack,
) -> None:
    admin = stack.key("q-admin-2", ["admin"])
    key = stack.key("q-ws")
    ws, _ = await stack.client(key)
    async with ws:
        await send(ws, op="subscribe", id=1, symbols=["AAPL", "MSFT", "NOPE"], types=["trade"])
        await next_event(ws, "subscribed", id=1)
        await send(ws, op="unsubscribe", id=2, symbols=["MSFT"])
        await next_event(ws, "unsubscribed", id=2)
    unsub, sub = await wait_for(stack, admin, "q-ws", 2)
    assert sub["endpoint"] == "ws:subscribe" and unsub["endpoint"] == "ws:unsubscribe"
    assert sub["status"] == "ok" and sub["rows"] == 2
    assert '"symbols":["AAPL","MSFT","NOPE"]' in sub["params"]
    assert '"types":["trade"]' in sub["params"]
    assert unsub["rows"] == 1 and unsub["params"] == '{"id":2,"symbols":["MSFT"]}'
    assert sub["duration_ms"] > 0 and sub["key"] == unsub["key"] == "q-ws"


async def test_errors_are_recorded_with_their_status(stack: Stack) -> None:
    admin = stack.key("q-admin-3", ["admin"])
    key = stack.key("q-err")
    async with stack.http() as http:
        r = await http.get("/ticks/realtime?symbols=", headers=auth(key))
    assert r.status_code == 422
    [q] = await wait_for(stack, admin, "q-err", 1)
    assert q["status"] == "422" and q["endpoint"] == "/ticks/realtime"
    assert q["bytes"] == len(r.content)


async def test_key_secret_never_stored(stack: Stack) -> None:
    admin = stack.key("q-admin-4", ["admin"])
    key = stack.key("q-secret")
    async with stack.http() as http:
        await http.get("/ticks/realtime?symbols=AAPL", headers=auth(key))
    ws, _ = await stack.client(key)
    async with ws:
        await send(ws, op="subscribe", id=1, symbols=["AAPL"])
        await next_event(ws, "subscribed", id=1)
    assert len(await wait_for(stack, admin, "q-secret", 2)) == 2
    rows = await flushed(stack, "q-secret", 2)  # everything is in SQLite now
    assert any("q-secret" in map(str, r) for r in rows)
    for secret in (key, admin, key[10:]):
        assert not any(secret in str(v) for r in rows for v in r)


async def test_streamed_rows_are_counted_for_ndjson_and_csv(tmp_path: Any) -> None:
    s = Stack(tmp_path, feed=False)
    t0 = 1_767_364_200 * 10**9  # 2026-01-02T14:30:00Z
    ticks = []
    for i in range(3):
        row: dict[str, object] = dict.fromkeys(STORED_SCHEMA)
        row.update(sym="XYZ", type="trade", ts=t0 + i, epoch=1, seq=i + 1, price=1.0, size=1.0)
        ticks.append(row)
    frame = pl.DataFrame(ticks, schema={**STORED_SCHEMA, "ts": pl.Int64()}, orient="row")
    write_file(
        s.data_dir / "history",
        frame.with_columns(pl.col("ts").cast(STORED_SCHEMA["ts"])),
        "1-0",
        "1-2",
    )
    s.start()
    try:
        admin = s.key("q-admin", ["admin"])
        key = s.key("q-stream", ["historical"])
        async with s.http() as http:
            for fmt in ("ndjson", "csv"):
                r = await http.get(
                    "/ticks/historical",
                    params={"symbols": "XYZ", "start": t0, "end": t0 + 10, "format": fmt},
                    headers=auth(key),
                )
                assert r.status_code == 200, r.text
        csv, ndjson = await wait_for(s, admin, "q-stream", 2)
    finally:
        s.stop()
    assert "format=ndjson" in ndjson["params"] and ndjson["rows"] == 3
    assert "format=csv" in csv["params"] and csv["rows"] == 3
    assert ndjson["endpoint"] == csv["endpoint"] == "/ticks/historical"


async def test_non_admin_key_is_403_on_queries(stack: Stack) -> None:
    key = stack.key("q-nonadmin", ["realtime", "historical"])
    async with stack.http() as http:
        r = await http.get("/queries", headers=auth(key))
        anon = await http.get("/queries")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert anon.status_code == 401


async def test_a_limit_that_is_not_an_ascii_integer_is_a_422_not_a_500(stack: Stack) -> None:
    admin = stack.key("q-admin-limit", ["admin"])
    odd = ["\u00b2", "\uff11\uff12", "\u0661", "1" * 5000, " 12", "1_0", "0", "10001", ""]
    async with stack.http() as http:
        answers = [
            await http.get("/queries", params={"limit": v}, headers=auth(admin)) for v in odd
        ]
    for value, r in zip(odd, answers, strict=True):
        assert r.status_code == 422, (value[:8], r.status_code, r.text[:100])
        assert "limit=" in r.json()["error"]["message"], r.text


async def test_cli_lists_queries_newest_first(stack: Stack) -> None:
    admin = stack.key("q-admin-5", ["admin"])
    key = stack.key("q-cli")
    async with stack.http() as http:
        await http.get("/ticks/realtime?symbols=AAPL", headers=auth(key))
        await http.get("/ticks/realtime?symbols=NVDA", headers=auth(key))
    assert len(await wait_for(stack, admin, "q-cli", 2)) == 2
    await flushed(stack, "q-cli", 2)  # the CLI reads SQLite
    out = stack.cli("queries", "--key", "q-cli", "--limit", "5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "(UTC)", "KEY"]
    assert len(lines) == 3
    assert "symbols=NVDA" in lines[1] and "symbols=AAPL" in lines[2]
    assert all("q-cli" in line and "/ticks/realtime" in line for line in lines[1:])


async def test_queries_answer_when_history_storage_is_unavailable(tmp_path: Any) -> None:
    s = Stack(tmp_path)
    (s.data_dir / "queries.sqlite3").mkdir(parents=True)  # SQLite cannot open a directory
    s.start()
    try:
        admin = s.key("q-admin", ["admin"])
        key = s.key("q-down")
        async with s.http() as http:
            for _ in range(3):
                r = await http.get("/ticks/realtime?symbols=AAPL", headers=auth(key))
                assert r.status_code == 200, r.text
            await eventually(  # a failed flush (twice a second; later on a busy machine)
                s.web.output, lambda out: "query history not stored" in out, what="a flush"
            )
            await asyncio.sleep(1.2)  # and more of them
            r = await http.get("/ticks/realtime?symbols=AAPL", headers=auth(key))
            assert r.status_code == 200
        kept = await history(s, admin, key="q-down")  # still in memory
        assert len(kept) == 4 and all(q["status"] == "200" for q in kept)
    finally:
        s.stop()
    assert "query history not stored" in s.web.output()
