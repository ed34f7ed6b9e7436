"""The vendor formats added to the importer, each on a file in the vendor's exact layout.

Sources of every layout: tests/data/SOURCES.md and tests/data/vendors/*/LAYOUT.md. Real files are
read where the repository has them (Tardis book data); the others are written here in the
documented layout (Databento files by Databento's own encoder, ``databento-dbn``).
"""

from __future__ import annotations

import datetime as dt
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import databento_dbn as dbn
import polars as pl
import pytest

from server.history.importers import FORMAT_GUIDE, FORMATS, read_file
from server.ticks import TICK_SCHEMA

VENDORS = Path(__file__).parent / "data" / "vendors"
UTC = dt.UTC


def ns(*args: int, us: int = 0, nanos: int = 0) -> int:
    t = dt.datetime(*args, tzinfo=UTC) + dt.timedelta(microseconds=us)
    return (t - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1) * 1000 + nanos


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def zipped(path: Path, member: str, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, text)
    return path


def rows(frame: pl.DataFrame, *cols: str) -> list[tuple[object, ...]]:
    return frame.select(cols).rows()


# --- Binance public data (binance_vision/LAYOUT.md) -------------------------------------------


def test_binance_spot_trades_without_header_read_ms_and_us_times(tmp_path: Path) -> None:
    text = (
        "51175358,17.80180000,5.69000000,101.29224200,1583709433583,True,True\n"
        "51175359,17.80190000,1.00000000,17.80190000,1583709433584,False,True\n"
        # newer spot files: microseconds
        "51175360,17.80200000,2.00000000,35.60400000,1750032000153116,false,true\n"
    )
    result = read_file(write(tmp_path / "BNBUSDT-trades-2020-03.csv", text), "binance-trades")

    assert result.ticks.schema == pl.Schema(TICK_SCHEMA)
    assert result.rejects.height == 0 and result.read == 3
    assert result.ticks["ts"].dt.epoch("ns").to_list() == [
        1583709433583 * 10**6,
        1583709433584 * 10**6,
        1750032000153116 * 1000,
    ]
    assert rows(result.ticks, "sym", "type", "price", "size", "side", "venue") == [
        ("BNBUSDT", "trade", 17.8018, 5.69, "sell", "BINANCE"),  # buyer was the maker
        ("BNBUSDT", "trade", 17.8019, 1.0, "buy", "BINANCE"),
        ("BNBUSDT", "trade", 17.802, 2.0, "buy", "BINANCE"),
    ]


def test_binance_futures_trades_with_header_inside_their_zip(tmp_path: Path) -> None:
    text = (
        "id,price,qty,quote_qty,time,is_buyer_maker\n28457,4.00000100,12.00000000,48.00,"
        "1499865549590,true\n"
    )
    path = zipped(tmp_path / "BTCUSDT-trades-2017-07.zip", "BTCUSDT-trades-2017-07.csv", text)
    result = read_file(path, "binance-trades")

    assert result.read == 1 and result.rejects.height == 0
    assert rows(result.ticks, "sym", "price", "size", "side", "venue") == [
        ("BTCUSDT", 4.000001, 12.0, "sell", "BINANCE-FUTURES")
    ]


def test_binance_agg_trades_spot_and_futures(tmp_path: Path) -> None:
    spot = write(
        tmp_path / "BNBBTC-aggTrades-2020-12-25.csv",
        "0,0.20000000,50.00000000,0,0,1608872400000,False,True\n",
    )
    futures = write(
        tmp_path / "ETHBTC-aggTrades-2017-06-30.csv",
        "26129,0.01633102,4.70443515,27781,27781,1498793709153,true\n",
    )
    s, f = read_file(spot, "binance-aggtrades"), read_file(futures, "binance-aggtrades")

    assert rows(s.ticks, "sym", "price", "size", "side", "venue") == [
        ("BNBBTC", 0.2, 50.0, "buy", "BINANCE")
    ]
    assert rows(f.ticks, "sym", "price", "size", "side", "venue") == [
        ("ETHBTC", 0.01633102, 4.70443515, "sell", "BINANCE-FUTURES")
    ]


