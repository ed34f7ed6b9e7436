"""Query parameters of the REST routes: each parsed into its value, or a 422 ``bad_parameter``
whose message says what to send.

Numbers are ASCII digits only: ``str.isdigit()`` accepts a superscript two, ``int()`` accepts
Arabic-Indic and fullwidth digits and ``1_000``, and ``int()`` of more than 4,300 digits raises;
none of those may reach ``int()`` here.
"""

from __future__ import annotations

import datetime as dt
import re

from server.api.errors import ApiError

_INT_RE = re.compile(r"-?[0-9]{1,19}")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
# Nanoseconds that fit in a signed 64-bit integer with a day to spare (years 1678 to 2262).
MAX_ABS_NS = 2**63 - 86_400 * 10**9
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _shown(raw: str, n: int = 32) -> str:
    return repr(raw[:n] + ("..." if len(raw) > n else ""))


def parse_int(name: str, raw: str | None, default: int, lo: int, hi: int) -> int:
    """``raw`` as an integer in ``[lo, hi]`` (``default`` if absent), or a 422 naming the range."""
    if raw is None:
        return default
    if _INT_RE.fullmatch(raw) is None or not lo <= int(raw) <= hi:
        raise ApiError(
            422,
            "bad_parameter",
            f"{name}={_shown(raw)} is not valid: give an integer from {lo:,} to {hi:,} "
            f"(ASCII digits; default {default:,})",
        )
    return int(raw)


def parse_flag(name: str, raw: str | None) -> bool:
    """``true``/``1``/``yes`` or ``false``/``0``/``no`` (any case; absent means false), or a 422."""
    if raw is None:
        return False
    word = raw.lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ApiError(
        422,
        "bad_parameter",
        f"{name}={_shown(raw)} is not valid: give true or false",
        valid=["true", "false"],
    )


def parse_time(name: str, raw: str | None) -> int:
    """ISO-8601 (naive means UTC) or integer ns -> integer ns UTC, or a 422 saying why not."""
    if raw is None or not raw.strip():
        raise ApiError(
            422, "bad_parameter", f"{name} is required: ISO-8601 (e.g. 2026-01-02T14:30:00Z) or ns"
        )
    raw = raw.strip()
    digits = raw.removeprefix("-")
    if digits.isascii() and digits.isdigit():
        if len(digits) > 19 or abs(int(raw)) >= MAX_ABS_NS:
            raise ApiError(
                422,
                "bad_parameter",
                f"{name}={_shown(raw)} is out of range for nanoseconds since the epoch "
                "(years 1678 to 2262)",
            )
        return int(raw)
    try:
        # An unescaped "+01:00" in a query string arrives as " 01:00".
        if "T" in raw and raw.count(" ") == 1:
            raw = raw.replace(" ", "+")
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(
            422,
            "bad_parameter",
            f"{name}={_shown(raw, 64)} is not a time: use ISO-8601 (e.g. 2026-01-02T14:30:00Z, "
            "naive means UTC) or integer nanoseconds since the epoch",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    delta = when - _EPOCH
    ns = (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    if abs(ns) >= MAX_ABS_NS:
        raise ApiError(
            422, "bad_parameter", f"{name}={_shown(raw, 64)} is out of range (years 1678 to 2262)"
        )
    return ns
