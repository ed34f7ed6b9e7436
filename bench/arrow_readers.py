"""Third-party readers of tickpipe's Arrow streams; runs in ``.venv-bench`` (pyarrow, DuckDB).

Reads each Arrow IPC stream file named on the command line (``/ticks/historical`` bodies saved
by ``bench/history.py``: plain, with dictionaries, with LZ4 or ZSTD buffer compression) with
pyarrow's IPC reader, then queries the table from DuckDB, and prints one JSON line per file:
rows, distinct symbols and the sum of ``seq`` as each reader sees them.
"""

from __future__ import annotations

import json
import sys

import duckdb
import pyarrow as pa
import pyarrow.ipc as ipc


def main() -> int:
    for path in sys.argv[1:]:
        with pa.memory_map(path) as source:
            ticks = ipc.open_stream(source).read_all()
        ((rows, syms, seq_sum),) = duckdb.sql(
            "SELECT count(*), count(DISTINCT sym), sum(seq) FROM ticks"
        ).fetchall()
        print(
            json.dumps(
                {
                    "file": path,
                    "pyarrow_rows": ticks.num_rows,
                    "sym_type": str(ticks.schema.field("sym").type),
                    "duckdb_rows": rows,
                    "duckdb_symbols": syms,
                    "duckdb_seq_sum": int(seq_sum),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
