"""The transport interface every transport implements (the embedded local log, the Kafka adapter,
memory here, the producers' spooling sink), and the in-memory transport; tests/test_transport_contract.py
runs one contract over all of them."""

from __future__ import annotations

import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, NamedTuple

from ..errors import NotDurableError


@dataclass(frozen=True, slots=True)
class Message:
    """One offset of a partition. ``damaged`` is None for a message as it was sent. A source that
    finds an offset it cannot read back whole (the embedded log: a torn or corrupt block, a broken
    segment header, offsets whose bytes are gone) still returns it, in order, with ``damaged`` set
    to ``"<kind>: <detail>"`` and ``value`` holding the raw bytes found where the record should be
    (possibly empty). Consumers must quarantine such a message (ingest: a ``log_damaged`` dead
    letter) and go on: one bad offset costs that offset, never the partition."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int = 0
    damaged: str | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes
    value: bytes


class Sink(ABC):
    """Where producers put encoded events. Per key (session), order is preserved.

    Every sink follows one acknowledgement model. `send` hands a message over; it is *acknowledged*
    once it is durable (Kafka: acknowledged by all in-sync replicas; local log and spool: fsync-ed;
    memory: at once). Until then it is *in flight*. A sink that acknowledges in the background
    (Kafka) is watched with `in_flight`, `acknowledged` and `failure`; every sink can be stopped with
    `abort`, after which `unacknowledged` hands back exactly the messages not known to be durable.
    Keys map to partitions with `partition_for`, the partition a consumer finds them in."""

    @abstractmethod
    def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Queue one message. May block at most the sink's configured bound; never drops silently.
        Raises `NotDurableError` (``undelivered``: this message) when it cannot be queued, and after
        `abort`."""

    def send_control(self, topic: str, key: bytes, value: bytes) -> None:
        """`send` for the events that report a loss (gap, checkpoint, session end): a sink with a size
        bound (the spool) keeps a small reserve for them. Other sinks: plain `send`."""
        self.send(topic, key, value)

    def accepting(self) -> bool:
        """True when an ordinary event would be accepted now (False: a bounded sink is full)."""
        return True

    @abstractmethod
    def flush(self, timeout: float | None = None) -> None:
        """Return once every message sent so far is acknowledged. Otherwise raise `NotDurableError`,
        whose ``undelivered`` lists the messages that are not known to be durable, in send order (per
        key, a suffix of what was sent); the sink forgets them."""

    @abstractmethod
    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        """Create the topic if it does not exist."""

    @abstractmethod
    def partition_for(self, topic: str, key: bytes) -> int | None:
        """The partition messages with ``key`` land in (None when the topic does not exist yet and the
        sink cannot know; a sink with one stream: 0)."""

    # -- acknowledgements --------------------------------------------------------------------
    @abstractmethod
    def in_flight(self) -> int:
        """Messages sent and neither acknowledged nor handed back yet."""

    @abstractmethod
    def acknowledged(self) -> int:
        """How many messages this sink has had acknowledged so far (grows; a caller that sees it stand
        still while messages are in flight knows acknowledgements stopped)."""

    def failure(self) -> Exception | None:
        """The error of the oldest in-flight message if its delivery failed (the caller decides: retry,
        spool, refuse). Sinks that report failures only from `send`/`flush` return None."""
        return None

    @abstractmethod
    def unacknowledged(self) -> list[Outgoing]:
        """Every message not known to be acknowledged, in send order; the sink forgets them."""

    @abstractmethod
    def abort(self) -> None:
        """Stop at once, never blocking: nothing still in flight is sent after this (a message already
        on its way may still arrive: at least once), later sends raise `NotDurableError`, and
        `unacknowledged` hands back what was not acknowledged."""

    def close(self, timeout: float | None = None) -> None:
        """Flush and release resources."""


