"""Where a session is read from: the warehouse, Kafka, the embedded local log, or a bundle file.

One interface (`SessionSource.read(session_id) -> RawSession`), the same result from each: the
session's exact sealed wire values in transport order, nothing decoded. Verification and replay
work on those bytes, so a session read from Kafka verifies exactly as the same session read back
from the warehouse (whose rows are re-encoded to the sealed bytes, see schemas/rows.py).

Transports deliver at least once: a byte-identical repeat of an event already read (same seq, same
bytes) is dropped and counted; anything else that does not fit the chain is kept so that
verification reports it.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from agentledger.schemas.contract import SchemaStore, load_store
from agentledger.schemas.errors import AgentLedgerError
from agentledger.schemas.sessionids import Place

from .chain import envelope_head, session_of


class SessionNotFound(AgentLedgerError):
    """The session is not in this source."""


@dataclass
class Provenance:
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


@dataclass
class RawSession:
    """One session's wire values (single-object encoded), in transport order."""

    session_id: str
    values: list[bytes]
    source: str  # warehouse | kafka | log | bundle
    where: str  # human description: file, topic/partition, warehouse path
    provenance: list[Provenance] = field(default_factory=list)
    writer_schemas: dict[bytes, dict] = field(default_factory=dict)  # fingerprint -> schema (bundles embed theirs)
    duplicates_dropped: int = 0
    scanned: int | None = 0  # transport messages examined (None: one per value)
    bundle: object | None = None  # the parsed Bundle, when read from one

    def __len__(self) -> int:
        return len(self.values)

    @property
    def fingerprints(self) -> list[bytes]:
        seen: dict[bytes, None] = {}
        for v in self.values:
            seen.setdefault(v[2:10], None)
        return list(seen)


class SessionSource(ABC):
    name: str = "?"

    @abstractmethod
    def read(self, session_id: str) -> RawSession:
        """The session's values; raises `SessionNotFound` when the source has none."""


def _dedupe(values: Iterable[bytes], provenance: Iterable[Provenance]) -> tuple[list[bytes], list[Provenance], int]:
    out, prov, seen, dropped = [], [], {}, 0
    for v, p in zip(values, provenance):
        try:
            seq = envelope_head(v)[2]
        except ValueError:
            seq = None
        if seq is not None and seen.get(seq) == v:
            dropped += 1
            continue
        if seq is not None:
            seen.setdefault(seq, v)
        out.append(v)
        prov.append(p)
    return out, prov, dropped


# --- warehouse ------------------------------------------------------------------------------------


