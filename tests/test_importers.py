"""Importing vendor tick files: each format on a small file in that vendor's exact layout, plus the
bad inputs (truncated, CRLF, no final newline, non-UTF-8, crossed/one-sided quotes, ...)."""

from __future__ import annotations

import datetime as dt
import gzip
import zipfile
from pathlib import Path

import polars as pl
import pytest

from server.history.importers import FORMATS, ImportResult, Mapping, read_file
from server.ticks import TICK_SCHEMA

UTC = dt.UTC


def ns(*args: int, us: int = 0, nanos: int = 0) -> int:
    """Integer ns since the epoch of a UTC wall-clock time."""
    t = dt.datetime(*args, tzinfo=UTC) + dt.timedelta(microseconds=us)
    return (t - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1) * 1000 + nanos


def ts_ns(result: ImportResult) -> list[int]:
    return result.ticks["ts"].dt.epoch("ns").to_list()


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def accounted(result: ImportResult) -> bool:
    return result.read == result.ticks.height + result.rejects.height + result.skipped


TARDIS_TRADES = (
    "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n"
    "binance,BTCUSDT,1585699200245000,1585699200355000,295150011,sell,6371.36,0.012\n"
    "binance,BTCUSDT,1585699200246123,1585699200356000,295150012,buy,6371.37,0.5\n"
    "binance,BTCUSDT,1585699200247000,1585699200357000,,unknown,6371.38,1\n"
)
TARDIS_QUOTES_HEADER = (
    "exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount\n"
)


# --- one test per format ----------------------------------------------------------------------


def test_tardis_trades_become_trades_with_us_timestamps_and_sides(tmp_path: Path) -> None:
    result = read_file(write(tmp_path / "trades.csv", TARDIS_TRADES), "tardis-trades")

    assert result.ticks.schema == pl.Schema(TICK_SCHEMA)
    assert result.rejects.height == 0 and result.read == 3
    assert ts_ns(result) == [
        ns(2020, 4, 1, us=245_000),
        ns(2020, 4, 1, us=246_123),
        ns(2020, 4, 1, us=247_000),
    ]
    rows = result.ticks.select("sym", "type", "price", "size", "side", "venue", "crossed").rows()
    assert rows == [
        ("BTCUSDT", "trade", 6371.36, 0.012, "sell", "BINANCE", None),
        ("BTCUSDT", "trade", 6371.37, 0.5, "buy", "BINANCE", None),
        ("BTCUSDT", "trade", 6371.38, 1.0, None, "BINANCE", None),
    ]
    assert result.ticks["bid"].null_count() == 3


def test_tardis_quotes_read_ask_before_bid(tmp_path: Path) -> None:
    text = TARDIS_QUOTES_HEADER + (
        "binance-futures,BTCUSDT,1585699200245000,1585699200355000,1.5,6371.40,6371.30,2.25\n"
    )
    result = read_file(write(tmp_path / "quotes.csv", text), "tardis-quotes")

    assert ts_ns(result) == [ns(2020, 4, 1, us=245_000)]
    row = result.ticks.row(0, named=True)
    assert row["type"] == "quote" and row["venue"] == "BINANCE-FUTURES"
    assert (row["bid"], row["bid_size"], row["ask"], row["ask_size"]) == (
        6371.30,
        2.25,
        6371.40,
        1.5,
    )
    assert row["price"] is None and row["side"] is None and row["crossed"] is False


def test_histdata_ticks_are_quotes_in_fixed_est_without_dst(tmp_path: Path) -> None:
    text = (
        "20120201 000000173,1.306600,1.306770,0\n"
        # July: New York would be on EDT (UTC-4), HistData stays on EST (UTC-5).
        "20120701 123015009,1.266100,1.266150,0\n"
    )
    result = read_file(
        write(tmp_path / "DAT_ASCII_EURUSD_T_201202.csv", text), "histdata", symbol="eurusd"
    )

    assert result.rejects.height == 0
    assert ts_ns(result) == [
        ns(2012, 2, 1, 5, 0, 0, us=173_000),
        ns(2012, 7, 1, 17, 30, 15, us=9_000),
    ]
    rows = result.ticks.select(
        "sym", "type", "bid", "ask", "bid_size", "ask_size", "crossed"
    ).rows()
    assert rows == [
        ("EURUSD", "quote", 1.3066, 1.30677, None, None, False),
        ("EURUSD", "quote", 1.2661, 1.26615, None, None, False),
    ]