class MemorySink(Sink):
    """Keeps what is sent, in order, in memory (``sent``: (topic, key, value); ``values``: the
    values). For staging before a real send, benchmarks and tests; durable only as the process is:
    a message is acknowledged as it is sent. `MemorySource` reads it back per partition
    (``partitions`` per topic, crc32 of the key, like the local log)."""

    def __init__(self, partitions: int = 1) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.default_partitions = partitions
        self.topics: dict[str, int] = {}
        self._aborted = False

    def reopen(self) -> "MemorySink":
        """Another sink on the same memory (what a new process opening the same log would be)."""
        other = MemorySink(self.default_partitions)
        other.sent, other.topics = self.sent, self.topics
        return other

    @property
    def values(self) -> list[bytes]:
        return [v for _, _, v in self.sent]

    def clear(self) -> None:
        self.sent.clear()

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        if self._aborted:
            raise NotDurableError("the sink was aborted", [Outgoing(topic, key, value)])
        self.sent.append((topic, key, value))

    def flush(self, timeout: float | None = None) -> None:
        pass

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        self.topics.setdefault(topic, partitions or self.default_partitions)

    def partition_for(self, topic: str, key: bytes) -> int | None:
        return zlib.crc32(key) % self.topics.get(topic, self.default_partitions)

    def in_flight(self) -> int:
        return 0

    def acknowledged(self) -> int:
        return len(self.sent)

    def unacknowledged(self) -> list[Outgoing]:
        return []

    def abort(self) -> None:
        self._aborted = True


class ForwardingSink(Sink):
    """Passes every call to ``inner``: a base for sinks that watch or change a few calls of another
    (tests' fault injection, benchmarks' bookkeeping). `send_control` is not forwarded: it goes
    through this sink's `send`, so a subclass watching `send` sees control events too (an inner
    sink's control reserve is not used)."""

    def __init__(self, inner: Sink):
        self.inner = inner

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.inner.send(topic, key, value)

    def accepting(self) -> bool:
        return self.inner.accepting()

    def flush(self, timeout: float | None = None) -> None:
        self.inner.flush(timeout)

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        self.inner.ensure_topic(topic, partitions)

    def partition_for(self, topic: str, key: bytes) -> int | None:
        return self.inner.partition_for(topic, key)

    def in_flight(self) -> int:
        return self.inner.in_flight()

    def acknowledged(self) -> int:
        return self.inner.acknowledged()

    def failure(self) -> Exception | None:
        return self.inner.failure()

    def unacknowledged(self) -> list[Outgoing]:
        return self.inner.unacknowledged()

    def abort(self) -> None:
        self.inner.abort()

    def close(self, timeout: float | None = None) -> None:
        self.inner.close(timeout)


PartitionsCallback = Callable[[list[tuple[str, int]]], None]
PartitionCallback = Callable[[list[int]], None]


class Scan(NamedTuple):
    """What `Source.scan` read: the kept messages, the first offset read and the end offset."""

    messages: list[Message]
    first: int
    end: int


