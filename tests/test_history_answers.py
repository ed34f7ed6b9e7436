"""``/ticks/historical`` answers exactly what it answered before the merge of sorted files: a
server with ``history_merge`` (the default) and one answering everything in SQL
(``history_merge=false``, the code before) give the same bytes for NDJSON, CSV and JSON pages,
the same frames for Arrow (with and without its options) and Parquet, the same gap counts and
fingerprints, and replays with the same events; the Arrow options are checked at the edge."""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import Iterator

import httpx
import orjson
import polars as pl
import pytest
import websockets

from tests.harness import TLS, Stack
from tests.test_history_merge import DAY, SYMS, T0, build_store
from tickpipe import SyncClient

RANGES = [
    (T0 - DAY, T0 + 6 * DAY),
    (T0 + DAY // 3, T0 + 2 * DAY + DAY // 5),
    (T0 + 3 * DAY - 3600 * 10**9, T0 + 3 * DAY + 900 * 10**9),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Stack]]:
    """Two web processes over copies of one store: the merge, and SQL only; each with a key."""
    base = tmp_path_factory.mktemp("answers")
    merged = Stack(base / "merge", feed=False)
    sql = Stack(base / "sql", feed=False, history_merge="false")
    build_store(merged.data_dir / "history")
    shutil.copytree(merged.data_dir / "history", sql.data_dir / "history")
    merged.start()
    sql.start()
    try:
        for s in (merged, sql):
            s.secret = s.key("answers", ["historical", "replay"])  # type: ignore[attr-defined]
        yield merged, sql
    finally:
        merged.stop()
        sql.stop()


def _get(stack: Stack, **params: object) -> httpx.Response:
    r = httpx.get(
        f"{stack.base}/ticks/historical",
        params=params,
        headers={"Authorization": f"Bearer {stack.secret}"},  # type: ignore[attr-defined]
        timeout=60,
        verify=TLS,
    )
    assert r.status_code == 200, r.text
    return r


def _both(servers: tuple[Stack, Stack], **params: object) -> tuple[httpx.Response, ...]:
    return tuple(_get(s, **params) for s in servers)


def _arrow(r: httpx.Response) -> pl.DataFrame:
    return pl.read_ipc_stream(io.BytesIO(r.content))


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
@pytest.mark.parametrize("rng", RANGES)
def test_streamed_text_formats_are_byte_identical(servers, fmt: str, rng) -> None:
    for syms in (SYMS, ["BBB"], ["AAA", "CCC"]):
        for types in ("trade,quote", "trade"):
            a, b = _both(
                servers, symbols=",".join(syms), start=rng[0], end=rng[1], types=types, format=fmt
            )
            assert a.content == b.content
            assert a.headers["x-tickpipe-gaps"] == b.headers["x-tickpipe-gaps"]
    assert a.content.count(b"\n") > 10


def test_json_pages_are_byte_identical_page_after_page(servers) -> None:
    params = {"symbols": ",".join(SYMS), "start": T0 - DAY, "end": T0 + 6 * DAY, "limit": 333}
    pages = 0
    cursor: dict[str, str] = {}
    while True:
        a, b = _both(servers, **params, **cursor)
        assert a.content == b.content
        pages += 1
        nxt = a.json()["next_cursor"]
        if nxt is None:
            break
        cursor = {"cursor": nxt}
    assert pages > 3


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dictionary": "true"},
        {"compression": "lz4"},
        {"dictionary": "1", "compression": "zstd"},
    ],
)
def test_arrow_frames_are_identical_with_every_option(servers, options) -> None:
    for rng in RANGES:
        common = {"symbols": ",".join(SYMS), "start": rng[0], "end": rng[1], "format": "arrow"}
        a, b = _both(servers, **common, **options)
        plain = _arrow(_get(servers[1], **common))  # SQL, no options: the answer before
        got = [_arrow(r).with_columns(pl.col(pl.Enum).cast(pl.String)) for r in (a, b)]
        assert got[0].equals(got[1])
        assert got[0].equals(plain)
        if options.get("dictionary"):
            assert _arrow(a).schema["sym"] == pl.Enum(SYMS)


def test_parquet_and_fingerprints_are_identical(servers) -> None:
    for rng in RANGES:
        common = {"symbols": ",".join(SYMS), "start": rng[0], "end": rng[1]}
        a, b = _both(servers, **common, format="parquet")
        assert pl.read_parquet(io.BytesIO(a.content)).equals(pl.read_parquet(io.BytesIO(b.content)))
        fa, fb = _both(servers, **common, fingerprint="true")
        assert fa.json() == fb.json()
        assert fa.json()["count"] > 0


def test_the_python_client_gets_the_frame_sql_gives(servers) -> None:
    merged, sql = servers
    with SyncClient(merged.base, merged.secret) as c:  # type: ignore[attr-defined]
        frame = c.history(SYMS, T0 - DAY, T0 + 6 * DAY)
    ref = _arrow(
        _get(sql, symbols=",".join(SYMS), start=T0 - DAY, end=T0 + 6 * DAY, format="arrow")
    )
    assert frame.schema["sym"] == pl.String and frame.schema["type"] == pl.String
    assert frame.equals(ref)


async def _replay(stack: Stack, types: list[str]) -> list[bytes]:
    """Every event of a replay at max, as sent (heartbeats aside)."""
    headers = {"Authorization": f"Bearer {stack.secret}"}  # type: ignore[attr-defined]
    events: list[bytes] = []
    async with websockets.connect(stack.ws_url, additional_headers=headers) as ws:
        await ws.recv()  # welcome
        request = {"op": "replay", "id": "r", "symbols": SYMS, "start": T0 - DAY,
                   "end": T0 + 6 * DAY, "speed": "max", "types": types}  # fmt: skip
        await ws.send(orjson.dumps(request).decode())
        while True:
            for ev in orjson.loads(await ws.recv()):
                # A heartbeat comes whenever the socket was quiet for its interval: when a busy
                # machine stalls the replay, not part of what is compared.
                if ev["type"] in ("replay_started", "heartbeat"):
                    continue
                events.append(orjson.dumps(ev))
                if ev["type"] == "replay_done":
                    return events


@pytest.mark.parametrize("types", [["trade", "quote"], ["quote"]])
def test_replays_send_the_same_events(servers, types: list[str]) -> None:
    a = asyncio.run(_replay(servers[0], types))
    b = asyncio.run(_replay(servers[1], types))
    assert a == b
    assert any(b'"type":"gap"' in e for e in a)  # the store has gaps: announced in place


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"format": "arrow", "compression": "brotli"}, "compression='brotli' is unknown"),
        ({"format": "ndjson", "compression": "lz4"}, "apply to format=arrow only"),
        ({"format": "csv", "dictionary": "true"}, "apply to format=arrow only"),
        ({"format": "arrow", "dictionary": "maybe"}, "dictionary"),
    ],
)
def test_arrow_options_that_do_not_apply_are_a_422(servers, params, says: str) -> None:
    merged = servers[0]
    r = httpx.get(
        f"{merged.base}/ticks/historical",
        params={"symbols": "AAA", "start": T0, "end": T0 + DAY, **params},
        headers={"Authorization": f"Bearer {merged.secret}"},  # type: ignore[attr-defined]
        timeout=60,
        verify=TLS,
    )
    assert r.status_code == 422
    assert says in r.json()["error"]["message"]
