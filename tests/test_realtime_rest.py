"""``GET /ticks/realtime``: the latest trade and quote per symbol, and its JSON errors."""

from __future__ import annotations

import time

from tests.harness import Stack, eventually


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_latest_trade_and_quote_per_symbol_with_seq_and_age(stack: Stack) -> None:
    key = stack.key("rest-ok")
    async with stack.http() as http:
        # A stack just started may have published one of the two kinds only (null until then).
        r = await eventually(
            lambda: http.get("/ticks/realtime?symbols=aapl,MSFT", headers=auth(key)),
            lambda r: (
                r.status_code != 200 or all(t["trade"] and t["quote"] for t in r.json()["ticks"])
            ),
            what="a trade and a quote of AAPL and MSFT",
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(body["server_time"] - time.time_ns()) < 5e9
    assert [t["sym"] for t in body["ticks"]] == ["AAPL", "MSFT"]
    for t in body["ticks"]:
        assert isinstance(t["epoch"], int) and t["seq"] > 0
        trade, quote = t["trade"], t["quote"]
        assert trade["type"] == "trade" and quote["type"] == "quote"
        assert max(trade["seq"], quote["seq"]) == t["seq"]
        assert trade["price"] > 0 and quote["bid"] > 0
        assert 0 <= trade["age_ms"] < 10_000 and 0 <= quote["age_ms"] < 10_000


async def test_missing_key_is_401_with_how_to_fix(stack: Stack) -> None:
    async with stack.http() as http:
        r = await http.get("/ticks/realtime?symbols=AAPL")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert err["code"] == "unauthorized" and "Authorization: Bearer" in err["message"]


async def test_wrong_and_revoked_keys_are_401(stack: Stack) -> None:
    key = stack.key("rest-revoked")
    stack.keys.revoke("rest-revoked")
    async with stack.http() as http:
        for k in ("tp_nope", key, "not-even-a-key"):
            r = await http.get("/ticks/realtime?symbols=AAPL", headers=auth(k))
            assert r.status_code == 401, k
        r = await http.get("/ticks/realtime?symbols=AAPL", headers={"Authorization": "Basic x"})
        assert r.status_code == 401


async def test_key_without_realtime_scope_is_403(stack: Stack) -> None:
    key = stack.key("rest-hist", ["historical"])
    async with stack.http() as http:
        r = await http.get("/ticks/realtime?symbols=AAPL", headers=auth(key))
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert "realtime" in r.json()["error"]["message"]


async def test_symbol_outside_entitlement_is_403(stack: Stack) -> None:
    key = stack.key("rest-entitled", ["realtime"], ["AAPL"])
    async with stack.http() as http:
        r = await http.get("/ticks/realtime?symbols=AAPL,MSFT", headers=auth(key))
    assert r.status_code == 403
    assert r.json()["error"] == {
        "code": "not_entitled",
        "message": "key 'rest-entitled' may not see these symbols",
        "symbols": ["MSFT"],
    }


async def test_unknown_symbol_is_404(stack: Stack) -> None:
    key = stack.key("rest-404")
    async with stack.http() as http:
        r = await http.get("/ticks/realtime?symbols=AAPL,NOPE", headers=auth(key))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_symbol"
    assert r.json()["error"]["symbols"] == ["NOPE"]


async def test_bad_parameters_are_422(stack: Stack) -> None:
    key = stack.key("rest-422")
    async with stack.http() as http:
        for query, code in (
            ("", "bad_parameter"),
            ("?symbols=", "bad_parameter"),
            ("?symbols=,%20,", "bad_parameter"),
            ("?symbols=AAPL;DROP%20TABLE", "invalid_symbol"),
            ("?symbols=%24(rm%20-rf)", "invalid_symbol"),
            ("?symbols=" + ",".join(f"S{i}" for i in range(201)), "too_many_symbols"),
        ):
            r = await http.get("/ticks/realtime" + query, headers=auth(key))
            assert r.status_code == 422, (query, r.text)
            assert r.json()["error"]["code"] == code


async def test_healthz_needs_no_key(stack: Stack) -> None:
    async with stack.http() as http:
        r = await http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "redis": "up",
        "replays": {"active": 0, "open_readers": 0, "rows_held": 0},
    }


async def test_repeat_requests_are_answered_from_memory_and_follow_live_ticks(own_stack) -> None:
    import asyncio

    import redis.asyncio as aredis

    s: Stack = own_stack(feed_rate=1000)
    key = s.key("rest-cache")
    await asyncio.sleep(0.5)  # let AAPL trade at least once
    r = aredis.Redis.from_url(s.redis.url)
    async with s.http() as http:
        assert b"tp:tick:AAPL" not in await r.pubsub_channels("tp:tick:*")
        seqs = []
        for _ in range(4):
            resp = await http.get("/ticks/realtime?symbols=AAPL", headers=auth(key))
            assert resp.status_code == 200
            tick = resp.json()["ticks"][0]
            assert max(tick["trade"]["seq"], tick["quote"]["seq"]) == tick["seq"]
            seqs.append(tick["seq"])
            redis_seq = int(await r.hget("tp:sym:AAPL", "seq"))
            assert tick["seq"] <= redis_seq
            await asyncio.sleep(0.3)
        # After the first request the web process listens to AAPL itself ...
        assert b"tp:tick:AAPL" in await r.pubsub_channels("tp:tick:*")
    await r.aclose()
    # ... and its answers keep moving with the feed.
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0]