class Source(ABC):
    """Where consumers read encoded events from, by (topic, partition, offset)."""

    @abstractmethod
    def partitions(self, topic: str) -> list[int]:
        """Partition numbers of the topic (empty if it does not exist)."""

    @abstractmethod
    def assign(self, topic: str, offsets: dict[int, int]) -> None:
        """Read every partition of ``topic``; partition p starts at ``offsets[p]`` (else the beginning)."""

    @abstractmethod
    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        """Next messages, in offset order within each partition; empty after ``timeout_s`` if none.
        Damaged data never stops a partition (let alone the others): it comes back as messages with
        ``damaged`` set, one per offset (see `Message`)."""

    @abstractmethod
    def end_offsets(self, topic: str) -> dict[int, int]:
        """Offset one past the last message of each partition, now."""

    @abstractmethod
    def positions(self) -> dict[tuple[str, int], int]:
        """Next offset this source will return, per assigned (topic, partition)."""

    @abstractmethod
    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read ``partition`` from ``offset`` on (next poll)."""

    @abstractmethod
    def partition_for(self, topic: str, key: bytes) -> int | None:
        """The partition the transport's sink puts messages with ``key`` in (None: no such topic).
        Never creates anything."""

    @abstractmethod
    def scan(self, topic: str, partition: int, start: int | None = None, *, key: bytes | None = None,
             max_found: int | None = None, timeout_s: float = 120) -> "Scan":
        """Read one partition from ``start`` (its first available offset when None or out of range) up
        to its end offset as of the call, keeping the messages whose key is ``key`` (all when None;
        a transport that stores no keys derives the key from the value: the session id), stopping
        once ``max_found`` are kept. Independent of `assign`/`poll`: positions do not move. Nothing is
        decoded, nothing committed. Damaged messages (see `Message`) are kept only when ``key`` is
        None."""

    # -- consumer groups (scale-out) -------------------------------------------------------
    def subscribe(self, topic: str, group: str, on_assigned: PartitionCallback, on_revoked: PartitionCallback) -> None:
        """Join consumer group ``group`` on ``topic``: each partition is read by exactly one member at a time.

        Both callbacks run during `poll` (on the polling thread, or on the client's IO thread: they
        must not call blocking source methods). ``on_revoked(partitions)`` runs before
        partitions are taken away: the caller must finish (commit) or abort its work on them before
        returning, because another member may start reading them right after. ``on_assigned(partitions)``
        runs once partitions are this member's: the caller seeks each one to the offset stored with its
        data (the group itself stores no offsets; the warehouse does)."""
        raise NotImplementedError(f"{type(self).__name__} has no consumer groups")

    def seek_to_beginning(self, topic: str, partition: int) -> None:
        """Read ``partition`` from its first available message (non-blocking; resolved on the next poll)."""
        self.seek(topic, partition, self.beginning_offsets(topic).get(partition, 0))

    def beginning_offsets(self, topic: str) -> dict[int, int]:
        """First offset still available per partition (above 0 once retention deleted old messages)."""
        return {p: 0 for p in self.partitions(topic)}

    def record_at(self, topic: str, partition: int, offset: int) -> bytes | None:
        """The value at one offset, read without moving this source; None when this source cannot
        tell cheaply (the default), or the offset is gone or damaged. Ingest checks with it that the
        record it last ingested from a partition is still the one there (a replaced log is not)."""
        return None

    def assigned(self) -> list[tuple[str, int]]:
        """The (topic, partition)s this source reads now."""
        return sorted(self.positions())

    def close(self) -> None:
        """Release resources. Offsets are never committed here: the warehouse owns them."""


class MemorySource(Source):
    """Reads what a `MemorySink` holds, per partition (offsets: the order of sends within a partition)."""

    def __init__(self, sink: MemorySink):
        self.sink = sink
        self._positions: dict[tuple[str, int], int] = {}

    def _log(self, topic: str, partition: int) -> list[Message]:
        out: list[Message] = []
        for t, k, v in self.sink.sent:
            if t == topic and self.sink.partition_for(t, k) == partition:
                out.append(Message(t, partition, len(out), k, v))
        return out

    def partitions(self, topic: str) -> list[int]:
        n = self.sink.topics.get(topic)
        if n is None and any(t == topic for t, _, _ in self.sink.sent):
            n = self.sink.default_partitions
        return list(range(n or 0))

    def partition_for(self, topic: str, key: bytes) -> int | None:
        return self.sink.partition_for(topic, key) if self.partitions(topic) else None

    def assign(self, topic: str, offsets: dict[int, int]) -> None:
        for p in self.partitions(topic):
            self._positions[(topic, p)] = offsets.get(p, 0)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._positions[(topic, partition)] = offset

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            out: list[Message] = []
            for (t, p), pos in sorted(self._positions.items()):
                got = self._log(t, p)[pos:pos + max_records - len(out)]
                if got:
                    self._positions[(t, p)] = got[-1].offset + 1
                    out.extend(got)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def end_offsets(self, topic: str) -> dict[int, int]:
        return {p: len(self._log(topic, p)) for p in self.partitions(topic)}

    def positions(self) -> dict[tuple[str, int], int]:
        return dict(self._positions)

    def scan(self, topic: str, partition: int, start: int | None = None, *, key: bytes | None = None,
             max_found: int | None = None, timeout_s: float = 120) -> Scan:
        msgs = self._log(topic, partition)
        first = 0 if start is None or not 0 <= start <= len(msgs) else start
        kept = [m for m in msgs[first:] if key is None or m.key == key]
        return Scan(kept[:max_found] if max_found is not None else kept, first, len(msgs))