def test_lobster_executions_become_trades_and_book_events_are_skipped(tmp_path: Path) -> None:
    text = (
        "34200.004241176,1,16113575,18,5853300,1\n"  # submission: skipped
        "34200.025552880,4,16120456,100,5859100,-1\n"  # sell limit hit: aggressor bought
        "34200.025552880,3,16120457,50,5859200,-1\n"  # deletion: skipped
        "34200.201743205,5,0,18,5853000,1\n"  # hidden buy limit hit: aggressor sold
    )
    name = "AAPL_2012-06-21_34200000_57600000_message_1.csv"
    result = read_file(write(tmp_path / name, text), "lobster")

    assert result.read == 4 and result.skipped == 2 and result.rejects.height == 0
    # 2012-06-21 is on EDT: 09:30 New York = 13:30 UTC; all nine decimals survive.
    assert ts_ns(result) == [
        ns(2012, 6, 21, 13, 30, 0, us=25_552, nanos=880),
        ns(2012, 6, 21, 13, 30, 0, us=201_743, nanos=205),
    ]
    rows = result.ticks.select("sym", "type", "price", "size", "side").rows()
    assert rows == [("AAPL", "trade", 585.91, 100.0, "buy"), ("AAPL", "trade", 585.3, 18.0, "sell")]


def test_lobster_takes_symbol_and_date_from_arguments_when_the_name_lacks_them(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "messages.csv", "36000.5,4,1,10,1000000,1\n")
    with pytest.raises(ValueError, match="--date"):
        read_file(path, "lobster", symbol="MSFT")

    result = read_file(path, "lobster", symbol="MSFT", date=dt.date(2012, 12, 3))
    # December: EST, 10:00 New York = 15:00 UTC.
    assert ts_ns(result) == [ns(2012, 12, 3, 15, 0, 0, us=500_000)]
    assert result.ticks.select("sym", "price", "side").row(0) == ("MSFT", 100.0, "sell")


def lean_zip(tmp_path: Path, zip_name: str, member: str, text: str) -> Path:
    path = tmp_path / zip_name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, text)
    return path


def test_lean_trade_zip_scales_prices_and_keeps_suspicious_rows_flagged(tmp_path: Path) -> None:
    text = (
        "34200000,4868000,100,P,00000000,0\n"
        "34200010,4868100,200,Q,00000000,1\n"
        "57599999,4870500,300,Q,00000000,0\n"
    )
    path = lean_zip(tmp_path, "20131007_trade.zip", "20131007_aapl_Trade_Tick.csv", text)
    result = read_file(path, "lean")

    # 2013-10-07 is on EDT: 09:30 New York = 13:30 UTC.
    assert ts_ns(result) == [
        ns(2013, 10, 7, 13, 30),
        ns(2013, 10, 7, 13, 30, 0, us=10_000),
        ns(2013, 10, 7, 19, 59, 59, us=999_000),
    ]
    rows = result.ticks.select("sym", "type", "price", "size", "venue", "flags").rows()
    assert rows == [
        ("AAPL", "trade", 486.8, 100.0, "P", None),
        ("AAPL", "trade", 486.81, 200.0, "Q", "suspicious"),  # kept, flagged
        ("AAPL", "trade", 487.05, 300.0, "Q", None),
    ]
    assert result.rejects.height == 0


def test_lean_quote_zip_treats_a_zero_side_as_absent(tmp_path: Path) -> None:
    text = (
        "34200000,4867000,300,4869000,200,P,00000000,0\n"
        "34200001,0,0,4869000,200,Q,00000000,0\n"  # bid absent
        "34200002,4867000,300,0,0,Q,00000000,0\n"  # ask absent
        "34200003,0,0,0,0,Q,00000000,0\n"  # both absent: not a quote
    )
    path = lean_zip(tmp_path, "20131007_quote.zip", "20131007_aapl_Quote_Tick.csv", text)
    result = read_file(path, "lean")

    rows = result.ticks.select("bid", "bid_size", "ask", "ask_size", "crossed").rows()
    assert rows == [
        (486.7, 300.0, 486.9, 200.0, False),
        (None, None, 486.9, 200.0, False),
        (486.7, 300.0, None, None, False),
    ]
    assert ts_ns(result)[1] == ns(2013, 10, 7, 13, 30, 0, us=1_000)
    assert result.rejects["line"].to_list() == [4]
    assert result.rejects["reason"][0].startswith("empty_quote")