@dataclass
class OffsetHint:
    """Where the warehouse saw a session's events in the transport."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int


def offset_hint(con, session_id: str, topic: str) -> OffsetHint | None:
    rows = con.execute(
        "SELECT source_partition, min(source_offset), max(source_offset) FROM events "
        "WHERE session_id = ? AND source_topic = ? GROUP BY 1", [session_id, topic]).fetchall()
    if len(rows) != 1 or rows[0][1] is None:
        return None
    return OffsetHint(topic, int(rows[0][0]), int(rows[0][1]), int(rows[0][2]))


class WarehouseSource(SessionSource):
    """Events as ingested: rows re-encoded with their writer schema to the exact sealed bytes."""

    name = "warehouse"

    def __init__(self, con, store: SchemaStore | None = None, label: str = "warehouse"):
        self.con = con
        self.store = store or load_store()
        self.label = label

    def read(self, session_id: str) -> RawSession:
        from agentledger.schemas.rows import iter_session_values

        values, prov = [], []
        for value, _rec, row in iter_session_values(self.con, self.store, session_id):
            values.append(value)
            prov.append(Provenance(row.get("source_topic"), row.get("source_partition"), row.get("source_offset")))
        if not values:
            raise SessionNotFound(f"session {session_id} is not in the warehouse {self.label}")
        return RawSession(session_id, values, self.name, self.label, prov, scanned=len(values))

    def has(self, session_id: str) -> bool:
        return self.con.execute("SELECT count(*) FROM events WHERE session_id = ?", [session_id]).fetchone()[0] > 0

    def hint(self, session_id: str, topic: str) -> OffsetHint | None:
        return offset_hint(self.con, session_id, topic)


# --- Kafka ----------------------------------------------------------------------------------------


class KafkaSessionSource(SessionSource):
    """Scans the one partition the session's key maps to, from the first offset the warehouse
    recorded for it when known (validated: the message there must belong to the session), else
    from the partition's beginning, up to the end offset at the time of the call."""

    name = "kafka"

    def __init__(self, bootstrap_servers: str, topic: str, hint: OffsetHint | None = None, timeout_s: float = 300):
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.hint = hint
        self.timeout_s = timeout_s

    def read(self, session_id: str) -> RawSession:
        from agentledger.schemas.transport.kafka import partition_count, partition_for_key, scan_partition

        key = session_id.encode()
        n = partition_count(self.bootstrap_servers, self.topic)
        if n == 0:
            raise SessionNotFound(f"topic {self.topic} does not exist on {self.bootstrap_servers}")
        p = partition_for_key(key, n)
        start = None
        h = self.hint
        if h is not None and h.topic == self.topic and h.partition == p:
            start = h.first_offset
        msgs, first, end = scan_partition(self.bootstrap_servers, self.topic, p, start, key=key, timeout_s=self.timeout_s)
        if start is not None and (not msgs or msgs[0].offset != start):
            # The hint did not point at this session's first event (topic recreated?): scan it all.
            msgs, first, end = scan_partition(self.bootstrap_servers, self.topic, p, None, key=key,
                                              timeout_s=self.timeout_s)
        if not msgs:
            raise SessionNotFound(f"no such session: {session_id} (no message of it in Kafka {self.topic}/{p}, "
                                  f"offsets {first}..{end - 1})")
        values, prov, dropped = _dedupe([m.value for m in msgs], [Provenance(m.topic, m.partition, m.offset) for m in msgs])
        return RawSession(session_id, values, self.name, f"kafka {self.bootstrap_servers} {self.topic}/{p} "
                          f"offsets {first}..{end - 1}", prov, duplicates_dropped=dropped, scanned=end - first)


    def place(self) -> Place:
        """For `schemas.sessionids.resolve`: a full id is looked up in the partition its key maps to
        (up to its first message); Kafka is not scanned for prefixes (that would read the whole topic)."""
        from agentledger.schemas.transport.kafka import partition_count, partition_for_key, scan_partition

        def exact(sid: str) -> bool:
            key = sid.encode()
            n = partition_count(self.bootstrap_servers, self.topic)
            if n == 0:
                return False
            msgs, _, _ = scan_partition(self.bootstrap_servers, self.topic, partition_for_key(key, n), None, key=key,
                                        timeout_s=self.timeout_s, max_found=1)
            return bool(msgs)

        return Place(f"Kafka topic {self.topic} (full ids only)", exact, lambda prefix, n: [])


# --- embedded local log -----------------------------------------------------------------------------


