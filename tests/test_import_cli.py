"""`tickpipe import`: vendor files into the same history the recorder writes, exactly once."""

from __future__ import annotations

import gzip
import subprocess
import sys
import zipfile

import duckdb

from tests import forkserver
from tests.harness import ROOT, TLS

TARDIS_TRADES = (
    "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\r\n"
    "binance,BTCUSDT,1700000000000001,1700000000000100,1,buy,37000.5,0.01\r\n"
    "binance,BTCUSDT,1700000000000002,1700000000000200,2,sell,36999.5,0.02\r\n"
    "binance,BTCUSDT,1700000000000003,1700000000000300,3,buy,-1,0.02\r\n"
    "binance,ETHUSDT,1700000000000004,1700000000000400,4,unknown,2000.25,1.5"  # no final newline
)


def run_import(data_dir, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"TICKPIPE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"}
    return forkserver.run(["import", *args], env, timeout=60)


def test_import_stores_ticks_once_and_reports_counts_and_rejects(tmp_path) -> None:
    src = tmp_path / "binance_trades_2023-11-14.csv"
    src.write_text(TARDIS_TRADES)
    data = tmp_path / "data"
    first = run_import(data, str(src), "--format", "tardis-trades")
    assert first.returncode == 0, first.stderr
    assert "read 4, stored 3, rejected 1, duplicate 0" in first.stdout
    rejects = next((data / "imports").glob("*.rejects.csv")).read_text().splitlines()
    assert rejects[0] == "line,reason,raw"
    assert rejects[1].startswith('4,"bad_price')  # file line 4 (the header is line 1)
    assert len(rejects) == 2

    again = run_import(data, str(src), "--format", "tardis-trades")
    assert "stored 0, rejected 0, duplicate 4" in again.stdout

    glob = str(data / "history" / "date=*" / "*.parquet")
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT sym, epoch, seq, price, size, side, venue, epoch(ts) * 1000000 "
        f"FROM read_parquet('{glob}') ORDER BY sym, seq"
    ).fetchall()
    con.close()
    assert [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("BTCUSDT", 1, 37000.5, 0.01, "buy", "BINANCE"),
        ("BTCUSDT", 2, 36999.5, 0.02, "sell", "BINANCE"),
        ("ETHUSDT", 1, 2000.25, 1.5, None, "BINANCE"),
    ]
    assert all(r[1] < 0 for r in rows), "imported epochs never collide with live (positive) ones"
    assert round(rows[0][7]) == 1700000000000001


def test_import_with_a_wrong_format_name_says_which_exist(tmp_path) -> None:
    src = tmp_path / "x.csv"
    src.write_text("a,b\n")
    out = run_import(tmp_path / "data", str(src), "--format", "tardis")
    assert out.returncode == 2
    assert "tardis-trades" in out.stderr and "histdata" in out.stderr


def test_import_of_a_file_in_another_layout_fails_clearly_and_stores_nothing(tmp_path) -> None:
    src = tmp_path / "quotes.csv"
    src.write_text("20120201 000000173,1.306600,1.306770,0\n")
    out = run_import(tmp_path / "data", str(src), "--format", "tardis-trades")
    assert out.returncode == 1 and "error" in out.stderr
    assert not list((tmp_path / "data" / "history").glob("date=*/*.parquet"))


# --- import identity: exactly once, overlap refused, --replace --------------------------------

HEADER = "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n"


def trades(first: int, n: int, sym: str = "BTCUSDT") -> str:
    """``n`` Tardis trades of ``sym``, one per millisecond from ``first``."""
    t0 = 1_700_000_000_000_000
    return "".join(
        f"binance,{sym},{t0 + i * 1000},{t0 + i * 1000 + 7},{i},buy,{37000 + i % 7},0.01\n"
        for i in range(first, first + n)
    )


def stored(data_dir) -> list[tuple]:
    glob = str(data_dir / "history" / "date=*" / "*.parquet")
    with duckdb.connect() as con:
        return con.execute(
            f"SELECT sym, epoch, seq, epoch_ns(ts) FROM read_parquet('{glob}', union_by_name=true)"
            " ORDER BY sym, ts, epoch, seq"
        ).fetchall()


