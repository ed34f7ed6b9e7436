"""ArcticDB side of bench/history.py; runs in ``.venv-bench`` (arcticdb, pandas, duckdb).

Reads a JSON spec on stdin (Parquet files, symbol, range, repeats), writes that symbol's rows
(read from the same files with DuckDB, ``ts`` as the index; the nullable boolean ``crossed``
stored as plain bool, as ArcticDB takes no pandas nullable types) into a fresh LMDB library in a
temporary directory, then times ``Library.read(symbol, date_range=...)`` only. Prints one JSON
line: ArcticDB's version, rows read and the seconds of each read.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

import arcticdb
import duckdb
import pandas as pd


def main() -> int:
    spec = json.loads(sys.stdin.read())
    names = ", ".join("'" + f.replace("'", "''") + "'" for f in spec["files"])
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    frame = con.execute(
        f"""SELECT * FROM read_parquet([{names}])
            WHERE sym = ? AND epoch_ns(ts) >= ? AND epoch_ns(ts) < ?
            ORDER BY ts, seq""",
        [spec["symbol"], spec["start_ns"], spec["end_ns"]],
    ).df()
    con.close()
    frame = frame.set_index("ts")
    # ArcticDB takes no pandas nullable booleans: ``crossed`` (all null here) becomes plain bool.
    for col in frame.columns:
        if isinstance(frame[col].dtype, pd.BooleanDtype):
            frame[col] = frame[col].fillna(False).astype(bool)
    workdir = tempfile.mkdtemp(prefix="tickpipe-bench-arctic-")
    try:
        ac = arcticdb.Arctic(f"lmdb://{workdir}")
        lib = ac.create_library("bench")
        lib.write(spec["symbol"], frame)
        start = pd.Timestamp(spec["start_ns"], unit="ns", tz="UTC")
        end = pd.Timestamp(spec["end_ns"] - 1, unit="ns", tz="UTC")
        lib.read(spec["symbol"], date_range=(start, end))  # warm (not timed)
        secs: list[float] = []
        rows = 0
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            got = lib.read(spec["symbol"], date_range=(start, end)).data
            secs.append(time.perf_counter() - t0)
            rows = len(got)
        del lib, ac
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"version": arcticdb.__version__, "rows": rows, "read_s": secs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
