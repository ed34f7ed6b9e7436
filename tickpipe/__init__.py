"""tickpipe's Python client: ``from tickpipe import Client``."""

from tickpipe.client import Client, Replay, ResumeUnavailable, SyncClient, TickpipeError
from tickpipe.fingerprint import Fingerprint

__all__ = ["Client", "Fingerprint", "Replay", "ResumeUnavailable", "SyncClient", "TickpipeError"]