def test_generic_csv_mapping_reads_epoch_ms_scaled_prices_and_a_symbol_column(
    tmp_path: Path,
) -> None:
    text = (
        "when,ticker,px,qty,aggressor\n1700000000123,es,450025,3,B\n1700000000124,es,450050,1,S\n"
    )
    mapping = Mapping(
        time="when",
        time_unit="ms",
        symbol_column="ticker",
        price="px",
        size="qty",
        side="aggressor",
        price_scale=100,
    )
    result = read_file(write(tmp_path / "fut.csv", text), "csv", mapping=mapping)

    assert ts_ns(result) == [1_700_000_000_123_000_000, 1_700_000_000_124_000_000]
    rows = result.ticks.select("sym", "type", "price", "size", "side").rows()
    assert rows == [("ES", "trade", 4500.25, 3.0, "buy"), ("ES", "trade", 4500.5, 1.0, "sell")]


def test_generic_mapping_reads_parquet_with_a_naive_datetime_column(tmp_path: Path) -> None:
    path = tmp_path / "quotes.parquet"
    pl.DataFrame(
        {
            "t": [dt.datetime(2024, 3, 1, 9, 30), dt.datetime(2024, 3, 1, 9, 31)],
            "b": [99.5, 0.0],
            "a": [99.7, 99.8],
        }
    ).write_parquet(path)
    mapping = Mapping(time="t", timezone="America/New_York", bid="b", ask="a", symbol="SPY")
    result = read_file(path, "csv", mapping=mapping)

    assert ts_ns(result) == [ns(2024, 3, 1, 14, 30)]
    assert result.ticks.select("sym", "bid", "ask").row(0) == ("SPY", 99.5, 99.7)
    assert result.rejects.rows() == [(2, "bad_price: non-positive or not finite", None)]


def test_generic_mapping_reads_timestamps_with_and_without_timezone(tmp_path: Path) -> None:
    text = (
        "time,price,size\n"
        "2024-01-02T10:00:00.123456789+01:00,10,1\n"  # offset: converted to UTC
        "2024-01-02T10:00:00Z,10,1\n"  # Z: UTC
        "2024-01-02 10:00:00.5,10,1\n"  # naive: read in the mapping's timezone
        "yesterday,10,1\n"
    )
    mapping = Mapping(time="time", timezone="America/New_York", price="price", size="size")
    result = read_file(write(tmp_path / "t.csv", text), "csv", mapping=mapping, symbol="X")

    assert ts_ns(result) == [
        ns(2024, 1, 2, 9, 0, 0, us=123_456, nanos=789),
        ns(2024, 1, 2, 10, 0, 0),
        ns(2024, 1, 2, 15, 0, 0, us=500_000),
    ]
    assert result.rejects.select("line", "raw").rows() == [(5, "yesterday,10,1")]
    assert result.rejects["reason"][0].startswith("bad_timestamp")


def test_generic_mapping_with_strptime_format_and_offset(tmp_path: Path) -> None:
    text = "d;bid;ask\n02/01/2024 10:00:00 +0900;1.5;1.6\n"
    mapping = Mapping(
        time="d",
        time_format="%d/%m/%Y %H:%M:%S %z",
        bid="bid",
        ask="ask",
        symbol="JPYX",
        separator=";",
    )
    result = read_file(write(tmp_path / "jp.csv", text), "csv", mapping=mapping)

    assert ts_ns(result) == [ns(2024, 1, 2, 1, 0, 0)]


# --- bad inputs -------------------------------------------------------------------------------


