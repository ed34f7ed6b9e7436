"""The WebSocket protocol: client messages (validated here, at the edge), events, close codes.

Every server frame is a JSON array of events, each with a ``type``. Tick events (``trade``,
``quote``) arrive already encoded from Redis (see ``server.bus``) and are never re-encoded; the
control events below are built and encoded here.
"""

from __future__ import annotations

import time
from enum import IntEnum
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


# Fragments: comma-joined tick events exactly as published (see server.bus) ---------------------

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
    i = event.find('"seq":')
    if i < 0:
        return None
    j = i + 6
    k = j
    while k < len(event) and event[k].isdigit():
        k += 1
    return int(event[j:k])
