"""What ``tickpipe import`` prints: one line per file, and a table of every file of a run."""

from __future__ import annotations

from server.history.importers.load import ImportReport

SUMMARY_COLUMNS = ("read", "stored", "rejected", "duplicate", "flagged")


def report_line(r: ImportReport) -> str:
    """``path: read N, stored N, rejected N, duplicate N, flagged N, skipped N (status, ...)``."""
    line = (
        f"{r.path}: read {r.read}, stored {r.stored}, rejected {r.rejected}, "
        f"duplicate {r.duplicate}, flagged {r.flagged}, skipped {r.skipped} "
        f"({r.status}, {r.seconds:.2f} s, epoch {r.epoch}"
        + (f", replaced {r.replaced}" if r.replaced else "")
        + ")"
    )
    return line + (f"; rejects in {r.rejects_file}" if r.rejects_file else "")


def summary_table(reports: list[ImportReport], failed: list[str]) -> str:
    """Per file: status, the counts and seconds; then the totals. ``failed``: files that ended
    in an error (listed with status ``error``)."""
    rows = [
        [
            r.path.name,
            r.status,
            *(f"{getattr(r, c):,}" for c in SUMMARY_COLUMNS),
            f"{r.seconds:.2f}",
        ]
        for r in reports
    ]
    rows += [[name, "error", *("-" for _ in SUMMARY_COLUMNS), "-"] for name in failed]
    totals = [sum(getattr(r, c) for r in reports) for c in SUMMARY_COLUMNS]
    seconds = sum(r.seconds for r in reports)
    files = len(reports) + len(failed)
    rows.append(["total", f"{files} files", *(f"{t:,}" for t in totals), f"{seconds:.2f}"])
    head = ["file", "status", *SUMMARY_COLUMNS, "seconds"]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def line(row: list[str]) -> str:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *(line(r) for r in rows)])
