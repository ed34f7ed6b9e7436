"""GET /ticks/historical: stored ticks in every format, paged JSON, enriched ticks, bars, errors."""

from __future__ import annotations

import datetime as dt
import errno
import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import polars as pl
import pytest

from server.ticks import STORED_SCHEMA
from tests.harness import TLS, Stack, corrupt_history_file, write_history
from tests.test_recorder import published, wait_recorded

COLUMNS = ["sym", "type", "ts", "epoch", "seq", "price", "size", "side", "bid", "ask"]
T0 = int(dt.datetime(2026, 1, 2, 14, 30, tzinfo=dt.UTC).timestamp()) * 10**9
MS = 10**6


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose feed ran ~2 s at 1,000 ticks/s and whose recorder stored all of it."""
    s = Stack(
        tmp_path_factory.mktemp("hist"), recorder=True, feed_rate=1000, recorder_flush_s=0.2
    ).start()
    try:
        time.sleep(2)
        assert s.feed is not None
        s.feed.stop()
        total = sum(seq for _e, seq in published(s).values())
        assert wait_recorded(s, total) == total
        yield s
    finally:
        s.stop()


def _tick(sym: str, typ: str, ms: float, seq: int, **fields: object) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(STORED_SCHEMA)
    row.update(sym=sym, type=typ, ts=T0 + int(ms * MS), epoch=1, seq=seq, venue="X")
    row["crossed"] = False if typ == "quote" else None
    row.update(fields)
    return row


def _q(sym: str, ms: float, seq: int, bid: float, ask: float) -> dict[str, object]:
    return _tick(sym, "quote", ms, seq, bid=bid, ask=ask, bid_size=1.0, ask_size=1.0)


def _t(sym: str, ms: float, seq: int, price: float, size: float, side: str | None = None):
    return _tick(sym, "trade", ms, seq, price=price, size=size, side=side)


HAND_ROWS = [
    # XYZ: enriched example
    _q("XYZ", 0, 1, 99.0, 101.0),
    _t("XYZ", 1, 2, 101.0, 10.0),  # at the ask -> buy (quote rule)
    _t("XYZ", 2, 3, 100.0, 5.0),  # inside the spread, down-tick -> sell (tick rule)
    _q("XYZ", 3, 4, 100.0, 102.0),
    _t("XYZ", 4, 5, 101.0, 2.0),  # inside, up-tick -> buy
    _t("XYZ", 5, 6, 101.0, 1.0),  # inside, same price -> previous aggressor (buy)
    _t("XYZ", 6, 7, 101.5, 4.0, "sell"),  # the source's side wins
    # BAR: bars example (1m): 14:30 has three trades, 14:31 none, 14:32 one
    _t("BAR", 100, 1, 10.0, 1.0),
    _q("BAR", 200, 2, 9.0, 13.0),
    _t("BAR", 30_000, 3, 12.0, 2.0),
    _t("BAR", 59_900, 4, 9.0, 1.0),
    _t("BAR", 125_000, 5, 11.0, 3.0),
]


@pytest.fixture(scope="module")
def handmade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack without a feed over a hand-written history file, a hidden temp file and a
    corrupted file on another date."""
    s = Stack(tmp_path_factory.mktemp("hand"), feed=False)
    root = s.data_dir / "history"
    path = write_history(root, HAND_ROWS)
    (path.parent / ".2-0_2-9.parquet.tmp").write_bytes(b"half written")
    corrupt_history_file(root)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _range(stack: Stack) -> tuple[int, int]:
    glob = str(stack.data_dir / "history" / "date=*" / "*.parquet")
    with duckdb.connect() as con:
        lo, hi = con.execute(
            f"SELECT epoch_ns(min(ts)), epoch_ns(max(ts)) FROM read_parquet('{glob}')"
        ).fetchone()
    return lo, hi + 1


def _get(stack: Stack, key: str | None, headers: dict[str, str] | None = None, **params):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    return httpx.get(f"{stack.base}/ticks/historical", params=params, headers=h, timeout=60,
                     verify=TLS)  # fmt: skip


