"""API keys: created once, stored only as SHA-256 hashes in a SQLite file under the data dir.

SQLite (not Redis) so that keys survive a restart of any component, Redis included, and so that a
revocation made by the CLI reaches every web process on the machine: each one re-reads the table
when SQLite's ``data_version`` moves (checked every ``key_refresh_s``).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.privacy import private_sqlite
from server.ticks import is_valid_symbol

SCOPES = ("realtime", "historical", "replay", "admin")
KEY_PREFIX = "tp_"
ALL = "*"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,          -- sha256 hex of the secret
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,         -- first characters of the secret, to recognise it
    scopes TEXT NOT NULL,         -- comma-separated
    symbols TEXT NOT NULL,        -- comma-separated, or '*'
    created_ns INTEGER NOT NULL,
    revoked_ns INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys(name) WHERE revoked_ns IS NULL;
"""


class KeyStoreError(ValueError):
    """A key could not be created or revoked; the message says why."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    scopes: frozenset[str]
    symbols: frozenset[str] | None  # None: every symbol
    created_ns: int
    revoked_ns: int | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def allows(self, sym: str) -> bool:
        return self.symbols is None or sym in self.symbols

    def screen(self, symbols: list[str]) -> tuple[list[str], list[dict[str, str]]]:
        """The symbols this key may ask for, and the others with why not (``invalid_symbol``,
        ``not_entitled``)."""
        allowed: list[str] = []
        rejected: list[dict[str, str]] = []
        for sym in symbols:
            if not is_valid_symbol(sym):
                rejected.append({"sym": sym[:40], "code": "invalid_symbol"})
            elif not self.allows(sym):
                rejected.append({"sym": sym, "code": "not_entitled"})
            else:
                allowed.append(sym)
        return allowed, rejected

    def public(self) -> dict[str, object]:
        """What may be shown about the key (never the secret)."""
        return {
            "name": self.name,
            "scopes": sorted(self.scopes),
            "symbols": ALL if self.symbols is None else sorted(self.symbols),
        }


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _row_to_key(row: tuple[Any, ...]) -> ApiKey:
    kid, name, prefix, scopes, symbols, created, revoked = row
    return ApiKey(
        id=kid,
        name=name,
        prefix=prefix,
        scopes=frozenset(s for s in scopes.split(",") if s),
        symbols=None if symbols == ALL else frozenset(s for s in symbols.split(",") if s),
        created_ns=created,
        revoked_ns=revoked,
    )


class KeyStore:
    """Create, list, revoke and look up API keys. ``lookup`` is an in-memory dict read."""

    def __init__(self, path: Path) -> None:
        private_sqlite(path)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._version: int | None = None
        self._active: dict[str, ApiKey] = {}
        self.refresh()

    def close(self) -> None:
        self._db.close()

    def refresh(self) -> bool:
        """Re-read the active keys if another process changed them; True if anything changed."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return False
        self._version = version
        rows = self._db.execute(
            "SELECT id, name, prefix, scopes, symbols, created_ns, revoked_ns "
            "FROM api_keys WHERE revoked_ns IS NULL"
        ).fetchall()
        self._active = {r[0]: _row_to_key(r) for r in rows}
        return True

    def lookup(self, secret: str | None) -> ApiKey | None:
        if not secret or not secret.startswith(KEY_PREFIX) or len(secret) > 200:
            return None
        kid = hash_secret(secret)
        key = self._active.get(kid)
        if key is None and self.refresh():  # created a moment ago by another process?
            key = self._active.get(kid)
        return key

    def is_active(self, key_id: str) -> bool:
        return key_id in self._active

    def create(
        self, name: str, scopes: Iterable[str], symbols: Iterable[str] | None = None
    ) -> tuple[str, ApiKey]:
        """A new key: returns the secret (shown once, never stored) and its record."""
        name = name.strip()
        if not name or len(name) > 64:
            raise KeyStoreError("a key needs a name of 1-64 characters (--name agent-1)")
        scope_set = frozenset(s.strip() for s in scopes if s.strip())
        unknown = scope_set - set(SCOPES)
        if unknown or not scope_set:
            raise KeyStoreError(
                f"unknown scope(s) {sorted(unknown)}; choose from {', '.join(SCOPES)}"
                if unknown
                else f"give at least one scope: {', '.join(SCOPES)}"
            )
        sym_list = None if symbols is None else [s.strip().upper() for s in symbols if s.strip()]
        if sym_list is not None and ALL in sym_list:
            sym_list = None
        if sym_list is not None:
            bad = [s for s in sym_list if not is_valid_symbol(s)]
            if bad or not sym_list:
                raise KeyStoreError(
                    f"invalid symbol(s) {bad[:5]}; use e.g. --symbols AAPL,MSFT or '*'"
                )
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=hash_secret(secret),
            name=name,
            prefix=secret[:10],
            scopes=scope_set,
            symbols=None if sym_list is None else frozenset(sym_list),
            created_ns=time.time_ns(),
        )
        try:
            self._db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (
                    key.id,
                    key.name,
                    key.prefix,
                    ",".join(sorted(key.scopes)),
                    ALL if key.symbols is None else ",".join(sorted(key.symbols)),
                    key.created_ns,
                ),
            )
        except sqlite3.IntegrityError:
            raise KeyStoreError(
                f"an active key named {name!r} exists; revoke it or pick another name"
            ) from None
        self._version = None  # our own commits do not move data_version
        self.refresh()
        return secret, key

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        sql = "SELECT id, name, prefix, scopes, symbols, created_ns, revoked_ns FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_ns IS NULL"
        return [_row_to_key(r) for r in self._db.execute(sql + " ORDER BY created_ns")]

    def revoke(self, name_or_prefix: str) -> int:
        """Revoke the active key with this name (or secret prefix); returns how many were."""
        cur = self._db.execute(
            "UPDATE api_keys SET revoked_ns = ? "
            "WHERE revoked_ns IS NULL AND (name = ? OR prefix = ?)",
            (time.time_ns(), name_or_prefix, name_or_prefix),
        )
        self._version = None  # our own commits do not move data_version
        self.refresh()
        return cur.rowcount

    def has_admin(self) -> bool:
        return any(k.has_scope("admin") for k in self._active.values())


def bearer_token(header: str | None) -> str | None:
    """The key from an ``Authorization: Bearer <key>`` header value."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
