"""GET /ticks/gaps and the gap count on /ticks/historical: holes in stored seq, epoch changes."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import httpx
import pytest

from server.ticks import STORED_SCHEMA
from tests.harness import TLS, Stack, corrupt_history_file, write_history
from tests.test_recorder import published, wait_recorded

T0 = int(dt.datetime(2026, 1, 2, 14, 30, tzinfo=dt.UTC).timestamp()) * 10**9
MS = 10**6
NO_GAPS = {"gaps": [], "epoch_changes": [], "count": 0, "upstream_gaps": []}


def _tick(sym: str, epoch: int, seq: int) -> dict[str, object]:
    """A trade at T0 + seq ms; ticks of epoch 2 come 100 ms later, after the restart."""
    row: dict[str, object] = dict.fromkeys(STORED_SCHEMA)
    row.update(sym=sym, type="trade", ts=_ts(sym, epoch, seq), epoch=epoch, seq=seq)
    row.update(price=100.0, size=1.0, venue="X")
    return row


def _ts(sym: str, epoch: int, seq: int) -> int:
    return T0 + (seq + (100 if epoch == 2 else 0)) * MS


HAND_ROWS = [
    # AAPL: seq 1..10, then 14..20 -> one gap 11..13
    *(_tick("AAPL", 1, s) for s in [*range(1, 11), *range(14, 21)]),
    # MSFT: epoch 1 seq 1..5, then the feed restarted: epoch 2 seq 1..5, no hole
    *(_tick("MSFT", 1, s) for s in range(1, 6)),
    *(_tick("MSFT", 2, s) for s in range(1, 6)),
    # OLD: imported history (negative epoch) with a hole 3..4
    *(_tick("OLD", -7, s) for s in (1, 2, 5)),
]


@pytest.fixture(scope="module")
def handmade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack without a feed over one hand-written history file and a corrupted file on
    another date."""
    s = Stack(tmp_path_factory.mktemp("gaps"), feed=False)
    write_history(s.data_dir / "history", HAND_ROWS)
    corrupt_history_file(s.data_dir / "history")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _key(stack: Stack, scopes: tuple[str, ...] = ("historical",), symbols=None) -> str:
    return stack.key(f"k{time.monotonic_ns()}", scopes, symbols)


def _get(stack: Stack, path: str, key: str | None, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{stack.base}{path}", params=params, headers=headers, timeout=60,
                     verify=TLS)  # fmt: skip


def _gaps(stack: Stack, key: str | None, **params: object) -> httpx.Response:
    return _get(stack, "/ticks/gaps", key, **params)


def test_gaps_lists_the_hole_with_the_ticks_around_it(handmade: Stack) -> None:
    body = _gaps(handmade, _key(handmade), symbols="AAPL", start=T0, end=T0 + 10**9).json()
    assert body == {
        "gaps": [
            {
                "sym": "AAPL",
                "epoch": 1,
                "from_seq": 11,
                "to_seq": 13,
                "missing": 3,
                "after_ts": T0 + 10 * MS,
                "before_ts": T0 + 14 * MS,
            }
        ],
        "epoch_changes": [],
        "count": 1,
        "upstream_gaps": [],  # no live venue source found a hole in a venue's trade ids
    }


def test_an_epoch_change_is_reported_and_is_not_a_gap(handmade: Stack) -> None:
    body = _gaps(handmade, _key(handmade), symbols="MSFT", start=T0, end=T0 + 10**9).json()
    assert body["gaps"] == [] and body["count"] == 0
    assert body["epoch_changes"] == [
        {
            "sym": "MSFT",
            "kind": "epoch_change",
            "from_epoch": 1,
            "to_epoch": 2,
            "at_ts": _ts("MSFT", 2, 1),
        }
    ]


def test_imported_history_with_a_negative_epoch_reports_its_gaps(handmade: Stack) -> None:
    body = _gaps(handmade, _key(handmade), symbols="OLD", start=T0, end=T0 + 10**9).json()
    assert [(g["epoch"], g["from_seq"], g["to_seq"], g["missing"]) for g in body["gaps"]] == [
        (-7, 3, 4, 2)
    ]
    assert body["epoch_changes"] == []