def _key(stack: Stack, scopes: tuple[str, ...] = ("historical",), symbols=None) -> str:
    return stack.key(f"k{time.monotonic_ns()}", scopes, symbols)


def _as_frame(fmt: str, resp: httpx.Response) -> pl.DataFrame:
    assert resp.status_code == 200, resp.text
    if fmt == "json":
        frame = pl.DataFrame(resp.json()["rows"], infer_schema_length=None)
    elif fmt == "ndjson":
        frame = pl.read_ndjson(io.BytesIO(resp.content), infer_schema_length=None)
    elif fmt == "csv":
        frame = pl.read_csv(io.BytesIO(resp.content), infer_schema_length=None)
    elif fmt == "parquet":
        frame = pl.read_parquet(io.BytesIO(resp.content))
    else:
        frame = pl.read_ipc_stream(io.BytesIO(resp.content))
    if frame.schema["ts"] != pl.Int64:
        assert frame.schema["ts"] == pl.Datetime("ns", "UTC"), fmt
        frame = frame.with_columns(pl.col("ts").dt.epoch("ns"))
    return frame.select(COLUMNS).cast({"price": pl.Float64, "bid": pl.Float64, "ask": pl.Float64})


def test_every_format_returns_the_same_rows_in_ts_seq_order(recorded: Stack) -> None:
    key = _key(recorded)
    start, end = _range(recorded)
    syms = "AAPL,MSFT,BTC-USD"
    frames = {
        fmt: _as_frame(fmt, _get(recorded, key, symbols=syms, start=start, end=end, format=fmt))
        for fmt in ("json", "ndjson", "csv", "parquet", "arrow")
    }
    ref = frames["json"]
    assert ref.height > 100
    assert set(ref["sym"].unique()) == {"AAPL", "MSFT", "BTC-USD"}
    for fmt, frame in frames.items():
        assert frame.equals(ref), fmt
    assert ref.select(["ts", "seq", "sym"]).equals(
        ref.select(["ts", "seq", "sym"]).sort(["ts", "seq", "sym"])
    )


def test_accept_header_chooses_the_format(recorded: Stack) -> None:
    key = _key(recorded)
    start, end = _range(recorded)
    resp = _get(
        recorded,
        key,
        {"Accept": "application/vnd.apache.arrow.stream"},
        symbols="AAPL",
        start=start,
        end=end,
    )
    assert resp.headers["content-type"].startswith("application/vnd.apache.arrow.stream")
    assert pl.read_ipc_stream(io.BytesIO(resp.content)).height > 0


def test_a_range_without_gaps_returns_every_seq_once(recorded: Stack) -> None:
    key = _key(recorded)
    start, end = _range(recorded)
    pub = published(recorded)
    resp = _get(recorded, key, symbols="AAPL,NVDA", start=start, end=end, format="ndjson")
    frame = _as_frame("ndjson", resp)
    for sym in ("AAPL", "NVDA"):
        seqs = frame.filter(pl.col("sym") == sym)["seq"].sort().to_list()
        assert seqs == list(range(1, pub[sym][1] + 1)), sym


