"""``tickpipe``: run the processes of the Procfile and manage API keys."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from server.config import Settings, get_settings

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def _keys(args: argparse.Namespace) -> int:
    from server.auth import KeyStore, KeyStoreError

    store = KeyStore(get_settings().keys_db)
    if args.keys_cmd == "create":
        symbols = None if args.symbols in (None, "*") else args.symbols.split(",")
        try:
            secret, key = store.create(args.name, args.scopes.split(","), symbols)
        except KeyStoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(secret)
        print(
            f"# key {key.name!r}: scopes {','.join(sorted(key.scopes))}; symbols "
            f"{key.public()['symbols'] if key.symbols is None else ','.join(sorted(key.symbols))}"
            " -- shown once, store it now",
            file=sys.stderr,
        )
        return 0
    if args.keys_cmd == "list":
        rows = store.list(include_revoked=args.all)
        print(f"{'NAME':<20} {'PREFIX':<12} {'SCOPES':<34} {'SYMBOLS':<24} CREATED / REVOKED")
        for k in rows:
            created = datetime.fromtimestamp(k.created_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")
            revoked = (
                " / " + datetime.fromtimestamp(k.revoked_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")
                if k.revoked_ns
                else ""
            )
            syms = "*" if k.symbols is None else ",".join(sorted(k.symbols))
            print(
                f"{k.name:<20} {k.prefix + '…':<12} {','.join(sorted(k.scopes)):<34} "
                f"{syms[:24]:<24} {created}{revoked}"
            )
        return 0
    if args.keys_cmd == "revoke":
        n = store.revoke(args.name)
        if not n:
            print(
                f"error: no active key named {args.name!r} (see 'tickpipe keys list')",
                file=sys.stderr,
            )
            return 1
        _announce_revocation(args.name)
        print(f"revoked {args.name!r}; open connections using it close within a second")
        return 0
    return 2


def _queries(args: argparse.Namespace) -> int:
    from server.queries import read_queries

    rows = read_queries(get_settings().queries_db, args.key, args.limit)
    print(f"{'TIME (UTC)':<23} {'KEY':<16} {'ENDPOINT':<18} {'STATUS':<16} {'ROWS':>7} "
          f"{'BYTES':>9} {'MS':>9}  PARAMS")  # fmt: skip
    for q in rows:
        when = datetime.fromtimestamp(q["ts"] / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        rows_ = "-" if q["rows"] is None else q["rows"]
        nbytes = "-" if q["bytes"] is None else q["bytes"]
        print(
            f"{when:<23} {(q['key'] or '-')[:16]:<16} {q['endpoint'][:18]:<18} "
            f"{q['status'][:16]:<16} {rows_:>7} {nbytes:>9} {q['duration_ms']:>9.3f}  "
            f"{q['params'][:80]}"
        )
    return 0


def _announce_revocation(name: str) -> None:
    """Tell running web processes at once; they also notice by themselves within a second."""
    import redis

    from server.bus import KEYS_CHANNEL

    try:
        client = redis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=1)
        client.publish(KEYS_CHANNEL, name)
        client.close()
    except redis.RedisError:
        pass


def _redis(_: argparse.Namespace) -> int:
    """Start a local redis-server for the Procfile, unless one already answers at the URL."""
    import redis

    s = get_settings()
    url = urlparse(s.redis_url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    try:
        redis.Redis.from_url(s.redis_url, socket_connect_timeout=1).ping()
        answering = True
    except redis.RedisError:
        answering = False
    if answering or host not in LOCAL_HOSTS:
        where = "already answers" if answering else "is not local"
        print(f"using the Redis at {host}:{port} (it {where}); not starting another", flush=True)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # so sigwait, not the default, takes them
        signal.sigwait(stop)
        return 0
    exe = shutil.which("redis-server")
    if exe is None:
        print("error: redis-server not found; run 'make run' (it installs it)", file=sys.stderr)
        return 1
    data = (s.data_dir / "redis").resolve()
    data.mkdir(parents=True, exist_ok=True)
    print(f"starting redis-server on {host}:{port}, data in {data}", flush=True)
    os.execv(
        exe,
        [exe, "--bind", host, "--port", str(port), "--dir", str(data), "--appendonly", "yes",
         "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
    )  # fmt: skip


def _feed(args: argparse.Namespace) -> int:
    from server.feed.tickerplant import run_feed

    source = None
    if args.file is not None:
        from server.feed.replay import FileReplay
        from server.importers import read_file

        try:
            result = read_file(args.file, args.format, symbol=args.symbol)
            source = FileReplay(result.ticks, args.speed, args.file.name)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    asyncio.run(run_feed(get_settings(), source))
    return 0


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """How ``tickpipe web`` runs uvicorn (the benchmarks run the app the same way)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.web_workers,
        "ws_max_size": 16 * 1024 * 1024,
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_timeout_s,
        # Compression is per connection: it would undo "encode once, same bytes for everyone".
        "ws_per_message_deflate": settings.ws_compression,
        "log_level": "info",
    }