def test_binance_book_ticker_rows_become_quotes(tmp_path: Path) -> None:
    text = (
        "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,"
        "event_time\n"
        "4291577411419,69612.10,3.462,69612.20,7.805,1711929600003,1711929600009\n"
    )
    result = read_file(write(tmp_path / "BTCUSDT-bookTicker-2024-04-01.csv", text),
                       "binance-bookticker")  # fmt: skip

    assert result.ticks["ts"].dt.epoch("ns").to_list() == [1711929600003 * 10**6]
    assert rows(result.ticks, "type", "bid", "bid_size", "ask", "ask_size", "crossed") == [
        ("quote", 69612.1, 3.462, 69612.2, 7.805, False)
    ]


def test_binance_file_without_its_published_name_needs_a_symbol(tmp_path: Path) -> None:
    path = write(tmp_path / "trades.csv", "1,2.5,1,2.5,1583709433583,True,True\n")
    with pytest.raises(ValueError, match="--symbol"):
        read_file(path, "binance-trades")
    assert read_file(path, "binance-trades", symbol="bnbusdt").ticks["sym"].to_list() == ["BNBUSDT"]


# --- Dukascopy (dukascopy/LAYOUT.md) ----------------------------------------------------------


def test_dukascopy_tick_export_with_and_without_volumes(tmp_path: Path) -> None:
    full = write(
        tmp_path / "eurusd-tick-2020-03-30-2020-03-31.csv",
        "timestamp,askPrice,bidPrice,askVolume,bidVolume\n1585526400104,1.11369,1.11361,0.75,0.75\n",
    )
    bare = write(tmp_path / "quotes.csv", "timestamp,askPrice,bidPrice\n1585526400104,1.1,1.2\n")
    a, b = read_file(full, "dukascopy"), read_file(bare, "dukascopy", symbol="EURUSD")

    assert a.ticks["ts"].dt.epoch("ns").to_list() == [1585526400104 * 10**6]
    assert rows(a.ticks, "sym", "bid", "bid_size", "ask", "ask_size", "venue") == [
        ("EURUSD", 1.11361, 0.75, 1.11369, 0.75, "DUKASCOPY")
    ]
    assert rows(b.ticks, "bid", "bid_size", "ask", "crossed") == [(1.2, None, 1.1, True)]


# --- Polygon flat files (polygon/LAYOUT.md) ---------------------------------------------------

POLYGON_TRADES = (
    "ticker,conditions,correction,exchange,id,participant_timestamp,price,sequence_number,"
    "sip_timestamp,size,tape,trf_id,trf_timestamp\n"
    'A,"12,37",0,11,52983525035312,1712306654208705342,142.99,3807,1712306654208740096,5,1,0,0\n'
    'A,"12,37",0,11,52983525035313,1712306654208705342,143,3808,1712306654208743168,8,1,0,0\n'
    "A,12,0,11,52983525035314,1712306654429439337,143,3809,1712306654429468160,187,1,0,0\n"
)


def test_polygon_trades_flat_file_keeps_ns_sip_times_and_flags_corrections(
    tmp_path: Path,
) -> None:
    text = POLYGON_TRADES + (
        "AAPL,,1,4,77,1712306654500000000,169.5,10,1712306654500000100,100,3,0,0\n"
    )
    result = read_file(write(tmp_path / "2024-04-05.csv", text), "polygon-trades")

    assert result.rejects.height == 0 and result.read == 4
    assert result.ticks["ts"].dt.epoch("ns").to_list() == [
        1712306654208740096,
        1712306654208743168,
        1712306654429468160,
        1712306654500000100,
    ]
    assert rows(result.ticks, "sym", "price", "size", "venue", "flags") == [
        ("A", 142.99, 5.0, "11", None),
        ("A", 143.0, 8.0, "11", None),
        ("A", 143.0, 187.0, "11", None),
        ("AAPL", 169.5, 100.0, "4", "corrected"),
    ]


# --- Databento DBN (databento/LAYOUT.md), written by Databento's own encoder -------------------


@dataclass
class Interval:
    start_date: dt.date
    end_date: dt.date
    symbol: str


@dataclass
class Mapping:
    raw_symbol: str
    intervals: list[Interval]


T0 = ns(2023, 11, 14, 15, 0)


def dbn_file(schema: dbn.Schema, records: list[object]) -> bytes:
    day = dt.date(2023, 11, 14)
    meta = dbn.Metadata(
        dataset="XNAS.ITCH",
        start=T0,
        stype_in=dbn.SType.RAW_SYMBOL,
        stype_out=dbn.SType.INSTRUMENT_ID,
        schema=schema,
        symbols=["AAPL"],
        mappings=[Mapping("AAPL", [Interval(day, day + dt.timedelta(days=1), "1234")])],
    )
    return bytes(meta) + b"".join(bytes(r) for r in records)  # type: ignore[call-overload]