def test_cursor_paging_returns_every_row_exactly_once(recorded: Stack) -> None:
    key = _key(recorded)
    start, end = _range(recorded)
    whole = _get(recorded, key, symbols="AAPL,MSFT,TSLA", start=start, end=end).json()
    assert whole["next_cursor"] is None
    rows: list[dict] = []
    cursor = None
    pages = 0
    while True:
        params = dict(symbols="AAPL,MSFT,TSLA", start=start, end=end, limit=97)
        if cursor:
            params["cursor"] = cursor
        page = _get(recorded, key, **params).json()
        rows.extend(page["rows"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages > 2
    assert rows == whole["rows"]
    assert len({(r["sym"], r["seq"]) for r in rows}) == whole["count"]


def test_types_filter_returns_only_those_types(recorded: Stack) -> None:
    key = _key(recorded)
    start, end = _range(recorded)
    body = _get(recorded, key, symbols="AAPL", start=start, end=end, types="trade").json()
    assert body["count"] > 0
    assert {r["type"] for r in body["rows"]} == {"trade"}


def test_start_and_end_accept_iso_with_and_without_timezone(recorded: Stack) -> None:
    key = _key(recorded)
    start, end = _range(recorded)
    iso = dt.datetime.fromtimestamp(start // 10**9, dt.UTC)
    a = _get(recorded, key, symbols="AAPL", start=iso.isoformat(), end=end).json()
    b = _get(
        recorded, key, symbols="AAPL", start=iso.replace(tzinfo=None).isoformat(), end=end
    ).json()
    assert a["count"] > 0 and a == b


def test_unknown_symbol_is_404_naming_it(recorded: Stack) -> None:
    start, end = _range(recorded)
    resp = _get(recorded, _key(recorded), symbols="AAPL,NOPE", start=start, end=end)
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["code"] == "unknown_symbol"
    assert resp.json()["error"]["symbols"] == ["NOPE"]


def test_a_known_symbol_with_nothing_in_the_range_is_an_empty_answer(recorded: Stack) -> None:
    body = _get(recorded, _key(recorded), symbols="AAPL", start=1, end=10).json()
    assert body == {"rows": [], "count": 0, "next_cursor": None, "gaps": 0}


def test_auth_errors(recorded: Stack) -> None:
    start, end = _range(recorded)
    params = dict(symbols="AAPL,MSFT", start=start, end=end)
    assert _get(recorded, None, **params).status_code == 401
    assert _get(recorded, "tp_wrong", **params).status_code == 401
    realtime_only = _key(recorded, ("realtime",))
    resp = _get(recorded, realtime_only, **params)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    aapl_only = _key(recorded, symbols=["AAPL"])
    resp = _get(recorded, aapl_only, **params)
    assert resp.status_code == 403
    assert resp.json()["error"] == {
        "code": "not_entitled",
        "message": resp.json()["error"]["message"],
        "symbols": ["MSFT"],
    }


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"start": 20, "end": 10}, "start must be before end"),
        ({"start": 10, "end": 10}, "start must be before end"),
        ({"start": "yesterday", "end": 10}, "not a time"),
        ({"end": 10}, "start is required"),
        ({"start": 1, "end": 10**30}, "out of range"),
        ({"start": "0001-01-01T00:00:00Z", "end": 10}, "out of range"),
        ({"start": 1, "end": 10, "format": "xml"}, "json, ndjson, csv, parquet, arrow"),
        ({"start": 1, "end": 10, "interval": "7m"}, "1s, 1m, 5m, 1h, 1d"),
        ({"start": 1, "end": 10, "types": "trade,bbo"}, "trade,quote"),
        ({"start": 1, "end": 10, "limit": 100_001}, "limit"),
        # Each of these answered a plain-text 500 before: str.isdigit() accepts a superscript
        # two, int() refuses more than 4,300 digits, int() accepts fullwidth digits.
        ({"start": "\u00b2", "end": "2030-01-01"}, "start='\u00b2' is not a time"),
        ({"start": "1" * 5000, "end": "2030-01-01"}, "start='111"),
        ({"start": 1, "end": "-" + "9" * 5000}, "out of range"),
        ({"start": 1, "end": 10, "limit": "\u00b2"}, "limit="),
        ({"start": 1, "end": 10, "limit": "\uff11\uff12"}, "ASCII digits"),
        ({"start": 1, "end": 10, "enriched": "maybe"}, "enriched='maybe' is not valid"),
        ({"start": 1, "end": 10, "fingerprint": "ja"}, "give true or false"),
        ({"start": 1, "end": 10, "cursor": "nonsense"}, "cursor"),
        ({"start": "2026-01-01", "end": "2026-06-01"}, "ndjson"),
        ({"start": "2026-01-01", "end": "2026-01-31", "interval": "1s"}, "format=ndjson"),
    ],
)
def test_bad_parameters_are_422_with_a_clear_message(
    recorded: Stack, params: dict, needle: str
) -> None:
    resp = _get(recorded, _key(recorded), symbols="AAPL", **params)
    assert resp.status_code == 422, resp.text
    assert needle in resp.json()["error"]["message"]


