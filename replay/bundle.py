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

Format 2 adds *provenance* from the exporting warehouse's log operator (schemas/treelog.py):

* ``agentledger.tree_head`` -- a signed tree head (STH) of the warehouse's log-wide Merkle tree;
* ``agentledger.inclusion`` -- the RFC 9162 inclusion proof, against that STH, of the session's latest
  leaf, whose entry is (session id, head seq, head hash, event count). One proof covers the whole
  chain: the head hash commits to every earlier event, so the leaf proves seq 0..head seq;
* ``agentledger.header_signature`` -- the operator's signature over the header's session id, first
  seq, head seq, head hash, event count, final checkpoint seq (``agentledger.final_checkpoint_seq``,
  or none), log id and the STH's size and root (`schemas.signing.bundle_header_message`).

So the head and count of a bundle are signed: a bundle cut after a signed checkpoint, with its header
rewritten and its digest recomputed, no longer matches its signed header (`check_provenance`).
Format 1 bundles (no provenance) still verify as before; they cannot pass ``--require-signature``.

Format 3 adds ``agentledger.coverage`` (issue 24): per source of the session, what it recorded (event
counts), what it cannot contain at all (its coverage statements, ``gap`` events of kind
``not_observable``) and what it lost (the other gaps) -- so a reader knows what the evidence does not
prove. The header digest covers it; the operator's signature covers its SHA-256 (the v2 header
message); and since the statements are chained events of the bundle, verification recomputes the
summary from them and fails when the header says otherwise. Format 1 and 2 bundles carry none and
verify as before (the summary is then shown from their events, unsigned).
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

from agentledger.schemas import codec, merkle, treelog
from agentledger.schemas.canonical import canonical_json
from agentledger.schemas.envelope import GENESIS_HASH
from agentledger.schemas.errors import AgentLedgerError, DecodeError
from agentledger.schemas.signing import ALGORITHM, Keyring, Signer, bundle_header_message

from .chain import ChainResult, RawChainVerifier, envelope_head, schema_has_envelope_head, verify_spans

BUNDLE_FORMAT = "2"
COVERAGE_FORMAT = "3"  # format 2 + agentledger.coverage, signed in the operator's v2 header message
READABLE_FORMATS = ("1", "2", "3")
META_PREFIX = "agentledger."
HEADER_DIGEST_KEY = "agentledger.header_digest"
# What the session's sources could not contain (issue 24): a summary of its coverage statements
# (gap_kind not_observable) and losses, per source; see `replay.session.coverage_of`.
COVERAGE_KEY = "agentledger.coverage"
MAX_HEADER_BYTES = 64 * 1024 * 1024


class BundleError(AgentLedgerError):
    """A file is not a readable agentledger bundle (bad header, wrong format), or cannot be written."""


# --- writing ------------------------------------------------------------------------------------


def coverage_digest(raw: bytes | None) -> str | None:
    """SHA-256 hex of the header's coverage bytes as written (None: the header has none)."""
    return None if raw is None else hashlib.sha256(raw).hexdigest()


