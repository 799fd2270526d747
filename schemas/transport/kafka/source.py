"""The Kafka source: kafka-python's consumer behind `Source` (polling, consumer groups, scans)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError

from ...errors import TransportError
from ..base import Message, PartitionCallback, Scan, Source
from .clients import consumer_client, partition_for_key


class KafkaSource(Source):
    """kafka-python's consumer behind `Source`. Offsets are never committed to Kafka: the warehouse
    stores them in the same transaction as the rows (see consumers/ingest/)."""

    def __init__(self, bootstrap_servers: str, **overrides: Any):
        self.bootstrap_servers = bootstrap_servers
        self._overrides = overrides
        self._consumer = consumer_client(bootstrap_servers, **overrides)

    def partitions(self, topic: str) -> list[int]:
        try:
            parts = self._consumer.partitions_for_topic(topic)
        except KafkaError as exc:
            raise TransportError(f"cannot read the partitions of {topic}: {exc}") from exc
        return sorted(parts) if parts else []

    def partition_for(self, topic: str, key: bytes) -> int | None:
        parts = self.partitions(topic)
        return parts[partition_for_key(key, len(parts))] if parts else None

    def scan(self, topic: str, partition: int, start: int | None = None, *, key: bytes | None = None,
             max_found: int | None = None, timeout_s: float = 120) -> Scan:
        """With a consumer of its own: the source's assignment and positions do not move."""
        overrides = {k: v for k, v in self._overrides.items() if k != "client_id"}
        return Scan(*scan_partition(self.bootstrap_servers, topic, partition, start, key=key, timeout_s=timeout_s,
                                    max_found=max_found, **overrides))

    def assign(self, topic: str, offsets: dict[int, int]) -> None:
        tps = [TopicPartition(topic, p) for p in self.partitions(topic)]
        self._consumer.assign(tps)
        for tp in tps:
            if tp.partition in offsets:
                self._consumer.seek(tp, offsets[tp.partition])
            else:
                self._consumer.seek_to_beginning(tp)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._consumer.seek(TopicPartition(topic, partition), offset)

    def subscribe(self, topic: str, group: str, on_assigned: PartitionCallback, on_revoked: PartitionCallback) -> None:
        """Kafka's group protocol assigns partitions among the members of ``group`` (the consumer must
        have been created with ``group_id=group``). Offsets are never committed to the group."""
        if self._consumer.config.get("group_id") != group:
            raise TransportError(f"the Kafka consumer was created for group {self._consumer.config.get('group_id')!r}, "
                                 f"not {group!r}")

        def parts(tps: Iterable[TopicPartition]) -> list[int]:
            return sorted(tp.partition for tp in tps if tp.topic == topic)

        # kafka-python ships no types, so its ConsumerRebalanceListener is Any to mypy.
        class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
                on_revoked(parts(revoked))

            def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
                on_assigned(parts(assigned))

        self._consumer.subscribe([topic], listener=_Listener())

    def seek_to_beginning(self, topic: str, partition: int) -> None:
        self._consumer.seek_to_beginning(TopicPartition(topic, partition))

    def beginning_offsets(self, topic: str) -> dict[int, int]:
        tps = [TopicPartition(topic, p) for p in self.partitions(topic)]
        return {tp.partition: off for tp, off in self._consumer.beginning_offsets(tps).items()}

    def assigned(self) -> list[tuple[str, int]]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            raise TransportError(f"Kafka poll failed: {exc}") from exc
        out: list[Message] = []
        for tp, records in batches.items():
            topic, partition = tp.topic, tp.partition
            out.extend(Message(topic, partition, r.offset, r.key, r.value, r.timestamp) for r in records)
        return out

    def end_offsets(self, topic: str) -> dict[int, int]:
        tps = [TopicPartition(topic, p) for p in self.partitions(topic)]
        return {tp.partition: off for tp, off in self._consumer.end_offsets(tps).items()}

    def positions(self) -> dict[tuple[str, int], int]:
        return {(tp.topic, tp.partition): self._consumer.position(tp) for tp in self._consumer.assignment()}

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def scan_partition(bootstrap_servers: str, topic: str, partition: int, start: int | None = None, *,
                   key: bytes | None = None, timeout_s: float = 120, max_found: int | None = None,
                   **overrides: Any) -> tuple[list[Message], int, int]:
    """Read one partition from ``start`` (its beginning when None or out of range) up to its end offset
    as of the call, keeping only messages whose key is ``key`` (all when None), stopping early once
    ``max_found`` are kept. Nothing is decoded and no offset is committed. Returns (messages, first
    offset read, end offset)."""
    consumer = consumer_client(bootstrap_servers, "agentledger-scan", **overrides)
    max_records = consumer.config["max_poll_records"]
    tp = TopicPartition(topic, partition)
    out: list[Message] = []
    try:
        consumer.assign([tp])
        begin = consumer.beginning_offsets([tp])[tp]
        end = consumer.end_offsets([tp])[tp]
        first = begin if start is None or start < begin or start > end else start
        consumer.seek(tp, first)
        deadline = time.monotonic() + timeout_s
        pos = first
        while pos < end:
            if time.monotonic() > deadline:
                raise TransportError(f"{topic}/{partition}: read {pos - first} of {end - first} messages in "
                                     f"{timeout_s:.0f}s; gave up")
            for records in consumer.poll(timeout_ms=500, max_records=max_records).values():
                for r in records:
                    if r.offset >= end:
                        continue
                    if key is None or r.key == key:
                        out.append(Message(topic, partition, r.offset, r.key, r.value, r.timestamp))
                    pos = max(pos, r.offset + 1)
            if max_found is not None and len(out) >= max_found:
                return out[:max_found], first, end
            pos = max(pos, consumer.position(tp))
        return out, first, end
    except KafkaError as exc:
        raise TransportError(f"reading {topic}/{partition} failed: {exc}") from exc
    finally:
        consumer.close(autocommit=False)
