"""A history range reaching up to now has no hole: what the recorder has not stored yet is read
from the tickerplant log in Redis, each tick exactly once across the boundary."""

from __future__ import annotations

import io
import time

import httpx
import polars as pl

from tests.harness import TLS, WAIT_S, Stack, eventually_sync
from tests.test_recorder import count_stored, published

SYMS = ["AAPL", "MSFT", "EURUSD"]


def _history(stack: Stack, start_ns: int, **params: object) -> httpx.Response:
    key = stack.key(f"h{time.monotonic_ns()}", ("historical",))
    return httpx.get(
        f"{stack.base}/ticks/historical",
        params={"symbols": ",".join(SYMS), "start": start_ns, "end": time.time_ns() + 60 * 10**9,
                "format": "ndjson", **params},
        headers={"Authorization": f"Bearer {key}"},
        timeout=WAIT_S,
        verify=TLS,
    )  # fmt: skip


def _frame(resp: httpx.Response) -> pl.DataFrame:
    assert resp.status_code == 200, resp.text
    return pl.read_ndjson(io.BytesIO(resp.content), infer_schema_length=None)


def _assert_contiguous_from_1(frame: pl.DataFrame, at_least: dict[str, tuple[int, int]]) -> None:
    for sym in SYMS:
        seqs = frame.filter(pl.col("sym") == sym)["seq"].to_list()
        assert seqs == list(range(1, len(seqs) + 1)), f"{sym}: holes or duplicates"
        assert len(seqs) >= at_least[sym][1], f"{sym}: ticks published before the query missing"


def test_a_range_up_to_now_has_every_seq_once_across_the_recorded_boundary(own_stack) -> None:
    s: Stack = own_stack(recorder=True, feed_rate=1000, recorder_flush_s=3)
    start = time.time_ns() - 60 * 10**9
    eventually_sync(lambda: count_stored(s), what="a first stored tick")
    before = published(s)
    resp = _history(s, start)
    frame = _frame(resp)
    assert int(resp.headers["X-Tickpipe-Unrecorded"]) > 0, "no tick came from the log"
    assert resp.headers["X-Tickpipe-Gaps"] == "0"
    _assert_contiguous_from_1(frame, before)
    # Paged JSON over the same boundary: every seq once as well.
    rows: list[dict] = []
    cursor = None
    while True:
        page = _history(
            s, start, format="json", limit=500, **({"cursor": cursor} if cursor else {})
        )
        body = page.json()
        rows.extend(body["rows"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    _assert_contiguous_from_1(pl.DataFrame(rows, infer_schema_length=None), before)


def test_without_a_recorder_history_answers_from_the_log(own_stack) -> None:
    s: Stack = own_stack(feed_rate=500)
    time.sleep(1)
    before = published(s)
    resp = _history(s, time.time_ns() - 60 * 10**9)
    frame = _frame(resp)
    _assert_contiguous_from_1(frame, before)
    assert int(resp.headers["X-Tickpipe-Unrecorded"]) >= frame.height


def test_a_recorder_far_behind_is_reported_not_hidden(own_stack) -> None:
    s: Stack = own_stack(feed_rate=500, history_tail_max_batches=5)
    start = time.time_ns() - 60 * 10**9
    # more than 5 batches unrecorded: 50 ms at full pace, longer when a busy feed is slow
    resp = eventually_sync(
        lambda: _history(s, start),
        lambda r: r.status_code != 200 or r.headers["X-Tickpipe-Unrecorded"].endswith("+"),
        every=0.3, what="more than 5 batches published",
    )  # fmt: skip
    assert resp.status_code == 200
    assert resp.headers["X-Tickpipe-Unrecorded"].endswith("+")


def test_with_redis_down_stored_history_still_answers_and_says_so(own_stack) -> None:
    s: Stack = own_stack(recorder=True, feed_rate=1000, recorder_flush_s=0.2)
    start = time.time_ns() - 60 * 10**9
    time.sleep(1)
    s.feed.stop()
    total = sum(seq for sym, (_e, seq) in published(s).items() if sym in SYMS)
    # Stored, not only answered: the answer reads what the recorder has not stored yet from
    # the log, so wait until none of it came from there.
    eventually_sync(
        lambda: _history(s, start),
        lambda r: r.headers["X-Tickpipe-Unrecorded"] == "0" and _frame(r).height >= total,
        every=0.3, what="every published tick stored",
    )  # fmt: skip
    s.redis.kill()
    resp = _history(s, start)
    assert resp.headers["X-Tickpipe-Unrecorded"] == "unavailable"
    assert _frame(resp).height == total
