"""What a venue adapter is: the venue's URL, the messages it sends after connecting, and a parser
that turns each venue message into calls on a ``Sink`` (ticks, subscription replies, errors).

An adapter knows one venue's protocol and nothing about reconnects, Redis or figures; the
session (``server.feed.sources.session``) drives it. Adapters parse with orjson and build ticks
directly: no per-message model objects on this path. Alpaca's and Kraken's trade and quote
messages (JSON numbers among many fields the adapter does not read) are decoded typed with
msgspec instead: straight into the fields read, the rest skipped; any message the typed
decoding refuses is read with orjson as before, so both give the same ticks and counts.

Decimals: Binance and Coinbase send prices and sizes as decimal strings, Kraken and Alpaca as
JSON numbers. Each is read once, with ``float()`` or orjson's or msgspec's correctly rounded
number parser, which gives the double nearest to the venue's decimal; a double holds 15
significant digits exactly, so the shortest text of that double (what orjson writes on the
wire, what Polars and ``repr`` print) is the venue's own decimal again, trailing zeros aside.
No arithmetic is ever done on a price or size before it is published.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Hashable, Iterable
from typing import Annotated, ClassVar, Protocol, TypeVar

import msgspec

from server.ticks import MAX_TS_NS, MIN_TS_NS, Quote, Trade

MS = 1_000_000  # ns per millisecond
C = TypeVar("C")  # what a checked decoding gives
P = TypeVar("P")  # ... and the plain one

# A venue's id (a trade or update id) for the typed decoding: 64 bits, signed (what msgspec's
# bounds take). One outside fails the typed decoding and is read with orjson, which reads up to
# 2**64 - 1 as an integer and anything larger as a float, which ``venue_int`` refuses: no id
# that orjson could not write reaches the tickerplant.
VenueId = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# A price or size as the tick checks admit it (``server.ticks.reject_reason``), for an adapter's
# typed decoding: a number above zero; msgspec refuses one beyond a double's range and JSON has
# no NaN, so it is finite too. A message with any other fails the typed decoding.
Positive = Annotated[float, msgspec.Meta(gt=0)]


class Sink(Protocol):
    """Where an adapter puts what it read from one venue message."""

    def trade(self, tick: Trade, key: Hashable = None, snapshot: bool = False) -> None:
        """A trade; ``tick.trade_id`` set when the venue numbers its trades, ``key`` what tells
        it from a replay when the id alone does not (default: the id); ``snapshot``: one the
        venue sends on subscribing (what traded before), not as it happens."""

    def quote(self, tick: Quote, update_id: int | None = None, snapshot: bool = False) -> None:
        """A best bid/ask; ``update_id`` when the venue numbers its book updates."""

    def subscribed(self, what: str) -> None:
        """The venue confirmed a subscription (a symbol, a channel, or ``*`` for all)."""

    def refused(self, symbol: str, message: str) -> None:
        """The venue refused to subscribe ``symbol`` (``""`` when it names none)."""

    def venue_error(self, message: str) -> None:
        """An error reply that is not about one symbol."""

    def unexpected(self, what: str) -> None:
        """A message the adapter does not publish (unknown channel, event or symbol)."""

    def malformed(self, what: str) -> None:
        """A message that is not the JSON the venue documents."""

    def reply(self, text: str) -> None:
        """Send ``text`` back to the venue (an application-level pong, a login step)."""

    def unscreened(self) -> None:
        """The ticks handed over next may fail the tick checks (``server.ticks.
        reject_reason``): the tickerplant screens them. Only an adapter that ``screens`` calls
        it, before any tick it cannot vouch for."""


class VenueRefused(Exception):
    """The venue will not serve this source as configured (a refused symbol, a refused key);
    reconnecting cannot help. The message names what to change."""


class Adapter:
    """The base of every venue adapter; a subclass sets the class attributes and overrides
    ``hello`` and ``on_message`` (and ``url`` when the venue puts streams in the URL)."""

    kind: ClassVar[str]  # the --source name, e.g. "binance"
    venue: ClassVar[str]  # the tick's venue field, e.g. "BINANCE"
    default_url: ClassVar[str]
    # Reconnect when nothing at all arrived for this long (the venue's heartbeat interval with a
    # margin); None: rely on WebSocket pings alone.
    silence_s: ClassVar[float | None] = None
    # A planned reconnect (new connection first, then the old one closed) this long after
    # connecting, before the venue's own connection limit; None: the venue has none.
    lifetime_s: ClassVar[float | None] = None
    # Whether the venue's trade ids are consecutive per symbol, so a hole in them is a gap.
    consecutive_trade_ids: ClassVar[bool] = True
    # Whether the adapter holds the ticks it hands over to the tick checks itself (typed
    # decoding with ``Positive`` prices and sizes, times checked against ``server.ticks``'
    # range), calling ``sink.unscreened`` before any tick it cannot vouch for: the tickerplant
    # then does not screen its ticks a second time. False: the tickerplant screens every tick.
    screens: ClassVar[bool] = False

    def __init__(self, symbols: dict[str, str], sink: Sink, secrets: dict[str, str]) -> None:
        """``symbols``: venue symbol -> tickpipe symbol; ``secrets``: credentials, never logged."""
        self.names = symbols
        self.sink = sink
        self.secrets = secrets
        self.ready = False  # every subscription confirmed

    def decode_checked(
        self,
        raw: str | bytes,
        recv_ns: int,
        checked: msgspec.json.Decoder[C],
        plain: msgspec.json.Decoder[P],
    ) -> C | P | None:
        """A data message decoded typed (only the fields read are built): by ``checked``, which
        holds prices and sizes to the tick checks (``Positive``), nearly every message; one it
        refuses (a price of 0) by ``plain``, its documented types, and its ticks then handed
        over unscreened, so the tickerplant rejects (and counts) only the bad ones; so too when
        the receive time is outside the checks' range. None: neither takes it (a control
        message, a field not of its documented type)."""
        if not MIN_TS_NS <= recv_ns < MAX_TS_NS:
            self.sink.unscreened()
        try:
            return checked.decode(raw)
        except msgspec.DecodeError:
            pass
        try:
            msg = plain.decode(raw)
        except msgspec.DecodeError:
            return None
        self.sink.unscreened()
        return msg

    def url(self, base: str) -> str:
        """The URL to connect to, from the venue's (or ``--url``'s) endpoint."""
        return base

    def hello(self) -> list[str]:
        """The messages to send right after connecting (login, subscriptions)."""
        raise NotImplementedError

    def on_connected(self) -> None:
        """A new connection is open: forget what the previous one confirmed."""
        self.ready = False

    def on_message(self, raw: str | bytes, recv_ns: int) -> None:
        """Parse one venue message into ``sink`` calls."""
        raise NotImplementedError

    def symbol(self, venue_sym: object, what: str) -> str | None:
        """The tickpipe symbol of a venue symbol in a message, or None (counted as unexpected)
        for one this source did not subscribe."""
        sym = self.names.get(venue_sym) if isinstance(venue_sym, str) else None
        if sym is None:
            self.sink.unexpected(f"{what} for symbol {str(venue_sym)[:32]!r}")
        return sym


def named_in(names: Iterable[str], text: str) -> list[str]:
    """The symbols of ``names`` that ``text`` (a venue's error message) names as whole words:
    ``BTC-USD`` is not named by "BTC-USDT is not a valid product"."""
    words = {w.rstrip("._/-") for w in _WORD.findall(text.upper())}
    return [s for s in names if s in words]


_WORD = re.compile(r"[A-Z0-9][A-Z0-9._/-]*")


def venue_int(x: object) -> int:
    """A number the venue sends as a JSON integer (a trade or update id, a time in ms); anything
    else (a string, a float, a bool) raises ``TypeError``: the message is malformed."""
    if type(x) is not int:
        raise TypeError(f"expected an integer, got {type(x).__name__} {str(x)[:24]!r}")
    return x


def book_side(price: float, size: float | None) -> tuple[float | None, float | None]:
    """One side of a best bid/ask as a quote carries it: a price of 0 (Binance, Alpaca, Kraken
    send it for a side with no order) is an empty side, no price and no size."""
    return (price, size) if price else (None, None)


def one_sided_quote(
    sym: str, ts: int, bid: float, bid_size: float, ask: float, ask_size: float, venue: str,
    recv_ns: int,
) -> Quote:  # fmt: skip
    """The quote of a book with an empty side (its price 0: ``book_side``); an adapter's usual
    quote, both prices set, is built directly."""
    return Quote(sym, ts, *book_side(bid, bid_size), *book_side(ask, ask_size), venue, recv_ns)


def side_of_aggressor(buyer_is_maker: bool) -> str:
    """The aggressor's side from a "buyer is the maker" flag (Binance ``m``)."""
    return "sell" if buyer_is_maker else "buy"


# ns UTC of each second seen lately, by its text 'YYYY-MM-DDTHH:MM:SS.': a venue's times repeat
# their second for many messages, so the calendar is worked out once per second and each time
# adds only its fraction.
_second_ns: dict[str, int] = {}
SECONDS_KEPT = 4096
# ns per unit of a fraction of n digits (n = 0..9)
_FRACTION_NS: list[int] = [10**9 // 10**digits for digits in range(10)]
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # at most, per month


def ns_from_iso(text: str) -> int:
    """``2021-04-17T16:44:05.529257Z`` (1 to 9 fraction digits, or none) as ns UTC; anything
    else raises ``ValueError`` (``TypeError`` for what is not a string).

    Faster than ``datetime.fromisoformat`` and keeps nanoseconds (Alpaca sends them): a time
    whose second was seen lately is a look-up of that second and an ``int`` of the fraction."""
    base = _second_ns.get(text[:20])
    if base is not None and text[-1] == "Z":
        fraction = text[20:-1]
        if fraction.isdigit() and len(fraction) < 10:
            return base + int(fraction) * _FRACTION_NS[len(fraction)]
    return _ns_from_iso_checked(text)


def _ns_from_iso_checked(text: str) -> int:
    """``ns_from_iso`` of a second not seen lately, of a time without a fraction, or of what is
    not a time (which raises)."""
    if not isinstance(text, str):
        raise TypeError(f"expected an ISO 8601 UTC time, got {type(text).__name__}")
    head = text[:19]
    base = _second_ns.get(head + ".")
    if base is None:
        base = _second_of(head, text)
        if len(_second_ns) >= SECONDS_KEPT:
            _second_ns.clear()
        _second_ns[head + "."] = base
    rest = text[19:]
    if rest == "Z" or rest == "":
        return base
    fraction = rest[1:-1]
    if rest[0] == "." and rest[-1] == "Z" and 0 < len(fraction) < 10 and fraction.isdigit():
        return base + int(fraction) * _FRACTION_NS[len(fraction)]
    raise ValueError(f"not an ISO 8601 UTC time: {text[:40]!r}")


def _second_of(head: str, text: str) -> int:
    """ns UTC of 'YYYY-MM-DDTHH:MM:SS'. A leap second (``:60``) is the next minute's first, as
    in POSIX time; a day, hour or minute that does not exist raises ``ValueError``."""
    if (
        len(head) != 19
        or not head.isascii()
        or head[4] + head[7] + head[10] + head[13] + head[16] != "--T::"
        or not (head[:4] + head[5:7] + head[8:10] + head[11:13] + head[14:16] + head[17:]).isdigit()
    ):
        raise ValueError(f"not an ISO 8601 UTC time: {text[:40]!r}")
    y, mo, d = int(head[0:4]), int(head[5:7]), int(head[8:10])
    h, mi, s = int(head[11:13]), int(head[14:16]), int(head[17:19])
    if not (
        1 <= mo <= 12
        and 1 <= d <= _DAYS[mo - 1]
        and (mo != 2 or d < 29 or calendar.isleap(y))
        and h < 24
        and mi < 60
        and s <= 60
    ):
        raise ValueError(f"not a time that exists: {text[:40]!r}")
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1_000_000_000
