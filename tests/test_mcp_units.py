"""The pure parts of the MCP server: the throttle of a resource watch, when an HTTP session is
judged gone, ISO times, the contract's schemas."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from server.mcp import contract
from server.mcp.http import SessionActivity
from server.mcp.resources import TickWatch
from server.mcp.tools import iso


async def test_watch_delivers_the_first_change_at_once_then_at_most_once_per_interval() -> None:
    delivered: list[tuple[float, list[str]]] = []
    two = asyncio.Event()

    def deliver(syms: list[str]) -> None:
        # When the watch decided to deliver (its own clock): a busy machine may run this
        # callback late, which says nothing about the watch's interval.
        delivered.append((watch._last, syms))
        if len(delivered) == 2:
            two.set()

    watch = TickWatch(None, 0.2, deliver)  # type: ignore[arg-type]
    watch.push("AAPL", "{}", 3)
    await asyncio.sleep(0.01)
    assert [syms for _t, syms in delivered] == [["AAPL"]]  # no wait after a quiet spell
    for sym in ("MSFT", "AAPL", "MSFT", "NVDA"):
        watch.push(sym, "{}", 3)
    await asyncio.wait_for(two.wait(), 60)  # the second delivery, however late a busy loop runs
    (t1, _first), (t2, second) = delivered
    assert second == ["MSFT", "AAPL", "NVDA"]  # each symbol once, in the order it ticked
    assert t2 - t1 >= 0.2


async def test_unsubscribed_symbols_are_not_delivered_and_a_closed_watch_is_silent() -> None:
    delivered: list[list[str]] = []
    watch = TickWatch(None, 0.05, delivered.append)  # type: ignore[arg-type]
    watch.push("AAPL", "{}", 3)
    watch.push("MSFT", "{}", 3)
    watch.unhold(["AAPL", "MSFT"])  # what the hub calls on unsubscribe, before the timer ran
    watch.closed = True
    watch.push("NVDA", "{}", 3)
    await asyncio.sleep(0.1)
    assert delivered == []


def test_session_is_gone_after_delete_or_idle_and_not_while_a_request_is_open() -> None:
    activity = SessionActivity(idle_s=0.05)
    with activity.request("s1", "POST"):
        pass
    with activity.request("s2", "DELETE"):
        pass
    assert not activity.ended("s1")
    assert activity.ended("s2")
    with activity.request("s1", "GET"):  # an open GET stream keeps the session
        time.sleep(0.06)
        assert not activity.ended("s1")
    time.sleep(0.06)
    assert activity.ended("s1")
    assert activity.ended("never-seen")


def test_iso_times_keep_nanoseconds_and_drop_zero_fractions() -> None:
    assert iso(0) == "1970-01-01T00:00:00Z"
    assert iso(1_772_461_800_055_000_000) == "2026-03-02T14:30:00.055Z"
    assert iso(1_772_461_800_000_000_001) == "2026-03-02T14:30:00.000000001Z"
    assert iso(1_772_461_800_123_456_000) == "2026-03-02T14:30:00.123456Z"


def test_tool_schemas_are_self_contained_objects() -> None:
    for spec in contract.tools(500).values():
        for schema in (contract.input_schema(spec), contract.output_schema(spec)):
            assert schema["type"] == "object"
            assert "$ref" not in str(schema) and "$defs" not in schema
        assert spec.description and len(spec.description) < 800


def test_web_app_import_leaves_the_mcp_sdk_and_the_client_unloaded() -> None:
    """The MCP SDK loads on the first ``/mcp`` request and the client's HTTP libraries never:
    a web process starts without them (together about a second of CPU per start)."""
    code = (
        "import sys, server.app; "
        "print(sorted(m for m in ('mcp', 'mcp_types', 'httpx', 'tickpipe.client') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
