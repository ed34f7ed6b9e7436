"""tickpipe: run the processes of the Procfile, serve MCP over stdio, manage API keys, import
tick files.

Bad arguments or settings exit 2 with what to pass (argparse's convention); a file or store
that cannot be read exits 1 with one line saying why. No command ends in a traceback on either.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import math
import os
import re
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from server.config import Settings, get_settings
from server.privacy import redact_root_logging

WRITES_REDIS = {"feed", "recorder", "web"}  # these wait for tickpipe's own Redis (see own_redis)


def _keys(args: argparse.Namespace) -> int:
    from server.auth import KeyStore, KeyStoreError

    path = get_settings().keys_db
    try:
        store = KeyStore(path)
    except (sqlite3.Error, OSError) as exc:
        return _failed(f"cannot open the key file {path}: {exc}")
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
    from server.ops.queries import read_queries

    path = get_settings().queries_db
    try:
        rows = read_queries(path, args.key, args.limit)
    except (sqlite3.Error, OSError) as exc:
        return _failed(f"cannot read the query history {path}: {exc}")
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

    from server.live.bus import KEYS_CHANNEL
    from server.live.connection import open_sync_redis

    try:
        client = open_sync_redis(get_settings())
        client.publish(KEYS_CHANNEL, name)  # a plain channel: a cluster broadcasts it
        client.close()
    except (redis.RedisError, ValueError):  # unreachable, or a bad TICKPIPE_REDIS_URL
        pass


def _redis(_: argparse.Namespace) -> int:
    """Run tickpipe's own redis-server for the Procfile, or stand by when TICKPIPE_REDIS_URL
    names another Redis (the other processes use that one)."""
    import redis

    from server.ops.own_redis import Owner, data_dir, probe, refusal

    s = get_settings()
    if not s.own_redis:
        url = urlparse(s.redis_url.split(",")[0])
        what = "the Redis Cluster" if s.cluster else "the Redis"
        print(f"using {what} TICKPIPE_REDIS_URL names ({url.hostname}:{url.port or 6379}); "
              "not starting one", flush=True)  # fmt: skip
        _wait_for_stop()
        return 0
    data = data_dir(s)
    owner, detail = probe(s)
    if owner is Owner.OTHER:
        print(f"error: {refusal(s, detail)}", file=sys.stderr, flush=True)
        return 1
    if owner is Owner.OURS:  # left running by an earlier run: adopt it, stop it on Ctrl-C
        print(f"tickpipe's own Redis (data in {data}) already runs on 127.0.0.1:{s.redis_port}; "
              "using it", flush=True)  # fmt: skip
        _wait_for_stop()
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(s.redis_url, socket_connect_timeout=1).shutdown()
        return 0
    exe = shutil.which("redis-server")
    if exe is None:
        print("error: redis-server not found; run 'make run' (it installs it)", file=sys.stderr)
        return 1
    data.mkdir(parents=True, exist_ok=True)
    print(f"starting redis-server on 127.0.0.1:{s.redis_port}, data in {data}", flush=True)
    os.execv(
        exe,
        [exe, "--bind", "127.0.0.1", "--port", str(s.redis_port), "--dir", str(data),
         "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
    )  # fmt: skip


def _wait_for_stop() -> None:
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # so sigwait, not the default, takes them
    signal.sigwait(stop)


def _require_own_redis() -> int:
    """Before a process that writes to Redis starts: wait for tickpipe's own Redis, and refuse
    (1) if another server answers in its place. Nothing to check with TICKPIPE_REDIS_URL."""
    from server.ops.own_redis import wait_until_ours

    s = get_settings()
    if not s.own_redis:
        return 0
    try:
        problem = wait_until_ours(s, lambda text: print(text, flush=True))
    except KeyboardInterrupt:
        return 130
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 1
    return 0


def _feed(args: argparse.Namespace) -> int:
    from server.feed.tickerplant import Source, run_feed, run_loop

    settings = get_settings()
    if args.name is not None:
        settings = settings.model_copy(update={"feed_name": args.name})
    source: Source | None = None
    parser: argparse.ArgumentParser = args.parser
    if args.source is not None and args.file is not None:
        parser.error("give --source or --file, not both")
    if args.source is None:
        for flag in ("symbols", "map", "url", "agg_trades"):
            if getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} goes with --source NAME")
    if args.source is not None:
        from server.feed.sources import VenueRefused

        try:
            source = _venue_source(args, settings)
        except VenueRefused as exc:
            return _failed(str(exc))
    elif args.file is not None:
        from server.feed.replay import FileReplay
        from server.history.importers import read_file

        try:
            result = read_file(
                args.file, args.format, symbol=args.symbol, mapping=args.mapping,
                lean_market=args.lean_market,
            )  # fmt: skip
            source = FileReplay(result.ticks, args.speed, args.file.name)
        except (ValueError, OSError) as exc:
            return _failed(f"{args.file}: {exc}")
    from server.feed.sources import VenueRefused

    try:
        run_loop(run_feed(settings, source))
    except VenueRefused as exc:
        return _failed(str(exc))
    return 0


def _venue_source(args: argparse.Namespace, settings: Settings) -> Any:
    """The live source ``--source`` names, or exit 2 saying which flag to fix."""
    from server.feed.sources import ADAPTERS, KEYED, SessionOptions, VenueFeed, symbol_map

    parser: argparse.ArgumentParser = args.parser
    if args.symbols is None:
        parser.error(f"--source {args.source} needs --symbols, e.g. --symbols BTCUSDT,ETHUSDT")
    try:
        names = symbol_map(args.symbols.split(","), args.map or [])
    except ValueError as exc:
        parser.error(str(exc))
    secrets: dict[str, str] = {}
    if args.source in KEYED:
        key, secret = settings.alpaca_key_id, settings.alpaca_secret_key
        if key is None or secret is None:
            parser.error(
                f"--source {args.source} needs TICKPIPE_ALPACA_KEY_ID and "
                "TICKPIPE_ALPACA_SECRET_KEY in the environment (or .env)"
            )
        secrets = {"key_id": key.get_secret_value(), "secret_key": secret.get_secret_value()}
    if args.url is not None and urlparse(args.url).scheme not in ("ws", "wss"):
        parser.error(f"--url {args.url!r}: give a WebSocket URL, ws://... or wss://...")
    adapter = ADAPTERS[args.source]
    if args.agg_trades:
        if not args.source.startswith("binance"):
            parser.error("--agg-trades is for --source binance or binance-futures")
        adapter = type(adapter.__name__, (adapter,), {"agg_trades": True})
    options = SessionOptions(
        backoff_min_s=settings.source_backoff_min_s,
        backoff_max_s=settings.source_backoff_max_s,
        lifetime_s=settings.source_lifetime_s,
        silence_s=settings.source_silence_s,
    )
    return VenueFeed(adapter, names, args.url, secrets, options)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
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
        # uvicorn's protocols plus the time limits it lacks (a request head, a close).
        "http": "server.api.transport:HeadTimeoutHttp",
        "ws": "server.api.transport:ClosingWebSockets",
        "log_level": "info",
    }


def _import(args: argparse.Namespace) -> int:
    from server.history.importers import import_file
    from server.history.importers.report import report_line, summary_table
    from server.history.store import history_dir

    history = history_dir(get_settings())
    paths, status = _expand(args.paths)
    progress = _Progress(paths)
    reports = []
    failed: list[str] = []
    for path in paths:
        progress.begin(path)
        try:
            r = import_file(
                history, path, args.format, symbol=args.symbol, mapping=args.mapping,
                date=args.date, lean_market=args.lean_market, replace=args.replace,
                dry_run=args.dry_run,
            )  # fmt: skip
        except (ValueError, OSError) as exc:
            progress.clear()
            print(f"{path}: error: {exc}", file=sys.stderr, flush=True)
            status = 1
            failed.append(path.name)
            progress.end(path, 0)
            continue
        reports.append(r)
        status = 1 if r.failed else status
        progress.clear()
        print(report_line(r), flush=True)
        if r.message:
            print(f"{path}: {r.message}", file=sys.stderr if r.failed else sys.stdout, flush=True)
        if r.preview is not None:
            _print_preview(r.preview)
        progress.end(path, r.stored)
    progress.clear()
    if len(paths) > 1:
        print(summary_table(reports, failed), flush=True)
    return status


def _expand(args: list[Path]) -> tuple[list[Path], int]:
    """Files named by the arguments: files, every file under a folder (hidden ones left out),
    and globs the shell left unexpanded (``data/**/*.zip``). Unmatched arguments are reported
    (status 1); the files found are imported anyway."""
    import glob

    files: list[Path] = []
    status = 0
    for arg in args:
        if arg.is_dir():
            found = sorted(p for p in arg.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                print(f"{arg}: error: the directory holds no files", file=sys.stderr)
                status = 1
            files += found
        elif not arg.exists() and glob.has_magic(str(arg)):
            found = sorted(Path(p) for p in glob.glob(str(arg), recursive=True))
            found = [p for p in found if p.is_file()]
            if not found:
                print(f"{arg}: error: no file matches", file=sys.stderr)
                status = 1
            files += found
        else:
            files.append(arg)  # a missing file is reported when its import fails
    return list(dict.fromkeys(files)), status


def _print_preview(frame: object) -> None:
    import polars as pl

    assert isinstance(frame, pl.DataFrame)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=32):
        print(f"first {frame.height} ticks as they would be stored:")
        print(frame)


class _Progress:
    """Files done, rows stored and the rate, redrawn on one line of a terminal (stderr); nothing
    when stderr is not a terminal (each file's line is printed either way)."""

    def __init__(self, paths: list[Path]) -> None:
        self.tty = sys.stderr.isatty()
        self.paths = len(paths)
        self.sizes = {p: p.stat().st_size if p.is_file() else 0 for p in paths}
        self.total = sum(self.sizes.values()) or 1
        self.done_bytes = self.files = self.rows = 0
        self.t0 = time.monotonic()
        self.shown = False

    def begin(self, path: Path) -> None:
        if not self.tty:
            return
        width = 30
        filled = int(width * self.done_bytes / self.total)
        rate = self.rows / max(time.monotonic() - self.t0, 1e-9)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.files}/{self.paths} files, "
            f"{self.rows:,} rows, {rate:,.0f} rows/s, {path.name}"
        )
        sys.stderr.write("\r" + line[:160] + "\x1b[K")
        sys.stderr.flush()
        self.shown = True

    def end(self, path: Path, rows: int) -> None:
        self.files += 1
        self.rows += rows
        self.done_bytes += self.sizes.get(path, 0)

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def _recorder(_: argparse.Namespace) -> int:
    import asyncio

    from server.history.recorder import run_recorder

    asyncio.run(run_recorder(get_settings()))
    return 0


