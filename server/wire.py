"""The WebSocket protocol: client messages (validated here, at the edge), events, close codes.

Every server frame is a JSON array of events, each with a ``type``. Tick events (``trade``,
``quote``) arrive already encoded from Redis (see ``server.live.bus``) and are never re-encoded; the
control events below are built and encoded here.

This module is the one source of what the server, the Python client and the dashboard share
(``SHARED``: close codes and which are final, errors worth a retry, tick types and field
order). The client (``tickpipe/wire.py``) and the dashboard (``web/wire.js``) get them as
generated files, written by ``python -m server.wire`` and checked by ``tests/test_wire.py``.
"""

from __future__ import annotations

import time
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

PROTOCOL_VERSION = 1
TICK_TYPES = ("trade", "quote")
# The fields of a tick event as published, in this order (optional ones only when set): what
# ``server.live.bus.tick_event`` writes and the publish script keeps, and stored rows replay as
# (with ``epoch`` after them, and an enriched replay's fields after that).
TICK_FIELDS = {
    "trade": ("type", "sym", "seq", "ts", "price", "size", "side", "venue", "trade_id", "recv_ts"),
    "quote": (
        "type",
        "sym",
        "seq",
        "ts",
        "bid",
        "bid_size",
        "ask",
        "ask_size",
        "crossed",
        "venue",
        "recv_ts",
    ),
}


class CloseCode(IntEnum):
    """WebSocket close codes, one per reason. Each close is preceded by an ``error`` event."""

    BAD_REQUEST = 4000
    UNAUTHORIZED = 4001
    AUTH_TIMEOUT = 4002
    FORBIDDEN = 4003
    KEY_REVOKED = 4004
    SLOW_CONSUMER = 4008
    RATE_LIMITED = 4029
    CONNECTION_LIMIT = 4030
    INTERNAL_ERROR = 1011  # a server bug on this connection (logged); reconnect and resume


# Closes after which reconnecting cannot help: the key or the requests must change first.
FINAL_CLOSE_CODES = frozenset(
    {CloseCode.BAD_REQUEST, CloseCode.UNAUTHORIZED, CloseCode.FORBIDDEN, CloseCode.KEY_REVOKED}
)
# Of those, the ones that refuse the key itself, in a few words (the dashboard logs out).
KEY_REFUSED = {
    CloseCode.UNAUTHORIZED: "key rejected",
    CloseCode.FORBIDDEN: "key not allowed here",
    CloseCode.KEY_REVOKED: "key revoked",
}
# ``error`` codes that a reconnect (and a resume by seq) gets past: the server closed this
# connection or cannot serve it right now, but the key and the request are fine.
RETRIED_ERRORS = frozenset(
    {"unavailable", "slow_consumer", "shutdown", "internal_error", "rate_limited",
     "connection_limit"}
)  # fmt: skip

# Client messages ------------------------------------------------------------------------------

RequestId = Annotated[str, Field(max_length=128)] | int | None
# Integers that reach Redis or DuckDB must fit in 64 bits.
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: RequestId = None


class Auth(_Op):
    op: Literal["auth"]
    key: Annotated[str, Field(max_length=256)]


Symbols = list[Annotated[str, Field(max_length=64)]]
# Non-tick channels: "status" (service_status frames every second, admin scope).
Channels = list[Literal["status"]]
MIN_THROTTLE_MS, MAX_THROTTLE_MS = 50, 60_000


class _SymbolsOrChannels(_Op):
    symbols: Symbols = []
    channels: Channels = []

    @model_validator(mode="after")
    def _something(self) -> _SymbolsOrChannels:
        if not self.symbols and not self.channels:
            raise ValueError('name at least one symbol, or a channel such as "status"')
        return self


class Subscribe(_SymbolsOrChannels):
    op: Literal["subscribe"]
    types: Annotated[list[Literal["trade", "quote"]], Field(min_length=1)] = ["trade", "quote"]
    snapshot: StrictBool = False
    # Sample this connection's ticks: the latest trade and quote per symbol once per period
    # (0 turns sampling off; absent leaves it as it is).
    throttle_ms: Annotated[StrictInt, Field(ge=0, le=MAX_THROTTLE_MS)] | None = None
    # Resume after a disconnect: send every event after these seqs, then continue live.
    from_seq: (
        dict[Annotated[str, Field(max_length=64)], Annotated[int, Field(ge=0, lt=2**63)]] | None
    ) = None
    # The epoch the client last saw: one for all symbols of from_seq, or one per symbol.
    epoch: Int64 | dict[Annotated[str, Field(max_length=64)], Int64] | None = None

    @model_validator(mode="after")
    def _throttle_floor(self) -> Subscribe:
        if self.throttle_ms is not None and 0 < self.throttle_ms < MIN_THROTTLE_MS:
            raise ValueError(
                f"throttle_ms must be 0 (off) or {MIN_THROTTLE_MS} to {MAX_THROTTLE_MS}"
            )
        return self


