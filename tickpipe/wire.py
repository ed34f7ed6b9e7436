"""The wire constants the client shares with the server.

Generated from server/wire.py by `python -m server.wire`: do not edit it, change
server/wire.py and run that again (tests/test_wire.py checks it is up to date).
"""

PROTOCOL_VERSION = 1
TICK_TYPES = (
    "trade",
    "quote",
)
TICK_FIELDS = {
    "trade": (
        "type",
        "sym",
        "seq",
        "ts",
        "price",
        "size",
        "side",
        "venue",
        "trade_id",
        "recv_ts",
    ),
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
CLOSE_CODES = {
    "BAD_REQUEST": 4000,
    "UNAUTHORIZED": 4001,
    "AUTH_TIMEOUT": 4002,
    "FORBIDDEN": 4003,
    "KEY_REVOKED": 4004,
    "SLOW_CONSUMER": 4008,
    "RATE_LIMITED": 4029,
    "CONNECTION_LIMIT": 4030,
    "INTERNAL_ERROR": 1011,
}
FINAL_CLOSE_CODES = frozenset(
    {
        4000,
        4001,
        4003,
        4004,
    }
)
KEY_REFUSED = {
    4001: "key rejected",
    4003: "key not allowed here",
    4004: "key revoked",
}
RETRIED_ERRORS = frozenset(
    {
        "connection_limit",
        "internal_error",
        "rate_limited",
        "shutdown",
        "slow_consumer",
        "unavailable",
    }
)