def test_an_import_that_stored_nothing_does_not_block_the_right_one(tmp_path) -> None:
    src = tmp_path / "binance_trades_2023-11-14_BTCUSDT.csv"
    src.write_text(HEADER + trades(0, 200))
    data = tmp_path / "data"
    # Read as milliseconds, the microsecond times fall after 2100: every row rejected.
    wrong = run_import(data, str(src), "--format", "csv", "--time", "timestamp",
                       "--time-unit", "ms", "--symbol-column", "symbol", "--price", "price",
                       "--size", "amount")  # fmt: skip
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "read 200, stored 0, rejected 200" in wrong.stdout

    right = run_import(data, str(src), "--format", "tardis-trades")
    assert right.returncode == 0, right.stderr
    assert "read 200, stored 200, rejected 0, duplicate 0" in right.stdout
    assert len(stored(data)) == 200


def whole_and_half(folder) -> tuple[str, str]:
    """A trades file of 1,000 ticks, and a copy of its first half."""
    whole, half = folder / "trades.csv", folder / "trades-first-half.csv"
    whole.write_text(HEADER + trades(0, 1000))
    half.write_text(HEADER + trades(0, 500))
    return str(whole), str(half)


def test_a_partial_copy_of_an_imported_file_is_refused_with_what_overlaps(tmp_path) -> None:
    whole, half = whole_and_half(tmp_path)
    data = tmp_path / "data"
    assert run_import(data, whole, "--format", "tardis-trades").returncode == 0

    out = run_import(data, half, "--format", "tardis-trades")
    assert out.returncode == 1
    assert "read 500, stored 0" in out.stdout and "refused" in out.stdout
    assert "overlaps ticks already stored: 500 BTCUSDT trades on BINANCE between" in out.stderr
    assert "--replace" in out.stderr
    assert len(stored(data)) == 1000, "the overlapping ticks were stored again"


def test_replace_stores_the_file_in_place_of_the_overlapping_ticks(tmp_path) -> None:
    whole, half = whole_and_half(tmp_path)
    data = tmp_path / "data"
    assert run_import(data, half, "--format", "tardis-trades").returncode == 0
    assert run_import(data, whole, "--format", "tardis-trades").returncode == 1

    out = run_import(data, whole, "--format", "tardis-trades", "--replace")
    assert out.returncode == 0, out.stderr
    assert "stored 1000" in out.stdout and "replaced 500" in out.stdout
    rows = stored(data)
    assert len(rows) == 1000 and len({r[3] for r in rows}) == 1000, "a tick stored twice"
    assert {r[1] for r in rows} == {rows[0][1]}, "ticks of the replaced import are left"
    assert [r[2] for r in rows] == list(range(1, 1001)), "seq has a hole"
    # the half file was imported once: importing it again stores nothing
    again = run_import(data, half, "--format", "tardis-trades")
    assert again.returncode == 0 and "duplicate 500" in again.stdout
    assert len(stored(data)) == 1000


def test_other_series_of_the_same_time_range_do_not_overlap(tmp_path) -> None:
    btc = tmp_path / "btc.csv"
    btc.write_text(HEADER + trades(0, 100))
    eth = tmp_path / "eth.csv"
    eth.write_text(HEADER + trades(0, 100, sym="ETHUSDT"))
    quotes = tmp_path / "quotes.csv"
    t0 = 1_700_000_000_000_000
    quotes.write_text(
        "exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount\n"
        + "".join(
            f"binance,BTCUSDT,{t0 + i * 1000},{t0 + i * 1000},1,37001,37000,2\n" for i in range(100)
        )
    )
    data = tmp_path / "data"
    for path, fmt in ((btc, "tardis-trades"), (eth, "tardis-trades"), (quotes, "tardis-quotes")):
        out = run_import(data, str(path), "--format", fmt)
        assert out.returncode == 0, out.stderr
    assert len(stored(data)) == 300


# --- folders, globs, the summary ---------------------------------------------------------------