class Unsubscribe(_SymbolsOrChannels):
    op: Literal["unsubscribe"]


class Ping(_Op):
    op: Literal["ping"]


TimeArg = int | Annotated[str, Field(max_length=64)]
# A speed is 1, 10, 100 (any number > 0) or "max"; checked in server.replay to say what is wrong.
SpeedArg = float | int | Annotated[str, Field(max_length=16)]


class Replay(_Op):
    """Stream stored events of a range, merged in (ts, seq) order, paced at ``speed``."""

    op: Literal["replay"]
    symbols: Annotated[list[Annotated[str, Field(max_length=64)]], Field(min_length=1)]
    start: TimeArg
    end: TimeArg | None = None
    types: Annotated[list[Literal["trade", "quote"]], Field(min_length=1)] = ["trade", "quote"]
    speed: SpeedArg = 1
    enriched: StrictBool = False
    then_live: StrictBool = False
    # Continue a replay that was cut off: only events strictly after this (ts, seq, sym).
    after: tuple[Int64, Int64, Annotated[str, Field(max_length=64)]] | None = None


class ReplayControl(_Op):
    """``pause``, ``resume``, ``speed`` (with ``speed``) or ``stop`` the replay ``id``."""

    op: Literal["pause", "resume", "speed", "stop"]
    speed: SpeedArg | None = None


ClientMessage = Annotated[
    Auth | Subscribe | Unsubscribe | Ping | Replay | ReplayControl, Field(discriminator="op")
]
_client_message = TypeAdapter(ClientMessage)
OPS = ("auth", "subscribe", "unsubscribe", "ping", "replay", "pause", "resume", "speed", "stop")


