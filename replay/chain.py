"""Chain verification from raw bytes: no Avro decoding, for every writer-schema version.

Each event's wire value is ``C3 01 ‖ fingerprint ‖ body``; the body starts with ``event_id``,
``session_id`` and ``seq`` (two strings and a long) and ends with ``prev_hash`` and ``hash`` (two
64-hex-char strings, i.e. ``80 01`` + 64 bytes each). So the verifier reads the session and seq
from the first bytes, the two hashes from the last 132 bytes, and checks:

* the bytes hash to the hash they carry (SHA-256 over everything before the hash field);
* ``seq`` is the expected next one (``first_seq`` for the first event, then +1 each);
* ``prev_hash`` is the previous event's hash (``GENESIS_HASH`` before seq 0);
* every event belongs to the same session.

The first event that fails names the first bad seq; the *expected* seq at that position is what
is reported (an inserted or reordered event may claim any seq), together with what it claimed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from agentledger.schemas.codec import SOE_HEADER_LEN, SOE_MAGIC, read_varint
from agentledger.schemas.errors import DecodeError
from agentledger.schemas.envelope import GENESIS_HASH, HASH_FIELD_LEN

_HASH_TAG = b"\x80\x01"
_TAIL_LEN = 2 * HASH_FIELD_LEN  # prev_hash field + hash field
ENVELOPE_HEAD = ("event_id", "session_id", "seq")


class BadEnvelope(ValueError):
    """The raw bytes do not start like an agentledger event."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_varint(buf, pos)
    except DecodeError as exc:
        raise BadEnvelope(f"{exc.detail} in the event") from exc