def test_unknown_format_name_raises_listing_valid_names(tmp_path: Path) -> None:
    path = write(tmp_path / "x.csv", TARDIS_TRADES)
    with pytest.raises(ValueError, match="tardis-trades, tardis-quotes") as err:
        read_file(path, "tardis")
    assert all(name in str(err.value) for name in FORMATS)


def test_wrong_header_for_the_format_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="check the format name"):
        read_file(write(tmp_path / "trades.csv", TARDIS_TRADES), "tardis-quotes")


def test_truncated_last_line_is_rejected_and_the_rest_imported(tmp_path: Path) -> None:
    text = TARDIS_TRADES + "binance,BTCUSDT,1585699200248000,15856992"
    result = read_file(write(tmp_path / "trades.csv", text), "tardis-trades")

    assert result.ticks.height == 3 and result.read == 4 and accounted(result)
    assert result.rejects.rows() == [
        (
            5,
            "bad_row: expected 8 fields, got 4 (truncated?)",
            "binance,BTCUSDT,1585699200248000,15856992",
        )
    ]


def test_crlf_line_endings_import_like_lf(tmp_path: Path) -> None:
    lf = read_file(write(tmp_path / "lf.csv", TARDIS_TRADES), "tardis-trades")
    crlf = read_file(
        write(tmp_path / "crlf.csv", TARDIS_TRADES.replace("\n", "\r\n")), "tardis-trades"
    )

    assert crlf.ticks.equals(lf.ticks) and crlf.rejects.height == 0
    assert "\r" not in "".join(crlf.ticks["sym"].to_list())


def test_last_line_without_newline_is_imported(tmp_path: Path) -> None:
    text = "20120201 000000173,1.306600,1.306770,0\n20120201 000000500,1.306610,1.306780,0"
    result = read_file(write(tmp_path / "h.csv", text), "histdata", symbol="EURUSD")

    assert result.ticks.height == 2 and result.rejects.height == 0
    assert result.ticks["ask"].to_list() == [1.30677, 1.30678]


def test_crossed_quotes_are_kept_and_flagged_one_sided_kept_empty_rejected(tmp_path: Path) -> None:
    text = TARDIS_QUOTES_HEADER + (
        "binance,BTCUSDT,1585699200000001,1585699200000001,1,6371.40,6371.50,2\n"  # crossed
        "binance,BTCUSDT,1585699200000002,1585699200000002,,,6371.30,2\n"  # no ask
        "binance,BTCUSDT,1585699200000003,1585699200000003,1,6371.40,,\n"  # no bid
        "binance,BTCUSDT,1585699200000004,1585699200000004,,,,\n"  # nothing
        "binance,BTCUSDT,1585699200000005,1585699200000005,1,-5,6371.30,2\n"  # bad ask
    )
    result = read_file(write(tmp_path / "q.csv", text), "tardis-quotes")

    rows = result.ticks.select("bid", "bid_size", "ask", "ask_size", "crossed").rows()
    assert rows == [
        (6371.5, 2.0, 6371.4, 1.0, True),
        (6371.3, 2.0, None, None, False),
        (None, None, 6371.4, 1.0, False),
    ]
    assert [(line, reason.split(":")[0]) for line, reason, _ in result.rejects.rows()] == [
        (5, "empty_quote"),
        (6, "bad_price"),
    ]


def test_duplicate_timestamps_are_distinct_ticks_in_file_order(tmp_path: Path) -> None:
    text = (
        "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n"
        "bitmex,XBTUSD,1585699200000002,0,3,buy,3,1\n"
        "bitmex,XBTUSD,1585699200000001,0,1,buy,1,1\n"
        "bitmex,XBTUSD,1585699200000001,0,2,sell,2,1\n"
        "bitmex,XBTUSD,1585699200000001,0,2,sell,2,1\n"
    )
    result = read_file(write(tmp_path / "d.csv", text), "tardis-trades")

    assert result.ticks["price"].to_list() == [1.0, 2.0, 2.0, 3.0]
    assert ts_ns(result) == [ns(2020, 4, 1, us=1)] * 3 + [ns(2020, 4, 1, us=2)]


