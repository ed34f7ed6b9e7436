"""A key never outlives the request that carried it: whatever a client does with it, it is in no
log, no Redis key or value and no file of the data dir; key and query files are 0600."""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import websockets

from server.privacy import SQLITE_SIDE_FILES, redact
from tests.harness import Proc, Stack, close_code, next_event, send


def test_redact_masks_keys_and_secret_named_values_only() -> None:
    key = "tp_" + "Ab3_-x" * 7 + "Q"
    assert redact(f"symbols=AAPL&key={key}&format=csv") == "symbols=AAPL&key=[redacted]&format=csv"
    assert redact(f"/ticks/{key}") == "/ticks/[redacted]"
    assert redact(f"/ws?token=x&q=tp%5F{key[3:]}") == "/ws?token=[redacted]&q=[redacted]"
    assert redact(f'{{"symbols":["{key.upper()}"],"api_key":"s"}}') == (
        '{"symbols":["[redacted]"],"api_key":"[redacted]"}'
    )
    plain = "symbols=AAPL,TP_X&start=2026-01-02T14:30:00Z&fields=ts,seq&interval=1m"
    assert redact(plain) == plain


@dataclass
class Leak:
    stack: Stack
    secret: str
    redis: bytes  # every key name and value Redis held before the stack stopped
    modes: dict[str, int]  # key and query files (and their SQLite side files) while running


@pytest.fixture(scope="module")
def leaked(tmp_path_factory: pytest.TempPathFactory) -> Leak:
    """A stack (access log on) after a client tried its key in every place but the right one;
    stopped, so that every log and file is complete."""
    s = Stack(tmp_path_factory.mktemp("leak"), recorder=True, recorder_flush_s=0.2)
    s.web = Proc(["web", "--access-log"], s.env, s.workdir / "web.log")
    s.start()
    try:
        secret = s.key("leaky", ("realtime", "historical", "replay"))
        asyncio.run(_misuse(s, secret))
        time.sleep(1)  # the query history flushes every 0.5 s
        dump, modes = _redis_text(s), _modes(s.data_dir)
    finally:
        s.stop()
    return Leak(s, secret, dump, modes)


def _modes(data_dir: Path) -> dict[str, int]:
    found = {}
    for name in ("keys.sqlite3", "queries.sqlite3"):
        for suffix in ("", *SQLITE_SIDE_FILES):
            path = data_dir / (name + suffix)
            with contextlib.suppress(FileNotFoundError):
                found[path.name] = stat.S_IMODE(path.stat().st_mode)
    return found


async def _misuse(s: Stack, secret: str) -> None:
    good = {"Authorization": f"Bearer {secret}"}
    encoded = "tp%5F" + secret[3:]
    async with s.http() as http:
        for path, headers in [
            (f"/ticks/realtime?symbols=AAPL&key={secret}", {}),
            (f"/ticks/realtime?symbols=AAPL&access_token={encoded}", {}),
            (f"/ticks/historical?symbols=AAPL&start=0&end=1&api_key={secret}", {}),
            (f"/ticks/realtime?symbols={secret}", good),
            (f"/ticks/historical?symbols=AAPL&start={secret}&end=1", good),
            (f"/ticks/{secret}", good),
            (f"/{secret}", {}),
            (f"/queries?key={secret}", {}),
            ("/ticks/realtime?symbols=AAPL", {"X-Api-Key": secret, "Cookie": f"key={secret}"}),
            ("/ticks/realtime?symbols=AAPL", {"Authorization": f"Basic {secret}"}),
            ("/ticks/realtime?symbols=AAPL", {"Authorization": f"Bearer {secret}x"}),
        ]:
            r = await http.get(path, headers=headers)
            assert r.status_code < 500, (path, r.text)
    # WebSocket: the key in the URL only (the server waits for an auth message, then closes).
    ws = await websockets.connect(f"{s.ws_url}?key={secret}", additional_headers={"X-Key": secret})
    assert (await close_code(ws))[0] == 4002
    # A first auth message with a wrong key that contains the right one.
    ws = await websockets.connect(f"{s.ws_url}?token={encoded}")
    await send(ws, op="auth", key=f"{secret}-and-more")
    assert (await close_code(ws))[0] == 4001
    # Authenticated, then the key in every field a message has.
    ws = await websockets.connect(f"{s.ws_url}?api_key={secret}", additional_headers=good)
    await next_event(ws, "welcome")
    await send(ws, op="subscribe", id="k1", symbols=[secret, "AAPL"])
    await next_event(ws, "subscribed", id="k1")
    await send(ws, op="subscribe", id="k2", symbols=["MSFT"], key=secret)
    await next_event(ws, "error", id="k2")
    await send(ws, op="unsubscribe", id="k3", symbols=[secret])
    await send(ws, op="ping", id=secret)
    await send(ws, op="auth", key=secret)
    await send(ws, op=secret)
    await send(ws, op="replay", id="r1", symbols=[secret], start=0, end=1)
    await ws.send(f'{{"op": "subscribe", "symbols": ["{secret}"]')  # not JSON
    await asyncio.sleep(0.5)
    await ws.close()