def test_a_folder_import_stores_every_file_and_prints_a_summary(tmp_path) -> None:
    folder = tmp_path / "downloads" / "binance"
    (folder / "2023-11-14").mkdir(parents=True)
    (folder / "2023-11-14" / "btc.csv").write_text(HEADER + trades(0, 100))
    (folder / "2023-11-14" / "eth.csv.gz").write_bytes(
        gzip.compress((HEADER + trades(0, 50, sym="ETHUSDT")).encode())
    )
    (folder / "sol.csv").write_text(HEADER + trades(0, 20, sym="SOLUSDT") + "binance,SOLUSDT,x\n")
    (folder / "broken.csv.gz").write_bytes(gzip.compress(b"x" * 1000)[:30])
    data = tmp_path / "data"

    out = run_import(data, str(tmp_path / "downloads"), "--format", "tardis-trades")
    assert out.returncode == 1, "one file failed"
    assert "broken.csv.gz: error:" in out.stderr and "Traceback" not in out.stderr
    table = out.stdout[out.stdout.index("file  ") :].splitlines()
    assert table[0].split() == [
        "file", "status", "read", "stored", "rejected", "duplicate", "flagged", "seconds",
    ]  # fmt: skip
    cells = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert cells["btc.csv"][:6] == ["stored", "100", "100", "0", "0", "0"]
    assert cells["eth.csv.gz"][:6] == ["stored", "50", "50", "0", "0", "0"]
    assert cells["sol.csv"][:6] == ["stored", "21", "20", "1", "0", "0"]
    assert cells["broken.csv.gz"][0] == "error"
    assert cells["total"][:7] == ["4", "files", "171", "170", "1", "0", "0"]
    assert len(stored(data)) == 170

    again = run_import(data, str(tmp_path / "downloads" / "**" / "*.csv*"), "--format",
                       "tardis-trades")  # fmt: skip
    assert "already imported" in again.stdout
    assert len(stored(data)) == 170


# --- vendor flags: stored, queryable and filterable ---------------------------------------------