def test_non_utf8_bytes_reject_only_their_row(tmp_path: Path) -> None:
    data = TARDIS_TRADES.encode() + b"binance,BTC\xffUSDT,1585699200248000,0,9,buy,1,1\n"
    data += b"binance,BTCUSDT,1585699200249000,0,10,buy,2,1\n"
    result = read_file(write(tmp_path / "bad.csv", data), "tardis-trades")

    assert result.ticks.height == 4 and accounted(result)
    line, reason, raw = result.rejects.row(0)
    assert (line, reason) == (5, "bad_encoding: invalid UTF-8 bytes")
    assert raw == "binance,BTC\ufffdUSDT,1585699200248000,0,9,buy,1,1"


def test_bad_values_are_rejected_with_line_and_reason(tmp_path: Path) -> None:
    text = (
        "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n"
        "binance,BTCUSDT,1585699200245000,0,1,buy,0,1\n"
        "binance,BTCUSDT,1585699200245000,0,2,buy,NaN,1\n"
        "binance,BTCUSDT,1585699200245000,0,3,buy,1,-2\n"
        "binance,BTCUSDT,not-a-time,0,4,buy,1,1\n"
        "binance,BTC USDT,1585699200245000,0,5,buy,1,1\n"
        "binance,BTCUSDT,1585699200245000,0,6,sideways,1,1\n"
        "binance,BTCUSDT,1585699200245000,0,7,buy,inf,1\n"
    )
    result = read_file(write(tmp_path / "bad.csv", text), "tardis-trades")

    assert result.ticks.height == 0 and result.read == 7
    codes = [reason.split(":")[0] for reason in result.rejects["reason"]]
    assert result.rejects["line"].to_list() == [2, 3, 4, 5, 6, 7, 8]
    assert codes == [
        "bad_price",
        "bad_price",
        "bad_size",
        "bad_timestamp",
        "bad_symbol",
        "bad_side",
        "bad_price",
    ]


def test_gz_input_is_read_directly(tmp_path: Path) -> None:
    path = tmp_path / "binance_trades_2020-04-01_BTCUSDT.csv.gz"
    path.write_bytes(gzip.compress(TARDIS_TRADES.encode()))
    plain = read_file(write(tmp_path / "plain.csv", TARDIS_TRADES), "tardis-trades")

    assert read_file(path, "tardis-trades").ticks.equals(plain.ticks)


def test_zip_input_reads_its_csv_member(tmp_path: Path) -> None:
    path = tmp_path / "eurusd.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("DAT_ASCII_EURUSD_T_201202.txt", "readme\n")
        z.writestr("DAT_ASCII_EURUSD_T_201202.csv", "20120201 000000173,1.306600,1.306770,0\n")
    result = read_file(path, "histdata", symbol="EURUSD")

    assert ts_ns(result) == [ns(2012, 2, 1, 5, 0, 0, us=173_000)]


def test_generic_mapping_with_price_and_bid_ask_reads_trades_and_quotes(tmp_path: Path) -> None:
    text = "t,p,s,b,a\n2024-01-01T00:00:00Z,5,1,,\n2024-01-01T00:00:01Z,,,4,6\n"
    mapping = Mapping(time="t", price="p", size="s", bid="b", ask="a", symbol="X")
    result = read_file(write(tmp_path / "mixed.csv", text), "csv", mapping=mapping)

    rows = result.ticks.select("type", "price", "size", "bid", "ask", "crossed").rows()
    assert rows == [("trade", 5.0, 1.0, None, None, None), ("quote", None, None, 4.0, 6.0, False)]


def test_blank_lines_and_an_empty_file_import_nothing_without_error(tmp_path: Path) -> None:
    empty = read_file(write(tmp_path / "empty.csv", b""), "histdata", symbol="EURUSD")
    blanks = read_file(write(tmp_path / "blanks.csv", "\n\r\n"), "histdata", symbol="EURUSD")

    assert (empty.read, empty.ticks.height, empty.rejects.height) == (0, 0, 0)
    assert (blanks.read, blanks.ticks.height, blanks.rejects.height) == (0, 0, 0)