class ProtocolError(Exception):
    """A client message we cannot act on; becomes an ``error`` event."""

    def __init__(self, code: str, message: str, req_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


def parse_client_message(
    text: str, max_bytes: int
) -> Auth | Subscribe | Unsubscribe | Ping | Replay | ReplayControl:
    """Parse and validate one client text frame, or raise ``ProtocolError`` saying what to fix."""
    if len(text) > max_bytes:
        raise ProtocolError(
            "message_too_large",
            f"message of {len(text)} bytes exceeds the {max_bytes}-byte limit; "
            "split the request (e.g. subscribe in several messages)",
        )
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(
            "bad_json", f"message is not valid JSON ({exc}); send one JSON object per frame"
        ) from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_request", 'send a JSON object such as {"op": "ping"}')
    req_id = raw.get("id") if isinstance(raw.get("id"), str | int) else None
    op = raw.get("op")
    if op not in OPS:
        raise ProtocolError(
            "unknown_op", f"unknown op {str(op)[:40]!r}; supported ops: {', '.join(OPS)}", req_id
        )
    try:
        return _client_message.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "message"
        raise ProtocolError(
            "bad_request", f"{op}: {where}: {first['msg']} ({exc.error_count()} error(s))", req_id
        ) from None


# Server events --------------------------------------------------------------------------------


def now_ns() -> int:
    return time.time_ns()


def frame(*events: dict[str, Any]) -> str:
    """One text frame holding these control events."""
    return orjson.dumps(list(events)).decode()


def event_json(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


def error(code: str, message: str, req_id: Any = None, fatal: bool = False) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "id": req_id, "fatal": fatal}


MAX_CLOSE_REASON_BYTES = 123  # a close frame carries at most 125 bytes: the code and the reason


def close_reason(code: int, event: dict[str, Any] | None) -> str:
    """The close frame's reason: the last error's ``code: message``, shortened at a word to fit,
    so a client that never reads that error still learns why it was closed."""
    if event is None:
        known = code in CloseCode._value2member_map_
        return CloseCode(code).name.lower() if known else ""
    text = f"{event['code']}: {event['message']}"
    if len(text.encode()) <= MAX_CLOSE_REASON_BYTES:
        return text
    cut = text.encode()[: MAX_CLOSE_REASON_BYTES - len("…".encode())].decode(errors="ignore")
    if " " in cut:
        cut = cut[: cut.rfind(" ")].rstrip(" ,;:")
    return cut + "…"


def welcome(
    conn_id: str, heartbeat_s: float, limits: dict[str, Any], key: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": "welcome",
        "protocol": PROTOCOL_VERSION,
        "conn_id": conn_id,
        "server_time": now_ns(),
        "heartbeat_s": heartbeat_s,
        "limits": limits,
        "key": key,
    }


def heartbeat() -> dict[str, Any]:
    return {"type": "heartbeat", "ts": now_ns()}


def pong(req_id: Any) -> dict[str, Any]:
    return {"type": "pong", "id": req_id, "ts": now_ns()}


def status(code: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"type": "status", "code": code, "message": message, **fields}


# Stored rows as events (replays and catch-up backlogs) ---------------------------------------

# Derived fields of an enriched replay, after the stored columns of a row.
ENRICHED_FIELDS = ("mid", "spread", "spread_bps", "notional", "aggressor")
# sym, type, ts, epoch, seq, price, size, side, bid, bid_size, ask, ask_size, venue, crossed,
# flags: the columns of ``server.ticks.STORED_SCHEMA``.
STORED_COLUMNS = 15


def row_event(row: tuple[Any, ...], close: str) -> str:
    """The live-format JSON of one stored row (``server.ticks.STORED_SCHEMA`` order, ts in ns) plus
    its ``epoch``, ending with ``close`` (``'}'``, or e.g. ``',"replay":"r1"}'`` to mark it as
    replayed)."""
    sym, typ, ts, epoch, seq, price, size, side, bid, bid_size, ask, ask_size, venue, crossed = row[
        :14
    ]
    flags = row[14] if len(row) > 14 else None
    ev: dict[str, Any]
    if typ == "trade":
        ev = {"type": "trade", "sym": sym, "seq": seq, "ts": ts, "price": price, "size": size}
        if side is not None:
            ev["side"] = side
        if len(row) > STORED_COLUMNS:  # enriched: the prevailing quote
            if bid is not None:
                ev["bid"] = bid
            if ask is not None:
                ev["ask"] = ask
    else:
        ev = {"type": "quote", "sym": sym, "seq": seq, "ts": ts}
        if bid is not None:  # absent on a one-sided quote
            ev["bid"] = bid
        if bid_size is not None:
            ev["bid_size"] = bid_size
        if ask is not None:
            ev["ask"] = ask
        if ask_size is not None:
            ev["ask_size"] = ask_size
        if crossed:
            ev["crossed"] = True
    if venue is not None:
        ev["venue"] = venue
    if flags is not None:
        ev["flags"] = flags
    ev["epoch"] = epoch
    for name, value in zip(ENRICHED_FIELDS, row[STORED_COLUMNS:], strict=False):
        if value is not None:
            ev[name] = value
    return orjson.dumps(ev)[:-1].decode() + close


def gap_event(rid: Any, sym: str, epoch: int | None, from_seq: int, to_seq: int) -> str:
    """The in-band ``gap`` of a replay or resume: seqs never recorded, so no one can send them."""
    return event_json(
        {
            "type": "gap",
            "id": rid,
            "sym": sym,
            "epoch": epoch,
            "from_seq": from_seq,
            "to_seq": to_seq,
            "missing": to_seq - from_seq + 1,
            "message": "these events were never recorded; the stream goes on after them",
        }
    )


# Fragments: comma-joined tick events exactly as published (see server.live.bus) ---------------

_SEP = "},{"


def split_events(fragment: str) -> list[str]:
    """The events of a fragment, each a complete JSON object (events hold no nested objects)."""
    parts = fragment.split(_SEP)
    if len(parts) == 1:
        return parts
    last = len(parts) - 1
    return [("" if i == 0 else "{") + p + ("" if i == last else "}") for i, p in enumerate(parts)]


def event_type(event: str) -> str:
    """``trade``, ``quote`` or ``status`` for an event string as published."""
    # Every published event starts with {"type":"<kind>"
    return event[9 : event.index('"', 9)]


def event_seq(event: str) -> int | None:
    return _int_field(event, '"seq":')


def _int_field(event: str, name: str) -> int | None:
    """The non-negative integer after ``name`` (``'"seq":'``) in an encoded event, if any."""
    i = event.find(name)
    if i < 0:
        return None
    j = i + len(name)
    k = j
    while k < len(event) and event[k].isdigit():
        k += 1
    return int(event[j:k])


_UPSTREAM_GAP = '{"type":"status","code":"upstream_gap",'  # as the publish script writes it


def is_upstream_gap(event: str) -> bool:
    """Whether an encoded event is a live source's ``upstream_gap`` status."""
    return event.startswith(_UPSTREAM_GAP)


def upstream_gap_place(event: str) -> int | None:
    """The seq an ``upstream_gap`` event goes right before (its ``after_seq`` + 1), else None."""
    if not event.startswith(_UPSTREAM_GAP):
        return None
    after = _int_field(event, '"after_seq":')
    return None if after is None else after + 1


def with_fields(event: str | bytes, **fields: Any) -> str:
    """An encoded event (a JSON object of plain values, as every event is) with these fields
    added at its end, e.g. a snapshot's ``"snapshot":true``."""
    text = event.decode() if isinstance(event, bytes) else event
    return text[:-1] + event_end(**fields)


def event_end(**fields: Any) -> str:
    """What ends an encoded event with these fields added: ``}`` for none, ``,"replay":"r1"}``
    for a replayed one (``row_event`` and the catch-up backlog take it as ``close``)."""
    return "".join(f',"{k}":{orjson.dumps(v).decode()}' for k, v in fields.items()) + "}"


# Shared with the client and the dashboard (generated files) ----------------------------------

CLIENT_MODULE = "tickpipe/wire.py"
DASHBOARD_MODULE = "web/wire.js"
_GENERATED = "Generated from server/wire.py by `python -m server.wire`: do not edit it, change\n"
_GENERATED += "server/wire.py and run that again (tests/test_wire.py checks it is up to date)."


def shared() -> dict[str, Any]:
    """What the client and the dashboard take from this module, as JSON values."""
    return {
        "PROTOCOL_VERSION": PROTOCOL_VERSION,
        "TICK_TYPES": list(TICK_TYPES),
        "TICK_FIELDS": {kind: list(fields) for kind, fields in TICK_FIELDS.items()},
        "CLOSE_CODES": {code.name: int(code) for code in CloseCode},
        "FINAL_CLOSE_CODES": sorted(int(code) for code in FINAL_CLOSE_CODES),
        "KEY_REFUSED": {int(code): words for code, words in KEY_REFUSED.items()},
        "RETRIED_ERRORS": sorted(RETRIED_ERRORS),
    }


def _py(value: Any, indent: str = "") -> str:
    """``value`` as Python source the way ruff formats it (one item a line, trailing commas)."""
    inner = indent + "    "
    if isinstance(value, dict):
        items = "".join(f"{inner}{_py(k)}: {_py(v, inner)},\n" for k, v in value.items())
        return "{\n" + items + indent + "}"
    if isinstance(value, list):
        items = "".join(f"{inner}{_py(v, inner)},\n" for v in value)
        return "(\n" + items + indent + ")"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def client_module() -> str:
    """The text of ``tickpipe/wire.py``: ``shared()`` as Python constants (lists as tuples,
    the code lists and error lists as frozensets)."""
    out = ['"""The wire constants the client shares with the server.', "", _GENERATED, '"""', ""]
    for name, value in shared().items():
        text = _py(value)
        if name in ("FINAL_CLOSE_CODES", "RETRIED_ERRORS"):
            text = "frozenset(\n    {" + _py(value, "    ")[1:-1] + "}\n)"
        out.append(f"{name} = {text}")
    return "\n".join(out) + "\n"


def dashboard_module() -> str:
    """The text of ``web/wire.js``: ``shared()`` as frozen JavaScript constants."""
    out = ["// " + line for line in _GENERATED.splitlines()]
    out.insert(0, "// The wire constants the dashboard shares with the server.")
    for name, value in shared().items():
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
        if isinstance(value, dict | list):
            text = f"Object.freeze({text})"
        out.append(f"export const {name} = {text};")
    return "\n".join(out) + "\n"


def write_generated(root: Path) -> list[Path]:
    """Write the client's and the dashboard's wire files under ``root`` (the repository)."""
    written = []
    for rel, text in ((CLIENT_MODULE, client_module()), (DASHBOARD_MODULE, dashboard_module())):
        path = root / rel
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_generated(Path(__file__).resolve().parents[1]):
        print(f"wrote {path}")
