"""`tickpipe import`: vendor files into the same history the recorder writes, exactly once."""

from __future__ import annotations

import subprocess
import sys

import duckdb

from tests.harness import ROOT

TARDIS_TRADES = (
    "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\r\n"
    "binance,BTCUSDT,1700000000000001,1700000000000100,1,buy,37000.5,0.01\r\n"
    "binance,BTCUSDT,1700000000000002,1700000000000200,2,sell,36999.5,0.02\r\n"
    "binance,BTCUSDT,1700000000000003,1700000000000300,3,buy,-1,0.02\r\n"
    "binance,ETHUSDT,1700000000000004,1700000000000400,4,unknown,2000.25,1.5"  # no final newline
)


def run_import(data_dir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "import", *args],
        cwd=ROOT,
        env={"TICKPIPE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


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
