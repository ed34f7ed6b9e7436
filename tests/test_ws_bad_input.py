"""Bad client input: each gets a clear error and the connection (and server) keep working."""

from __future__ import annotations

import asyncio

import orjson

from server.wire import CloseCode
from tests.harness import Stack, close_code, next_event, send


async def assert_still_works(ws) -> None:
    await send(ws, op="ping", id="alive")
    assert (await next_event(ws, "pong"))["id"] == "alive"


async def test_malformed_json_gets_bad_json_error(stack: Stack) -> None:
    ws, _ = await stack.client(stack.key("bad-json"))
    await ws.send('{"op": "subscribe", "symbols": [AAPL')
    err = await next_event(ws, "error")
    assert err["code"] == "bad_json" and err["fatal"] is False
    assert "JSON" in err["message"]
    await assert_still_works(ws)
    await ws.close()


async def test_json_that_is_not_an_object_gets_bad_request(stack: Stack) -> None:
    ws, _ = await stack.client(stack.key("not-obj"))
    await ws.send("[1, 2, 3]")
    err = await next_event(ws, "error")
    assert err["code"] == "bad_request"
    await assert_still_works(ws)
    await ws.close()


async def test_unknown_op_lists_supported_ops(stack: Stack) -> None:
    ws, _ = await stack.client(stack.key("unknown-op"))
    await send(ws, op="subscribe_all_the_things", id=5)
    err = await next_event(ws, "error")
    assert err["code"] == "unknown_op" and err["id"] == 5
    assert "subscribe" in err["message"] and "ping" in err["message"]
    await assert_still_works(ws)
    await ws.close()


async def test_invalid_fields_get_bad_request_naming_the_field(stack: Stack) -> None:
    ws, _ = await stack.client(stack.key("bad-fields"))
    await send(ws, op="subscribe", id=1, symbols="AAPL")
    err = await next_event(ws, "error")
    assert err["code"] == "bad_request" and "symbols" in err["message"] and err["id"] == 1
    await send(ws, op="subscribe", id=2, symbols=["AAPL"], types=["trades"])
    err = await next_event(ws, "error")
    assert err["code"] == "bad_request" and "types" in err["message"]
    await send(ws, op="subscribe", id=3, symbols=["AAPL"], snapshot="yes")
    err = await next_event(ws, "error")
    assert err["code"] == "bad_request" and "snapshot" in err["message"]
    await send(ws, op="subscribe", id=4, symbols=["AAPL"], colour="blue")
    err = await next_event(ws, "error")
    assert err["code"] == "bad_request" and "colour" in err["message"]
    await assert_still_works(ws)
    await ws.close()


async def test_subscribe_with_10000_symbols_is_refused_whole(stack: Stack) -> None:
    ws, welcome = await stack.client(stack.key("ten-k"))
    # 10,000 symbols do not even fit in one message (max_inbound_bytes)...
    await send(ws, op="subscribe", id="big", symbols=[f"SYM{i}" for i in range(10_000)])
    err = await next_event(ws, "error")
    assert err["code"] == "message_too_large"
    # ... and a request over max_symbols that does fit is refused as a whole, by count.
    limit = welcome["limits"]["max_symbols"]
    await send(ws, op="subscribe", id="many", symbols=[f"S{i}" for i in range(limit + 1)])
    err = await next_event(ws, "error")
    assert err["code"] == "too_many_symbols" and err["id"] == "many"
    assert str(limit) in err["message"]
    await send(ws, op="subscribe", id="small", symbols=["AAPL"])
    sub = await next_event(ws, "subscribed")
    assert sub["symbols"] == ["AAPL"]
    await ws.close()


async def test_binary_frame_gets_bad_request(stack: Stack) -> None:
    ws, _ = await stack.client(stack.key("binary"))
    await ws.send(orjson.dumps({"op": "ping"}))  # bytes -> binary frame
    err = await next_event(ws, "error")
    assert err["code"] == "bad_request" and "text" in err["message"]
    await assert_still_works(ws)
    await ws.close()


async def test_10mb_frame_gets_message_too_large_and_connection_survives(stack: Stack) -> None:
    ws, welcome = await stack.client(stack.key("huge"), max_size=None)
    await ws.send('{"op":"ping","pad":"' + "x" * (10 * 1024 * 1024) + '"}')
    err = await next_event(ws, "error")
    assert err["code"] == "message_too_large"
    assert str(welcome["limits"]["max_inbound_bytes"]) in err["message"]
    await assert_still_works(ws)
    await ws.close()


async def test_flooding_messages_get_rate_limited_then_disconnected_4029(stack: Stack) -> None:
    ws, _ = await stack.client(stack.key("flood"))
    ping = orjson.dumps({"op": "ping"}).decode()
    for _ in range(60):
        await ws.send(ping)
    err = await next_event(ws, "error", code="rate_limited")
    assert err["fatal"] is False
    for _ in range(500):
        try:
            await ws.send(ping)
        except Exception:
            break
    code, events = await close_code(ws)
    assert code == CloseCode.RATE_LIMITED == 4029
    assert any(e.get("code") == "rate_limited" and e.get("fatal") for e in events)
    assert ws.close_reason.startswith("rate_limited: far over")


async def test_bad_input_on_one_connection_leaves_others_streaming(stack: Stack) -> None:
    good, _ = await stack.client(stack.key("bystander"))
    await send(good, op="subscribe", symbols=["MSFT"])
    await next_event(good, "subscribed")
    bad, _ = await stack.client(stack.key("vandal"))
    for junk in ("{", "null", '{"op":1}', "\x00\x01", '{"op":"auth"}'):
        await bad.send(junk)
    await asyncio.sleep(0.2)
    await next_event(good, "quote")
    await next_event(good, "trade")
    await bad.close()
    await good.close()


async def test_a_stream_of_garbage_is_closed_as_bad_request_4000(stack: Stack) -> None:
    ws, _ = await stack.client(stack.key("garbage"))
    for i in range(19):  # below the limit: each gets its own non-fatal error
        await ws.send("not json" if i % 2 else '{"op": "nope"}')
    await send(ws, op="ping", id="still-ok")  # a valid message resets the count
    assert (await next_event(ws, "pong"))["id"] == "still-ok"
    for _ in range(20):
        await ws.send("not json")
    code, events = await close_code(ws)
    assert code == CloseCode.BAD_REQUEST == 4000
    assert events[-1]["code"] == "bad_request" and events[-1]["fatal"] is True
    assert ws.close_reason.startswith("bad_request: 20 unusable messages in a row")
