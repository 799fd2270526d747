"""The one module that talks to fastavro.

Wire format: Avro single-object encoding, ``C3 01`` + 8-byte CRC-64-AVRO fingerprint of the
writer schema + the Avro binary body.

Container files: standard Avro Object Container Files. Every OCF this project *writes* puts
exactly one record in each block. That costs ~19 bytes a record and nothing measurable in
DuckDB's reader, and it means the exact bytes of each record can be sliced out of a file
without decoding it -- which is what the hash chain is computed over.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Iterator, cast

import fastavro
from fastavro.schema import fingerprint as _fingerprint
from fastavro.schema import to_parsing_canonical_form

from .errors import DecodeError, SchemaError

SOE_MAGIC = b"\xc3\x01"
SOE_HEADER_LEN = 10
OCF_MAGIC = b"Obj\x01"
SYNC_LEN = 16

_META_SCHEMA = fastavro.parse_schema({"type": "map", "values": "bytes"})


def parse(schema: dict[str, Any]) -> Any:
    """Parse a schema dict for encoding/decoding (named types resolved)."""
    try:
        return fastavro.parse_schema(schema)
    except Exception as exc:  # fastavro raises several unrelated types
        raise SchemaError(f"invalid Avro schema: {exc}") from exc


def canonical_form(schema: dict[str, Any]) -> str:
    return to_parsing_canonical_form(schema)


def fingerprint(schema: dict[str, Any]) -> bytes:
    """CRC-64-AVRO of the parsing canonical form, in the byte order single-object encoding uses."""
    return bytes.fromhex(_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def encode(parsed: Any, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed, record)
    return out.getvalue()


class Encoder:
    """`encode` for one schema on a hot path: reuses its buffer (one producer thread per encoder)."""

    def __init__(self, parsed: Any):
        self.parsed = parsed
        self._buf = io.BytesIO()

    def __call__(self, record: dict[str, Any]) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        fastavro.schemaless_writer(buf, self.parsed, record)
        return buf.getvalue()


def decode(body: bytes, writer: Any, reader: Any | None = None) -> dict[str, Any]:
    """Decode one Avro body; union members come back as ``(record name, value)`` tuples."""
    try:
        return cast(dict[str, Any], fastavro.schemaless_reader(
            io.BytesIO(body), writer, reader, return_record_name=True, return_record_name_override=False
        ))
    except Exception as exc:
        raise DecodeError("undecodable", f"{type(exc).__name__}: {exc}") from exc


def soe_frame(fp: bytes, body: bytes) -> bytes:
    return SOE_MAGIC + fp + body


def soe_split(value: bytes) -> tuple[bytes, bytes]:
    """Split a single-object-encoded message into (fingerprint, body)."""
    if len(value) < SOE_HEADER_LEN or value[:2] != SOE_MAGIC:
        raise DecodeError("bad_header", "not Avro single-object encoding (no C3 01 marker)")
    return value[2:10], value[10:]


# --- Object Container Files -------------------------------------------------------------


def zigzag_varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: bytes | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decode one Avro zigzag varint at ``pos`` (not past ``end``); returns (value, next position).
    The one varint reader of the project: envelope peeks, OCF block walks and bundle headers use it."""
    end = len(buf) if end is None else end
    shift = 0
    acc = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated", "varint runs past the end of the data")
        b = buf[pos]
        pos += 1
        acc |= (b & 0x7F) << shift
        if not b & 0x80:
            return (acc >> 1) ^ -(acc & 1), pos
        shift += 7
        if shift > 63:
            raise DecodeError("bad_varint", "varint longer than 10 bytes")


def ocf_header(schema: dict[str, Any], sync: bytes, metadata: dict[str, bytes] | None = None) -> bytes:
    """Header of an uncompressed OCF. ``sync`` is chosen by the caller (deterministic files)."""
    if len(sync) != SYNC_LEN:
        raise ValueError("sync marker must be 16 bytes")
    meta = {"avro.schema": json.dumps(schema, separators=(",", ":")).encode(), "avro.codec": b"null"}
    for k, v in (metadata or {}).items():
        meta[k] = v
    out = io.BytesIO()
    out.write(OCF_MAGIC)
    fastavro.schemaless_writer(out, _META_SCHEMA, meta)
    out.write(sync)
    return out.getvalue()


