"""The producer spool: a durable, bounded, ordered holding area for events Kafka has not taken yet.

The spool is the embedded log (`schemas.transport.local.LocalLog`) rooted at
``$AGENTLEDGER_HOME/spool`` (or AGENTLEDGER_SPOOL_DIR): one topic directory per Kafka topic, each
with ONE partition, so the spool is a single FIFO per topic and every session's events sit in it
in the order they were recorded. Next to the log:

    <topic>/0/drained.json   {"offset": N}: every record below N is acknowledged by Kafka
    .drain.lock               flock held by whichever process is draining
    overflow.json            what was refused because the spool was full (never a silent drop)

Guarantees:
- A record is durable once `append` returns (the log fsyncs segment and index).
- `drain` sends records in spool order with an idempotent, acks=all producer and advances the
  cursor only past records Kafka acknowledged (the cursor file is replaced atomically and fsynced),
  so nothing Kafka acknowledged is sent again by a later drain. A crash between the acknowledgement
  and the cursor write re-sends at most one drain batch; the warehouse's chain guard turns those
  copies into ``duplicate`` dead letters and keeps each event exactly once.
- Fully drained segments are deleted (the newest segment always stays so offsets keep counting).
- A full disk or a crash never makes the spool unusable: the log undoes a failed append and repairs
  what an interrupted one left (see `schemas.transport.local`). A spooled record that cannot be read
  back whole (a damaged block) is not sent: drain writes its bytes and the reason to a
  ``<segment>.quarantine-<time>`` file next to its segment and goes on with the next record.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from agentledger.schemas.envelope import peek
from agentledger.schemas.errors import NotDurableError, TransportError
from agentledger.schemas.transport.base import Outgoing
from agentledger.schemas.transport.local import IDX_ENTRY, LocalLog, append_outgoing

SPOOL_SEGMENT_BYTES = 8 * 1024 * 1024
DRAIN_BATCH = 5000


@dataclass
class OverflowStats:
    """Events refused while the spool was full (persisted in overflow.json, shown by `spool status`)."""

    events: int = 0
    bytes: int = 0
    first_at: str | None = None
    last_at: str | None = None
    sessions: dict[str, int] = field(default_factory=dict)

    def add(self, session_id: str, nbytes: int) -> None:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.events += 1
        self.bytes += nbytes
        self.first_at = self.first_at or now
        self.last_at = now
        if session_id in self.sessions or len(self.sessions) < 1000:
            self.sessions[session_id] = self.sessions.get(session_id, 0) + 1

    def merge(self, other: "OverflowStats") -> "OverflowStats":
        s = dict(self.sessions)
        for k, v in other.sessions.items():
            if k in s or len(s) < 1000:
                s[k] = s.get(k, 0) + v
        firsts = [x for x in (self.first_at, other.first_at) if x]
        lasts = [x for x in (self.last_at, other.last_at) if x]
        return OverflowStats(self.events + other.events, self.bytes + other.bytes,
                             min(firsts) if firsts else None, max(lasts) if lasts else None, s)


class Spool:
    def __init__(self, root: Path, *, segment_bytes: int = SPOOL_SEGMENT_BYTES):
        self.root = Path(root)
        self.log = LocalLog(self.root, default_partitions=1, segment_bytes=segment_bytes)

    # -- writing -------------------------------------------------------------------------------
    def append(self, topic: str, values: list[bytes]) -> int:
        """Append durably (fsync); returns the offset of the first value. Raises OSError/TransportError
        (`AppendFailed` says which prefix is durable)."""
        self.log.ensure_topic(topic, 1)
        return self.log.append(topic, 0, values)

    def append_outgoing(self, pending: list[Outgoing]) -> None:
        """Append messages of any topics, send order kept per topic; raises `NotDurableError` listing
        exactly the messages that are not durable (the others are in the spool)."""
        try:
            for topic in dict.fromkeys(m.topic for m in pending):
                self.log.ensure_topic(topic, 1)
        except (OSError, TransportError) as exc:
            raise NotDurableError(f"spool {self.root}: {exc}", pending) from exc
        append_outgoing(self.log, pending, lambda m: 0)

    # -- positions -----------------------------------------------------------------------------
    def topics(self) -> list[str]:
        return self.log.topics()

    def _cursor_path(self, topic: str) -> Path:
        return self.log.topic_dir(topic) / "0" / "drained.json"

    def cursor(self, topic: str) -> int:
        try:
            return int(json.loads(self._cursor_path(topic).read_text())["offset"])
        except FileNotFoundError:
            return self._first_offset(topic)
        except (ValueError, KeyError) as exc:
            raise TransportError(f"spool cursor {self._cursor_path(topic)} is unreadable: {exc}") from exc

    def _first_offset(self, topic: str) -> int:
        bases = self.log.segments(topic, 0)
        return bases[0] if bases else 0

    def end(self, topic: str) -> int:
        return self.log.end_offset(topic, 0)

    def undrained(self, topic: str | None = None) -> int:
        topics = [topic] if topic else self.topics()
        return sum(max(0, self.end(t) - self.cursor(t)) for t in topics)

    def _commit(self, topic: str, offset: int) -> None:
        path = self._cursor_path(topic)
        tmp = path.with_name(f".drained.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"offset": offset, "at": dt.datetime.now(dt.timezone.utc).isoformat()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._retain(topic, offset)

    def _retain(self, topic: str, cursor: int) -> None:
        bases = self.log.segments(topic, 0)
        for base, nxt in zip(bases, bases[1:]):
            if nxt <= cursor:
                seg = self.log.segment_path(topic, 0, base)
                for p in (seg, seg.with_suffix(".idx")):
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass

    def usage_bytes(self, topic: str | None = None) -> int:
        """Bytes of records not yet drained (what the size bound counts)."""
        total = 0
        for t in [topic] if topic else self.topics():
            cur = self.cursor(t)
            for base in self.log.segments(t, 0):
                seg = self.log.segment_path(t, 0, base)
                try:
                    size = seg.stat().st_size
                    count = seg.with_suffix(".idx").stat().st_size // IDX_ENTRY.size
                except FileNotFoundError:
                    continue
                if base + count <= cur:
                    continue
                if base >= cur:
                    total += size
                    continue
                with open(seg.with_suffix(".idx"), "rb") as f:
                    f.seek((cur - base) * IDX_ENTRY.size)
                    pos, _ = IDX_ENTRY.unpack(f.read(IDX_ENTRY.size))
                total += size - pos
        return total

    # -- draining ------------------------------------------------------------------------------
    @contextmanager
    def drain_lock(self, blocking: bool = False) -> Iterator[bool]:
        """Hold the cross-process drain lock; yields False (and holds nothing) if another process has it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".drain.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def drain_batch(self, topic: str, sink, *, flush_timeout: float, max_records: int = DRAIN_BATCH) -> int:
        """Send the next records of ``topic`` through ``sink`` (a KafkaSink), wait for acknowledgements
        and advance the cursor past the acknowledged prefix. Caller holds the drain lock.
        Returns records drained; raises NotDurableError (cursor at the first unacknowledged record)."""
        cur = self.cursor(topic)
        msgs = self.log.read(topic, 0, cur, max_records)
        if not msgs:
            return 0
        bad = next((i for i, m in enumerate(msgs) if m.damaged is not None), None)
        if bad == 0:
            # Records the spool cannot read back whole are not sent: their bytes go to a quarantine
            # file next to their segment (with the reason), and draining goes on after them.
            k = next((i for i, m in enumerate(msgs) if m.damaged is None), len(msgs))
            for m in msgs[:k]:
                self.log.quarantine_message(m)
            self._commit(topic, cur + k)
            return k
        if bad is not None:
            msgs = msgs[:bad]
        order = {}
        sent = 0
        error: NotDurableError | None = None
        for i, m in enumerate(msgs):
            order[id(m.value)] = i
            try:
                sink.send(topic, peek(m.value).session_id.encode(), m.value)
            except NotDurableError as exc:
                error = exc
                break
            sent += 1
        acked = sent
        try:
            sink.flush(flush_timeout)
        except NotDurableError as exc:
            # Everything before the first unacknowledged record is in Kafka: never send it again.
            acked = min((order.get(id(o.value), sent) for o in exc.undelivered), default=0)
            error = error or exc
        if acked:
            self._commit(topic, cur + acked)
        if error is not None:
            raise error
        return acked

    # -- overflow ------------------------------------------------------------------------------
    def overflow(self) -> OverflowStats:
        try:
            d = json.loads((self.root / "overflow.json").read_text())
        except (FileNotFoundError, ValueError):
            return OverflowStats()
        return OverflowStats(d.get("events", 0), d.get("bytes", 0), d.get("first_at"), d.get("last_at"),
                             d.get("sessions", {}))

    def record_overflow(self, stats: OverflowStats) -> None:
        """Add ``stats`` to overflow.json (under a lock; readers see the old or the new file)."""
        if not stats.events:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".overflow.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            merged = self.overflow().merge(stats)
            tmp = self.root / f".overflow.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(merged.__dict__, sort_keys=True))
            os.replace(tmp, self.root / "overflow.json")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        topics = []
        for t in self.topics():
            cur, end = self.cursor(t), self.end(t)
            oldest = None
            if end > cur:
                try:
                    first = self.log.read(t, 0, cur, 1)
                    if first:
                        oldest = dt.datetime.fromtimestamp(peek(first[0].value).occurred_at_us / 1e6,
                                                           dt.timezone.utc).isoformat()
                except Exception:  # noqa: BLE001 -- status must show what it can
                    oldest = None
            topics.append({"topic": t, "undrained_events": max(0, end - cur), "undrained_bytes": self.usage_bytes(t),
                           "drained_offset": cur, "end_offset": end, "oldest_undrained_at": oldest,
                           "segments": len(self.log.segments(t, 0))})
        ov = self.overflow()
        return {"spool": str(self.root), "topics": topics,
                "undrained_events": sum(t["undrained_events"] for t in topics),
                "undrained_bytes": sum(t["undrained_bytes"] for t in topics),
                "overflow_events": ov.events, "overflow_bytes": ov.bytes, "overflow_first_at": ov.first_at,
                "overflow_last_at": ov.last_at, "overflow_sessions": len(ov.sessions)}


def drain(spool: Spool, make_sink: Callable[[], object], *, timeout_s: float = 60.0, flush_timeout: float = 30.0,
          on_progress: Callable[[int], None] | None = None, wait_for_lock: bool = True) -> dict:
    """Drain every topic of the spool to Kafka (used by `agentledger spool drain`).
    Returns {"drained": n, "remaining": m}; raises NotDurableError/TransportError if Kafka fails."""
    drained = 0
    deadline = time.monotonic() + timeout_s
    with spool.drain_lock(blocking=wait_for_lock) as held:
        if not held:
            return {"drained": 0, "remaining": spool.undrained(), "locked": True}
        sink = make_sink()
        try:
            for topic in spool.topics():
                sink.ensure_topic(topic)
                while time.monotonic() < deadline:
                    n = spool.drain_batch(topic, sink, flush_timeout=flush_timeout)
                    if not n:
                        break
                    drained += n
                    if on_progress:
                        on_progress(n)
        finally:
            sink.close(timeout=5)
    return {"drained": drained, "remaining": spool.undrained(), "locked": False}