def envelope_head(value: bytes, offset: int = SOE_HEADER_LEN) -> tuple[str, str, int]:
    """(event_id, session_id, seq) read from the first bytes of an event body."""
    out = []
    pos = offset
    for _ in range(2):
        n, pos = _varint(value, pos)
        if n < 0 or pos + n > len(value):
            raise BadEnvelope("string length runs past the end of the event")
        try:
            out.append(value[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise BadEnvelope("id is not UTF-8") from exc
        pos += n
    seq, _ = _varint(value, pos)
    return out[0], out[1], seq


def session_of(value: bytes) -> str | None:
    """The session id of a wire value, or None when it is not an event (used to filter partitions)."""
    if len(value) < SOE_HEADER_LEN + _TAIL_LEN or value[:2] != SOE_MAGIC:
        return None
    try:
        return envelope_head(value)[1]
    except BadEnvelope:
        return None


def schema_has_envelope_head(schema: dict) -> bool:
    """True when a writer schema starts with event_id, session_id, seq and ends with prev_hash, hash."""
    fields = schema.get("fields", [])
    names = [f.get("name") for f in fields]
    if names[:3] != list(ENVELOPE_HEAD) or names[-2:] != ["prev_hash", "hash"]:
        return False
    types = [fields[0]["type"], fields[1]["type"], fields[2]["type"]]
    base = [t.get("type") if isinstance(t, dict) else t for t in types]
    return base == ["string", "string", "long"]


@dataclass
class ChainResult:
    """Outcome of verifying one session's events in the order given."""

    session_id: str | None
    count: int  # events examined
    verified: int  # events before the first bad one
    first_seq: int
    head_seq: int  # last verified seq (first_seq - 1 if none)
    head_hash: str
    first_bad_seq: int | None = None
    first_bad_index: int | None = None
    reason: str | None = None
    detail: str | None = None
    hashes: list[str] = field(default_factory=list, repr=False)  # hash of each verified event, in order

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None

    def as_dict(self) -> dict:
        return {"session_id": self.session_id, "events": self.count, "verified": self.verified,
                "first_seq": self.first_seq, "head_seq": self.head_seq, "head_hash": self.head_hash,
                "ok": self.ok, "first_bad_seq": self.first_bad_seq, "reason": self.reason, "detail": self.detail}


class RawChainVerifier:
    """Incremental raw-bytes verifier. Feed values in order with `add`; stop at the first failure."""

    def __init__(self, session_id: str | None = None, first_seq: int = 0, first_prev_hash: str = GENESIS_HASH):
        self.session_id = session_id
        self.first_seq = first_seq
        self.head_seq = first_seq - 1
        self.head_hash = first_prev_hash
        self._head_hash_b = first_prev_hash.encode()
        self.index = 0
        self.hashes: list[str] = []
        self.failure: tuple[int, int, str, str] | None = None  # (expected seq, index, reason, detail)

    def fail(self, reason: str, detail: str) -> None:
        if self.failure is None:
            self.failure = (self.head_seq + 1, self.index, reason, detail)

    def add(self, value: bytes, fingerprint_body: tuple[bytes, bytes] | None = None) -> bool:
        """Check the next event. ``fingerprint_body`` gives (SOE header, body) instead of ``value``
        (bundle files hold bodies only). Returns False once the chain is broken."""
        if self.failure is not None:
            return False
        if fingerprint_body is not None:
            header, body = fingerprint_body
            h = hashlib.sha256(header)
            tail = body
            off = 0
        else:
            header = None
            tail = value
            off = SOE_HEADER_LEN
            if len(value) < SOE_HEADER_LEN or value[:2] != SOE_MAGIC:
                self.fail("undecodable", "not Avro single-object encoding (no C3 01 marker)")
                return False
        expected = self.head_seq + 1
        if len(tail) < off + _TAIL_LEN or tail[-HASH_FIELD_LEN:-64] != _HASH_TAG:
            self.fail("hash_mismatch", "the event does not end with a hash field")
            return False
        claimed = tail[-64:]
        if header is not None:
            h.update(memoryview(tail)[: len(tail) - HASH_FIELD_LEN])
            digest = h.hexdigest().encode()
        else:
            digest = hashlib.sha256(memoryview(tail)[: len(tail) - HASH_FIELD_LEN]).hexdigest().encode()
        try:
            eid, sid, seq = envelope_head(tail, off)
        except BadEnvelope as exc:
            self.fail("undecodable", str(exc))
            return False
        if digest != claimed:
            self.fail("hash_mismatch", f"the bytes of the event at position {self.index} (claiming seq {seq}) "
                                       "do not hash to its hash field")
            return False
        if self.session_id is None:
            self.session_id = sid
        elif sid != self.session_id:
            self.fail("wrong_session", f"the event at position {self.index} belongs to session {sid}")
            return False
        if seq != expected:
            if seq < expected:
                reason = "duplicate" if claimed.decode() in self.hashes[-1:] or seq < expected - 1 else "seq_regression"
            else:
                reason = "seq_gap"
            self.fail(reason, f"expected seq {expected} at position {self.index}, found seq {seq}")
            return False
        if tail[-_TAIL_LEN : -_TAIL_LEN + 2] != _HASH_TAG or tail[-_TAIL_LEN + 2 : -HASH_FIELD_LEN] != self._head_hash_b:
            self.fail("chain_mismatch", f"seq {seq}: prev_hash is not the hash of seq {expected - 1}")
            return False
        self.head_seq = seq
        self._head_hash_b = claimed
        self.head_hash = claimed.decode()
        self.hashes.append(self.head_hash)
        self.index += 1
        return True

    def result(self, count: int | None = None) -> ChainResult:
        r = ChainResult(self.session_id, count if count is not None else self.index + (self.failure is not None),
                        len(self.hashes), self.first_seq, self.head_seq, self.head_hash, hashes=self.hashes)
        if self.failure:
            r.first_bad_seq, r.first_bad_index, r.reason, r.detail = self.failure
        return r


def verify_values(values: Iterable[bytes], *, session_id: str | None = None, first_seq: int = 0,
                  first_prev_hash: str = GENESIS_HASH) -> ChainResult:
    """Verify wire values (single-object encoded) of one session, in the order given."""
    v = RawChainVerifier(session_id, first_seq, first_prev_hash)
    n = 0
    for value in values:
        n += 1
        if not v.add(value):
            break
    if isinstance(values, Sequence):
        n = len(values)
    return v.result(n)


def verify_spans(data: bytes, spans: Sequence[tuple[int, int]], header: bytes, *, session_id: str | None = None,
                 first_seq: int = 0, first_prev_hash: str = GENESIS_HASH) -> ChainResult:
    """`verify_values` for bodies lying at ``spans`` (start, end) of ``data`` (a bundle or segment),
    each to be prefixed by ``header`` (C3 01 + fingerprint). One tight pass; on the first failure the
    exact reason is worked out by `RawChainVerifier`."""
    data = bytes(data)  # (no copy when it is bytes already)
    mv = memoryview(data)
    base = hashlib.sha256(header)
    prev = first_prev_hash.encode()
    expected = first_seq
    sid_b = session_id.encode() if session_id is not None else None
    hashes = []
    append = hashes.append
    tag = _HASH_TAG
    starts = data.startswith
    copy = base.copy
    if len(prev) != HASH_FIELD_LEN - 2:  # an odd first_prev_hash: the careful verifier says what is wrong
        return _verify_spans_carefully(data, spans, header, session_id, first_seq, first_prev_hash)
    for s, e in spans:
        h = copy()
        h.update(mv[s : e - HASH_FIELD_LEN])
        claimed = data[e - 64 : e]
        if h.hexdigest().encode() != claimed or not starts(tag, e - 66, e - 64):
            break
        if not starts(tag, e - 132, e - 130) or not starts(prev, e - 130, e - 66):
            break
        # envelope head: event_id, session_id (strings, one-byte lengths in practice), seq
        n1 = data[s]
        if n1 & 0x80:
            break
        p = s + 1 + (n1 >> 1)
        n2 = data[p]
        if n2 & 0x80:
            break
        p += 1
        if sid_b is None:
            sid_b = data[p : p + (n2 >> 1)]
        elif n2 >> 1 != len(sid_b) or not starts(sid_b, p):
            break
        p += n2 >> 1
        b = data[p]
        if b & 0x80:  # multi-byte varint
            acc, shift = b & 0x7F, 7
            while True:
                p += 1
                b = data[p]
                acc |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            seq = (acc >> 1) ^ -(acc & 1)
        else:
            seq = (b >> 1) ^ -(b & 1)
        if seq != expected:
            break
        expected += 1
        prev = claimed
        append(claimed.decode())
    else:
        r = ChainResult(sid_b.decode() if sid_b is not None else session_id, len(spans), len(hashes), first_seq,
                        expected - 1, prev.decode(), hashes=hashes)
        return r
    # a failure (or an unusual encoding): the careful verifier says exactly what and where
    return _verify_spans_carefully(data, spans, header, session_id, first_seq, first_prev_hash)


def _verify_spans_carefully(data, spans, header, session_id, first_seq, first_prev_hash) -> ChainResult:
    v = RawChainVerifier(session_id, first_seq, first_prev_hash)
    for s, e in spans:
        if not v.add(b"", (header, data[s:e])):
            break
    return v.result(len(spans))