def test_suspicious_rows_are_stored_flagged_and_filterable_over_rest(tmp_path) -> None:
    import httpx

    from tests.harness import Stack, write_history
    from tests.test_historical import _tick

    quotes = (
        "34200000,1849900,300,1850100,200,P,00000000,0\n"
        "34200010,1849900,300,1850000,100,Q,00000000,0\n"
        "34200020,1850000,100,1850000,100,Q,00000000,1\n"  # the vendor marks it suspicious
    )
    folder = tmp_path / "equity" / "usa" / "tick" / "ibm"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "20131007_quote.zip", "w") as z:
        z.writestr("20131007_ibm_Quote_Tick.csv", quotes)
    stack = Stack(tmp_path / "stack", feed=False)
    # A file written before the flags column existed reads on next to the new ones.
    before = 1_381_150_800 * 10**9  # 2013-10-07 13:00 UTC, half an hour before the file's ticks
    old = [_tick("IBM", "quote", 0, 1, bid=1.0, ask=2.0, bid_size=1.0, ask_size=1.0, ts=before)]
    path = write_history(stack.data_dir / "history", [tuple(r.values()) for r in old])
    import polars as pl

    pl.read_parquet(path).drop("flags").write_parquet(path)
    out = run_import(stack.data_dir, str(folder), "--format", "lean")
    assert out.returncode == 0 and "stored 3, rejected 0, duplicate 0, flagged 1" in out.stdout
    stack.start()
    try:
        key = stack.key("flags", ("historical",), None)

        def rows(**params: str) -> list[dict]:
            r = httpx.get(
                f"{stack.base}/ticks/historical",
                params={"symbols": "IBM", "start": "2013-10-07T13:00:00Z",
                        "end": "2013-10-08T00:00:00Z", **params},
                headers={"Authorization": f"Bearer {key}"}, timeout=60, verify=TLS,
            )  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()["rows"]

        every = rows()
        assert [r["flags"] for r in every] == [None, None, None, "suspicious"]
        assert [r["bid"] for r in rows(flagged="only")] == [185.0]
        assert len(rows(flagged="exclude")) == 3
        bad = httpx.get(f"{stack.base}/ticks/historical", timeout=60, verify=TLS,
                        params={"symbols": "IBM", "start": "2013-10-07T13:00:00Z",
                                "end": "2013-10-08T00:00:00Z", "flagged": "maybe"},
                        headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert bad.status_code == 422 and "flagged" in bad.text
    finally:
        stack.stop()


# --- files in no named format, mapped from flags ------------------------------------------------


def test_a_headerless_csv_mapped_from_flags_with_date_and_symbol_from_its_name(tmp_path) -> None:
    # time of day in New York, bid, ask; the date and symbol are only in the file name
    src = tmp_path / "EURUSD_20240312_quotes.csv"
    src.write_text("09:30:00.250;1.0921;1.0923\n09:30:01;1.0922;1.0924\n25:99:00;1.1;1.2\n")
    flags = ["--format", "csv", "--no-header", "--columns", "t,b,a", "--separator", ";",
             "--time", "t", "--time-format", "%H:%M:%S%.f", "--timezone", "America/New_York",
             "--date-pattern", "%Y%m%d", "--symbol-pattern", "^([A-Z]+)_", "--bid", "b",
             "--ask", "a"]  # fmt: skip
    data = tmp_path / "data"

    dry = run_import(data, str(src), *flags, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "first 2 ticks as they would be stored" in dry.stdout
    assert "2024-03-12 13:30:00.250 UTC" in dry.stdout and "EURUSD" in dry.stdout
    assert not (data / "history").exists() or not list((data / "history").rglob("*.parquet"))

    out = run_import(data, str(src), *flags)
    assert out.returncode == 0, out.stderr
    assert "read 3, stored 2, rejected 1" in out.stdout
    rows = stored(data)
    # 2024-03-12 is on EDT (UTC-4): 09:30 New York is 13:30 UTC
    assert [(r[0], r[3]) for r in rows] == [
        ("EURUSD", 1_710_250_200_250_000_000),
        ("EURUSD", 1_710_250_201_000_000_000),
    ]


def test_a_freqtrade_trades_parquet_mapped_from_flags(tmp_path) -> None:
    import polars as pl

    # freqtrade's DEFAULT_TRADES_COLUMNS and dtypes (vendors/freqtrade/LAYOUT.md)
    src = tmp_path / "XRP_ETH-trades.parquet"
    pl.DataFrame(
        {
            "timestamp": [1_700_000_000_123, 1_700_000_000_456],
            "id": ["101", "102"],
            "type": [None, None],
            "side": ["buy", "sell"],
            "price": [0.00034, 0.00035],
            "amount": [120.0, 30.5],
            "cost": [0.0408, 0.010675],
        },
        schema_overrides={"type": pl.Utf8},
    ).write_parquet(src)
    out = run_import(tmp_path / "data", str(src), "--format", "csv", "--time", "timestamp",
                     "--time-unit", "ms", "--symbol-pattern", r"^([A-Z]+_[A-Z]+)-trades",
                     "--price", "price", "--size", "amount", "--side", "side")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "read 2, stored 2, rejected 0" in out.stdout
    rows = stored(tmp_path / "data")
    assert [(r[0], r[3]) for r in rows] == [
        ("XRP_ETH", 1_700_000_000_123_000_000),
        ("XRP_ETH", 1_700_000_000_456_000_000),
    ]


def test_a_bad_mapping_flag_says_what_to_fix(tmp_path) -> None:
    src = tmp_path / "x.csv"
    src.write_text("t,p\n1,2\n")
    out = run_import(tmp_path / "data", str(src), "--format", "csv", "--time", "t",
                     "--time-unit", "ms", "--time-format", "%H")  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "time_unit" in out.stderr or "time-unit" in out.stderr


def test_a_terminal_gets_a_progress_line_and_a_pipe_only_plain_lines(tmp_path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "btc.csv").write_text(HEADER + trades(0, 10))
    (folder / "eth.csv").write_text(HEADER + trades(0, 10, sym="ETHUSDT"))
    cmd = f"{sys.executable} -m server.cli import {folder} --format tardis-trades"
    env = {"TICKPIPE_DATA_DIR": str(tmp_path / "tty"), "PATH": "/usr/bin:/bin"}
    # script(1) runs the command on a pseudo-terminal
    tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert tty.returncode == 0, tty.stdout
    assert "] 1/2 files, 10 rows," in tty.stdout and "rows/s, eth.csv" in tty.stdout

    piped = run_import(tmp_path / "pipe", str(folder), "--format", "tardis-trades")
    assert piped.returncode == 0
    assert "files," not in piped.stdout + piped.stderr and "\r" not in piped.stdout + piped.stderr
    assert len(piped.stdout.splitlines()) == 2 + 5  # a line per file, then the table