# Each format's example in FORMAT_GUIDE (shown by `tickpipe import --help`), as a file of that
# format: (file name, contents, read_file arguments).
GUIDE_EXAMPLES = {
    "tardis-trades": ("t.csv", "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n"
                      "binance,BTCUSDT,1700000000000001,1700000000000100,1,buy,37000.5,0.01\n", {}),
    "tardis-quotes": ("q.csv", "exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,"
                      "bid_price,bid_amount\n"
                      "binance,BTCUSDT,1700000000000001,1700000000000100,0.5,37000.6,37000.4,1.2"
                      "\n", {}),
    "histdata": ("h.csv", "20120201 000000173,1.306600,1.306770,0\n", {"symbol": "EURUSD"}),
    "lobster": ("AAPL_2012-06-21_34200000_57600000_message_1.csv",
                "34200.025552880,4,16120456,100,5859100,-1\n", {}),
    "lean": ("20131007_aapl_Trade_Tick.csv", "34200000,4868000,100,P,00000000,0\n", {}),
    "csv": ("c.csv", "when,ticker,px,qty\n1700000000123,ES,4500.25,3\n", {"mapping": Mapping(
        time="when", time_unit="ms", symbol_column="ticker", price="px", size="qty")}),
    "tardis-book": ("b.csv", "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,"
                    "amount\nderibit,BTC-PERPETUAL,1585699200245000,1585699200355684,true,ask,"
                    "6421.5,18640\n", {}),
    "binance-trades": ("BNBUSDT-trades-2020-03.csv", "51175358,17.80180000,5.69000000,"
                       "101.29224200,1583709433583,True,True\n", {}),
    "binance-aggtrades": ("ETHBTC-aggTrades-2017-06.csv", "26129,0.01633102,4.70443515,27781,"
                          "27781,1498793709153,true\n", {}),
    "binance-bookticker": ("BTCUSDT-bookTicker-2024-01-02.csv", "1,42000.1,2.5,42000.2,1.25,"
                           "1704153600123,1704153600125\n", {}),
    "polygon-trades": ("2024-04-05.csv", "ticker,conditions,correction,exchange,id,"
                       "participant_timestamp,price,sequence_number,sip_timestamp,size,tape,"
                       "trf_id,trf_timestamp\n"
                       'A,"12,37",0,11,52983525035312,1712306654208705342,142.99,3807,'
                       "1712306654208740096,5,1,0,0\n", {}),
    "dukascopy": ("q.csv", "timestamp,askPrice,bidPrice,askVolume,bidVolume\n"
                  "1585526400104,1.11369,1.11361,0.75,0.75\n", {"symbol": "EURUSD"}),
}  # fmt: skip


# Databento's example is a DBN record (binary), shown as its fields: tests/test_vendor_formats.py
# imports that record.
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "databento"])
def test_the_example_of_each_format_guide_imports(tmp_path: Path, fmt: str) -> None:
    from server.history.importers import FORMAT_GUIDE

    name, text, kwargs = GUIDE_EXAMPLES[fmt]
    guide = FORMAT_GUIDE[fmt].replace("\n  ", "")  # a header may wrap onto two lines
    for line in text.splitlines():
        assert line in FORMAT_GUIDE[fmt] or line in guide, line
    result = read_file(write(tmp_path / name, text), fmt, **kwargs)
    assert result.ticks.height == 1 and result.rejects.height == 0, result.rejects


def test_stored_rows_and_the_wire_agree_on_the_stored_columns() -> None:
    from server import wire
    from server.ticks import STORED_SCHEMA

    assert len(STORED_SCHEMA) == wire.STORED_COLUMNS
    assert list(STORED_SCHEMA)[13:] == ["crossed", "flags"]
    row = (
        "X",
        "quote",
        1,
        -5,
        1,
        None,
        None,
        None,
        1.0,
        None,
        2.0,
        None,
        None,
        False,
        "suspicious",
    )
    assert '"flags":"suspicious"' in wire.row_event(row, "}")


def test_constant_tells_a_column_of_one_value_from_one_of_several() -> None:
    from server.history.importers.common import constant

    assert constant(pl.Series([], dtype=pl.Utf8))
    assert constant(pl.Series(["A", "A"])) and constant(pl.Series([None, None], dtype=pl.Utf8))
    assert not constant(pl.Series(["A", "B"]))
    assert not constant(pl.Series(["A", None])) and not constant(pl.Series([None, "A"]))
