"""The fault benchmark's bookkeeping: how delivered seqs are kept and losses are counted."""

from __future__ import annotations

from bench.chaos import count_in, missing, overlap
from bench.chaos_clients import Delivery, LatencyLog, Runs
from tickpipe.client import TickpipeError


def tick(sym: str, seq: int) -> dict[str, object]:
    return {"type": "quote", "sym": sym, "seq": seq, "ts": 0, "bid": 1.0, "ask": 2.0}


def test_runs_keep_contiguous_seqs_as_one_run_and_spot_duplicates() -> None:
    r = Runs()
    assert all(r.add(q) for q in (1, 2, 3, 7, 8, 5))
    assert r.runs == [[1, 3], [5, 5], [7, 8]]
    assert not r.add(2) and not r.add(8) and not r.add(5)
    assert r.add(4) and r.runs == [[1, 5], [7, 8]]
    assert r.add(6) and r.runs == [[1, 8]]
    assert r.add(0) and r.runs == [[0, 8]]


def test_missing_and_counts_over_a_range() -> None:
    runs = [[1, 3], [7, 8], [12, 20]]
    assert missing(runs, 2, 14) == [[4, 6], [9, 11]]
    assert missing(runs, 21, 25) == [[21, 25]]
    assert missing([], 1, 3) == [[1, 3]]
    assert missing(runs, 7, 8) == []
    assert count_in(runs, 2, 14) == 2 + 2 + 3
    assert overlap([[4, 8]], runs) == 2


def test_a_lower_seq_after_a_restarted_subscription_is_a_new_epoch_not_a_duplicate() -> None:
    d = Delivery("c0", LatencyLog())
    for q in (10, 11, 12):
        d.tick(tick("A", q))
    d.tick(tick("A", 11))  # the same subscription: a duplicate
    d.report(TickpipeError("epoch_changed", "sequence restarted"))
    for q in (1, 2):
        d.tick(tick("A", q))
    assert d.runs[("A", 0)].runs == [[10, 12]]
    assert d.runs[("A", 1)].runs == [[1, 2]]
    assert d.dups == {("A", 0): [11]}
    assert [r["code"] for r in d.reports] == ["epoch_changed"]
