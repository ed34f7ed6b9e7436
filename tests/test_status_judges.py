"""The status judges, without a process or a clock: each verdict from figures and a time, and
the heartbeat records as they go into a Redis hash and come back (``server.ops``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from server.ops.board import ErrorJournal
from server.ops.heartbeat import FeedBeat, RecorderBeat, WebBeat
from server.ops.judges import (
    DEGRADED,
    DOWN,
    UP,
    Part,
    SymbolTrack,
    judge_feed,
    judge_recorder,
    judge_redis,
    judge_symbol,
    judge_web,
    overall,
)

NOW = 1_790_000_000.0  # unix seconds
NS = 10**9


def _hash(mapping: dict) -> dict[bytes, bytes]:
    """A mapping as Redis gives it back from HGETALL."""
    return {
        str(k).encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in mapping.items()
    }


FEED = FeedBeat(state="running", pid=7, rate=400.0, published=10_000, rejected={},
                last_rejects=[], last_tick_ns=int((NOW - 0.2) * NS),
                updated_ns=int((NOW - 0.5) * NS))  # fmt: skip
RECORDER = RecorderBeat(pid=8, state="ok", error="", write_errors=0, rows_stored=5_000,
                        lag_batches=3, lag_ticks=12, pending_batches=1, lag_s=0.4,
                        last_flush_ns=int((NOW - 1) * NS), files_compacted=0,
                        updated_ns=int((NOW - 0.5) * NS))  # fmt: skip


def feed(**over: Any) -> FeedBeat:
    return dataclasses.replace(FEED, **over)


def recorder(**over: Any) -> RecorderBeat:
    return dataclasses.replace(RECORDER, **over)


def test_heartbeat_records_come_back_from_a_redis_hash_as_they_went_in() -> None:
    beat = feed(rejected={"bad_price": 2}, last_rejects=[{"reason": "bad_price"}])
    assert FeedBeat.parse(_hash(beat.mapping())) == beat
    assert RecorderBeat.parse(_hash(recorder().mapping())) == recorder()
    web = WebBeat({"connections": 3, "redis_pubsub": "up", "ticks_out_per_s": 1.5}, 123)
    assert WebBeat.parse(_hash(web.mapping())) == web
    assert FeedBeat.parse({}) is None and RecorderBeat.parse({}) is None


def test_a_half_written_heartbeat_reads_as_defaults() -> None:
    beat = RecorderBeat.parse({b"pid": b"not a number"})
    assert beat is not None and beat.pid == 0 and beat.lag_batches == -1 and beat.lag_s == -1


def test_a_publishing_feed_is_up_with_its_rate() -> None:
    part = judge_feed("sim", feed(), seen=NOW - 0.5, now=NOW)
    assert (part.id, part.kind, part.state) == ("feed:sim", "feed", UP)
    assert part.reason == "publishing 400 ticks/s"
    assert part.figures["heartbeat_age_s"] == 0.5 and part.figures["last_tick_age_s"] == 0.2


@pytest.mark.parametrize(
    ("beat", "state", "words"),
    [
        (None, DOWN, "not running (start it: tickpipe feed)"),
        (feed(updated_ns=int((NOW - 4) * NS)), DOWN, "no heartbeat for 4.0 s"),
        (feed(state="redis_down"), DEGRADED, "Redis unreachable"),
        (feed(state=""), DEGRADED, "starting: not publishing yet"),
        (feed(last_tick_ns=int((NOW - 6) * NS)), DEGRADED, "no tick published for 6.0 s"),
        (feed(last_tick_ns=0), DEGRADED, "no tick published for its start"),
        (feed(rejected={"bad_price": 3}), UP, "; 3 rejected so far"),
    ],
)
def test_feed_verdicts(beat: FeedBeat | None, state: str, words: str) -> None:
    part = judge_feed("sim", beat, seen=NOW - 20, now=NOW)
    assert part.state == state and words in part.reason, part


def test_a_feed_never_seen_says_so() -> None:
    assert "no heartbeat yet" in judge_feed("sim", None, seen=0.0, now=NOW).reason


@pytest.mark.parametrize(
    ("beat", "state", "words"),
    [
        (None, DOWN, "ticks are not stored (start it: tickpipe recorder)"),
        (recorder(updated_ns=int((NOW - 3.5) * NS)), DOWN, "stopped or hangs"),
        (recorder(state="write_failed", error="No space left"), DOWN, "free disk space"),
        (recorder(lag_batches=40, lag_s=12.0), DEGRADED, "behind by 12 s (40 batches waiting)"),
        (recorder(), UP, "5000 rows stored; 3 batches waiting"),
        (recorder(lag_batches=0, pending_batches=0, lag_s=30.0), UP, "idle: every published"),
    ],
)
def test_recorder_verdicts(beat: RecorderBeat | None, state: str, words: str) -> None:
    part = judge_recorder(beat, now=NOW)
    assert part.state == state and words in part.reason, part


def test_an_idle_recorder_has_no_lag_however_old_the_last_tick() -> None:
    part = judge_recorder(recorder(lag_batches=0, pending_batches=0, lag_s=30.0), now=NOW)
    assert part.figures["lag_s"] == 0.0 and part.figures["idle_s"] == 30.0


def test_web_verdicts() -> None:
    up = WebBeat({"redis_pubsub": UP, "connections": 2, "ticks_out_per_s": 10}, int(NOW * NS))
    assert judge_web("h:1", up, NOW, NOW).reason == "2 connections, 10 ticks/s out"
    lost = WebBeat({"redis_pubsub": DOWN}, int(NOW * NS))
    assert judge_web("h:1", lost, NOW, NOW).state == DEGRADED
    old = WebBeat({"redis_pubsub": UP}, int((NOW - 5) * NS))
    assert judge_web("h:1", old, NOW, NOW).state == DOWN
    gone = judge_web("h:2", None, NOW - 12, NOW)
    assert gone.state == DOWN and gone.reason.startswith("no heartbeat for 12 s")


def test_redis_verdicts() -> None:
    info = {"used_memory": 2**20, "maxmemory": 0, "redis_version": "7.0"}
    assert judge_redis(info, 0.4).state == UP
    assert judge_redis(info, 250.0).reason == "slow: PING took 250 ms"
    full = judge_redis({"used_memory": 95 * 2**20, "maxmemory": 100 * 2**20}, 0.4)
    assert full.state == DEGRADED and "memory nearly full" in full.reason


def test_a_symbol_is_stale_against_its_own_usual_rate() -> None:
    track = SymbolTrack(seq=10, epoch=1, changed=100.0)
    trade = b'{"type":"trade","sym":"X","seq":20,"ts":%d,"price":2.0,"size":1.0}'
    track.observe("X", 1, 20, [trade % int((NOW - 1) * NS)], mono=110.0)  # 10 ticks in 10 s
    assert track.usual_s == 1.0 and track.rate == 1.0
    fresh = judge_symbol(track, NOW)
    assert fresh["state"] == UP and fresh["last"] == 2.0 and fresh["age_s"] == 1.0
    stale = judge_symbol(track, NOW + 20)  # 21 s without a tick: more than 10 usual intervals
    assert stale["state"] == DEGRADED and stale["stale"] and "usually every 1 s" in stale["reason"]


def test_a_one_sided_latest_quote_gives_a_row_without_that_side() -> None:
    """The latest quote has no ask (a one-sided book): the symbol's row has its bid, no ask and
    no spread (absent, not null: the row's numbers are numbers)."""
    track = SymbolTrack(seq=10, epoch=1, changed=100.0)
    quote = b'{"type":"quote","sym":"X","seq":11,"ts":%d,"bid":2.5,"bid_size":3.0}'
    track.observe("X", 1, 11, [quote % int((NOW - 1) * NS)], mono=110.0)
    row = judge_symbol(track, NOW)
    assert row["bid"] == 2.5 and "ask" not in row and "spread" not in row


def test_a_new_epoch_starts_the_count_over() -> None:
    track = SymbolTrack(seq=500, epoch=1, changed=100.0)
    track.observe("X", 2, 3, [], mono=101.0)
    assert (track.seq, track.epoch, track.rate) == (3, 2, 0.0)


def test_a_symbol_that_never_ticked_is_degraded() -> None:
    assert judge_symbol(SymbolTrack(), NOW)["reason"] == "no tick published yet"


def test_overall_is_down_only_with_redis_and_degraded_by_any_other_trouble() -> None:
    redis_up, redis_down = Part("redis", "redis", UP, "ok"), Part("redis", "redis", DOWN, "x")
    feed_down = Part("feed:sim", "feed", DOWN, "stopped")
    assert overall([redis_up], []) == (UP, "every part is up")
    assert overall([redis_down, feed_down], [])[0] == DOWN
    assert overall([redis_up, feed_down], []) == (DEGRADED, "feed:sim down: stopped")
    stale = [{"sym": "X", "state": DEGRADED}]
    assert overall([redis_up], stale) == (DEGRADED, "1 stale symbol(s): X")


def test_the_journal_notes_changes_and_recoveries_but_not_at_start_up() -> None:
    journal = ErrorJournal(started_ns=0)
    down = Part("feed:sim", "feed", DOWN, "stopped")
    journal.note(Part("feed:sim", "feed", UP, "ok"))  # up from the start: nothing to say
    journal.note(down)
    journal.note(down)  # the same state again: noted once
    journal.note(Part("feed:sim", "feed", UP, "ok"))
    assert [(e["state"], e["message"]) for e in journal.recent()] == [
        (UP, "back up"),
        (DOWN, "stopped"),
    ]
    journal.note_rejects("feed:sim", {"bad_price": 1}, [])
    journal.note_rejects("feed:sim", {"bad_price": 4}, [{"reason": "bad_price"}])
    assert journal.recent(1)[0]["message"] == "3 tick(s) rejected (bad_price)"
