"""History answers as bytes, chunk by chunk: Arrow IPC stream, NDJSON, CSV.

Arrow: one stream per answer (schema, dictionaries once, then record batches, then the end
marker), written chunk by chunk. Two options, both standard Arrow IPC that pyarrow, Polars,
DuckDB (through pyarrow) and the Arrow libraries of other languages read:

* ``dictionary``: ``sym``, ``type``, ``side`` (and enriched ``aggressor``) sent as
  dictionary-encoded columns with one dictionary for the whole stream (the request's symbols;
  trade, quote; buy, sell), so a tick carries a 4-byte index instead of the strings;
* ``compression``: ``lz4`` (LZ4 frame) or ``zstd`` compression of each record batch's buffers
  (Arrow IPC ``BodyCompression``; arrow-js does not read it).

Without them the stream is the one it has always been (plain strings, no compression).
NDJSON and CSV are Polars' writers, chunk by chunk (CSV's header once).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Literal, Protocol

import polars as pl

# An Arrow IPC stream ends with a continuation marker and a zero length.
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
Compression = Literal["lz4", "zstd"]
COMPRESSIONS: tuple[Compression, ...] = ("lz4", "zstd")
# Message header types (Arrow ``Message.fbs``).
_SCHEMA, _DICTIONARY, _RECORD_BATCH = 1, 2, 3
SIDES = ["buy", "sell"]
TICK_TYPES = ["trade", "quote"]


def split_messages(stream: bytes) -> list[tuple[int, bytes]]:
    """The messages of an encapsulated IPC stream as (header type, bytes), end marker left out."""
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(stream):
        cont, meta_len = struct.unpack_from("<Ii", stream, at)
        if cont != 0xFFFFFFFF:  # pre-1.0 framing: no continuation marker
            raise ValueError("not an Arrow IPC stream with continuation markers")
        if meta_len == 0:
            break
        meta = at + 8
        kind, body_len = _header(stream, meta)
        end = meta + meta_len + body_len
        out.append((kind, stream[at:end]))
        at = end
    return out


def _header(buf: bytes, base: int) -> tuple[int, int]:
    """(header type, body length) of the flatbuffer ``Message`` at ``base``."""
    table = base + struct.unpack_from("<I", buf, base)[0]
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    vt_len = struct.unpack_from("<H", buf, vtable)[0]

    def field_at(i: int) -> int:
        slot = 4 + 2 * i
        return struct.unpack_from("<H", buf, vtable + slot)[0] if slot < vt_len else 0

    kind_off, body_off = field_at(1), field_at(3)
    kind = buf[table + kind_off] if kind_off else 0
    body = struct.unpack_from("<q", buf, table + body_off)[0] if body_off else 0
    return kind, body


@dataclass
class ArrowStream:
    """Encodes an answer's chunks into one Arrow IPC stream; ``encode(None)`` ends it."""

    symbols: list[str]
    dictionary: bool = False
    compression: Compression | None = None
    _started: bool = field(default=False, repr=False)

    def _prepare(self, frame: pl.DataFrame) -> pl.DataFrame:
        if not self.dictionary:
            return frame
        enums = {
            "sym": pl.Enum(sorted(set(self.symbols))),
            "type": pl.Enum(TICK_TYPES),
            "side": pl.Enum(SIDES),
            "aggressor": pl.Enum(SIDES),
        }
        return frame.with_columns(
            pl.col(c).cast(t) for c, t in enums.items() if frame.schema.get(c) == pl.String
        )

    def encode(self, frame: pl.DataFrame | None) -> bytes:
        if frame is None:
            return EOS
        buf = io.BytesIO()
        frame = self._prepare(frame)
        frame.write_ipc_stream(
            buf,
            compression=self.compression or "uncompressed",
            compat_level=pl.CompatLevel.oldest(),
        )
        stream = buf.getvalue()
        if not self._started:
            self._started = True
            return stream[: -len(EOS)]
        # The schema and the dictionaries went with the first chunk; they never change.
        return b"".join(m for kind, m in split_messages(stream) if kind == _RECORD_BATCH)


class Encoder(Protocol):
    """Turns an answer's chunks into body bytes, in order; ``encode(None)`` gives its end."""

    def encode(self, frame: pl.DataFrame | None) -> bytes: ...


class NdjsonLines:
    def encode(self, frame: pl.DataFrame | None) -> bytes:
        if frame is None:
            return b""
        buf = io.BytesIO()
        frame.write_ndjson(buf)
        return buf.getvalue()


@dataclass
class CsvRows:
    _header: bool = True

    def encode(self, frame: pl.DataFrame | None) -> bytes:
        if frame is None:
            return b""
        header, self._header = self._header, False
        return frame.write_csv(include_header=header).encode()