def trade(i: int, side: dbn.Side, flags: int = 0) -> dbn.TradeMsg:
    return dbn.TradeMsg(
        publisher_id=2, instrument_id=1234, ts_event=T0 + i, price=189_500_000_000 + i * 10**7,
        size=100 + i, action=dbn.Action.TRADE, side=side, depth=0, ts_recv=T0 + i + 5,
        flags=flags, sequence=i,
    )  # fmt: skip


def mbp1(i: int, action: dbn.Action, bid: int, ask: int, flags: int = 0) -> dbn.MBP1Msg:
    level = dbn.BidAskPair(bid_px=bid, ask_px=ask, bid_sz=200, ask_sz=300, bid_ct=1, ask_ct=1)
    return dbn.MBP1Msg(
        publisher_id=2, instrument_id=1234, ts_event=T0 + i, price=189_500_000_000, size=10,
        action=action, side=dbn.Side.BID, depth=0, ts_recv=T0 + i + 5, flags=flags,
        levels=level,
    )  # fmt: skip


def test_databento_trades_with_sides_symbols_and_flags(tmp_path: Path) -> None:
    data = dbn_file(
        dbn.Schema.TRADES,
        [
            trade(0, dbn.Side.BID),
            trade(1, dbn.Side.ASK, flags=dbn.F_LAST | dbn.F_BAD_TS_RECV),
            trade(2, dbn.Side.NONE),
        ],
    )
    result = read_file(write(tmp_path / "xnas-itch-20231114.trades.dbn", data), "databento")

    assert result.rejects.height == 0 and result.read == 3
    assert "price=189500000000 size=100 side=B symbol=AAPL" in FORMAT_GUIDE["databento"]
    assert result.ticks["ts"].dt.epoch("ns").to_list() == [T0, T0 + 1, T0 + 2]
    assert rows(result.ticks, "sym", "price", "size", "side", "venue", "flags") == [
        ("AAPL", 189.5, 100.0, "buy", "XNAS", None),
        ("AAPL", 189.51, 101.0, "sell", "XNAS", "bad_ts_recv"),
        ("AAPL", 189.52, 102.0, None, "XNAS", None),
    ]


def test_databento_zstd_file_reads_like_the_plain_one(tmp_path: Path) -> None:
    data = dbn_file(dbn.Schema.TRADES, [trade(0, dbn.Side.BID), trade(1, dbn.Side.ASK)])
    out = io.BytesIO()
    zst = dbn.Transcoder(out, dbn.Encoding.DBN, dbn.Compression.ZSTD)
    zst.write(data)
    zst.flush()
    plain = read_file(write(tmp_path / "t.dbn", data), "databento")
    packed = read_file(write(tmp_path / "t.dbn.zst", out.getvalue()), "databento")

    assert out.getvalue()[:4] == b"\x28\xb5\x2f\xfd"
    assert packed.ticks.equals(plain.ticks) and plain.ticks.height == 2


def test_databento_mbp1_gives_trades_and_a_quote_per_top_of_book_change(tmp_path: Path) -> None:
    bid, ask = 189_400_000_000, 189_600_000_000
    data = dbn_file(
        dbn.Schema.MBP_1,
        [
            mbp1(0, dbn.Action.ADD, bid, ask),
            mbp1(1, dbn.Action.ADD, bid, ask),  # same top: no quote
            mbp1(2, dbn.Action.TRADE, bid, ask),  # a trade, same top
            mbp1(3, dbn.Action.CANCEL, bid, dbn.UNDEF_PRICE, flags=dbn.F_MAYBE_BAD_BOOK),
        ],
    )
    result = read_file(write(tmp_path / "mbp1.dbn", data), "databento")

    assert rows(result.ticks, "type", "price", "bid", "ask", "flags") == [
        ("quote", None, 189.4, 189.6, None),
        ("trade", 189.5, None, None, None),
        ("quote", None, 189.4, None, "maybe_bad_book"),
    ]


def test_databento_tbbo_pairs_each_trade_with_the_quote_before_it(tmp_path: Path) -> None:
    data = dbn_file(dbn.Schema.TBBO, [mbp1(0, dbn.Action.TRADE, 189_400_000_000, 189_600_000_000)])
    result = read_file(write(tmp_path / "tbbo.dbn", data), "databento")

    assert rows(result.ticks, "type", "price", "bid", "bid_size", "ask", "ask_size") == [
        ("quote", None, 189.4, 200.0, 189.6, 300.0),
        ("trade", 189.5, None, None, None, None),
    ]