def _redis_text(s: Stack) -> bytes:
    """Every key name and value in Redis, read by type."""
    r = redis.Redis.from_url(s.redis.url)
    out: list[bytes] = []
    try:
        for name in r.scan_iter(count=1000):
            out.append(name)
            kind = r.type(name).decode()
            if kind == "string":
                out.append(r.get(name) or b"")
            elif kind == "hash":
                out.extend(b"%s=%s" % kv for kv in r.hgetall(name).items())
            elif kind == "list":
                out.extend(r.lrange(name, 0, -1))
            elif kind == "set":
                out.extend(r.smembers(name))
            elif kind == "zset":
                out.extend(m for m, _ in r.zrange(name, 0, -1, withscores=True))
            elif kind == "stream":
                for entry_id, fields in r.xrange(name):
                    out.append(entry_id)
                    out.extend(b"%s=%s" % kv for kv in fields.items())
            else:
                raise AssertionError(f"Redis key {name!r} of unexpected type {kind}")
    finally:
        r.close()
    return b"\n".join(out)


def _found(secret: str, data: bytes) -> bool:
    """The part of the key that is never shown (past its 10-character prefix), in any case."""
    return secret[10:].lower().encode() in data.lower()


def test_a_key_sent_anywhere_but_the_header_is_in_no_log(leaked: Leak) -> None:
    s, secret = leaked.stack, leaked.secret
    web = s.web.output()
    assert '"GET /ticks/realtime?symbols=AAPL&key=[redacted] HTTP/1.1" 401' in web, web[-3000:]
    assert '"WebSocket /ws?api_key=[redacted]" [accepted]' in web, web[-3000:]
    for proc in (s.web, s.feed, s.recorder):
        assert proc is not None and proc.log.exists()
        assert not _found(secret, proc.log.read_bytes()), (proc.log.name, proc.output()[-3000:])
    assert not _found(secret, (s.redis.dir / "log").read_bytes())


def test_a_key_sent_anywhere_but_the_header_is_in_no_redis_key_or_value(leaked: Leak) -> None:
    assert b"tp:sym:AAPL" in leaked.redis, "Redis was read"
    assert not _found(leaked.secret, leaked.redis)


def test_a_key_sent_anywhere_but_the_header_is_in_no_file_of_the_data_dir(leaked: Leak) -> None:
    s, secret = leaked.stack, leaked.secret
    files = [p for p in s.data_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("queries.sqlite3") for p in files)
    for path in files:
        assert not _found(secret, path.read_bytes()), path
    stored = _stored_queries(s.data_dir / "queries.sqlite3")
    assert any("key=[redacted]" in params for params in stored), stored
    assert any('"[redacted]"' in params for params in stored), stored


def _stored_queries(path: Path) -> list[str]:
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [endpoint + " " + params for endpoint, params in db.execute(
            "SELECT endpoint, params FROM queries")]  # fmt: skip
    finally:
        db.close()


def test_key_and_query_files_are_readable_by_their_owner_only(leaked: Leak) -> None:
    modes = leaked.modes
    assert {"keys.sqlite3", "queries.sqlite3", "queries.sqlite3-wal"} <= set(modes), modes
    assert all(mode == 0o600 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}


def test_a_key_file_made_by_an_older_version_is_made_private(tmp_path: Path) -> None:
    from server.auth import KeyStore

    path = tmp_path / "keys.sqlite3"
    KeyStore(path).close()
    for file in (path, path.with_name(path.name + "-wal")):
        if file.exists():
            file.chmod(0o644)
    KeyStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
