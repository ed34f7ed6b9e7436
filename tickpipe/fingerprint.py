"""The replay fingerprint: a SHA-256 over a canonical encoding of every tick event, in order.

The server computes it for a WebSocket replay (``replay_done``) and for ``/ticks/historical``
with ``fingerprint=true``; a client can compute it itself from the events it received (or from
an NDJSON export), so a backtest can prove it saw exactly the same data as last time.

Canonical line of one tick (fields joined by ``|``, ending in ``\\n``)::

    sym|type|ts|epoch|seq|price|size|side|bid|bid_size|ask|ask_size|venue|crossed

Integers in decimal, floats as Python's shortest round-trip ``repr`` of the float (so ``100``
and ``100.0`` encode alike), absent or null fields empty, ``crossed`` is ``1`` only when true.
Enriched fields (mid, spread, ...) are derived, so they are not part of the encoding.

This module is shared by the server and the client and imports nothing else from tickpipe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

FIELDS = (
    "sym",
    "type",
    "ts",
    "epoch",
    "seq",
    "price",
    "size",
    "side",
    "bid",
    "bid_size",
    "ask",
    "ask_size",
    "venue",
    "crossed",
)
_FLOAT_AT = [FIELDS.index(f) for f in ("price", "size", "bid", "bid_size", "ask", "ask_size")]


def canonical_line(
    sym: str,
    type_: str,
    ts: int,
    epoch: int | None,
    seq: int,
    price: float | None = None,
    size: float | None = None,
    side: str | None = None,
    bid: float | None = None,
    bid_size: float | None = None,
    ask: float | None = None,
    ask_size: float | None = None,
    venue: str | None = None,
    crossed: bool | None = None,
) -> str:
    """The canonical encoding of one tick (see the module docstring), newline included.

    Numbers must already be floats (``canonical_event`` converts); written inline because the
    server encodes millions of these per replay.
    """
    return (
        f"{sym}|{type_}|{ts}|{'' if epoch is None else epoch}|{seq}|"
        f"{'' if price is None else repr(price)}|{'' if size is None else repr(size)}|"
        f"{side or ''}|{'' if bid is None else repr(bid)}|"
        f"{'' if bid_size is None else repr(bid_size)}|{'' if ask is None else repr(ask)}|"
        f"{'' if ask_size is None else repr(ask_size)}|{venue or ''}|{'1' if crossed else ''}\n"
    )


def canonical_event(event: Mapping[str, Any]) -> str:
    """The canonical line of a tick event as received (WebSocket event or NDJSON row)."""
    values: list[Any] = [event.get(f) for f in FIELDS]
    for i in _FLOAT_AT:
        if values[i] is not None:
            values[i] = float(values[i])
    return canonical_line(*values)


class Fingerprint:
    """A running fingerprint: feed it events in order, read ``hexdigest`` at the end."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.count = 0
        self.first_ts: int | None = None
        self.last_ts: int | None = None

    def add_lines(self, lines: list[str], first_ts: int | None, last_ts: int | None) -> None:
        """Add already encoded canonical lines (with their first and last ts)."""
        if not lines:
            return
        self._h.update("".join(lines).encode())
        self.count += len(lines)
        if self.first_ts is None:
            self.first_ts = first_ts
        self.last_ts = last_ts

    def add_event(self, event: Mapping[str, Any]) -> None:
        """Add one tick event as received."""
        self.add_lines([canonical_event(event)], event["ts"], event["ts"])

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """``count``, ``first_ts``, ``last_ts`` and ``fingerprint``, as the server reports them."""
        return {
            "count": self.count,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "fingerprint": self.hexdigest(),
        }