def test_a_damaged_dbn_file_is_a_clear_error(tmp_path: Path) -> None:
    data = dbn_file(dbn.Schema.TRADES, [trade(0, dbn.Side.BID)])
    with pytest.raises(ValueError, match="not a readable DBN file"):
        read_file(write(tmp_path / "cut.dbn", data[:40]), "databento")


# --- Tardis book data reduced to the top of the book (real files, tardis/) ----------------------


def test_tardis_incremental_book_l2_snapshot_gives_its_best_ask() -> None:
    result = read_file(VENDORS / "tardis" / "deribit_incremental_book_L2_BTC-PERPETUAL.csv",
                       "tardis-book")  # fmt: skip

    # 15 ask levels of one snapshot message: one quote, ask side only.
    assert result.read == 15 and result.rejects.height == 0 and result.skipped == 14
    assert result.ticks["ts"].dt.epoch("ns").to_list() == [1585699200245000 * 1000]
    assert rows(result.ticks, "sym", "venue", "bid", "ask", "ask_size") == [
        ("BTC-PERPETUAL", "DERIBIT", None, 6421.5, 18640.0)
    ]


def test_tardis_incremental_book_l2_updates_remove_and_replace_levels(tmp_path: Path) -> None:
    text = (
        "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount\n"
        "deribit,BTC-PERPETUAL,1585699200245000,1585699200355684,true,ask,6421.5,10\n"
        "deribit,BTC-PERPETUAL,1585699200245000,1585699200355684,true,ask,6422,5\n"
        "deribit,BTC-PERPETUAL,1585699200245000,1585699200355684,true,bid,6420,7\n"
        "deribit,BTC-PERPETUAL,1585699200300000,1585699200400000,false,ask,6421.5,0\n"
        "deribit,BTC-PERPETUAL,1585699200301000,1585699200401000,false,bid,6419,3\n"
        "deribit,BTC-PERPETUAL,1585699200302000,1585699200402000,false,bid,6421,2\n"
    )
    result = read_file(write(tmp_path / "l2.csv", text), "tardis-book")

    assert rows(result.ticks, "bid", "bid_size", "ask", "ask_size") == [
        (6420.0, 7.0, 6421.5, 10.0),
        (6420.0, 7.0, 6422.0, 5.0),  # best ask removed
        (6421.0, 2.0, 6422.0, 5.0),  # a better bid; the update below the best changed nothing
    ]
    assert result.skipped == 3


def test_tardis_book_snapshot_5_gives_a_quote_when_the_top_changes() -> None:
    result = read_file(VENDORS / "tardis" / "binance-futures_book_snapshot_5_BTCUSDT.csv",
                       "tardis-book")  # fmt: skip

    assert result.read == 10 and result.rejects.height == 0
    assert rows(result.ticks, "bid", "bid_size", "ask", "ask_size") == [
        (11657.07, 10.896, 11657.08, 1.714),
        (11657.07, 10.896, 11657.08, 1.476),
        (11657.07, 10.896, 11657.08, 1.475),
        (11657.07, 10.881, 11657.08, 1.475),
        (11657.07, 10.881, 11657.08, 1.321),
        (11657.07, 10.881, 11657.08, 1.477),
        (11657.07, 10.881, 11657.08, 1.631),
        (11657.07, 10.881, 11657.08, 1.393),
    ]
    assert result.skipped == 2 and result.ticks["venue"][0] == "BINANCE-FUTURES"


# --- QuantConnect Lean forex, CFD and crypto (quantconnect_lean/LAYOUT.md) ----------------------


def test_lean_fxcm_quote_zip_is_in_utc_minus_5_with_crlf_and_crossed_quotes(
    tmp_path: Path,
) -> None:
    text = "3074,1.38700,1.38720\r\n7826,1.38710,1.38720\r\n19317,1.38730,1.38725\r\n"
    path = zipped(
        tmp_path / "forex" / "fxcm" / "tick" / "eurusd" / "20140505_quote.zip",
        "20140505_eurusd_tick_quote.csv",
        text,
    )
    result = read_file(path, "lean")

    assert result.rejects.height == 0 and result.read == 3
    # FXCM data is in UTC-05 all year (Lean's market-hours database): midnight is 05:00 UTC.
    assert result.ticks["ts"].dt.epoch("ns").to_list() == [
        ns(2014, 5, 5, 5, 0, 3, us=74_000),
        ns(2014, 5, 5, 5, 0, 7, us=826_000),
        ns(2014, 5, 5, 5, 0, 19, us=317_000),
    ]
    assert rows(result.ticks, "sym", "bid", "ask", "bid_size", "crossed", "venue") == [
        ("EURUSD", 1.387, 1.3872, None, False, "FXCM"),
        ("EURUSD", 1.3871, 1.3872, None, False, "FXCM"),
        ("EURUSD", 1.3873, 1.38725, None, True, "FXCM"),
    ]


