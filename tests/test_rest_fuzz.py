"""The REST API fuzzed from its OpenAPI document (schemathesis) against a real stack.

Every operation in ``contracts/openapi.yaml`` gets generated requests, valid and invalid, each
sent with an admin key, with no key and with an unknown key. No answer may be a 5xx other than
the documented ``500 corrupt_history`` and ``503 unavailable``, and every answer must match the
document: status code, content type, headers and JSON schema. Derandomized and bounded
(``MAX_EXAMPLES`` per operation and generation mode), so a CI run is repeatable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator

import pytest
import schemathesis
from schemathesis import Case
from schemathesis.checks import not_a_server_error, positive_data_acceptance

from server.auth import SCOPES
from server.ticks import STORED_SCHEMA
from tests.harness import ROOT, Stack, corrupt_history_file, eventually_sync, write_history
from tests.test_recorder import stored_files

# One item per operation, but schemathesis gives them all the function's node id, and
# pytest-xdist tells items apart by node id: in a parallel run only one operation was fuzzed
# (and reported). So this module runs in `make test`'s serial pass.
pytestmark = pytest.mark.alone

OPENAPI = ROOT / "specs" / "001-tick-data-pipeline" / "contracts" / "openapi.yaml"
MAX_EXAMPLES = 300
# The examples of openapi.yaml ask for AAPL,MSFT from 2026-11-26T14:30:00Z: stored rows there.
EXAMPLE_T0 = int(dt.datetime(2026, 11, 26, 14, 30, tzinfo=dt.UTC).timestamp()) * 10**9
DOCUMENTED_5XX = {500: "corrupt_history", 503: "unavailable"}
UNKNOWN_KEY = "tp_" + "x" * 43

# Values that broke parsers before (unicode digits pass str.isdigit(); int() refuses more than
# 4,300 digits; NUL bytes; times out of range), mixed into every string parameter and forced
# into the integer and boolean ones now and then.
ODD_VALUES = [
    "\u00b2", "\u0663", "\uff11\uff12", "1" * 5000, "-" + "9" * 5000, "9" * 20,
    "-9223372036854775808", "1e3", "0x10", "1_000", " 12 ", "+5", "-0", "nan", "inf", "",
    " ", "\x00", "AAPL\x00", "2024-13-45", "2026-11-26T14:30:00+99:00", "9999-12-31T23:59:59",
    "0001-01-01T00:00:00+01:00", "2026-11-26T14:30:00Z", "2026-11-26T15:00:00Z", "AAPL,MSFT",
    "true", "false", "1", "0", "100001", "10001",
]  # fmt: skip
# Real symbols and times, so that many requests reach the history reader (live ticks are
# around now, stored rows at the document's examples, a corrupt file on 2026-11-28), each
# with a few odd values.
NOW_NS = time.time_ns()
ODD_FEW = ["\u00b2", "1" * 5000, "9" * 20, "", "2024-13-45", "\x00"]
REAL_VALUES = {
    "symbols": ["AAPL", "AAPL,MSFT", "msft", "AAPL,AAPL", "NVDA,BTC-USD"],
    "start": ["2026-11-26T14:30:00Z", "2026-11-26", str(NOW_NS - 3600 * 10**9), "0"],
    "end": ["2026-11-26T15:00:00Z", "2026-11-29", str(NOW_NS + 3600 * 10**9)],
    "types": ["trade", "quote", "quote,trade"],
    "fields": ["ts,seq,price", "sym,type,ts", "close,volume,start", "mid,spread,aggressor"],
}
config = schemathesis.Config.from_dict(
    {
        "dictionaries": {
            "odd": {"values": ODD_VALUES},
            **{name: {"values": values + ODD_FEW} for name, values in REAL_VALUES.items()},
        },
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            # Unlisted query parameters are ignored (openapi.yaml says so); keys are sent below.
            "allow-extra-parameters": False,
            "with-security-parameters": False,
            "dictionaries": {"string": {"dictionary": "odd", "probability": 0.3}},
        },
        # Nothing learnt from answers (they vary with live data): the same requests every run.
        "phases": {
            "fuzzing": {
                "error-feedback": {"enabled": False},
                "extra-data-sources": {"responses": False},
            }
        },
        "parameters": {
            **{f"query.{name}": {"dictionary": name, "probability": 0.7} for name in REAL_VALUES},
            **{
                f"query.{name}": {"dictionary": "odd", "probability": 0.3}
                for name in ("limit", "enriched", "fingerprint")
            },
        },
    }
)
schema = schemathesis.openapi.from_path(OPENAPI, config=config)


def _example_rows() -> list[tuple]:
    rows = []
    for i in range(200):
        sym = ("AAPL", "MSFT")[i % 2]
        ts = EXAMPLE_T0 + i * 10**9
        base = dict.fromkeys(STORED_SCHEMA)
        if i % 3:
            base.update(type="quote", bid=100.0, bid_size=1.0, ask=100.5, ask_size=2.0)
            base["crossed"] = False
        else:
            base.update(type="trade", price=100.25, size=3.0, side="buy")
        base.update(sym=sym, ts=ts, epoch=1, seq=i // 2 + 1, venue="X")
        rows.append(tuple(base.values()))
    return rows


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """A stack with live ticks, recorded ticks, a stored day at the document's examples and a
    corrupt file on 2026-11-28."""
    s = Stack(tmp_path_factory.mktemp("fuzz"), recorder=True, recorder_flush_s=0.2)
    write_history(s.data_dir / "history", _example_rows(), "import-fuzz", "2026-11-26")
    corrupt_history_file(s.data_dir / "history", "2026-11-28")  # the documented 500
    s.start()
    try:
        eventually_sync(lambda: len(stored_files(s)) >= 2, every=0.2,
                        what="two stored files")  # fmt: skip
        yield s, s.key("fuzz-admin", SCOPES)
    finally:
        s.stop()


def documented_server_errors_only(ctx: object, response: schemathesis.Response, case: Case) -> None:
    """A 5xx is allowed only as a documented JSON error (corrupt history, or unavailable), or as
    ``/status`` saying the deployment is down."""
    if response.status_code < 500:
        return
    body: object = None
    with contextlib.suppress(ValueError):
        body = response.json()
    if case.path == "/status" and isinstance(body, dict) and body.get("status") == "down":
        return
    code = body.get("error", {}).get("code") if isinstance(body, dict) else None
    assert code == DOCUMENTED_5XX.get(response.status_code), (
        f"{response.status_code} is not a documented error: {response.text[:300]!r}"
    )


@schema.parametrize()
def test_every_answer_is_documented_and_no_undocumented_5xx(
    case: Case, fuzzed: tuple[Stack, str]
) -> None:
    stack, admin = fuzzed
    kw = {
        "base_url": stack.base,
        "timeout": 60,
        "excluded_checks": [not_a_server_error, positive_data_acceptance],
        "additional_checks": [documented_server_errors_only],
    }
    case.call_and_validate(headers={"Authorization": f"Bearer {admin}"}, **kw)
    case.call_and_validate(headers={"Authorization": f"Bearer {UNKNOWN_KEY}"}, **kw)
    if case.headers:
        case.headers.pop("Authorization", None)
    case.call_and_validate(**kw)