class LocalLogSessionSource(SessionSource):
    """Scans the local-log partition the session maps to (same partitioner as `LocalSink`). The
    log stores no keys, so each message's session id is read from its first bytes (no decoding)."""

    name = "log"

    def __init__(self, log_dir: Path, topic: str, hint: OffsetHint | None = None):
        self.log_dir = Path(log_dir)
        self.topic = topic
        self.hint = hint

    def read(self, session_id: str) -> RawSession:
        from agentledger.schemas.transport.local import LocalLog

        log = LocalLog(self.log_dir)
        n = log.partition_count(self.topic)
        if n == 0:
            raise SessionNotFound(f"topic {self.topic} does not exist in the local log {self.log_dir}")
        p = zlib.crc32(session_id.encode()) % n  # = LocalLog.partition_for, without creating anything
        end = log.end_offset(self.topic, p)
        bases = log.segments(self.topic, p)
        begin = bases[0] if bases else 0
        start = begin
        h = self.hint
        if h is not None and h.topic == self.topic and h.partition == p and begin <= h.first_offset < end:
            first = log.read(self.topic, p, h.first_offset, 1)
            if first and session_of(first[0].value) == session_id:
                start = h.first_offset
        values, prov = [], []
        off = start
        while off < end:
            msgs = log.read(self.topic, p, off, min(50_000, end - off))
            if not msgs:
                break
            for m in msgs:
                if m.damaged is None and session_of(m.value) == session_id:
                    values.append(m.value)
                    prov.append(Provenance(self.topic, p, m.offset))
            off = msgs[-1].offset + 1
        if not values:
            raise SessionNotFound(f"no such session: {session_id} (not in the local log {self.log_dir}, "
                                  f"{self.topic}/{p})")
        values, prov, dropped = _dedupe(values, prov)
        return RawSession(session_id, values, self.name, f"local log {self.log_dir} {self.topic}/{p} offsets "
                          f"{start}..{end - 1}", prov, duplicates_dropped=dropped, scanned=end - start)


    def _session_ids(self, partitions, wanted, limit: int) -> list[str]:
        """Up to ``limit`` distinct session ids of the given partitions for which ``wanted(id)``."""
        from agentledger.schemas.transport.local import LocalLog

        log = LocalLog(self.log_dir)
        found: list[str] = []
        for p in partitions:
            end = log.end_offset(self.topic, p)
            bases = log.segments(self.topic, p)
            off = bases[0] if bases else 0
            while off < end:
                msgs = log.read(self.topic, p, off, min(50_000, end - off))
                if not msgs:
                    break
                for m in msgs:
                    sid = session_of(m.value)
                    if sid is not None and sid not in found and wanted(sid):
                        found.append(sid)
                        if len(found) >= limit:
                            return found
                off = msgs[-1].offset + 1
        return found

    def place(self) -> Place:
        """For `schemas.sessionids.resolve`: a full id is looked for in its partition (up to its first
        event); a prefix in every partition."""
        from agentledger.schemas.transport.local import LocalLog

        def partitions() -> list[int]:
            n = LocalLog(self.log_dir).partition_count(self.topic) if self.log_dir.is_dir() else 0
            return list(range(n))

        def exact(sid: str) -> bool:
            parts = partitions()
            return bool(parts) and bool(self._session_ids([zlib.crc32(sid.encode()) % len(parts)],
                                                         lambda x: x == sid, 1))

        def starting(prefix: str, n: int) -> list[str]:
            return self._session_ids(partitions(), lambda x: x.startswith(prefix), n)

        return Place(f"the local log {self.log_dir}", exact, starting)


# --- bundle ----------------------------------------------------------------------------------------


class BundleValues(Sequence):
    """The wire values of a bundle's events, sliced on demand (a million-event bundle is not copied)."""

    def __init__(self, bundle):
        self._b = bundle
        self._prefix = b"\xc3\x01" + bundle.fingerprint

    def __len__(self) -> int:
        return len(self._b.spans)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        s, e = self._b.spans[i]
        return self._prefix + self._b.data[s:e]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))


class BundleSource(SessionSource):
    """A bundle file. Its events are the blocks that frame correctly; `verify` reports the rest."""

    name = "bundle"

    def __init__(self, path: Path, bundle=None):
        self.path = Path(path)
        self.bundle = bundle

    def read(self, session_id: str | None = None) -> RawSession:
        from .bundle import read_bundle

        b = self.bundle or read_bundle(self.path)
        sid = b.session_id
        if session_id and session_id != sid:
            raise SessionNotFound(f"{self.path} holds session {sid}, not {session_id}")
        # Nothing here frames the blocks: replay frames and verifies a big bundle in a child process
        # while this one decodes it. (A bundle has no transport provenance.)
        return RawSession(sid, BundleValues(b), self.name, str(self.path), writer_schemas={b.fingerprint: b.header.schema},
                          scanned=None, bundle=b)