def test_enriched_ticks_match_a_hand_computed_example(handmade: Stack) -> None:
    key = _key(handmade)
    rows = _get(
        handmade, key, symbols="XYZ", start="2026-01-02T14:30:00", end=T0 + 10 * MS, enriched="1"
    ).json()["rows"]
    fields = ("seq", "type", "bid", "ask", "notional", "aggressor", "mid", "spread")
    got = [tuple(r[f] for f in fields) for r in rows]
    assert got == [
        (1, "quote", 99.0, 101.0, None, None, 100.0, 2.0),
        (2, "trade", 99.0, 101.0, 1010.0, "buy", None, None),
        (3, "trade", 99.0, 101.0, 500.0, "sell", None, None),
        (4, "quote", 100.0, 102.0, None, None, 101.0, 2.0),
        (5, "trade", 100.0, 102.0, 202.0, "buy", None, None),
        (6, "trade", 100.0, 102.0, 101.0, "buy", None, None),
        (7, "trade", 100.0, 102.0, 406.0, "sell", None, None),
    ]
    assert rows[0]["spread_bps"] == pytest.approx(200.0)
    assert rows[3]["spread_bps"] == pytest.approx(2 / 101 * 1e4)


def test_bars_match_a_hand_computed_example(handmade: Stack) -> None:
    key = _key(handmade)
    params = dict(symbols="BAR", start=T0, end=T0 + 3600 * 10**9, interval="1m")
    rows = _get(handmade, key, **params).json()["rows"]
    assert rows == [
        {
            "sym": "BAR",
            "start": T0,
            "open": 10.0,
            "high": 12.0,
            "low": 9.0,
            "close": 9.0,
            "volume": 4.0,
            "vwap": 10.75,
            "trades": 3,
            "first_seq": 1,
            "last_seq": 4,
        },
        {
            "sym": "BAR",
            "start": T0 + 120 * 10**9,
            "open": 11.0,
            "high": 11.0,
            "low": 11.0,
            "close": 11.0,
            "volume": 3.0,
            "vwap": 11.0,
            "trades": 1,
            "first_seq": 5,
            "last_seq": 5,
        },
    ]
    arrow = pl.read_ipc_stream(io.BytesIO(_get(handmade, key, format="arrow", **params).content))
    assert arrow["start"].dtype == pl.Datetime("ns", "UTC")
    assert arrow["close"].to_list() == [9.0, 11.0]


def test_a_corrupted_file_errors_clearly_and_other_dates_still_answer(handmade: Stack) -> None:
    key = _key(handmade)
    for fmt in ("json", "ndjson", "parquet"):
        resp = _get(handmade, key, symbols="XYZ", start="2026-01-05", end="2026-01-06", format=fmt)
        assert resp.status_code == 500, fmt
        err = resp.json()["error"]
        assert err["code"] == "corrupt_history"
        assert Path(err["file"]).name == "3-0_3-9.parquet"
    ok = _get(handmade, key, symbols="XYZ", start="2026-01-02", end="2026-01-03")
    assert ok.status_code == 200 and ok.json()["count"] == 7


