"""The sorted-runs merge answers raw-tick queries with exactly the rows and order of the SQL
reader, and counts the same gaps; the column-wise replay events equal the per-row ones; the
Arrow stream options decode to the same frame."""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import polars as pl
import pytest

from server import wire
from server.api.encoders import ArrowStream, split_messages
from server.history.events import fingerprint_lines, tick_events, vectorizable
from server.history.facts import FACTS_KEY, facts_of, key_columns, learn
from server.history.merge import MergeReader, gap_count, open_reader, parts_of
from server.history.query import HistoryQuery, HistoryReader, Source, find_gaps
from server.history.store import write_file
from server.ticks import STORED_SCHEMA
from tickpipe.fingerprint import canonical_line

DAY = 86_400 * 10**9
T0 = 1_767_571_200 * 10**9  # 2026-01-05
SYMS = ["AAA", "BBB", "CCC", "DDD"]


def _ticks(rng: random.Random, sym: str, n: int, t_lo: int, t_hi: int, seq0: int, epoch: int):
    """``n`` ticks of one symbol in [t_lo, t_hi): repeated timestamps, a gap now and then."""
    rows = []
    seq = seq0
    ts_list = sorted(rng.randrange(t_lo, t_hi) for _ in range(n))
    for i, ts in enumerate(ts_list):
        if i and rng.random() < 0.1:
            ts = ts_list[i - 1]  # the same ts as the tick before (seq breaks the tie)
        seq += 1 if rng.random() > 0.05 else rng.randrange(2, 5)  # a gap
        trade = rng.random() < 0.3
        px = round(100 + rng.random(), 4)
        rows.append(
            {
                "sym": sym,
                "type": "trade" if trade else "quote",
                "ts": ts,
                "epoch": epoch,
                "seq": seq,
                "price": px if trade else None,
                "size": float(rng.randrange(1, 9) * 100) if trade else None,
                "side": rng.choice(["buy", "sell", None]) if trade else None,
                "bid": None if trade else px - 0.01,
                "bid_size": None if trade else rng.choice([None, 300.0]),
                "ask": None if trade else px + 0.01,
                "ask_size": None if trade else 500.0,
                "venue": rng.choice(["XNAS", None]),
                "crossed": None if trade else rng.random() < 0.05,
                "flags": "suspicious" if rng.random() < 0.05 else None,
            }
        )
    return rows, seq


def _frame(rows: list[dict[str, object]]) -> pl.DataFrame:
    frame = pl.DataFrame(rows, schema={**STORED_SCHEMA, "ts": pl.Int64()})
    return frame.with_columns(pl.col("ts").cast(pl.Datetime("ns", "UTC")))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("merge") / "history")


