"""A tick file replayed as a live feed, at a chosen speed (``tickpipe feed --file ...``).

The file is read with ``server.history.importers`` (any supported vendor format). Ticks keep their
order and their spacing divided by ``speed``; each is published with the wall-clock time it goes
out as its ``ts`` (this is a live feed: event time is now), and the file starts over when it
ends, so a demo can run on real data for as long as it likes.
"""

from __future__ import annotations

import polars as pl

from server.ticks import Quote, Tick, Trade


class FileReplay:
    """A source for the tickerplant: the rows of a tick table, paced by their timestamps."""

    def __init__(self, ticks: pl.DataFrame, speed: float = 1.0, name: str = "file") -> None:
        if ticks.height == 0:
            raise ValueError("the file has no ticks to replay")
        if speed <= 0:
            raise ValueError("speed must be positive, e.g. 1 (real time) or 10")
        self.name = name
        self.speed = speed
        self.ticks = ticks.sort("ts", maintain_order=True)
        ns = self.ticks["ts"].cast(pl.Int64)
        self.offsets = ns - ns.min()  # sorted: found with search_sorted
        self.symbols = sorted(self.ticks["sym"].unique().to_list())
        self._start_ns: int | None = None
        self._next = 0

    def describe(self) -> str:
        n, syms = self.ticks.height, len(self.symbols)
        return f"{self.name}: {n} ticks of {syms} symbols replayed at {self.speed:g}x"

    def due(self, start_ns: int, end_ns: int) -> list[Tick]:
        if self._start_ns is None:
            self._start_ns = start_ns
        reached = (end_ns - self._start_ns) * self.speed
        stop = int(self.offsets.search_sorted(int(reached), side="right"))
        rows = self.ticks.slice(self._next, stop - self._next)
        self._next = stop
        if self._next >= self.ticks.height:  # the end: start over
            self._start_ns, self._next = end_ns, 0
        out: list[Tick] = []
        for r in rows.iter_rows(named=True):
            if r["type"] == "trade":
                out.append(Trade(r["sym"], end_ns, r["price"], r["size"], r["side"], r["venue"]))
            else:
                out.append(
                    Quote(r["sym"], end_ns, r["bid"], r["bid_size"], r["ask"], r["ask_size"],
                          r["venue"])
                )  # fmt: skip
        return out
