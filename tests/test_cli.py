"""`tickpipe` on bad arguments, bad settings and bad files: a clear error, never a traceback.

Bad arguments exit 2 (argparse's convention) with what to pass; a file or store that cannot be
read exits 1 with one line saying what is wrong; nothing is stored. Every case runs the real CLI
as a subprocess.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from server.history.importers import FORMATS
from tests import forkserver
from tests.harness import free_port

TRADES = "exchange,symbol,timestamp,local_timestamp,id,side,price,amount\n" + "".join(
    f"binance,BTCUSDT,17000000000{i:05d},17000000000{i:05d},{i},buy,37000.5,0.01\n"
    for i in range(2000)
)


def tickpipe(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI with its data dir in ``tmp`` and a Redis URL where nothing listens."""
    base = {
        "PATH": "/usr/bin:/bin",
        "TICKPIPE_DATA_DIR": str(tmp / "data"),
        "TICKPIPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    return forkserver.run(list(args), {**base, **env}, timeout=90)


def _zip(text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("trades.csv", text)
    return buf.getvalue()


def _bad_crc(data: bytes) -> bytes:
    """A zip whose member's compressed bytes were changed after it was written."""
    i = data.index(b"trades.csv") + len(b"trades.csv") + 40
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


ZIPPED = _zip(TRADES)
GZIPPED = gzip.compress(TRADES.encode())
# name -> bytes of a file that cannot be imported, whatever the format says
BROKEN_FILES = {
    "truncated.zip": ZIPPED[: len(ZIPPED) // 2],
    "only-starts-like-a.zip": b"PK\x03\x04" + b"not a zip at all" * 10,
    "bad-crc.zip": _bad_crc(ZIPPED),
    "empty.zip": _zip("")[:0] + b"PK\x05\x06" + b"\x00" * 18,
    "truncated.csv.gz": GZIPPED[: len(GZIPPED) // 2],
    "only-starts-like.gz": b"\x1f\x8b" + b"not gzip" * 10,
    "corrupt-deflate.gz": GZIPPED[:20] + b"\xff" * 40 + GZIPPED[60:],
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_a_broken_archive_is_one_line_error_and_nothing_stored(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(BROKEN_FILES[name])
    out = tickpipe(tmp_path, "import", str(path), "--format", "tardis-trades")
    assert out.returncode == 1, out
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "error" in lines[0], out.stderr
    assert not list((tmp_path / "data").rglob("*.parquet")), "a broken file stored ticks"


def test_a_broken_archive_replayed_by_the_feed_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "truncated.zip"
    path.write_bytes(BROKEN_FILES["truncated.zip"])
    out = tickpipe(tmp_path, "feed", "--file", str(path), "--format", "tardis-trades")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "truncated.zip" in out.stderr.strip().splitlines()[-1]


def _files(tmp: Path) -> dict[str, Path]:
    csv = tmp / "trades.csv"
    csv.write_text(TRADES)
    not_sqlite = tmp / "garbage" / "data"
    not_sqlite.mkdir(parents=True)
    for name in ("keys.sqlite3", "queries.sqlite3"):
        (not_sqlite / name).write_bytes(b"this is not a database" * 100)
    (tmp / "a-file").write_text("x")
    (tmp / "fake.parquet").write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    (tmp / "empty").mkdir()
    return {"csv": csv, "garbage": not_sqlite, "file": tmp / "a-file", "empty": tmp / "empty"}


# (id, argv with {csv}, {garbage}, {file}, {tmp} placeholders, extra env, exit code, a word the
# error must contain)
CASES = [
    ("no-command", [], {}, 2, "COMMAND"),
    ("unknown-command", ["serve"], {}, 2, "invalid choice"),
    ("import-date-slashes", ["import", "{csv}", "--format", "lobster", "--date", "2024/11/26"],
     {}, 2, "YYYY-MM-DD"),
    ("import-date-impossible", ["import", "{csv}", "--format", "lobster", "--date", "2024-02-30"],
     {}, 2, "YYYY-MM-DD"),
    ("import-format-unknown", ["import", "{csv}", "--format", "tardis"], {}, 2, "tardis-trades"),
    ("import-no-format", ["import", "{csv}"], {}, 2, "--format"),
    ("import-missing-file", ["import", "{tmp}/nope.csv", "--format", "tardis-trades"], {}, 1,
     "nope.csv"),
    ("import-an-empty-directory", ["import", "{empty}", "--format", "tardis-trades"], {}, 1,
     "no files"),
    ("import-a-glob-matching-nothing", ["import", "{tmp}/*.nothing", "--format", "tardis-trades"],
     {}, 1, "no file matches"),
    ("import-csv-without-mapping", ["import", "{csv}", "--format", "csv"], {}, 2, "--mapping"),
    ("import-mapping-not-json", ["import", "{csv}", "--format", "csv", "--mapping", "{time:"],
     {}, 2, "--mapping"),
    ("import-mapping-incomplete", ["import", "{csv}", "--format", "csv", "--mapping",
     '{"time": "timestamp"}'], {}, 2, "price"),
    ("import-mapping-missing-file", ["import", "{csv}", "--format", "csv", "--mapping",
     "{tmp}/nope.json"], {}, 2, "nope.json"),
    ("import-fake-parquet", ["import", "{tmp}/fake.parquet", "--format", "csv", "--mapping",
     '{"time": "ts", "price": "p", "symbol": "X"}'], {}, 1, "fake.parquet"),
    ("import-lobster-no-symbol", ["import", "{csv}", "--format", "lobster"], {}, 1, "symbol"),
    ("feed-speed-word", ["feed", "--speed", "fast"], {}, 2, "--speed"),
    ("feed-speed-zero", ["feed", "--speed", "0"], {}, 2, "--speed"),
    ("feed-speed-nan", ["feed", "--speed", "nan"], {}, 2, "--speed"),
    ("feed-format-unknown", ["feed", "--file", "{csv}", "--format", "xml"], {}, 2, "--format"),
    ("feed-file-without-format", ["feed", "--file", "{csv}"], {}, 2, "--format"),
    ("feed-missing-file", ["feed", "--file", "{tmp}/nope.csv", "--format", "histdata"], {}, 1,
     "nope.csv"),
    ("queries-limit-word", ["queries", "--limit", "many"], {}, 2, "--limit"),
    ("queries-limit-zero", ["queries", "--limit", "0"], {}, 2, "--limit"),
    ("queries-not-a-database", ["queries"], {"TICKPIPE_DATA_DIR": "{garbage}"}, 1,
     "queries.sqlite3"),
    ("keys-create-no-name", ["keys", "create"], {}, 2, "--name"),
    ("keys-create-bad-scope", ["keys", "create", "--name", "a", "--scopes", "root"], {}, 2,
     "scope"),
    ("keys-create-bad-symbols", ["keys", "create", "--name", "a", "--symbols", "$(rm)"], {}, 2,
     "symbol"),
    ("keys-revoke-unknown", ["keys", "revoke", "nobody"], {}, 1, "nobody"),
    ("keys-not-a-database", ["keys", "list"], {"TICKPIPE_DATA_DIR": "{garbage}"}, 1,
     "keys.sqlite3"),
    ("keys-data-dir-is-a-file", ["keys", "list"], {"TICKPIPE_DATA_DIR": "{file}"}, 1,
     "a-file"),
    ("setting-not-a-number", ["keys", "list"], {"TICKPIPE_PORT": "eighty"}, 2, "TICKPIPE_PORT"),
    ("setting-out-of-range", ["queries"], {"TICKPIPE_FEED_RATE": "-5"}, 2,
     "TICKPIPE_FEED_RATE"),
    ("redis-url-bad-scheme", ["recorder"], {"TICKPIPE_REDIS_URL": "http://127.0.0.1:1"}, 2,
     "TICKPIPE_REDIS_URL"),
    ("redis-url-bad-port", ["redis"], {"TICKPIPE_REDIS_URL": "redis://127.0.0.1:99999"}, 2,
     "TICKPIPE_REDIS_URL"),
    ("web-redis-url-bad", ["web"], {"TICKPIPE_REDIS_URL": "nonsense"}, 2, "TICKPIPE_REDIS_URL"),
    ("cluster-bad-seed", ["feed"], {"TICKPIPE_REDIS_MODE": "cluster",
     "TICKPIPE_REDIS_URL": "redis://127.0.0.1:7000,http://x:1"}, 2, "TICKPIPE_REDIS_URL"),
    ("seeds-without-cluster-mode", ["web"],
     {"TICKPIPE_REDIS_URL": "redis://127.0.0.1:7000,redis://127.0.0.1:7001"}, 2,
     "TICKPIPE_REDIS_MODE=cluster"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "env", "code", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_arguments_and_settings_say_what_to_pass_without_a_traceback(
    tmp_path: Path, argv: list[str], env: dict[str, str], code: int, word: str
) -> None:
    places = {k: str(v) for k, v in _files(tmp_path).items()} | {"tmp": str(tmp_path)}

    def put(text: str) -> str:
        for name, value in places.items():
            text = text.replace("{" + name + "}", value)
        return text

    out = tickpipe(tmp_path, *map(put, argv), **{k: put(v) for k, v in env.items()})
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "error" in out.stderr and word in out.stderr, out.stderr
    if code == 1:
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_help_of_every_command_exits_0_and_import_names_every_format(tmp_path: Path) -> None:
    commands = [
        [], ["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"], ["queries"],
        ["redis"], ["feed"], ["import"], ["recorder"], ["web"],
    ]  # fmt: skip
    helps = {}
    for cmd in commands:
        out = tickpipe(tmp_path, *cmd, "--help")
        assert out.returncode == 0 and out.stderr == "", (cmd, out.stderr)
        assert "usage: tickpipe" in out.stdout
        helps[" ".join(cmd)] = out.stdout
    for fmt in FORMATS:
        assert fmt in helps["import"], fmt
        assert fmt in helps["feed"], fmt
    assert "YYYY-MM-DD" in helps["import"]