def _mcp(_: argparse.Namespace) -> int:
    import asyncio

    from server.mcp.stdio import run_stdio

    return asyncio.run(run_stdio(get_settings()))


def _web(args: argparse.Namespace) -> int:
    import uvicorn

    from server.privacy import uvicorn_log_config

    uvicorn.run(
        "server.app:create_app",
        factory=True,
        access_log=args.access_log,
        log_config=uvicorn_log_config(),  # keys in request lines are masked
        **uvicorn_options(get_settings()),
    )
    return 0


# -- arguments: each type says what to pass when a value does not parse (argparse exits 2) --


def _date(text: str) -> dt.date:
    """A session date, YYYY-MM-DD."""
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text) is None:
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date: give YYYY-MM-DD, e.g. 2024-11-26"
        ) from None


def _speed(text: str) -> float:
    """A replay speed: a finite number > 0, at most 1e6."""
    try:
        speed = float(text)
    except ValueError:
        speed = math.nan
    if not (math.isfinite(speed) and 0 < speed <= 1e6):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a speed: give a number > 0 (1 = real time, 10 = ten times faster)"
        )
    return speed


def _limit(text: str) -> int:
    """How many query records: 1 to 10,000."""
    if re.fullmatch(r"[0-9]{1,5}", text) is None or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: give 1 to 10000")
    return int(text)