def _fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full."""
    with path.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_parquet_on_a_full_disk_is_a_json_503_saying_what_is_wrong(tmp_path) -> None:
    """A Parquet answer is written to ``<data_dir>/tmp`` before it is sent: on a full disk
    (a real ENOSPC on a full tmpfs) that is a JSON 503, not a plain-text 500."""
    s = Stack(tmp_path, feed=False)
    write_history(s.data_dir / "history", HAND_ROWS)
    spill = s.data_dir / "tmp"
    spill.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spill)], check=True)
    try:
        _fill(spill / "filler")
        s.start()
        key = _key(s)
        params = dict(symbols="XYZ", start="2026-01-02", end="2026-01-03")
        full = _get(s, key, format="parquet", **params)
        assert full.status_code == 503, full.text
        assert full.headers["content-type"] == "application/json"
        err = full.json()["error"]
        assert err["code"] == "unavailable"
        assert "disk full" in err["message"] and str(spill) in err["message"], err
        assert [p.name for p in spill.iterdir()] == ["filler"], "a partial answer was left"
        assert _get(s, key, format="arrow", **params).status_code == 200, "streams need no file"
        (spill / "filler").unlink()
        ok = _get(s, key, format="parquet", **params)
        assert ok.status_code == 200 and pl.read_parquet(io.BytesIO(ok.content)).height == 7
    finally:
        s.stop()
        subprocess.run(["umount", "-l", str(spill)], check=False)


EMPTY_QUERIES = {
    "ticks": {},
    "fields": {"fields": "price,ts,sym"},
    "enriched": {"enriched": "true", "fields": "mid,aggressor,ts"},
    "bars": {"interval": "1m"},
}


def _columns(fmt: str, resp: httpx.Response) -> object:
    """What an answer says about its columns: the CSV header, or the Arrow/Parquet schema."""
    assert resp.status_code == 200, resp.text
    if fmt == "csv":
        return resp.text.splitlines()[0]
    read = pl.read_parquet if fmt == "parquet" else pl.read_ipc_stream
    return read(io.BytesIO(resp.content)).schema


@pytest.mark.parametrize("query", sorted(EMPTY_QUERIES))
def test_an_empty_answer_still_has_its_columns_in_every_format(recorded: Stack, query: str) -> None:
    """Empty with no file in the range (1970), and empty with files but no row in the range:
    CSV still has its header and Arrow and Parquet their schema, the same as with rows."""
    key = _key(recorded)
    lo, hi = _range(recorded)
    params = {"symbols": "AAPL", **EMPTY_QUERIES[query]}
    for fmt in ("csv", "arrow", "parquet"):
        full = _get(recorded, key, start=lo, end=hi, format=fmt, **params)
        for start, end in ((1, 10), (lo - 10**6, lo)):
            empty = _get(recorded, key, start=start, end=end, format=fmt, **params)
            assert _columns(fmt, empty) == _columns(fmt, full), (fmt, start)
            if fmt == "csv":
                assert empty.text.count("\n") == 1
            else:
                read = pl.read_parquet if fmt == "parquet" else pl.read_ipc_stream
                assert read(io.BytesIO(empty.content)).height == 0
    for start, end in ((1, 10), (lo - 10**6, lo)):
        as_json = _get(recorded, key, start=start, end=end, **params)
        assert as_json.status_code == 200 and as_json.json()["rows"] == [], as_json.text
        ndjson = _get(recorded, key, start=start, end=end, format="ndjson", **params)
        assert ndjson.status_code == 200 and ndjson.content == b""


async def test_client_history_of_an_empty_range_is_a_frame_with_the_tick_columns(
    recorded: Stack,
) -> None:
    from tickpipe import Client

    lo, hi = _range(recorded)
    async with Client(recorded.base, _key(recorded)) as client:
        full = await client.history(["AAPL"], lo, hi)
        empty = await client.history(["AAPL"], 1, 10)
    assert full.height > 0 and empty.height == 0
    assert empty.schema == full.schema
    assert empty.columns[:5] == ["sym", "type", "ts", "epoch", "seq"]


def test_no_history_yet_says_the_symbol_is_unknown_in_every_format(own_stack) -> None:
    s: Stack = own_stack(feed=False)
    key = _key(s)
    for fmt in ("json", "arrow"):
        resp = _get(s, key, symbols="AAPL", start=1, end=10, format=fmt)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_symbol"


def test_a_published_symbol_not_yet_recorded_is_an_empty_answer(own_stack) -> None:
    s: Stack = own_stack(feed_rate=100)
    resp = _get(s, _key(s), symbols="AAPL", start=1, end=10, format="arrow")
    assert resp.status_code == 200 and pl.read_ipc_stream(io.BytesIO(resp.content)).height == 0


def test_ticks_of_a_file_written_across_midnight_are_found_from_the_next_day(tmp_path) -> None:
    """The recorder files a flush under the day of its first tick; a range starting after
    midnight must still see the ticks the same file holds for the new day."""
    midnight = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z
    rest = (None,) * 8  # side, bid, bid_size, ask, ask_size, venue, crossed, flags
    rows = [
        ("ABC", "trade", midnight - 100_000_000, 5, 1, 10.0, 1.0, *rest),
        ("ABC", "trade", midnight + 100_000_000, 5, 2, 11.0, 1.0, *rest),
    ]
    s = Stack(tmp_path / "s", feed=False)
    write_history(s.data_dir / "history", rows)
    assert [p.name for p in (s.data_dir / "history").glob("date=*")] == ["date=2025-12-31"]
    s.start()
    try:
        resp = _get(s, _key(s), symbols="ABC", start=midnight, end=midnight + 3_600 * 10**9)
    finally:
        s.stop()
    assert resp.status_code == 200, resp.text
    assert [(r["seq"], r["price"]) for r in resp.json()["rows"]] == [(2, 11.0)]


@pytest.mark.parametrize("fmt", ["json", "ndjson", "csv", "parquet", "arrow"])
def test_fields_picks_columns_in_the_order_asked(recorded: Stack, fmt: str) -> None:
    key = _key(recorded)
    start, end = _range(recorded)
    params = dict(symbols="AAPL", start=start, end=end, format=fmt, types="trade")
    full = _as_frame("ndjson", _get(recorded, key, **{**params, "format": "ndjson"}))
    resp = _get(recorded, key, fields="price,ts,seq", **params)
    assert resp.status_code == 200, resp.text
    body = resp.content
    if fmt == "json":
        frame = pl.DataFrame(resp.json()["rows"])
    elif fmt == "ndjson":
        frame = pl.read_ndjson(io.BytesIO(body))
    elif fmt == "csv":
        frame = pl.read_csv(io.BytesIO(body))
    elif fmt == "parquet":
        frame = pl.read_parquet(io.BytesIO(body))
    else:
        frame = pl.read_ipc_stream(io.BytesIO(body))
    assert frame.columns == ["price", "ts", "seq"]
    assert frame["seq"].to_list() == full["seq"].to_list()


def test_fields_pages_with_a_cursor_even_without_the_key_columns(recorded: Stack) -> None:
    key = _key(recorded)
    start, end = _range(recorded)
    params = dict(symbols="MSFT", start=start, end=end, fields="price", types="trade")
    whole = _get(recorded, key, **params).json()["rows"]
    first = _get(recorded, key, limit=10, **params).json()
    second = _get(recorded, key, limit=10, cursor=first["next_cursor"], **params).json()
    assert [list(r) for r in first["rows"]] == [["price"]] * 10
    assert first["rows"] + second["rows"] == whole[:20]


def test_fields_of_enriched_ticks_and_bars(handmade: Stack) -> None:
    key = _key(handmade)
    rows = _get(handmade, key, symbols="XYZ", start=T0, end=T0 + 10 * MS, enriched="true",
                fields="seq,aggressor").json()["rows"]  # fmt: skip
    assert rows[1] == {"seq": 2, "aggressor": "buy"}
    bars = _get(handmade, key, symbols="BAR", start=T0, end=T0 + 3600 * 10**9, interval="1m",
                fields="start,close").json()["rows"]  # fmt: skip
    assert bars[0] == {"start": T0, "close": 9.0}


def test_unknown_fields_are_422_listing_the_valid_ones(recorded: Stack) -> None:
    key = _key(recorded)
    resp = _get(recorded, key, symbols="AAPL", start=1, end=10, fields="price,mid")
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert "mid" in err["message"] and "enriched" not in err["message"]
    assert "price" in err["valid"] and "mid" not in err["valid"]
    resp = _get(recorded, key, symbols="AAPL", start=1, end=10, fields=",,")
    assert resp.status_code == 422