def test_lean_oanda_cfd_quotes_are_utc_with_fractional_milliseconds(tmp_path: Path) -> None:
    path = zipped(
        tmp_path / "cfd" / "oanda" / "tick" / "xauusd" / "20140505_quote.zip",
        "20140505_xauusd_tick_quote.csv",
        "40.1868,1300.100,1300.500\n",
    )
    result = read_file(path, "lean")

    assert result.ticks["ts"].dt.epoch("ns").to_list() == [ns(2014, 5, 5, 0, 0, 0, us=40_186,
                                                              nanos=800)]  # fmt: skip
    assert rows(result.ticks, "sym", "bid", "ask", "venue") == [("XAUUSD", 1300.1, 1300.5, "OANDA")]


def test_lean_file_outside_its_folders_takes_the_market_from_the_argument(tmp_path: Path) -> None:
    path = zipped(tmp_path / "20140505_quote.zip", "20140505_eurusd_tick_quote.csv", "0,1,2\n")
    with pytest.raises(ValueError, match="--lean-market"):
        read_file(path, "lean")
    result = read_file(path, "lean", lean_market="forex/oanda")
    assert result.ticks["ts"].dt.epoch("ns").to_list() == [ns(2014, 5, 5)]


def test_lean_crypto_trades_and_quotes_keep_suspicious_rows_flagged(tmp_path: Path) -> None:
    folder = tmp_path / "crypto" / "coinbase" / "tick" / "btcusd"
    trades = zipped(folder / "20180405_trade.zip", "20180405_btcusd_tick_trade.csv",
                    "86400,232.40,93.1\n86401,232.41,1.5,1\n")  # fmt: skip
    quotes = zipped(folder / "20180405_quote.zip", "20180405_btcusd_tick_quote.csv",
                    "86400,232.40,20392.0,232.42,8059.5\n")  # fmt: skip
    t, q = read_file(trades, "lean"), read_file(quotes, "lean")

    assert rows(t.ticks, "sym", "price", "size", "venue", "flags") == [
        ("BTCUSD", 232.4, 93.1, "COINBASE", None),
        ("BTCUSD", 232.41, 1.5, "COINBASE", "suspicious"),
    ]
    assert t.ticks["ts"].dt.epoch("ns").to_list()[0] == ns(2018, 4, 5, 0, 1, 26, us=400_000)
    assert rows(q.ticks, "bid", "bid_size", "ask", "ask_size") == [(232.4, 20392.0, 232.42, 8059.5)]


# --- LOBSTER with the 7th column and the lobster_ prefix ----------------------------------------


def test_lobster_seven_column_file_with_prefix_imports(tmp_path: Path) -> None:
    text = (
        "34713.685155243,1,206833312,100,118600,-1,NSDQ\n"
        "34714.133632201,4,206833312,100,118600,-1,NSDQ\n"
        "34714.133632202,5,0,50,118500,1,\n"
        "34714.2,x,0,50,118500,1,\n"  # not an event type: rejected, not skipped
    )
    name = "lobster_AAPL_2012-06-21_34200000_57600000_message_10.csv"
    result = read_file(write(tmp_path / name, text), "lobster")

    assert result.read == 4 and result.skipped == 1
    assert result.rejects.rows() == [
        (4, "bad_row: unknown LOBSTER event type ?", "34714.2,x,0,50,118500,1,")
    ]
    assert rows(result.ticks, "sym", "price", "size", "side") == [
        ("AAPL", 11.86, 100.0, "buy"),
        ("AAPL", 11.85, 50.0, "sell"),
    ]


# --- every format's --help example imports ----------------------------------------------------


def test_every_format_has_a_guide_with_its_columns() -> None:
    assert set(FORMAT_GUIDE) == set(FORMATS)
    for fmt in FORMATS:
        assert len(FORMAT_GUIDE[fmt].splitlines()) >= 2, fmt