def _mapping(text: str) -> object:
    """A ``Mapping`` for ``--format csv``: JSON text, or the path of a .json file holding it."""
    from server.history.importers import Mapping

    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"cannot read {text!r} ({exc.strerror}): give JSON such as "
                '{"time": "ts", "time_unit": "ms", "price": "px", "symbol": "AAPL"} or a .json file'
            ) from None
    try:
        return Mapping.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'mapping'}: {e['msg']}" for e in exc.errors()
        )
        raise argparse.ArgumentTypeError(
            f"{problems} (see 'tickpipe import --help', format csv)"
        ) from None


def _formats_epilog() -> str:
    from server.history.importers import FORMAT_GUIDE

    blocks = [f"{name}\n" + "\n".join("    " + line for line in guide.splitlines())
              for name, guide in FORMAT_GUIDE.items()]  # fmt: skip
    return "formats (--format) and what each file looks like:\n\n" + "\n\n".join(blocks) + "\n"


def _failed(message: str) -> int:
    """A runtime failure: one line on stderr, exit status 1."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    from server.auth import SCOPES
    from server.history.importers import FORMATS

    plain = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="tickpipe",
        description=__doc__,
        epilog="Settings are TICKPIPE_* environment variables (or a .env file), e.g.\n"
        "TICKPIPE_DATA_DIR (default data), TICKPIPE_REDIS_URL, TICKPIPE_PORT.\n"
        "'tickpipe COMMAND --help' tells more about each command.",
        formatter_class=plain,
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(
        name: str,
        summary: str,
        about: str,
        func: Callable[[argparse.Namespace], int],
        redis: bool,
        epilog: str | None = None,
    ) -> argparse.ArgumentParser:
        """A subcommand; ``redis``: it talks to Redis, so TICKPIPE_REDIS_URL is checked first."""
        cmd = sub.add_parser(
            name, help=summary, description=about, epilog=epilog, formatter_class=plain
        )
        cmd.set_defaults(func=func, redis=redis, parser=cmd)
        return cmd

    keys = command(
        "keys", "create, list and revoke API keys",
        "API keys, stored as SHA-256 hashes in <data_dir>/keys.sqlite3. A key is sent as\n"
        "'Authorization: Bearer <key>', never in a URL.",
        _keys, redis=False,
    )  # fmt: skip
    ks = keys.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    c = ks.add_parser("create", help="create a key and print it once")
    c.add_argument("--name", required=True, help="1-64 characters, unique among active keys")
    c.add_argument(
        "--scopes",
        default="realtime",
        help=f"comma-separated, from {','.join(SCOPES)} (default: realtime)",
    )
    c.add_argument(
        "--symbols", help="comma-separated symbols the key may see, e.g. AAPL,MSFT (default: all)"
    )
    ls = ks.add_parser("list", help="list keys (never the secrets)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    r = ks.add_parser("revoke", help="revoke a key by name or prefix")
    r.add_argument("name", help="the key's name, or the first 10 characters of the key")

    q = command(
        "queries", "show the query history, newest first",
        "Every REST query and WebSocket subscribe, per key (<data_dir>/queries.sqlite3).",
        _queries, redis=False,
    )  # fmt: skip
    q.add_argument("--key", help="only this key's queries (by key name)")
    q.add_argument("--limit", type=_limit, default=100, help="1 to 10000 records (default 100)")

    command(
        "redis", "run tickpipe's own redis-server",
        "Run tickpipe's own redis-server on 127.0.0.1:TICKPIPE_REDIS_PORT with its data in\n"
        "<data_dir>/redis; stand by (start nothing) if TICKPIPE_REDIS_URL names another Redis.",
        _redis, redis=True,
    )  # fmt: skip
    feed = command(
        "feed", "run the feed: simulated, or a tick file replayed live",
        "Publish ticks into Redis: simulated (TICKPIPE_SYMBOLS, TICKPIPE_FEED_RATE), or the\n"
        "ticks of a file in any import format, replayed at --speed and started over when it\n"
        "ends.",
        _feed, redis=True, epilog=_formats_epilog(),
    )  # fmt: skip
    feed.add_argument("--file", type=Path, help="replay this tick file instead of simulating")
    from server.feed.sources import ADAPTERS

    feed.add_argument(
        "--source", choices=sorted(ADAPTERS), metavar="NAME",
        help=f"publish a venue's live trades and quotes: {', '.join(sorted(ADAPTERS))}",
    )  # fmt: skip
    feed.add_argument(
        "--symbols", help="with --source: the venue's symbols, comma-separated (BTCUSDT, BTC-USD, "
        "BTC/USD, AAPL as the venue writes them)",
    )  # fmt: skip
    feed.add_argument(
        "--map", action="append", metavar="VENUE_SYM=SYM",
        help="with --source: publish a venue symbol under another name (repeatable)",
    )  # fmt: skip
    feed.add_argument("--name", help="this feed's name in status (default TICKPIPE_FEED_NAME)")
    feed.add_argument(
        "--url", help="with --source: the venue's WebSocket endpoint instead of the public one "
        "(scheme, host, port, path; the adapter adds its streams and subscriptions)",
    )  # fmt: skip
    feed.add_argument(
        "--agg-trades", action="store_true",
        help="with --source binance*: subscribe <sym>@aggTrade instead of <sym>@trade",
    )  # fmt: skip
    feed.add_argument(
        "--format", choices=FORMATS, metavar="FORMAT", help=f"with --file: {', '.join(FORMATS)}"
    )
    _file_arguments(feed)
    feed.add_argument(
        "--speed", type=_speed, default=1.0, help="1 = real time (default), 10 = ten times faster"
    )
    imp = command(
        "import", "load vendor tick files into history",
        "Store the ticks of vendor files in the history the recorder writes\n"
        "(<data_dir>/history), exactly once. FILE may be a file, a folder (every file under\n"
        "it) or a glob (data/**/*.zip). Files may be plain, .gz or .zip (the first .csv\n"
        "member). A file already imported (same bytes) stores nothing; a file whose ticks\n"
        "overlap stored ones (same symbol, type and venue in the same time range) is refused\n"
        "unless --replace. Rows that cannot be ticks go to\n"
        "<data_dir>/imports/<name>.<digest>.rejects.csv with the reason; rows a vendor flagged\n"
        "(e.g. suspicious) are stored with the flag in the 'flags' column.",
        _import, redis=False, epilog=_formats_epilog(),
    )  # fmt: skip
    imp.add_argument("paths", nargs="+", type=Path, metavar="FILE")
    imp.add_argument(
        "--format", required=True, choices=FORMATS, metavar="FORMAT",
        help=f"one of {', '.join(FORMATS)} (see below)",
    )  # fmt: skip
    imp.add_argument("--date", type=_date, help="YYYY-MM-DD, for files that do not carry it")
    imp.add_argument(
        "--replace", action="store_true",
        help="store files whose ticks overlap imported ones, removing those first",
    )  # fmt: skip
    imp.add_argument(
        "--dry-run", action="store_true",
        help="read and check only: print the first ticks as they would be stored",
    )  # fmt: skip
    _file_arguments(imp)
    command(
        "recorder", "store every published tick as Parquet",
        "Store every tick published into Redis as Parquet files under <data_dir>/history,\n"
        "exactly once, and merge small files in the background.",
        _recorder, redis=True,
    )  # fmt: skip
    w = command(
        "web", "run the web process (REST, WebSocket, dashboard)",
        "Serve the REST API, the WebSocket at /ws and the dashboard at / on\n"
        "TICKPIPE_HOST:TICKPIPE_PORT (default 127.0.0.1:8000). On first start it prints an\n"
        "admin key, once.",
        _web, redis=True,
    )  # fmt: skip
    w.add_argument(
        "--access-log", action="store_true", help="log every request line (keys in URLs masked)"
    )
    command(
        "mcp", "serve MCP over stdio for a local agent (key in TICKPIPE_KEY)",
        "Serve the Model Context Protocol over stdin/stdout for an agent host that starts\n"
        "tickpipe itself; the API key comes from TICKPIPE_KEY.",
        _mcp, redis=True,
    )  # fmt: skip
    return p


# --format csv: the Mapping's fields as flags (they override a --mapping file's).
MAPPING_FLAGS = {
    "--time": "column of the time (epoch numbers, text, or the time of day)",
    "--time-unit": "s, ms, us or ns: the time column counts these since the epoch",
    "--time-format": "strptime format of the time column, e.g. '%%Y-%%m-%%d %%H:%%M:%%S%%.f'",
    "--timezone": "zone of times without an offset (default UTC), e.g. America/New_York",
    "--symbol-column": "column of the symbol",
    "--symbol-pattern": "regular expression on the file name; its first group is the symbol",
    "--price": "column of the trade price",
    "--size": "column of the trade size",
    "--side": "column of the aggressor side (buy/sell, b/s)",
    "--bid": "column of the bid price",
    "--bid-size": "column of the bid size",
    "--ask": "column of the ask price",
    "--ask-size": "column of the ask size",
    "--venue": "column of the venue",
    "--flag-column": "column whose 1/true flags the row (the flag is named after the column)",
    "--price-scale": "prices are divided by this (e.g. 10000)",
    "--separator": "field separator (default ,)",
    "--columns": "names of the columns of a file without a header, comma-separated",
    "--date-pattern": "strptime date in the file name (e.g. %%Y%%m%%d); then --time is the "
    "time of day",
}


def _file_arguments(cmd: argparse.ArgumentParser) -> None:
    """The arguments that say how to read a file: for any format, and the csv mapping."""
    cmd.add_argument("--symbol", help="for files that do not name it (histdata, lobster, ...)")
    cmd.add_argument(
        "--lean-market", metavar="TYPE/MARKET",
        help="lean: the market of a file kept outside Lean's folders, e.g. forex/fxcm",
    )  # fmt: skip
    group = cmd.add_argument_group("csv and Parquet files (--format csv)")
    group.add_argument("--mapping", type=_mapping, help="JSON text or a .json file (see below)")
    for flag, text in MAPPING_FLAGS.items():
        kind = float if flag == "--price-scale" else str
        group.add_argument(flag, type=kind, help=text, metavar="X" if kind is float else "VALUE")
    group.add_argument("--no-header", action="store_true", help="the file has no header row")


def _mapping_from(args: argparse.Namespace) -> object:
    """The --mapping file's Mapping with the mapping flags applied (None: neither given)."""
    from server.history.importers import Mapping

    given = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag in MAPPING_FLAGS
        if getattr(args, flag[2:].replace("-", "_")) is not None
    }
    if "columns" in given:
        given["column_names"] = [c.strip() for c in given.pop("columns").split(",")]
    if args.no_header:
        given["header"] = False
    if args.mapping is None and not given:
        return None
    base = args.mapping.model_dump(exclude_unset=True) if args.mapping is not None else {}
    try:
        return Mapping.model_validate({**base, **given})
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-') or 'mapping'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        parser: argparse.ArgumentParser = args.parser
        parser.error(f"{problems} (see 'tickpipe {args.cmd} --help', format csv)")