def _import(args: argparse.Namespace) -> int:
    from server.importers import FORMATS, import_file
    from server.store import history_dir

    if args.format not in FORMATS:
        print(f"error: unknown format {args.format!r}; use one of {', '.join(FORMATS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    day = datetime.strptime(args.date, "%Y-%m-%d").date() if args.date else None
    history = history_dir(get_settings())
    status = 0
    for path in args.paths:
        try:
            r = import_file(history, path, args.format, symbol=args.symbol, date=day)
        except (ValueError, OSError) as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(
            f"{path}: read {r.read}, stored {r.stored}, rejected {r.rejected}, "
            f"duplicate {r.duplicate}, skipped {r.skipped} (epoch {r.epoch})"
            + (f"; rejects in {r.rejects_file}" if r.rejects_file else "")
        )
    return status


def _recorder(_: argparse.Namespace) -> int:
    from server.recorder import run_recorder

    asyncio.run(run_recorder(get_settings()))
    return 0


def _web(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "server.api.app:create_app",
        factory=True,
        access_log=args.access_log,
        **uvicorn_options(get_settings()),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tickpipe", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ks = keys.add_subparsers(dest="keys_cmd", required=True)
    c = ks.add_parser("create", help="create a key and print it once")
    c.add_argument("--name", required=True)
    c.add_argument("--scopes", default="realtime", help="comma-separated: realtime,historical,"
                   "replay,admin")  # fmt: skip
    c.add_argument("--symbols", default=None, help="comma-separated entitlements, or * (default)")
    ls = ks.add_parser("list", help="list keys (never the secrets)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    r = ks.add_parser("revoke", help="revoke a key by name or prefix")
    r.add_argument("name")
    keys.set_defaults(func=_keys)

    q = sub.add_parser("queries", help="show the query history, newest first")
    q.add_argument("--key", help="only this key's queries (by key name)")
    q.add_argument("--limit", type=int, default=100)
    q.set_defaults(func=_queries)

    sub.add_parser("redis", help="run a local redis-server unless one answers").set_defaults(
        func=_redis
    )
    feed = sub.add_parser("feed", help="run the feed: simulated, or a tick file replayed live")
    feed.add_argument("--file", type=Path, help="replay this tick file instead of simulating")
    feed.add_argument("--format", default="csv", help="the file's format (see 'import')")
    feed.add_argument("--symbol", help="for files that do not name it")
    feed.add_argument("--speed", type=float, default=1.0, help="1 = real time, 10 = ten times")
    feed.set_defaults(func=_feed)
    imp = sub.add_parser("import", help="load vendor tick files into history")
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--format", required=True, help="tardis-trades, tardis-quotes, histdata, "
                     "lobster, lean or csv")  # fmt: skip
    imp.add_argument("--symbol", help="for files that do not name it (histdata, lobster)")
    imp.add_argument("--date", help="YYYY-MM-DD, for files that do not carry it (lobster)")
    imp.set_defaults(func=_import)
    sub.add_parser("recorder", help="store every published tick as Parquet").set_defaults(
        func=_recorder
    )
    w = sub.add_parser("web", help="run the web process (REST, WebSocket, dashboard)")
    w.add_argument("--access-log", action="store_true")
    w.set_defaults(func=_web)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
