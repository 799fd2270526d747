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

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from agentledger.schemas.contract import SchemaStore, load_store
from agentledger.schemas.errors import AgentLedgerError
from agentledger.schemas.sessionids import Place
from agentledger.schemas.transport import Source, kafka_source, local_source

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


# --- a transport (Kafka, the embedded local log) ---------------------------------------------------


class TransportSessionSource(SessionSource):
    """Scans the one partition the session's key maps to (`Source.partition_for`), from the first
    offset the warehouse recorded for it when known (validated: the message there must belong to
    the session), else from the partition's beginning, up to the end offset at the time of the call.
    ``open_source`` opens the transport's `Source` (closed after each use)."""

    name = "?"
    prefix_search = False  # may `place` scan every partition for id prefixes?

    def __init__(self, open_source: Callable[[], Source], topic: str, where: str, hint: OffsetHint | None = None,
                 timeout_s: float = 300):
        self.open_source = open_source
        self.topic = topic
        self.where = where
        self.place_name = f"{where} topic {topic}"
        self.hint = hint
        self.timeout_s = timeout_s

    @contextmanager
    def _source(self) -> Iterator[Source]:
        src = self.open_source()
        try:
            yield src
        finally:
            src.close()

    def read(self, session_id: str) -> RawSession:
        key = session_id.encode()
        with self._source() as src:
            p = src.partition_for(self.topic, key)
            if p is None:
                raise SessionNotFound(f"topic {self.topic} does not exist in {self.where}")
            start = None
            h = self.hint
            if h is not None and h.topic == self.topic and h.partition == p:
                start = h.first_offset
            scan = src.scan(self.topic, p, start, key=key, timeout_s=self.timeout_s)
            if start is not None and (not scan.messages or scan.messages[0].offset != start):
                # The hint did not point at this session's first event (topic recreated?): scan it all.
                scan = src.scan(self.topic, p, None, key=key, timeout_s=self.timeout_s)
        msgs, first, end = scan
        if not msgs:
            raise SessionNotFound(f"no such session: {session_id} (no message of it in {self.where} {self.topic}/{p}, "
                                  f"offsets {first}..{end - 1})")
        values, prov, dropped = _dedupe([m.value for m in msgs], [Provenance(m.topic, m.partition, m.offset) for m in msgs])
        return RawSession(session_id, values, self.name, f"{self.where} {self.topic}/{p} offsets {first}..{end - 1}",
                          prov, duplicates_dropped=dropped, scanned=end - first)

    def _session_ids(self, src: Source, partitions: Iterable[int], wanted, limit: int) -> list[str]:
        """Up to ``limit`` distinct session ids of the given partitions for which ``wanted(id)``."""
        found: list[str] = []
        for p in partitions:
            for m in src.scan(self.topic, p, timeout_s=self.timeout_s).messages:
                sid = session_of(m.value)
                if sid is not None and sid not in found and wanted(sid):
                    found.append(sid)
                    if len(found) >= limit:
                        return found
        return found

    def place(self) -> Place:
        """For `schemas.sessionids.resolve`: a full id is looked up in the partition its key maps to
        (up to its first message); prefixes only where ``prefix_search`` (reading a whole Kafka topic
        for a prefix is not worth it)."""

        def exact(sid: str) -> bool:
            with self._source() as src:
                p = src.partition_for(self.topic, sid.encode())
                return p is not None and bool(src.scan(self.topic, p, key=sid.encode(), max_found=1,
                                                       timeout_s=self.timeout_s).messages)

        def starting(prefix: str, n: int) -> list[str]:
            if not self.prefix_search:
                return []
            with self._source() as src:
                return self._session_ids(src, src.partitions(self.topic), lambda x: x.startswith(prefix), n)

        return Place(self.place_name, exact, starting)


class KafkaSessionSource(TransportSessionSource):
    name = "kafka"

    def __init__(self, bootstrap_servers: str, topic: str, hint: OffsetHint | None = None, timeout_s: float = 300):
        super().__init__(lambda: kafka_source(bootstrap_servers), topic, f"kafka {bootstrap_servers}", hint, timeout_s)
        self.bootstrap_servers = bootstrap_servers
        self.place_name = f"Kafka topic {topic} (full ids only)"


class LocalLogSessionSource(TransportSessionSource):
    """The embedded log stores no keys: its scan matches the session id each record starts with."""

    name = "log"
    prefix_search = True

    def __init__(self, log_dir: Path, topic: str, hint: OffsetHint | None = None):
        super().__init__(lambda: local_source(Path(log_dir)), topic, f"local log {log_dir}", hint)
        self.log_dir = Path(log_dir)
        self.place_name = f"the local log {log_dir}"


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