def _check_file_arguments(args: argparse.Namespace) -> None:
    """What argparse cannot check alone: a replayed file needs its format, csv its mapping."""
    if args.cmd not in ("feed", "import") or (args.cmd == "feed" and args.file is None):
        return
    parser: argparse.ArgumentParser = args.parser
    if args.format is None:
        from server.history.importers import FORMATS

        parser.error(f"--file needs --format: one of {', '.join(FORMATS)}")
    args.mapping = _mapping_from(args)
    if args.format == "csv" and args.mapping is None:
        parser.error(
            "--format csv needs a mapping: --time and --price/--bid/--ask (and more, see "
            f"'tickpipe {args.cmd} --help') or --mapping"
        )


def _bad_settings(exc: ValidationError) -> int:
    for e in exc.errors():
        if not e["loc"]:  # a rule across settings: its message names them
            print(f"error: {e['msg'].removeprefix('Value error, ')}", file=sys.stderr)
            continue
        name = "TICKPIPE_" + "_".join(map(str, e["loc"])).upper()
        given = f"={str(e['input'])[:60]!r}" if isinstance(e.get("input"), str) else ""
        print(f"error: {name}{given}: {e['msg']}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    redact_root_logging()
    args = build_parser().parse_args(argv)
    _check_file_arguments(args)
    try:
        settings = get_settings()
        if args.redis:
            from redis.connection import parse_url

            from server.live.connection import seed_nodes

            try:
                if settings.cluster:  # seed nodes, comma-separated; host:port is enough
                    for seed in seed_nodes(settings):
                        parse_url(f"redis://{seed.host}:{seed.port}")
                else:
                    parse_url(settings.redis_url)
            except ValueError as exc:
                print(f"error: TICKPIPE_REDIS_URL={settings.redis_url!r}: {exc}", file=sys.stderr)
                return 2
    except ValidationError as exc:
        return _bad_settings(exc)
    if args.cmd in WRITES_REDIS and (refused := _require_own_redis()):
        return refused
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
