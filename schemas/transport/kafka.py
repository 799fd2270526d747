"""The Kafka adapter: the only module that imports kafka-python.

Producer guarantees: ``acks="all"`` and ``enable_idempotence=True`` are passed explicitly (kafka-python
silently turns idempotence off when some other settings are given); the key is the session id, so
one session maps to one partition and keeps its order. Consumers never commit offsets to Kafka:
the warehouse stores them in the same transaction as the rows (see consumers/ingest.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

from ..errors import NotDurableError, TransportError
from .base import Message, Outgoing, PartitionCallback, Sink, Source

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "compression_type": "lz4",
    "linger_ms": 20,
    "batch_size": 512 * 1024,
    "max_request_size": 1024 * 1024,
    "max_in_flight_requests_per_connection": 5,
    "request_timeout_ms": 15_000,
    "delivery_timeout_ms": 60_000,
    "max_block_ms": 10_000,
}

CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "max_poll_records": 50_000,
    "fetch_min_bytes": 1,
    "fetch_max_wait_ms": 200,
    "check_crcs": True,
}


def partition_for_key(key: bytes, partitions: int) -> int:
    """Partition the Java and kafka-python default partitioners choose for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int, timeout_s: float = 30) -> None:
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="agentledger-admin",
                                 request_timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        raise TransportError(f"cannot reach Kafka at {bootstrap_servers}: {exc}") from exc
    try:
        if topic in set(admin.list_topics()):
            return
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    except KafkaError as exc:
        raise TransportError(f"cannot create topic {topic}: {exc}") from exc
    finally:
        admin.close()
    # Metadata propagation: wait until the topic is visible with all its partitions.
    deadline = time.monotonic() + timeout_s
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers)
    try:
        while time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts and len(parts) >= partitions:
                return
            time.sleep(0.1)
    finally:
        consumer.close()
    raise TransportError(f"topic {topic} did not appear within {timeout_s}s")


class KafkaSink(Sink):
    def __init__(self, bootstrap_servers: str, default_partitions: int = 6, **overrides: Any):
        self.bootstrap_servers = bootstrap_servers
        self.default_partitions = default_partitions
        config = {**PRODUCER_DEFAULTS, **overrides}
        config["acks"] = "all"
        config["enable_idempotence"] = True
        try:
            self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers, client_id="agentledger", **config)
        except KafkaError as exc:
            raise TransportError(f"cannot connect a producer to {bootstrap_servers}: {exc}") from exc
        self._inflight: list[tuple[Outgoing, Any]] = []
        self._topics: set[str] = set()

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        if topic not in self._topics:
            ensure_topic(self.bootstrap_servers, topic, partitions or self.default_partitions)
            self._topics.add(topic)

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        msg = Outgoing(topic, key, value)
        try:
            fut = self._producer.send(topic, key=key, value=value)
        except KafkaError as exc:
            raise NotDurableError(f"Kafka did not accept the event: {exc}", [msg]) from exc
        self._inflight.append((msg, fut))

    def flush(self, timeout: float | None = None) -> None:
        inflight, self._inflight = self._inflight, []
        try:
            self._producer.flush(timeout=timeout)
        except KafkaTimeoutError:
            pass  # the futures below say which messages are not acknowledged
        failed = []
        first_error = None
        for msg, fut in inflight:
            if not fut.is_done or fut.failed():
                failed.append(msg)
                if first_error is None:
                    first_error = fut.exception if fut.is_done else "no acknowledgement before the timeout"
        if failed:
            raise NotDurableError(f"{len(failed)} event(s) not acknowledged by Kafka: {first_error}", failed)

    def close(self, timeout: float | None = None) -> None:
        try:
            self.flush(timeout)
        finally:
            self._producer.close(timeout=timeout if timeout is not None else 5)

    def metrics(self) -> dict:
        return self._producer.metrics()


class KafkaSource(Source):
    def __init__(self, bootstrap_servers: str, **overrides: Any):
        config = {**CONSUMER_DEFAULTS, **overrides}
        config["enable_auto_commit"] = False
        try:
            self._consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentledger-ingest", **config)
        except KafkaError as exc:
            raise TransportError(f"cannot connect a consumer to {bootstrap_servers}: {exc}") from exc

    def partitions(self, topic: str) -> list[int]:
        parts = self._consumer.partitions_for_topic(topic)
        return sorted(parts) if parts else []

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

        def parts(tps) -> list[int]:
            return sorted(tp.partition for tp in tps if tp.topic == topic)

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                on_revoked(parts(revoked))

            def on_partitions_assigned(self, assigned):
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


def raw_poll(bootstrap_servers: str, topic: str, expected: int, timeout_s: float = 300) -> tuple[int, float]:
    """Baseline for benchmarks: plain kafka-python poll of a whole topic, values touched, nothing
    decoded or stored. Returns (messages, seconds)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, **{**CONSUMER_DEFAULTS})
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        n = 0
        nbytes = 0
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        while n < expected and time.perf_counter() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=CONSUMER_DEFAULTS["max_poll_records"]).values():
                n += len(records)
                nbytes += sum(len(r.value) for r in records)
        return n, time.perf_counter() - t0
    finally:
        consumer.close(autocommit=False)


def partition_count(bootstrap_servers: str, topic: str, timeout_s: float = 30) -> int:
    """Partitions of ``topic`` (0 when it does not exist)."""
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentledger-replay",
                                 request_timeout_ms=int(timeout_s * 1000) + 1000)
    except KafkaError as exc:
        raise TransportError(f"cannot connect a consumer to {bootstrap_servers}: {exc}") from exc
    try:
        parts = consumer.partitions_for_topic(topic)
        return len(parts) if parts else 0
    except KafkaError as exc:
        raise TransportError(f"cannot read the partitions of {topic}: {exc}") from exc
    finally:
        consumer.close(autocommit=False)


def scan_partition(bootstrap_servers: str, topic: str, partition: int, start: int | None = None, *,
                   key: bytes | None = None, timeout_s: float = 120, **overrides: Any) -> tuple[list[Message], int, int]:
    """Read one partition from ``start`` (its beginning when None or out of range) up to its end offset
    as of the call, keeping only messages whose key is ``key`` (all when None). Nothing is decoded
    and no offset is committed. Returns (messages, first offset read, end offset)."""
    config = {**CONSUMER_DEFAULTS, **overrides}
    config["enable_auto_commit"] = False
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentledger-replay", **config)
    except KafkaError as exc:
        raise TransportError(f"cannot connect a consumer to {bootstrap_servers}: {exc}") from exc
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
            for records in consumer.poll(timeout_ms=500, max_records=CONSUMER_DEFAULTS["max_poll_records"]).values():
                for r in records:
                    if r.offset >= end:
                        continue
                    if key is None or r.key == key:
                        out.append(Message(topic, partition, r.offset, r.key, r.value, r.timestamp))
                    pos = max(pos, r.offset + 1)
            pos = max(pos, consumer.position(tp))
        return out, first, end
    except KafkaError as exc:
        raise TransportError(f"reading {topic}/{partition} failed: {exc}") from exc
    finally:
        consumer.close(autocommit=False)
