"""Evidence bundles: one session as one standard Avro Object Container File that verifies itself.

Layout (readable by any Avro tool and by DuckDB's ``read_avro``):

* the OCF schema IS the events' writer schema, so each record's body is byte for byte the body the
  producer sealed, and ``C3 01 ‖ CRC-64-AVRO(schema) ‖ body`` is the exact wire value whose SHA-256
  is its hash. The codec is ``null`` and every block holds exactly one record, so each event's bytes
  are sliced out of the file without decoding;
* events in seq order, one per block;
* metadata (``agentledger.*``): the session id, the writer fingerprint, the first seq and its
  prev_hash, the event count and chain head (so a truncated tail is detected), the checkpoints
  with their signatures and key ids, optionally the public keys, and ``agentledger.header_digest``
  -- SHA-256 over every other metadata entry and the sync marker, so a damaged header is detected.

What verification proves: the header digest and the hash chain prove the file is internally
consistent -- any changed, missing, added or reordered event is found and named by seq. They do
not prove *authenticity* (someone who rewrites every event can recompute every hash). That comes
from checkpoint signatures: a checkpoint signed by a key you trust (``--public-key``, or
``$AGENTLEDGER_HOME/keys``) proves events 0..head_seq are what that key holder recorded. Public
keys embedded in a bundle are reported but never trusted by themselves.

A session whose events were written under several writer schemas cannot be one standard OCF (an
OCF has one schema): `export` refuses it and names the seq where the schema changes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from schemas import codec
from schemas.envelope import GENESIS_HASH
from schemas.errors import AgentLedgerError, DecodeError

from .chain import ChainResult, RawChainVerifier, envelope_head, schema_has_envelope_head, verify_spans

BUNDLE_FORMAT = "1"
META_PREFIX = "agentledger."
HEADER_DIGEST_KEY = "agentledger.header_digest"
MAX_HEADER_BYTES = 64 * 1024 * 1024


class BundleError(AgentLedgerError):
    """A file is not a readable agentledger bundle (bad header, wrong format), or cannot be written."""


# --- writing ------------------------------------------------------------------------------------


def header_digest(metadata: dict[str, bytes], sync: bytes) -> str:
    h = hashlib.sha256(b"agentledger-bundle-header-v1\n")
    h.update(sync)
    for k in sorted(metadata):
        if k == HEADER_DIGEST_KEY:
            continue
        kb = k.encode()
        v = metadata[k]
        h.update(len(kb).to_bytes(8, "big") + kb + len(v).to_bytes(8, "big") + v)
    return h.hexdigest()


@dataclass
class ExportResult:
    path: Path
    session_id: str
    events: int
    head_seq: int
    head_hash: str
    writer_fingerprint: str
    checkpoints: int
    bytes: int


def write_bundle(
    path: Path,
    *,
    session_id: str,
    values: Sequence[bytes],
    writer_schema: dict,
    checkpoints: list[dict],
    public_keys: dict[str, bytes] | None = None,
    source: str = "",
    extra: dict[str, str] | None = None,
    exported_at: dt.datetime | None = None,
    chain: ChainResult | None = None,
    allow_broken: bool = False,
) -> ExportResult:
    """Write ``values`` (the session's wire values, in seq order) as a bundle at ``path``.

    The file is written to a temporary name, fsync-ed and renamed, so ``path`` is either the
    complete bundle or untouched. Refuses an empty session, values of another session, several
    writer schemas, and (unless ``allow_broken``) a chain that does not verify.
    """
    if not values:
        raise BundleError(f"session {session_id} has no events to export")
    fp = codec.fingerprint(writer_schema)
    for i, v in enumerate(values):
        if v[2:10] != fp:
            raise BundleError(
                f"session {session_id} changes writer schema at position {i} (fingerprint {v[2:10].hex()} after "
                f"{fp.hex()}): a standard Avro container has one schema, so it cannot hold this session as one "
                "bundle; export the events of each writer schema separately or upcast them first")
    if not schema_has_envelope_head(writer_schema):
        raise BundleError("the writer schema does not start with event_id, session_id, seq and end with prev_hash, hash")
    if chain is None:
        v = RawChainVerifier(session_id)
        for value in values:
            if not v.add(value):
                break
        chain = v.result(len(values))
    if not chain.ok and not allow_broken:
        raise BundleError(f"session {session_id} does not verify (first bad seq {chain.first_bad_seq}: "
                          f"{chain.reason}); refusing to export it as evidence (use --allow-broken to export anyway)")
    first_seq = envelope_head(values[0])[2]
    prev_first = values[0][-130:-66].decode("ascii", "replace")
    last_hash = values[-1][-64:].decode("ascii", "replace")
    last_seq = envelope_head(values[-1])[2]
    sync = hashlib.sha256(f"agentledger-bundle/{session_id}/{last_hash}".encode()).digest()[:16]
    meta: dict[str, bytes] = {
        "agentledger.bundle": BUNDLE_FORMAT.encode(),
        "agentledger.session_id": session_id.encode(),
        "agentledger.writer_fingerprint": fp.hex().encode(),
        "agentledger.first_seq": str(first_seq).encode(),
        "agentledger.first_prev_hash": prev_first.encode(),
        "agentledger.event_count": str(len(values)).encode(),
        "agentledger.head_seq": str(last_seq).encode(),
        "agentledger.head_hash": last_hash.encode(),
        "agentledger.chain_status": (b"ok" if chain.ok else f"broken at seq {chain.first_bad_seq}: {chain.reason}".encode()),
        "agentledger.checkpoints": json.dumps(checkpoints, sort_keys=True, separators=(",", ":")).encode(),
        "agentledger.key_ids": json.dumps(sorted({c["key_id"] for c in checkpoints})).encode(),
        "agentledger.exported_at": (exported_at or dt.datetime.now(dt.timezone.utc)).isoformat().encode(),
        "agentledger.source": source.encode(),
    }
    if public_keys:
        meta["agentledger.public_keys"] = json.dumps({k: v.decode() for k, v in sorted(public_keys.items())}).encode()
    for k, v in (extra or {}).items():
        meta[f"agentledger.{k}"] = v.encode()
    schema_json = json.dumps(writer_schema, separators=(",", ":")).encode()
    full = {"avro.schema": schema_json, "avro.codec": b"null", **meta}
    meta[HEADER_DIGEST_KEY] = header_digest(full, sync).encode()
    header = codec.ocf_header(writer_schema, sync, meta)
    # ocf_header serialises the schema the same way; check, so the digest covers what is written.
    parsed = read_header(header)
    if parsed.metadata.get("avro.schema") != schema_json:
        raise BundleError("internal: the OCF header does not hold the schema as digested")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    size = 0
    with open(tmp, "wb") as f:
        f.write(header)
        size += len(header)
        chunk = []
        for v in values:
            chunk.append(codec.ocf_block(v[10:], sync))
            if len(chunk) >= 10_000:
                data = b"".join(chunk)
                f.write(data)
                size += len(data)
                chunk = []
        data = b"".join(chunk)
        f.write(data)
        size += len(data)
        codec.fsync_file(f)
    os.replace(tmp, path)
    return ExportResult(path, session_id, len(values), last_seq, last_hash, fp.hex(), len(checkpoints), size)


# --- reading ------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    try:
        return codec.read_varint(buf, pos, end)
    except DecodeError as exc:
        raise BundleError(f"the header is damaged ({exc.detail})") from exc


@dataclass
class BundleHeader:
    schema: dict
    schema_json: bytes
    sync: bytes
    metadata: dict[str, bytes]
    length: int

    def meta(self, key: str) -> str:
        try:
            return self.metadata[f"{META_PREFIX}{key}"].decode()
        except KeyError:
            raise BundleError(f"not an agentledger bundle: the header has no {META_PREFIX}{key}") from None
        except UnicodeDecodeError:
            raise BundleError(f"the header's {META_PREFIX}{key} is not UTF-8") from None

    def meta_int(self, key: str) -> int:
        raw = self.meta(key)
        try:
            return int(raw)
        except ValueError:
            raise BundleError(f"the header's {META_PREFIX}{key} is not a number: {raw[:40]!r}") from None

    def meta_json(self, key: str, default: Any = None) -> Any:
        if f"{META_PREFIX}{key}" not in self.metadata:
            return default
        try:
            return json.loads(self.meta(key))
        except ValueError:
            raise BundleError(f"the header's {META_PREFIX}{key} is not valid JSON") from None


def read_header(data: bytes) -> BundleHeader:
    """Parse an OCF header strictly (bounded, no library decoding of untrusted lengths)."""
    if data[:4] != codec.OCF_MAGIC:
        raise BundleError("not an Avro object container file (bad magic bytes)")
    end = min(len(data), MAX_HEADER_BYTES)
    pos = 4
    meta: dict[str, bytes] = {}
    while True:
        count, pos = _varint(data, pos, end)
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = _varint(data, pos, end)  # block size in bytes: not needed
        for _ in range(count):
            items = []
            for _what in ("key", "value"):
                n, pos = _varint(data, pos, end)
                if n < 0 or pos + n > end:
                    raise BundleError(f"the header's metadata {_what} length {n} runs past the end of the header")
                items.append(bytes(data[pos : pos + n]))
                pos += n
            try:
                key = items[0].decode("utf-8")
            except UnicodeDecodeError:
                raise BundleError("the header holds a metadata key that is not UTF-8") from None
            if key in meta:
                raise BundleError(f"the header repeats the metadata key {key!r}")
            meta[key] = items[1]
    sync = bytes(data[pos : pos + codec.SYNC_LEN])
    if len(sync) != codec.SYNC_LEN:
        raise BundleError("the header is cut short (no sync marker)")
    pos += codec.SYNC_LEN
    schema_json = meta.get("avro.schema")
    if schema_json is None:
        raise BundleError("the header has no avro.schema")
    try:
        schema = json.loads(schema_json)
        if not isinstance(schema, dict):
            raise ValueError("not a record schema")
    except ValueError as exc:
        raise BundleError(f"the header's avro.schema is not valid JSON: {exc}") from None
    return BundleHeader(schema, schema_json, sync, meta, pos)


@dataclass
class Bundle:
    """A bundle read into memory: its header and the byte range of each event's body."""

    path: Path | None
    data: bytes
    header: BundleHeader
    fingerprint: bytes
    _spans: list[tuple[int, int]] | None = field(default=None, repr=False)
    _framing_error: tuple[int, str] | None = field(default=None, repr=False)

    @property
    def framed(self) -> bool:
        return self._spans is not None

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(body start, end) of each well-formed block, framed on first use."""
        if self._spans is None:
            self._spans, self._framing_error = frame_blocks(self.data, self.header.length, self.header.sync)
        return self._spans

    @property
    def framing_error(self) -> tuple[int, str] | None:
        """(block index, what is wrong) where the framing stops being sound, or None."""
        self.spans  # noqa: B018
        return self._framing_error

    def set_framing(self, spans: list[tuple[int, int]], error: tuple[int, str] | None) -> None:
        """Framing worked out elsewhere (a verifying child process) over these same bytes."""
        self._spans, self._framing_error = spans, error

    @property
    def session_id(self) -> str:
        return self.header.meta("session_id")

    def body(self, i: int) -> bytes:
        s, e = self.spans[i]
        return self.data[s:e]

    def value(self, i: int) -> bytes:
        return codec.SOE_MAGIC + self.fingerprint + self.body(i)

    def values(self) -> list[bytes]:
        prefix = codec.SOE_MAGIC + self.fingerprint
        d = self.data
        return [prefix + d[s:e] for s, e in self.spans]

    @property
    def checkpoints(self) -> list[dict]:
        cps = self.header.meta_json("checkpoints", [])
        if not isinstance(cps, list):
            raise BundleError("the header's agentledger.checkpoints is not a list")
        return cps

    @property
    def public_keys(self) -> dict[str, str]:
        keys = self.header.meta_json("public_keys", {})
        return keys if isinstance(keys, dict) else {}


def parse_bundle(data: bytes, path: Path | None = None) -> Bundle:
    """Parse the header (a bad one raises `BundleError`). The blocks are framed on first use of
    `Bundle.spans`; framing problems are recorded, not raised, so that verification can name the
    seq where they start."""
    header = read_header(data)
    codec_name = header.metadata.get("avro.codec", b"null")
    if codec_name != b"null":
        raise BundleError(f"not an agentledger bundle: codec {codec_name.decode(errors='replace')!r} (bundles are uncompressed)")
    try:
        fp = codec.fingerprint(header.schema)
    except Exception as exc:  # a damaged schema: fastavro raises several types
        raise BundleError(f"the header's avro.schema is not a valid Avro schema: {exc}") from None
    return Bundle(path, data, header, fp)


def frame_blocks(data: bytes, pos: int, sync: bytes) -> tuple[list[tuple[int, int]], tuple[int, str] | None]:
    """The (body start, end) of each one-record block from ``pos`` on, and where the framing stops
    being sound ((block index, what is wrong), or None)."""
    n = len(data)
    i = 0
    spans: list[tuple[int, int]] = []
    append = spans.append
    starts_with = data.startswith
    while pos < n:
        # fast path: a one-record block whose size fits a one- or two-byte varint (events < 8 KiB)
        if data[pos] == 0x02 and pos + 3 <= n:
            b1 = data[pos + 1]
            if b1 & 1:  # a negative size: damaged
                size, p = 0, pos
            elif b1 < 0x80:
                size, p = b1 >> 1, pos + 2
            elif data[pos + 2] < 0x80:
                size, p = ((b1 & 0x7F) | (data[pos + 2] << 7)) >> 1, pos + 3
            else:
                size, p = 0, pos
            end = p + size
            if size > 0 and end + codec.SYNC_LEN <= n and starts_with(sync, end):
                append((p, end))
                pos = end + codec.SYNC_LEN
                i += 1
                continue
        # anything else, including every kind of damage, takes the careful path below
        if data[pos] != 0x02:  # zigzag(1): every bundle block holds exactly one record
            try:
                count, _ = _varint(data, pos, n)
                what = f"a block of {count} records (bundles hold one event per block)"
            except BundleError:
                what = "an unreadable block header"
            return spans, (i, f"{what} at byte {pos}")
        try:
            size, p = _varint(data, pos + 1, n)
        except BundleError:
            return spans, (i, f"the block at byte {pos} is cut short")
        end = p + size
        if size <= 0 or end + codec.SYNC_LEN > n:
            return spans, (i, f"the block at byte {pos} claims {size} bytes; the file "
                              f"{'ends first' if size > 0 else 'cannot hold that'} (truncated or damaged)")
        if data[end : end + codec.SYNC_LEN] != sync:
            return spans, (i, f"the block at byte {pos} does not end with the file's sync marker (damaged framing)")
        spans.append((p, end))
        pos = end + codec.SYNC_LEN
        i += 1
    return spans, None


def read_bundle(path: Path) -> Bundle:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc}") from exc
    return parse_bundle(data, path)


# --- verifying ----------------------------------------------------------------------------------


@dataclass
class BundleCheck:
    """Structural verification of a bundle: header, framing, chain, count, head."""

    ok: bool
    session_id: str | None
    events_expected: int | None
    events_found: int
    chain: ChainResult | None
    first_bad_seq: int | None = None
    reason: str | None = None
    detail: str | None = None
    header_ok: bool = True

    def as_dict(self) -> dict:
        return {"ok": self.ok, "session_id": self.session_id, "header_ok": self.header_ok,
                "events_expected": self.events_expected, "events_found": self.events_found,
                "first_bad_seq": self.first_bad_seq, "reason": self.reason, "detail": self.detail,
                "head_seq": self.chain.head_seq if self.chain else None,
                "head_hash": self.chain.head_hash if self.chain else None}


def check_bundle(b: Bundle, chain: ChainResult | None = None) -> BundleCheck:
    """Everything that needs no decoding: header digest, framing, hash chain, count and head.
    ``chain``: the chain over ``b.spans`` as already verified elsewhere (the native decoder vouches
    only for a sound one); when None it is verified here."""
    h = b.header
    try:
        if h.meta("bundle") != BUNDLE_FORMAT:
            raise BundleError(f"unsupported bundle format {h.meta('bundle')!r} (this tool reads {BUNDLE_FORMAT})")
        digest = h.meta("header_digest")
        if digest != header_digest(h.metadata, h.sync):
            raise BundleError("the header digest does not match the header: its metadata, schema or sync marker "
                              "was changed after export")
        session_id = h.meta("session_id")
        expected = h.meta_int("event_count")
        first_seq = h.meta_int("first_seq")
        first_prev = h.meta("first_prev_hash")
        head_seq = h.meta_int("head_seq")
        head_hash = h.meta("head_hash")
        if h.meta("writer_fingerprint") != b.fingerprint.hex():
            raise BundleError("the header's writer fingerprint is not the fingerprint of its schema")
        if not schema_has_envelope_head(h.schema):
            raise BundleError("the bundle schema is not an agentledger event schema")
        b.checkpoints  # noqa: B018 -- parse now, so a damaged list is a header error
    except BundleError as exc:
        return BundleCheck(False, None, None, len(b.spans), None, None, "bad_header", str(exc), header_ok=False)
    if chain is None:
        chain = verify_spans(b.data, b.spans, codec.SOE_MAGIC + b.fingerprint, session_id=session_id,
                             first_seq=first_seq, first_prev_hash=first_prev)
    chk = BundleCheck(True, session_id, expected, len(b.spans), chain)

    def bad(seq: int, reason: str, detail: str) -> BundleCheck:
        chk.ok, chk.first_bad_seq, chk.reason, chk.detail = False, seq, reason, detail
        return chk

    if not chain.ok:
        return bad(chain.first_bad_seq, chain.reason, chain.detail)
    if b.framing_error is not None:
        i, what = b.framing_error
        return bad(first_seq + i, "bad_framing", f"event at position {i}: {what}")
    if len(b.spans) < expected:
        return bad(first_seq + len(b.spans), "truncated",
                   f"the header says {expected} events, the file holds {len(b.spans)}: seq "
                   f"{first_seq + len(b.spans)} onwards is missing")
    if len(b.spans) > expected:
        return bad(first_seq + expected, "extra_events",
                   f"the header says {expected} events, the file holds {len(b.spans)}")
    if chain.head_seq != head_seq or chain.head_hash != head_hash:
        return bad(chain.head_seq, "head_mismatch",
                   f"the chain ends at seq {chain.head_seq} ({chain.head_hash[:16]}…), the header says seq {head_seq} "
                   f"({head_hash[:16]}…)")
    return chk


def verify_file(path: Path) -> BundleCheck:
    """Structural verification of a bundle file; every failure is a `BundleCheck`, never an exception."""
    try:
        b = read_bundle(path)
    except BundleError as exc:
        return BundleCheck(False, None, None, 0, None, None, "bad_header", str(exc), header_ok=False)
    return check_bundle(b)


def checkpoint_entry(seq: int, cp: dict) -> dict:
    """A checkpoint event's payload as listed in the bundle header (JSON-safe)."""
    sig = cp["signature"]
    return {"seq": int(seq), "head_seq": int(cp["head_seq"]), "head_hash": cp["head_hash"],
            "event_count": int(cp["event_count"]), "algorithm": cp.get("algorithm") or "ed25519",
            "key_id": cp["key_id"], "final": bool(cp.get("final")),
            "signature": base64.b64encode(bytes(sig)).decode()}


__all__ = ["Bundle", "BundleCheck", "BundleError", "ExportResult", "GENESIS_HASH", "check_bundle",
           "parse_bundle", "read_bundle", "read_header", "verify_file", "write_bundle", "checkpoint_entry"]