def test_several_symbols_are_answered_together(handmade: Stack) -> None:
    params = dict(symbols="AAPL,MSFT,OLD", start=T0, end=T0 + 10**9)
    body = _gaps(handmade, _key(handmade), **params).json()
    assert [g["sym"] for g in body["gaps"]] == ["AAPL", "OLD"]
    assert body["count"] == 2
    assert [c["sym"] for c in body["epoch_changes"]] == ["MSFT"]


def test_a_range_without_gaps_has_none_everywhere(handmade: Stack) -> None:
    key = _key(handmade)
    params = dict(symbols="AAPL", start=T0, end=T0 + 11 * MS)  # seq 1..10 only
    assert _gaps(handmade, key, **params).json() == NO_GAPS
    resp = _get(handmade, "/ticks/historical", key, **params)
    assert resp.headers["X-Tickpipe-Gaps"] == "0"
    assert resp.json()["gaps"] == 0 and resp.json()["count"] == 10


def test_historical_says_when_its_range_contains_a_gap(handmade: Stack) -> None:
    key = _key(handmade)
    params = dict(symbols="AAPL", start=T0, end=T0 + 10**9)
    resp = _get(handmade, "/ticks/historical", key, **params)
    assert resp.headers["X-Tickpipe-Gaps"] == "1"
    body = resp.json()
    assert body["gaps"] == 1 and body["count"] == 17 and body["next_cursor"] is None
    for fmt in ("ndjson", "csv", "parquet", "arrow"):
        resp = _get(handmade, "/ticks/historical", key, format=fmt, **params)
        assert resp.status_code == 200 and resp.headers["X-Tickpipe-Gaps"] == "1", fmt


def test_the_gap_count_ignores_the_types_filter(handmade: Stack) -> None:
    params = dict(symbols="AAPL", start=T0, end=T0 + 10**9, types="quote")
    resp = _get(handmade, "/ticks/historical", _key(handmade), **params)
    assert resp.json()["count"] == 0 and resp.headers["X-Tickpipe-Gaps"] == "1"


def test_no_history_yet_has_no_gaps(handmade: Stack) -> None:
    body = _gaps(handmade, _key(handmade), symbols="AAPL", start=1, end=10).json()
    assert body == NO_GAPS


def test_a_corrupted_file_errors_clearly(handmade: Stack) -> None:
    resp = _gaps(handmade, _key(handmade), symbols="AAPL", start="2026-01-05", end="2026-01-06")
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["code"] == "corrupt_history" and err["file"].endswith("3-0_3-9.parquet")


def test_gaps_auth_errors(handmade: Stack) -> None:
    params = dict(symbols="AAPL,MSFT", start=T0, end=T0 + 10**9)
    assert _gaps(handmade, None, **params).status_code == 401
    assert _gaps(handmade, "tp_wrong", **params).status_code == 401
    resp = _gaps(handmade, _key(handmade, ("realtime",)), **params)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    resp = _gaps(handmade, _key(handmade, symbols=["AAPL"]), **params)
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert err["code"] == "not_entitled" and err["symbols"] == ["MSFT"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"symbols": "AAPL", "start": 20, "end": 10}, "start must be before end"),
        ({"symbols": "AAPL", "start": "yesterday", "end": 10}, "not a time"),
        ({"symbols": "AAPL", "end": 10}, "start is required"),
        ({"start": 1, "end": 10}, "symbols is required"),
    ],
)
def test_gaps_bad_parameters_are_422(handmade: Stack, params: dict, needle: str) -> None:
    resp = _gaps(handmade, _key(handmade), **params)
    assert resp.status_code == 422, resp.text
    assert needle in resp.json()["error"]["message"]


def test_a_live_recording_has_no_gaps(own_stack) -> None:
    s: Stack = own_stack(recorder=True, feed_rate=1000, recorder_flush_s=0.2)
    time.sleep(2)
    assert s.feed is not None
    s.feed.stop()
    pub = published(s)
    total = sum(seq for _e, seq in pub.values())
    assert wait_recorded(s, total) == total
    key = _key(s)
    params = dict(symbols=",".join(pub), start=0, end=time.time_ns() + 10**9)
    assert _gaps(s, key, **params).json() == NO_GAPS
    resp = _get(s, "/ticks/historical", key, format="ndjson", **params)
    assert resp.status_code == 200 and resp.headers["X-Tickpipe-Gaps"] == "0"
