"""Keys stay secret: masked in every URL that is logged or stored, and the files that hold keys
or query history readable by their owner only.

A key belongs in ``Authorization: Bearer <key>`` (or the WebSocket ``auth`` message); a client
that puts it anywhere else (``?key=tp_...``, a path, a symbol) is refused, and what it sent is
still logged by uvicorn and recorded in the query history. ``redact`` masks anything that looks
like a key (``tp_`` and 20 or more key characters, in any case, percent-encoded or not) and the
value of every URL parameter or JSON field named like a secret (``key``, ``token``,
``api_key``, ``access_token``, ``auth``, ``password``, ...).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any

REDACTED = "[redacted]"
_KEY_CHAR = r"(?:[a-z0-9_-]|%[0-9a-f]{2})"
_KEY_RE = re.compile(rf"tp(?:_|%5f){_KEY_CHAR}{{20,}}", re.IGNORECASE)
_SECRET_NAME = r"[\w-]*(?:key|token|secret|password|passwd|auth[\w-]*)"
_URL_PARAM_RE = re.compile(rf"((?:^|[?&;]){_SECRET_NAME}=)[^&;#\s\"']*", re.IGNORECASE)
_JSON_FIELD_RE = re.compile(rf'("{_SECRET_NAME}"\s*:\s*")(?:[^"\\]|\\.)*', re.IGNORECASE)
# SQLite files next to a database: its rollback journal, or its write-ahead log and index.
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


def redact(text: str) -> str:
    """``text`` with every key in it, and the value of every URL parameter or JSON field named
    like a secret, replaced by ``[redacted]``."""
    text = _KEY_RE.sub(REDACTED, text)
    text = _URL_PARAM_RE.sub(rf"\g<1>{REDACTED}", text)
    return _JSON_FIELD_RE.sub(rf"\g<1>{REDACTED}", text)


def _masked(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


class RedactKeys(logging.Filter):
    """A handler filter that masks keys in a record's message, arguments and traceback (uvicorn
    logs every request line, ``WebSocket /ws?key=...`` included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_masked(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _masked(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(_exception_text(record.exc_info))
        return True


def _exception_text(exc_info: Any) -> str:
    """A record's exception as the logging formatter writes it; a malformed ``exc_info`` (uvloop
    logs an exception class, not an instance, after a failed TLS handshake: its
    ``__traceback__`` is a descriptor) as its type and value, never a failure of the log call."""
    try:
        etype, value, tb = exc_info
        if isinstance(value, type) and issubclass(value, BaseException):
            return value.__name__
        return logging.Formatter().formatException(
            (etype, value, tb if isinstance(tb, TracebackType) else None)
        )
    except Exception:  # whatever a library put there, the record is still written
        return f"{exc_info!r}"[:500]


def redact_root_logging() -> None:
    """Mask keys in whatever the root logger's handlers write (the feed's, the recorder's and
    the web app's own log lines)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactKeys())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging configuration with ``RedactKeys`` on every handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_keys"] = {"()": RedactKeys}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_keys")
    return config


def private_sqlite(path: Path) -> None:
    """Make ``path`` (created empty if missing) and its journal, WAL and shared-memory files
    readable and writable by the owner only. SQLite creates those side files with the mode of
    the database file, so a database made here stays private."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDONLY, 0o600))
    for file in (path, *(path.with_name(path.name + s) for s in SQLITE_SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            file.chmod(0o600)
