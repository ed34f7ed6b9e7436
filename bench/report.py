"""What every benchmark report states: the machine, the commit measured, what else was running,
and where the report is written (``bench/results/<name>-<date>[-quick].md``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
import timeit
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} CPUs ({model}), {ram:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def host_probe_us() -> float:
    """µs for ``sum(range(1000))``, best of 5 timeit repeats: a yardstick of what a CPU second
    of this shared host does at the moment (a quiet modern core: about 10), so runs on hosts
    of other speeds can be compared."""
    return min(timeit.repeat("sum(range(1000))", number=20_000, repeat=5)) / 20_000 * 1e6


def code_version() -> str:
    """The commit measured, and whether server/ differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "server"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    return f"{head or 'unknown'}" + (" with uncommitted changes in server/" if dirty else "")


def top_lines() -> list[str]:
    """The head of ``top``: what else was running just before a measurement."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["top", "-bn1", "-w", "160"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.splitlines()[:15]
    return ["(top unavailable)"]


def top_section(top: list[str]) -> list[str]:
    """A report's closing section: ``top_lines()`` taken just before the measurement."""
    return ["", "## What else was running (`top -bn1 | head -15` just before)", "", "```", *top,
            "```", ""]  # fmt: skip


def write_results(name: str, text: str, quick: bool = False) -> Path:
    """Write a report to ``bench/results/`` (quick runs apart, not committed) and say where."""
    out = ROOT / "bench" / "results" / f"{name}-{dt.date.today().isoformat()}.md"
    if quick:
        out = out.with_name(out.stem + "-quick.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out.relative_to(ROOT)}")
    return out
