"""Vendor tick files in, tickpipe tick frames out: pure parsing with Polars, no Redis, no server.

Every format goes through the same three steps, all vectorised:

1. ``common.load``: the file's bytes (zip and gz read directly; DBN, zstd DBN and Parquet as they
   are); ``table.read_rows``: those bytes as typed columns read by Polars' CSV reader, each row
   with its 1-based line number. CRLF endings, a UTF-8 BOM and a last line without newline are
   fine.
2. A per-format parser (one module per vendor: ``tardis``, ``databento``, ``binance``,
   ``polygon``, ``dukascopy``, ``histdata``, ``lobster``, ``lean``; ``mapped`` for any CSV or
   Parquet file described by a ``Mapping``) turns the rows into the tick columns (``sym``,
   ``type``, ``ts``, ..., ``flags`` for what the vendor flagged) plus a ``reason`` for rows that
   are malformed in a format-specific way (too many fields, an unknown event type, ...).
3. ``common.split_ticks``: the checks every tick passes (the rules of
   ``server.ticks.reject_reason``) and the split into ``ticks`` (sorted by ``ts``, stable) and
   ``rejects`` (``line``, ``reason``, ``raw``; the raw text read back for those rows only).

``formats.read_file`` runs the three steps for a format by name; ``load.import_file`` stores the
ticks in history exactly once (``identity``: what counts as imported, overlap, replace). Bad rows
never raise. Non-UTF-8 bytes reject the row they are on (reason ``bad_encoding``); the rest of
the file still imports. A wrong format name, a header that is not the format's header, an
archive that cannot be read to its end, or a missing date/symbol that the file does not carry
raise ``ValueError`` with what to do next.
"""

from __future__ import annotations

from server.history.importers.common import ImportResult
from server.history.importers.formats import FORMAT_GUIDE, FORMATS, read_file
from server.history.importers.load import ImportReport, import_epoch, import_file
from server.history.importers.mapped import Mapping

__all__ = [
    "FORMATS",
    "FORMAT_GUIDE",
    "ImportReport",
    "ImportResult",
    "Mapping",
    "import_epoch",
    "import_file",
    "read_file",
]
