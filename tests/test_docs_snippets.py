"""Every shell and Python snippet of the README and the quickstart runs as written.

The fenced blocks are taken from the Markdown in order: ``console`` blocks give their ``$ ``
lines (a trailing backslash continues a command; other lines are output), ``bash``/``sh``/
``shell`` blocks all their lines, ``python`` blocks are run as scripts. A comment on the line
before a fence changes that: ``<!-- snippet: file NAME -->`` saves a block as NAME for a later
command to run, ``<!-- snippet: skip (reason) -->`` leaves it out (it starts the stack, or needs
files a reader brings). Each document runs in one shell session (variables carry over, as in a
terminal), in a scratch directory holding the repository's ``.venv`` and ``examples``, against a
real stack (Redis, feed, recorder, web) started here; the address the docs give,
``127.0.0.1:8000``, is replaced by the stack's. Every snippet must exit 0, and curl fails on an
HTTP error.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.config import DEFAULT_SYMBOLS
from tests.harness import ROOT, Stack, recorded_for

DOCS = [ROOT / "README.md", ROOT / "specs" / "001-tick-data-pipeline" / "quickstart.md"]
SHELL = {"console", "bash", "sh", "shell"}
RUN = SHELL | {"python"}
DOCUMENTED = "127.0.0.1:8000"
MARKER = re.compile(r"<!--\s*snippet:\s*(skip|file)\s*(.*?)\s*-->")
FENCE = re.compile(r"^(`{3,})\s*([\w-]*)\s*$")
SNIPPET_TIMEOUT_S = 120


@dataclass
class Snippet:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None  # why it is not run
    file: str | None = None  # saved under this name instead of run

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    def commands(self) -> str:
        """What a reader types: the ``$ `` lines of a console block (with their
        continuations), or the whole of any other block."""
        if self.lang != "console" and not self.text.lstrip().startswith("$ "):
            return self.text
        out: list[str] = []
        more = False
        for line in self.text.splitlines():
            if more:
                out.append(line)
            elif line.startswith("$ "):
                out.append(line[2:])
            else:
                continue
            more = line.rstrip().endswith("\\")
        return "\n".join(out) + "\n"


def snippets(doc: Path) -> list[Snippet]:
    """The runnable fenced blocks of a Markdown file, in order. A fence left open (another
    opening fence with a language inside it, or the end of the file) is an error."""
    found: list[Snippet] = []
    lines = doc.read_text().splitlines()
    i = 0
    marker: tuple[str, str] | None = None
    while i < len(lines):
        m = MARKER.search(lines[i])
        if m:
            marker = (m.group(1), m.group(2))
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].strip():
                marker = None  # a marker applies to the fence right after it
            i += 1
            continue
        ticks, lang, start = fence.group(1), fence.group(2).lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != ticks:
            inner = FENCE.match(lines[i])
            assert not (inner and inner.group(2)), (
                f"{doc.name}:{start + 1}: the {lang or 'plain'} block is not closed before "
                f"line {i + 1} opens a {inner.group(2)} block"  # type: ignore[union-attr]
            )
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{doc.name}:{start + 1}: the {lang} block is never closed"
        i += 1
        if lang in RUN:
            s = Snippet(doc, start + 1, lang, "\n".join(body) + "\n")
            if marker and marker[0] == "skip":
                s.skip = marker[1].strip("() ")
            elif marker and marker[0] == "file":
                s.file = marker[1]
            found.append(s)
        marker = None
    return found


@pytest.fixture(scope="module")
def docs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """What `make run` starts: feed (2,000 ticks/s over its 20 symbols), recorder and web."""
    s = Stack(
        tmp_path_factory.mktemp("docs"), recorder=True, symbols=DEFAULT_SYMBOLS, feed_rate=2000
    ).start()
    try:
        asyncio.run(recorded_for(s, 15))  # the docs replay minutes that are already stored
        yield s
    finally:
        s.stop()


class Terminal:
    """One shell session for a document: commands of each snippet run in bash with ``set -e``
    and ``pipefail``; the variables a snippet sets are there for the next."""

    def __init__(self, stack: Stack, workdir: Path) -> None:
        self.stack = stack
        self.dir = workdir
        workdir.mkdir()
        for name in (".venv", "examples"):
            (workdir / name).symlink_to(ROOT / name)
        self.env = {**stack.env, "HOME": str(workdir)}
        self.state = workdir / ".snippet-state.sh"
        self.state.write_text("")
        self.baseline = set(self._bash("compgen -v").stdout.split())

    def _bash(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script], cwd=self.dir, env=self.env, capture_output=True, text=True,
            timeout=SNIPPET_TIMEOUT_S,
        )  # fmt: skip

    def here(self, text: str) -> str:
        return text.replace(DOCUMENTED, f"127.0.0.1:{self.stack.port}")

    def run(self, s: Snippet) -> subprocess.CompletedProcess[str]:
        if s.file is not None:
            (self.dir / s.file).write_text(self.here(s.text))
            return subprocess.CompletedProcess([], 0, "", "")
        if s.lang == "python":
            path = self.dir / f".snippet-{s.line}.py"
            path.write_text(self.here(s.text))
            return subprocess.run(
                [str(ROOT / ".venv/bin/python"), str(path)], cwd=self.dir, env=self.env,
                capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S,
            )  # fmt: skip
        keep = " ".join(sorted(self.baseline))
        script = (
            f"source {self.state}\n"
            'curl() { command curl --fail-with-body "$@"; }\n'  # an HTTP error fails the step
            "set -eo pipefail\n"
            f"{self.here(s.commands())}"
            "set +e\n"
            f'for v in $(compgen -v); do [[ " {keep} " == *" $v "* ]] || declare -p "$v"; '
            f"done > {self.state}.new 2>/dev/null\n"
            f"mv {self.state}.new {self.state}\n"
        )
        return self._bash(script)


def run_document(doc: Path, stack: Stack, workdir: Path) -> list[str]:
    """Run a document's snippets in order; what was skipped, and why."""
    term = Terminal(stack, workdir)
    skipped = []
    for s in snippets(doc):
        if s.skip is not None:
            assert s.skip, f"{s.where}: a skipped snippet must say why"
            skipped.append(f"{s.where}: {s.skip}")
            continue
        began = time.monotonic()
        done = term.run(s)
        what = f"saved as {s.file}" if s.file else f"exit {done.returncode}"
        print(f"{s.where} {s.lang}: {what} in {time.monotonic() - began:.1f} s")
        assert done.returncode == 0, (
            f"{s.where} ({s.lang}) exited {done.returncode}\n--- snippet\n{s.text}"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
    return skipped


def test_every_fence_in_the_docs_is_closed_and_every_skip_says_why() -> None:
    for doc in DOCS:
        found = snippets(doc)  # asserts every fence is closed
        assert [s for s in found if s.skip is None], f"{doc.name}: nothing to run"
        assert all(s.skip for s in found if s.skip is not None)


def test_readme_lists_the_ping_op_once() -> None:
    assert DOCS[0].read_text().count('{"op": "ping"') == 1


@pytest.mark.timeout(600)  # the stack, a minute of recorded ticks, then every snippet in turn
def test_readme_snippets_run_as_written(docs_stack: Stack, tmp_path: Path) -> None:
    skipped = run_document(DOCS[0], docs_stack, tmp_path / "readme")
    assert len(skipped) <= 2, skipped  # `make run` / `make test`, vendor files to import


@pytest.mark.timeout(600)
def test_quickstart_snippets_run_as_written(docs_stack: Stack, tmp_path: Path) -> None:
    skipped = run_document(DOCS[1], docs_stack, tmp_path / "quickstart")
    assert len(skipped) <= 2, skipped  # `make run` and `make test`


def test_a_failing_snippet_fails_the_run(docs_stack: Stack, tmp_path: Path) -> None:
    """The runner itself: a wrong command, an HTTP error and a failing pipe are each caught."""
    term = Terminal(docs_stack, tmp_path / "t")
    doc = tmp_path / "x.md"
    for bad in (
        "$ .venv/bin/tickpipe keys list [--all]",
        f"$ curl -s http://{DOCUMENTED}/ticks/realtime?symbols=AAPL",
        "$ echo nothing | grep something | cat",
    ):
        s = Snippet(doc, 1, "console", bad + "\n")
        assert term.run(s).returncode != 0, bad
    term.run(Snippet(doc, 1, "console", "$ X=$(echo carried)\n"))
    assert term.run(Snippet(doc, 2, "console", '$ test "$X" = carried\n')).returncode == 0
    assert os.environ.get("X") is None
