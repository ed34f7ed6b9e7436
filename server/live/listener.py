"""What the hub feeds: a ``Listener`` is anything that takes a symbol's live fragments.

Three kinds listen: a WebSocket's ``Subscriber`` (``server.live.subscriber``), the web process's
last-value cache (``server.live.latest``) and an MCP resource watch (``server.mcp.resources``).
The hub knows them only through this protocol.
"""

from __future__ import annotations

from typing import Protocol


class Listener(Protocol):
    """A consumer of live fragments, subscribed to symbols through ``Hub.subscribe``."""

    # sym -> the types it takes (``server.live.subscriber.MASKS``); the hub keeps it up to date.
    symbols: dict[str, int]

    def push(self, sym: str, fragment: str, mask: int) -> None:
        """One fragment of ``sym`` as published (comma-joined events); runs on the hub's reader,
        so it must never await or block."""

    def hold(self, syms: list[str]) -> None:
        """Keep back what arrives for these newly subscribed symbols until ``release``."""

    def release(self, sym: str, after_seq: int, mask: int) -> None:
        """Let ``sym`` flow, dropping held events at or below ``after_seq``."""

    def unhold(self, syms: list[str]) -> None:
        """Forget what is held for these symbols (their subscription did not happen)."""
