"""API keys: the CLI, hashing at rest, survival across restarts, and keys never logged."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from server.auth import KeyStore, KeyStoreError, hash_secret
from tests.harness import Stack, eventually, next_event


def test_cli_creates_lists_and_revokes_keys(own_stack) -> None:
    s = own_stack(feed=False)
    out = s.cli("keys", "create", "--name", "agent-1", "--scopes", "realtime,historical",
                "--symbols", "AAPL,MSFT")  # fmt: skip
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    assert secret.startswith("tp_") and len(secret) > 40
    listing = s.cli("keys", "list")
    assert "agent-1" in listing.stdout and "historical,realtime" in listing.stdout
    assert secret not in listing.stdout
    assert s.cli("keys", "revoke", "agent-1").returncode == 0
    assert "agent-1" not in s.cli("keys", "list").stdout
    assert "agent-1" in s.cli("keys", "list", "--all").stdout
    assert s.cli("keys", "revoke", "agent-1").returncode == 1


def test_cli_rejects_bad_key_requests_with_a_clear_message(own_stack) -> None:
    s = own_stack(feed=False)
    bad = s.cli("keys", "create", "--name", "x", "--scopes", "realtime,superuser")
    assert bad.returncode == 2 and "superuser" in bad.stderr and "realtime" in bad.stderr
    bad = s.cli("keys", "create", "--name", "y", "--symbols", "AAPL;rm -rf")
    assert bad.returncode == 2 and "invalid symbol" in bad.stderr
    assert s.cli("keys", "create", "--name", "dup").returncode == 0
    dup = s.cli("keys", "create", "--name", "dup")
    assert dup.returncode == 2 and "exists" in dup.stderr


def test_keys_are_stored_only_as_hashes(tmp_path) -> None:
    store = KeyStore(tmp_path / "keys.sqlite3")
    secret, _key = store.create("hashed", ["realtime"])
    store.close()
    raw = (tmp_path / "keys.sqlite3").read_bytes()
    assert secret.encode() not in raw
    rows = sqlite3.connect(tmp_path / "keys.sqlite3").execute("SELECT id FROM api_keys").fetchall()
    assert rows == [(hash_secret(secret),)]


def test_unknown_scope_and_empty_name_are_refused(tmp_path) -> None:
    store = KeyStore(tmp_path / "k.sqlite3")
    with pytest.raises(KeyStoreError, match="scope"):
        store.create("a", ["root"])
    with pytest.raises(KeyStoreError, match="name"):
        store.create(" ", ["realtime"])


@pytest.mark.slow
async def test_key_survives_restart_of_web_and_redis(own_stack) -> None:
    s: Stack = own_stack()
    key = s.key("durable")
    s.feed.stop()
    s.web.stop()
    s.redis.kill()
    s.redis.start()  # empty: this Redis keeps nothing on disk
    s.start_web()
    s.feed.start()
    s.wait_for_ticks()
    ws, welcome = await s.client(key)
    assert welcome["key"]["name"] == "durable"
    await ws.close()


async def test_key_never_appears_in_logs(own_stack) -> None:
    s: Stack = own_stack(feed=False)
    key = s.key("secretive")
    ws, _ = await s.client(key)
    await ws.close()
    async with s.http() as http:
        await http.get("/ticks/realtime?symbols=AAPL", headers={"Authorization": f"Bearer {key}"})
        await http.get("/ticks/realtime?symbols=AAPL", headers={"Authorization": "Bearer tp_bad"})
    wrong = await s.connect("tp_wrong_key_value")
    await wrong.close()
    await asyncio.sleep(0.2)
    log = s.web.output()
    for secret in (key, "tp_bad", "tp_wrong_key_value"):
        assert secret not in log, log[-2000:]


async def test_first_start_prints_an_admin_key_once(own_stack) -> None:
    s: Stack = own_stack(feed=False)
    first = s.web.output()
    assert "admin key (shown only once" in first
    secret = first.split("keep it): ")[1].split()[0]
    ws, welcome = await s.client(secret)
    assert "admin" in welcome["key"]["scopes"]
    await ws.close()
    s.web.stop()
    s.web.log.write_text("")
    s.start_web()
    await eventually(s.web.output, lambda out: "keys create" in out, what="the start-up notes")
    assert "admin key" not in s.web.output()
    ws, _ = await s.client(secret)
    await next_event(ws, "heartbeat")
    await ws.close()