def ocf_block(body: bytes, sync: bytes) -> bytes:
    """One block holding one record."""
    return b"\x02" + zigzag_varint(len(body)) + body + sync


def ocf_blocks(bodies: Iterable[bytes], sync: bytes) -> bytes:
    return b"".join([b"\x02" + zigzag_varint(len(b)) + b + sync for b in bodies])


@dataclass(frozen=True)
class OcfHeader:
    schema: dict[str, Any]
    sync: bytes
    metadata: dict[str, bytes]
    length: int  # bytes the header occupies

    @property
    def codec(self) -> str:
        return self.metadata.get("avro.codec", b"null").decode()


def read_ocf_header(data: bytes | memoryview) -> OcfHeader:
    if bytes(data[:4]) != OCF_MAGIC:
        raise DecodeError("bad_header", "not an Avro object container file")
    bio = io.BytesIO(bytes(data))
    bio.seek(4)
    try:
        meta = cast(dict[str, bytes], fastavro.schemaless_reader(bio, _META_SCHEMA))
    except Exception as exc:
        raise DecodeError("bad_header", f"OCF metadata: {exc}") from exc
    sync = bio.read(SYNC_LEN)
    if len(sync) != SYNC_LEN:
        raise DecodeError("truncated", "OCF header has no sync marker")
    try:
        schema = json.loads(meta["avro.schema"])
    except (KeyError, ValueError) as exc:
        raise DecodeError("bad_header", "OCF header has no valid avro.schema") from exc
    return OcfHeader(schema=schema, sync=sync, metadata=meta, length=bio.tell())


@dataclass(frozen=True)
class RawBlock:
    position: int  # byte offset of the block in the file
    end: int  # byte offset just past its sync marker
    count: int
    data: bytes  # the block's (uncompressed) records, concatenated


def iter_ocf_blocks(data: bytes | memoryview, sync: bytes, start: int) -> Iterator[RawBlock]:
    """Walk the blocks of an uncompressed OCF held in memory, from byte ``start``, decoding nothing.

    Stops quietly at a torn tail (a block cut short by a crash); raises on a wrong sync marker.
    """
    pos = start
    n = len(data)
    while pos < n:
        try:
            count, p = read_varint(data, pos)
            size, p = read_varint(data, p)
        except DecodeError:
            return
        if count < 1 or size < 0:
            raise DecodeError("bad_block", f"block at byte {pos} has count {count} and size {size}")
        end = p + size + SYNC_LEN
        if end > n:
            return
        if bytes(data[p + size : end]) != sync:
            raise DecodeError("bad_sync", f"block at byte {pos} does not end with the file's sync marker")
        yield RawBlock(pos, end, count, bytes(data[p : p + size]))
        pos = end


def iter_file_blocks(data: bytes | memoryview, header: OcfHeader) -> Iterator[RawBlock]:
    if header.codec != "null":
        raise DecodeError("unsupported_codec", f"codec {header.codec!r}: only uncompressed files can be sliced")
    return iter_ocf_blocks(data, header.sync, header.length)


def split_records(block: RawBlock, parsed_writer: Any) -> list[bytes]:
    """Raw bytes of each record of a block. One-record blocks (ours) need no decoding at all."""
    if block.count == 1:
        return [block.data]
    bio = io.BytesIO(block.data)
    out = []
    for _ in range(block.count):
        start = bio.tell()
        fastavro.schemaless_reader(bio, parsed_writer)
        out.append(block.data[start : bio.tell()])
    return out


def read_container(fo: BinaryIO) -> tuple[dict[str, Any], dict[str, str], Iterator[dict[str, Any]]]:
    """Any OCF, any codec, decoded record by record (for small files and foreign writers)."""
    try:
        reader = fastavro.reader(fo, return_record_name=True)
    except Exception as exc:
        raise DecodeError("bad_header", f"{type(exc).__name__}: {exc}") from exc
    return (cast(dict[str, Any], reader.writer_schema), dict(reader.metadata),
            cast(Iterator[dict[str, Any]], iter(reader)))


def fsync_file(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
