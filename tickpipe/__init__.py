"""tickpipe's Python client: ``from tickpipe import Client``.

The names load on first use (PEP 562), so the server, which imports ``tickpipe.fingerprint``
and ``tickpipe.wire`` only, does not import the client's HTTP and WebSocket libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tickpipe.client import (
        Client,
        Loss,
        Replay,
        ResumeUnavailable,
        Subscription,
        SyncClient,
        TickpipeError,
        UpstreamGap,
    )
    from tickpipe.fingerprint import Fingerprint

_HOME = {
    "Client": "tickpipe.client",
    "Fingerprint": "tickpipe.fingerprint",
    "Loss": "tickpipe.client",
    "Replay": "tickpipe.client",
    "ResumeUnavailable": "tickpipe.client",
    "Subscription": "tickpipe.client",
    "SyncClient": "tickpipe.client",
    "TickpipeError": "tickpipe.client",
    "UpstreamGap": "tickpipe.client",
}

__all__ = [
    "Client",
    "Fingerprint",
    "Loss",
    "Replay",
    "ResumeUnavailable",
    "Subscription",
    "SyncClient",
    "TickpipeError",
    "UpstreamGap",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'tickpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