def header_coverage(b: "Bundle") -> dict | None:
    """The coverage summary in a bundle's header, or None (bundles written before issue 24)."""
    if COVERAGE_KEY not in b.header.metadata:
        return None
    cov = b.header.meta_json("coverage")
    if not isinstance(cov, dict):
        raise BundleError("the header's agentledger.coverage is not an object")
    return cov


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
class Provenance:
    """What the exporting log operator vouches with: its key, a signed tree head, and the inclusion
    proof of the session's latest leaf (index ``leaf_index``) against it."""

    signer: Signer
    tree_head: treelog.TreeHead
    leaf_index: int
    path: list[bytes]


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
    provenance: "Provenance | None" = None,
    coverage: dict | None = None,
) -> ExportResult:
    """Write ``values`` (the session's wire values, in seq order) as a bundle at ``path``.

    The file is written to a temporary name, fsync-ed and renamed, so ``path`` is either the
    complete bundle or untouched. Refuses an empty session, values of another session, several
    writer schemas, and (unless ``allow_broken``) a chain that does not verify. ``coverage``: the
    session's coverage summary (`replay.session.coverage_of`), written as ``agentledger.coverage``:
    covered by the header digest and, with provenance, by the operator's signature.
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
        "agentledger.bundle": (BUNDLE_FORMAT if coverage is None else COVERAGE_FORMAT).encode(),
        "agentledger.session_id": session_id.encode(),
        "agentledger.writer_fingerprint": fp.hex().encode(),
        "agentledger.first_seq": str(first_seq).encode(),
        "agentledger.first_prev_hash": prev_first.encode(),
        "agentledger.event_count": str(len(values)).encode(),
        "agentledger.head_seq": str(last_seq).encode(),
        "agentledger.head_hash": last_hash.encode(),
        "agentledger.chain_status": (b"ok" if chain.ok else f"broken at seq {chain.first_bad_seq}: {chain.reason}".encode()),
        "agentledger.checkpoints": canonical_json(checkpoints),
        "agentledger.key_ids": json.dumps(sorted({c["key_id"] for c in checkpoints})).encode(),
        "agentledger.exported_at": (exported_at or dt.datetime.now(dt.timezone.utc)).isoformat().encode(),
        "agentledger.source": source.encode(),
    }
    finals = [int(c["seq"]) for c in checkpoints if c.get("final")]
    final_seq = max(finals) if finals else None
    meta["agentledger.final_checkpoint_seq"] = ("none" if final_seq is None else str(final_seq)).encode()
    if coverage is not None:
        meta[COVERAGE_KEY] = canonical_json(coverage)
    if provenance is not None:
        th = provenance.tree_head
        msg = bundle_header_message(session_id, first_seq, last_seq, last_hash, len(values), final_seq, th.log_id,
                                    th.tree_size, th.root_hash, coverage_digest(meta.get(COVERAGE_KEY)))
        meta["agentledger.log_id"] = th.log_id.encode()
        meta["agentledger.tree_head"] = canonical_json(th.as_dict())
        meta["agentledger.inclusion"] = canonical_json({"leaf_index": provenance.leaf_index, "tree_size": th.tree_size,
                                               "path": [h.hex() for h in provenance.path]})
        meta["agentledger.header_signature"] = canonical_json({
            "algorithm": ALGORITHM, "key_id": provenance.signer.key_id,
            "signature": base64.b64encode(provenance.signer.sign(msg)).decode()})
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
        except (ValueError, RecursionError):  # (nesting deeper than the parser's recursion: not ours either)
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
    except RecursionError:
        raise BundleError("the header's avro.schema is not valid JSON: nested too deeply") from None
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
        """The header's checkpoint list, each entry as `checkpoint_entry` writes it. The header digest
        is unkeyed (anyone can recompute it), so every entry is checked here: a malformed one is a
        `BundleError` (`check_bundle`: bad_header), never an exception further on."""
        cps = self.header.meta_json("checkpoints", [])
        if not isinstance(cps, list):
            raise BundleError("the header's agentledger.checkpoints is not a list")
        for i, c in enumerate(cps):
            if not isinstance(c, dict):
                raise BundleError(f"the header's agentledger.checkpoints entry {i} is not an object")
            for key, types in _CHECKPOINT_FIELDS.items():
                if key not in c:
                    if key in _CHECKPOINT_REQUIRED:
                        raise BundleError(f"the header's agentledger.checkpoints entry {i} has no {key}")
                    continue
                v = c[key]
                if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                    raise BundleError(f"the header's agentledger.checkpoints entry {i} has a {key} of the wrong "
                                      f"type ({type(v).__name__})")
        return cps

    @property
    def public_keys(self) -> dict[str, str]:
        keys = self.header.meta_json("public_keys", {})
        return keys if isinstance(keys, dict) else {}


# The fields of a header checkpoint entry (`checkpoint_entry`) and their JSON types.
_CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "seq": (int,), "signature": (str,), "key_id": (str,), "head_seq": (int,), "head_hash": (str,),
    "event_count": (int,), "algorithm": (str,), "final": (bool,)}
_CHECKPOINT_REQUIRED = ("seq", "signature", "key_id")


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
        if h.meta("bundle") not in READABLE_FORMATS:
            raise BundleError(f"unsupported bundle format {h.meta('bundle')!r} (this tool reads "
                              f"{', '.join(READABLE_FORMATS)})")
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
        h.meta_json("public_keys")  # (and damaged embedded keys)
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


@dataclass
class ProvenanceCheck:
    """``status``: valid | absent (format 1, or exported without a signed tree) | unknown_key (signed by
    an operator key that is not trusted) | bad_header_signature | bad_tree_head | bad_inclusion |
    not_a_whole_session | final_checkpoint_mismatch | malformed."""

    status: str
    detail: str = ""
    log_id: str | None = None
    tree_size: int | None = None
    root_hash: str | None = None
    leaf_index: int | None = None
    key_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "valid"

    @property
    def failed(self) -> bool:
        """Evidence of tampering (not merely missing or untrusted provenance)."""
        return self.status not in ("valid", "absent", "unknown_key")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_provenance(b: Bundle, operators: Keyring) -> ProvenanceCheck:
    """The signed header, the signed tree head and the inclusion proof of a structurally sound bundle
    (`check_bundle` has already held the chain to the header's head seq, head hash and count), with
    trusted operator keys. Never raises for bad data."""
    h = b.header
    if h.meta("bundle") == "1" or f"{META_PREFIX}tree_head" not in h.metadata:
        why = ("a format 1 bundle" if h.meta("bundle") == "1" else "exported without a signed tree head")
        return ProvenanceCheck("absent", f"{why}: its head and count are not signed by a log operator (re-export "
                                         "it from the warehouse with this version)")
    try:
        th = treelog.TreeHead.from_dict(h.meta_json("tree_head"))
        inc = h.meta_json("inclusion")
        sig = h.meta_json("header_signature")
        if not isinstance(inc, dict) or not isinstance(sig, dict):
            raise BundleError("the inclusion proof or the header signature is not an object")
        leaf_index, tree_size = int(inc["leaf_index"]), int(inc["tree_size"])
        path = [bytes.fromhex(str(x)) for x in inc["path"]]
        signature = base64.b64decode(str(sig["signature"]), validate=True)
        kid, alg = str(sig["key_id"]), str(sig.get("algorithm") or ALGORITHM)
        session_id, first_seq = h.meta("session_id"), h.meta_int("first_seq")
        head_seq, head_hash, count = h.meta_int("head_seq"), h.meta("head_hash"), h.meta_int("event_count")
        final_raw = h.meta("final_checkpoint_seq")
        final_seq = None if final_raw == "none" else int(final_raw)
        log_id = h.meta("log_id")
    except (BundleError, treelog.TreeError, KeyError, TypeError, ValueError) as exc:
        return ProvenanceCheck("malformed", f"the bundle's provenance is malformed: {exc}")
    out = ProvenanceCheck("valid", "", th.log_id, th.tree_size, th.root_hash, leaf_index, kid)
    msg = bundle_header_message(session_id, first_seq, head_seq, head_hash, count, final_seq, log_id, th.tree_size,
                                th.root_hash, coverage_digest(h.metadata.get(COVERAGE_KEY)))
    if alg != ALGORITHM:
        out.status, out.detail = "bad_header_signature", f"the header signature uses algorithm {alg!r}"
    elif kid not in operators:
        out.status, out.detail = "unknown_key", (f"the header is signed by operator key {kid}, which is not trusted "
                                                 "(pass --operator-key)")
    elif not operators.verify(kid, signature, msg):
        out.status, out.detail = "bad_header_signature", ("the header signature does not verify: the session id, "
                                                          "head seq, head hash, count, final checkpoint, coverage or "
                                                          "tree head were changed after export")
    elif log_id != th.log_id or tree_size != th.tree_size:
        out.status, out.detail = "bad_tree_head", "the inclusion proof or the log id names another tree head"
    elif th.check(operators) != "valid":
        st = th.check(operators)
        out.status = "unknown_key" if st == "unknown_key" else "bad_tree_head"
        out.detail = f"the tree head of size {th.tree_size} is {st} (key {th.key_id})"
    else:
        try:
            merkle.verify_inclusion(leaf_index, th.tree_size,
                                    treelog.session_leaf_hash(session_id, head_seq, head_hash, count), path,
                                    bytes.fromhex(th.root_hash))
        except (merkle.ProofError, ValueError) as exc:
            out.status, out.detail = "bad_inclusion", f"the session's head is not in the signed tree: {exc}"
    if out.ok and (first_seq != 0 or count != head_seq + 1):
        out.status, out.detail = "not_a_whole_session", (f"the bundle holds seq {first_seq}..{head_seq} ({count} "
                                                         "events), not the session from seq 0")
    if out.ok:
        finals = [int(c["seq"]) for c in b.checkpoints if c.get("final")]
        if (max(finals) if finals else None) != final_seq:
            out.status, out.detail = "final_checkpoint_mismatch", (
                f"the signed header names final checkpoint {final_raw}, the bundle lists "
                f"{max(finals) if finals else 'none'}")
    return out


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


__all__ = ["Bundle", "BundleCheck", "BundleError", "ExportResult", "GENESIS_HASH", "Provenance", "ProvenanceCheck",
           "check_bundle", "check_provenance", "parse_bundle", "read_bundle", "read_header", "verify_file",
           "write_bundle", "checkpoint_entry"]