def build_store(root: Path) -> Path:
    """A store with what makes a merge hard: per-flush files overlapping in time, a file across
    midnight, a compacted day, two epochs of one symbol, ties in ts across symbols and within a
    symbol, gaps, vendor-flagged ticks, and a file written without facts in its metadata nor the
    ``flags`` column (written before either existed)."""
    rng = random.Random(14)
    seqs = dict.fromkeys(SYMS, 0)
    # Day 1: compacted, every symbol, one file.
    rows: list[dict[str, object]] = []
    for sym in SYMS:
        got, seqs[sym] = _ticks(rng, sym, 400, T0, T0 + DAY, seqs[sym], 1)
        rows += got
    # Same ts across symbols, where seq order and symbol order disagree: (ts, seq, sym) puts
    # the DDD tick first, (ts, sym, seq) would put the AAA one first.
    ddd = next(r for r in rows if r["sym"] == "DDD" and int(r["seq"]) > 10)  # type: ignore[call-overload]
    for _ in range(3):
        seqs["AAA"] += 1
        rows.append({**ddd, "sym": "AAA", "seq": seqs["AAA"] + 500})
    seqs["AAA"] += 500
    write_file(root, _frame(rows), "100-0", "199-9")
    # Day 2: per-flush files that overlap in time (each covers a random span).
    file_id = 200
    for _ in range(6):
        rows = []
        lo = T0 + DAY + rng.randrange(0, DAY // 2)
        for sym in rng.sample(SYMS, 3):
            got, seqs[sym] = _ticks(rng, sym, 80, lo, lo + DAY // 3, seqs[sym], 1)
            rows += got
        write_file(root, _frame(rows), f"{file_id}-0", f"{file_id}-9")
        file_id += 1
    # A file across midnight into day 4, and a new epoch of AAA.
    midnight, hour = T0 + 3 * DAY, 3600 * 10**9
    rows, seqs["BBB"] = _ticks(rng, "BBB", 200, midnight - hour, midnight + hour, seqs["BBB"], 1)
    more, _ = _ticks(rng, "AAA", 100, midnight - hour // 6, midnight + hour // 6, 0, 2)
    write_file(root, _frame(rows + more), "300-0", "300-9")
    # An old file: no facts in its metadata.
    rows, seqs["CCC"] = _ticks(rng, "CCC", 150, T0 + 4 * DAY, T0 + 5 * DAY, seqs["CCC"], 1)
    old = root / "date=2026-01-09" / "400-0_400-9.parquet"
    old.parent.mkdir(parents=True)
    _frame(rows).drop("flags").sort("sym", "ts", "seq").write_parquet(old)
    return root


def _sql(source: Source, q: HistoryQuery, ns_ints: bool = True) -> pl.DataFrame:
    reader = HistoryReader(source, q)
    try:
        frames = list(reader.chunks(97, ns_ints=ns_ints))
    finally:
        reader.close()
    return pl.concat(frames) if frames else q.empty(ns_ints=ns_ints)


def _merged(source: Source, q: HistoryQuery, ns_ints: bool = True) -> pl.DataFrame:
    reader = open_reader(source, q)
    assert isinstance(reader, MergeReader)
    frames = list(reader.chunks(89, ns_ints=ns_ints))
    return pl.concat(frames) if frames else q.empty(ns_ints=ns_ints)


def _queries(rng: random.Random, n: int) -> list[HistoryQuery]:
    out = []
    for _ in range(n):
        start = T0 + rng.randrange(-DAY, 5 * DAY)
        end = start + rng.randrange(1, 3 * DAY)
        syms = rng.sample(SYMS, rng.randrange(1, len(SYMS) + 1))
        types = rng.choice([("trade", "quote"), ("trade",), ("quote",)])
        flagged = rng.choice(["include", "include", "exclude", "only"])
        out.append(HistoryQuery(syms, start, end, types, flagged=flagged))
    out.append(HistoryQuery(SYMS, T0 - DAY, T0 + 6 * DAY))
    out.append(HistoryQuery(["BBB"], T0, T0 + 6 * DAY))
    return out


def test_merge_gives_the_rows_and_order_of_sql(store: Path) -> None:
    rng = random.Random(1)
    for cache_mb in (0, 64):
        source = Source.of(store, 256, cache_mb)
        for q in _queries(rng, 25):
            want = _sql(source, q)
            got = _merged(source, q)
            assert got.equals(want), q
            assert _merged(source, q, ns_ints=False).equals(_sql(source, q, ns_ints=False))


def test_merge_pages_with_cursor_limit_and_fields_like_sql(store: Path) -> None:
    source = Source.of(store, 256, 64)
    whole = _sql(source, HistoryQuery(SYMS, T0, T0 + 6 * DAY))
    for i in (0, 17, 401, 900):
        ts, seq, sym = whole.row(i)[2], whole.row(i)[4], whole.row(i)[0]
        for syms in (SYMS, ["AAA"]):
            q = HistoryQuery(syms, T0, T0 + 6 * DAY, after=(ts, seq, sym), limit=50)
            assert _merged(source, q).equals(_sql(source, q))
    q = HistoryQuery(SYMS, T0, T0 + 6 * DAY, fields=("seq", "sym", "price"))
    assert _merged(source, q).equals(_sql(source, q))


def test_merge_reads_the_unrecorded_tail_like_sql(store: Path) -> None:
    rng = random.Random(3)
    rows, _ = _ticks(rng, "AAA", 60, T0 + 4 * DAY, T0 + 5 * DAY, 10_000, 1)
    source = Source.of(store, 256)
    source.tail = _frame(rows)
    q = HistoryQuery(["AAA", "CCC"], T0 + 4 * DAY, T0 + 6 * DAY)
    assert _merged(source, q).equals(_sql(source, q))


def test_gap_count_equals_find_gaps(store: Path) -> None:
    rng = random.Random(2)
    source = Source.of(store, 256)
    for q in _queries(rng, 40):
        found, _changes = find_gaps(source, q.syms, q.start_ns, q.end_ns)
        assert gap_count(source, q.syms, q.start_ns, q.end_ns) == len(found), q
    assert len(find_gaps(source, SYMS, T0 - DAY, T0 + 6 * DAY)[0]) > 10


def test_gap_count_of_overlapping_seq_runs_is_exact(tmp_path: Path) -> None:
    # Two files hold interleaved seqs of one (sym, epoch): no run can be taken whole.
    root = tmp_path / "history"
    base = {"sym": "AAA", "type": "trade", "epoch": 1, "price": 1.0, "size": 1.0}
    a = [{**base, "ts": T0 + s, "seq": s} for s in (1, 3, 8)]
    b = [{**base, "ts": T0 + 100 + s, "seq": s} for s in (2, 4, 5)]
    write_file(root, _frame(a), "1-0", "1-9")
    write_file(root, _frame(b), "2-0", "2-9")
    source = Source.of(root, 256)
    found, _changes = find_gaps(source, ["AAA"], T0, T0 + DAY)
    assert gap_count(source, ["AAA"], T0, T0 + DAY) == len(found) == 1


def test_a_stretch_bigger_than_the_query_memory_is_left_to_sql(store: Path) -> None:
    q = HistoryQuery(SYMS, T0, T0 + 6 * DAY)
    assert isinstance(open_reader(Source.of(store, 256), q), MergeReader)
    tiny = Source.of(store, 256)
    tiny.memory_mb = 0  # nothing fits
    reader = open_reader(tiny, q)
    assert isinstance(reader, HistoryReader)
    reader.close()
    enriched = open_reader(Source.of(store, 256), dataclasses.replace(q, enriched=True))
    assert isinstance(enriched, HistoryReader)
    enriched.close()


def test_facts_kept_in_the_file_equal_facts_learnt_from_it(store: Path) -> None:
    for path in sorted(store.glob("date=*/*.parquet")):
        kept = pl.read_parquet_metadata(path).get(FACTS_KEY)
        learnt = facts_of(key_columns(pl.scan_parquet(path)))
        assert (kept is None) == path.name.startswith("400-")  # the old file has none
        facts = learn(path)
        assert (facts.rows, facts.ts_lo, facts.ts_hi) == (learnt.rows, learnt.ts_lo, learnt.ts_hi)
        assert facts.sym_rows == learnt.sym_rows
        assert facts.runs.equals(learnt.runs)
    assert len(parts_of(Source.of(store, 256), SYMS, T0, T0 + 6 * DAY)) == 9


# -- events ---------------------------------------------------------------------------------------


def _event_rows(store: Path) -> pl.DataFrame:
    return _sql(Source.of(store, 256), HistoryQuery(SYMS, T0 - DAY, T0 + 6 * DAY))


@pytest.mark.parametrize("close", ["}", ',"replay":"r1"}', ',"replay":7}'])
def test_column_wise_events_equal_the_per_row_events(store: Path, close: str) -> None:
    frame = _event_rows(store)
    assert vectorizable(frame)
    rows = frame.rows()
    ts, texts, lines = tick_events(frame, close)
    assert ts == [r[2] for r in rows]
    assert texts == [wire.row_event(r, close) for r in rows]
    assert lines == [canonical_line(*r[:14]) for r in rows]
    assert fingerprint_lines(frame) == lines


@pytest.mark.parametrize(
    "change",
    [
        {"price": 1.5e-05},  # repr 1.5e-05, Polars 0.000015: left to the per-row functions
        {"bid_size": 3e-07},
        {"price": 1e16},
        {"price": 1.2345678901234567e19},
        {"venue": 'A"B'},
        {"side": "se\\ll"},
    ],
)
def test_events_of_values_polars_writes_differently_are_still_the_per_row_ones(
    store: Path, change: dict[str, object]
) -> None:
    frame = _event_rows(store).head(30)
    col, value = next(iter(change.items()))
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(pl.lit(value, dtype=frame.schema[col]))
        .otherwise(pl.col(col))
        .alias(col)
    )
    rows = frame.rows()
    _ts, texts, lines = tick_events(frame, "}")
    assert texts == [wire.row_event(r, "}") for r in rows]
    assert lines == [canonical_line(*r[:14]) for r in rows]


# -- Arrow stream options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"dictionary": True}, {"compression": "lz4"}, {"dictionary": True, "compression": "zstd"}],
)
def test_arrow_stream_options_decode_to_the_same_frame(
    store: Path, options: dict[str, object]
) -> None:
    frame = _event_rows(store)
    enc = ArrowStream(SYMS, **options)  # type: ignore[arg-type]
    body = b"".join([enc.encode(frame.slice(lo, 300)) for lo in range(0, frame.height, 300)])
    body += enc.encode(None)
    kinds = [k for k, _m in split_messages(body)]
    # One schema, the dictionaries once, then record batches only.
    n_dicts = 3 if options.get("dictionary") else 0
    assert kinds[0] == 1 and kinds[1 : 1 + n_dicts] == [2] * n_dicts
    assert set(kinds[1 + n_dicts :]) == {3}
    back = pl.read_ipc_stream(io.BytesIO(body))
    if options.get("dictionary"):
        assert back.schema["sym"] == pl.Enum(SYMS)
        back = back.with_columns(pl.col(pl.Enum).cast(pl.String))
    assert back.equals(frame)
