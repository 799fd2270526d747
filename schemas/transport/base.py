"""The transport interface shared by the Kafka adapter and the embedded local log."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable


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
    """Where producers put encoded events. Per key (session), order is preserved."""

    @abstractmethod
    def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Queue one message. May block at most the sink's configured bound; never drops silently."""

    @abstractmethod
    def flush(self, timeout: float | None = None) -> None:
        """Return once every message sent so far is durable: acknowledged by all in-sync replicas
        (Kafka, acks=all) or fsync-ed (local log). Otherwise raise `NotDurableError`, whose
        ``undelivered`` lists the messages that are not known to be durable, in send order."""

    @abstractmethod
    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        """Create the topic if it does not exist."""

    def close(self, timeout: float | None = None) -> None:
        """Flush and release resources."""


class MemorySink(Sink):
    """Keeps what is sent, in order, in memory (``sent``: (topic, key, value); ``values``: the
    values). For staging before a real send, benchmarks and tests; durable only as the process is."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    @property
    def values(self) -> list[bytes]:
        return [v for _, _, v in self.sent]

    def clear(self) -> None:
        self.sent.clear()

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, value))

    def flush(self, timeout: float | None = None) -> None:
        pass

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        pass


PartitionsCallback = Callable[[list[tuple[str, int]]], None]
PartitionCallback = Callable[[list[int]], None]


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

    def seek(self, topic: str, partition: int, offset: int) -> None:
        raise NotImplementedError

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

    def assigned(self) -> list[tuple[str, int]]:
        """The (topic, partition)s this source reads now."""
        return sorted(self.positions())

    def close(self) -> None:
        """Release resources. Offsets are never committed here: the warehouse owns them."""
