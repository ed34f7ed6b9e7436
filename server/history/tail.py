"""Tickerplant log entries as stored rows: what the recorder writes, and the log's unrecorded
tail that history reads so that a range up to now has no hole.

A log entry (``tp:log``, see ``server.live.bus``) holds ``e`` (``SYM=epoch,...``) and ``d``, the
batch's events joined by the publish script; its events become rows of ``STORED_SCHEMA``, each
with its symbol's epoch from its own entry.
"""

from __future__ import annotations

import io
import logging

import polars as pl

from server.history.store import LogId, parse_log_id
from server.ticks import STORED_SCHEMA

log = logging.getLogger("tickpipe.recorder")


# Event fields as the publish script writes them (``ts`` in integer ns); others are ignored.
_EVENT_SCHEMA: dict[str, pl.DataType] = {
    **{k: v for k, v in STORED_SCHEMA.items() if k != "epoch"},
    "ts": pl.Int64(),
}
# Put before each entry's events, so every event row knows its entry (no event's type is "#").
_ENTRY_MARK = b'{"type":"#","seq":%d}'
# Where one event of ``d`` ends and the next begins: a '"' inside a JSON string is always
# escaped, so this can only be the publish script's own join.
_EVENT_JOIN = b'},{"type":"'


def _parse_events(parts: list[tuple[int, bytes]]) -> pl.DataFrame:
    """Events of (entry index, ``d``) pairs in order, with the entry index as ``seq`` of a
    ``"#"`` row before each entry's events; parsed in Rust, one line per event."""
    lines = b"\n".join(
        _ENTRY_MARK % idx + b"\n" + d.replace(_EVENT_JOIN, b'}\n{"type":"') for idx, d in parts
    )
    try:
        return pl.read_ndjson(io.BytesIO(lines), schema=_EVENT_SCHEMA)
    except pl.exceptions.PolarsError:  # not split as expected: parse the entries as arrays
        whole = b",".join(_ENTRY_MARK % idx + b"," + d for idx, d in parts)
        return pl.read_json(io.BytesIO(b"[" + whole + b"]"), schema=_EVENT_SCHEMA)


def entries_to_frame(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> pl.DataFrame:
    """Tick rows of these log entries (status events are not ticks and are left out).

    Events are parsed by Polars (no Python object per tick); each event's ``epoch`` is its
    symbol's in the ``e`` field of its own entry."""
    parts: list[tuple[int, bytes]] = []
    e_entry: list[int] = []
    e_sym: list[str] = []
    e_epoch: list[int] = []
    for entry_id, fields in entries:
        if not fields:  # trimmed from the log before it was stored: a gap the index will show
            log.error("log entry %s was trimmed before it was stored", entry_id)
            continue
        epochs = dict(p.split("=", 1) for p in fields[b"e"].decode().split(",") if p)
        if not fields[b"d"]:
            continue
        idx = len(parts)
        parts.append((idx, fields[b"d"]))
        for sym, epoch in epochs.items():
            e_entry.append(idx)
            e_sym.append(sym)
            e_epoch.append(int(epoch))
    if not parts:
        return pl.DataFrame(schema=STORED_SCHEMA)
    ticks = (
        _parse_events(parts)
        .with_columns(
            pl.when(pl.col("type") == "#").then(pl.col("seq")).forward_fill().alias("_entry")
        )
        .filter(pl.col("type").is_in(["trade", "quote"]))
    )
    if not ticks.height:
        return pl.DataFrame(schema=STORED_SCHEMA)
    epochs_frame = pl.DataFrame(
        {"_entry": e_entry, "sym": e_sym, "epoch": e_epoch},
        schema={"_entry": pl.Int64(), "sym": pl.Utf8(), "epoch": pl.Int64()},
    )
    frame = ticks.join(epochs_frame, on=["_entry", "sym"], how="left", maintain_order="left")
    missing = frame.filter(pl.col("epoch").is_null())
    if missing.height:  # an event of a symbol its entry gives no epoch for
        raise KeyError(missing["sym"][0])
    return frame.with_columns(pl.col("ts").cast(pl.Datetime("ns", "UTC"))).select(
        list(STORED_SCHEMA)
    )


def tail_frame(entries: list[tuple[bytes, dict[bytes, bytes]]], high_water: LogId) -> pl.DataFrame:
    """Stored-schema rows of log entries above ``high_water`` (status events left out)."""
    fresh = [e for e in entries if parse_log_id(e[0].decode()) > high_water]
    return entries_to_frame(fresh)


def logs_frame(per_log: list[tuple[list[tuple[bytes, dict[bytes, bytes]]], LogId]]) -> pl.DataFrame:
    """``tail_frame`` of several logs, each with its own high-water mark, as one frame."""
    frames = [tail_frame(entries, high) for entries, high in per_log if entries]
    if not frames:
        return pl.DataFrame(schema=STORED_SCHEMA)
    return frames[0] if len(frames) == 1 else pl.concat(frames)
