"""tickpipe's Python client: ``from tickpipe import Client``."""

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
