"""The envelope every event shares: ids, per-session sequence, and the hash chain.

Hash definition (stable; documented in docs/warehouse.md):

    hash = hex(SHA-256( C3 01 || writer fingerprint || body bytes before the `hash` field ))

``prev_hash`` is a field inside the body, so each hash covers the previous one. Because ``hash``
is the last field of the record and always 64 hex characters, its Avro encoding is the last
66 bytes of the body (``80 01`` = length 64, then the hex). Verification therefore needs the raw
message bytes only, no decoding and no re-encoding, and holds for every writer-schema version.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import codec
from .contract import SchemaStore
from .errors import DecodeError

GENESIS_HASH = "0" * 64
HASH_FIELD_LEN = 66
_HASH_PREFIX = b"\x80\x01"


def uuid7(unix_ms: int, rand: bytes) -> str:
    """RFC 9562 UUIDv7 from a millisecond timestamp and 10 random bytes (seedable, for replays)."""
    if len(rand) < 10:
        raise ValueError("uuid7 needs 10 random bytes")
    b = bytearray(unix_ms.to_bytes(6, "big") + rand[:10])
    b[6] = 0x70 | (b[6] & 0x0F)
    b[8] = 0x80 | (b[8] & 0x3F)
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_now(rng: random.Random | None = None) -> str:
    r = rng.randbytes(10) if rng else __import__("os").urandom(10)
    return uuid7(time.time_ns() // 1_000_000, r)


def seal(header: bytes, unsealed_body: bytes) -> tuple[bytes, str]:
    """Turn the body of an event encoded with ``hash=""`` into the wire value and its hash."""
    if unsealed_body[-1:] != b"\x00":
        raise ValueError("the event must be encoded with an empty hash field")
    prefix = unsealed_body[:-1]
    digest = hashlib.sha256(header + prefix).hexdigest()
    return header + prefix + _HASH_PREFIX + digest.encode(), digest


def claimed_hash(value: bytes) -> str | None:
    """The hash an encoded event claims for itself, or None if its tail is not a hash field."""
    if len(value) < codec.SOE_HEADER_LEN + HASH_FIELD_LEN or value[-HASH_FIELD_LEN:-64] != _HASH_PREFIX:
        return None
    try:
        return value[-64:].decode("ascii")
    except UnicodeDecodeError:
        return None


def content_hash(value: bytes) -> str:
    return hashlib.sha256(value[:-HASH_FIELD_LEN]).hexdigest()


def hash_ok(value: bytes) -> bool:
    """True when the message's bytes hash to the hash it carries."""
    claimed = claimed_hash(value)
    return claimed is not None and hashlib.sha256(value[:-HASH_FIELD_LEN]).hexdigest() == claimed


@dataclass(frozen=True)
class Sealed:
    value: bytes  # single-object-encoded, ready for the wire
    hash: str
    record: dict[str, Any]  # the record as encoded (hash filled in)


class Sealer:
    """Encodes event records under the current schema and seals them into the chain."""

    def __init__(self, store: SchemaStore):
        self.store = store
        self.header = codec.SOE_MAGIC + store.current.fingerprint
        self._parsed = store.current.parsed
        self._encoder = codec.Encoder(self._parsed)

    def seal(self, record: dict[str, Any]) -> Sealed:
        record["hash"] = ""
        if self._encoder.parsed is not self._parsed:  # the writer schema was swapped (tests of old writers)
            self._encoder = codec.Encoder(self._parsed)
        value, digest = seal(self.header, self._encoder(record))
        record["hash"] = digest
        return Sealed(value, digest, record)


def make_record(
    *,
    event_id: str,
    session_id: str,
    seq: int,
    occurred_at_us: int,
    producer: dict[str, Any],
    payload_name: str,
    payload: dict[str, Any],
    prev_hash: str,
    turn_id: str | None = None,
    tool_call_id: str | None = None,
    trace: dict[str, Any] | None = None,
    redactions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "session_id": session_id,
        "seq": seq,
        "occurred_at": occurred_at_us,
        "producer": producer,
        "turn_id": turn_id,
        "tool_call_id": tool_call_id,
        "trace": trace,
        "redactions": redactions or [],
        "payload": (payload_name, payload),
        "prev_hash": prev_hash,
        "hash": "",
    }


@dataclass
class ChainProblem:
    seq: int | None
    reason: str  # hash_mismatch | seq_gap | seq_regression | chain_mismatch | duplicate | wrong_session
    detail: str
    event_id: str | None = None


class ChainVerifier:
    """Sequential verifier of one session's events, in order (used by verify, replay and bundles)."""

    def __init__(self, session_id: str | None = None, head_seq: int = -1, head_hash: str = GENESIS_HASH):
        self.session_id = session_id
        self.head_seq = head_seq
        self.head_hash = head_hash
        self.count = 0

    def check(self, value: bytes, record: dict[str, Any]) -> ChainProblem | None:
        """Check the next event; on success it becomes the head. Returns the problem otherwise."""
        seq, eid = record["seq"], record.get("event_id")
        if self.session_id is None:
            self.session_id = record["session_id"]
        if record["session_id"] != self.session_id:
            return ChainProblem(seq, "wrong_session", f"event of session {record['session_id']}", eid)
        if not hash_ok(value):
            return ChainProblem(seq, "hash_mismatch", "the event's bytes do not hash to its hash field", eid)
        if seq != self.head_seq + 1:
            if seq <= self.head_seq:
                reason = "duplicate" if record["hash"] == self.head_hash or seq < self.head_seq else "seq_regression"
                return ChainProblem(seq, reason, f"seq {seq} after head {self.head_seq}", eid)
            return ChainProblem(seq, "seq_gap", f"expected seq {self.head_seq + 1}, got {seq}", eid)
        if record["prev_hash"] != self.head_hash:
            return ChainProblem(seq, "chain_mismatch", "prev_hash is not the hash of the previous event", eid)
        self.head_seq = seq
        self.head_hash = record["hash"]
        self.count += 1
        return None


Clock = Callable[[], int]  # microseconds since the epoch, UTC


def system_clock_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class Peek:
    event_id: str
    session_id: str
    seq: int
    occurred_at_us: int
    prev_hash: str
    hash: str


def peek(value: bytes) -> Peek:
    """The envelope fields transports need (session key, seq, time, chain links), read from the raw
    bytes without decoding the record. Relies only on the field order every schema version keeps:
    event_id, session_id, seq, occurred_at first; prev_hash, hash last (both 64 hex characters)."""
    try:
        pos = 10
        n, pos = codec.read_varint(value, pos)
        event_id = value[pos:pos + n].decode()
        pos += n
        n, pos = codec.read_varint(value, pos)
        session_id = value[pos:pos + n].decode()
        pos += n
        seq, pos = codec.read_varint(value, pos)
        at, pos = codec.read_varint(value, pos)
    except (IndexError, UnicodeDecodeError) as exc:
        raise DecodeError("undecodable", f"cannot read the envelope: {exc}") from exc
    tail = value[-2 * HASH_FIELD_LEN:]
    if tail[:2] != _HASH_PREFIX or tail[HASH_FIELD_LEN:HASH_FIELD_LEN + 2] != _HASH_PREFIX:
        raise DecodeError("undecodable", "the event does not end with prev_hash and hash")
    return Peek(event_id, session_id, seq, at, tail[2:HASH_FIELD_LEN].decode(), tail[HASH_FIELD_LEN + 2:].decode())
