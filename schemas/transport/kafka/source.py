"""The Kafka source: kafka-python's consumer behind `Source` (polling, consumer groups, scans)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.protocol.consumer import IsolationLevel
from kafka.errors import KafkaError
from kafka.record import MemoryRecords

from ...errors import TransportError
from ..base import Message, PartitionCallback, Scan, Source
from .clients import consumer_client, partition_for_key


# A poll that may still return at least this many messages takes a plain fetch whole even when it
# holds more (at most one fetch, max_partition_fetch_bytes, beyond the poll's bound): cutting it would
# parse the rest record by record (measured: ~40 % of a 100,000-message batch's messages). Smaller
# polls (small --batch) stay exact.
RAW_OVERSHOOT_FROM = 10_000


class KafkaRaw:
    """One partition's fetch as kafka-python received it, not parsed into records: its record batches'
    bytes (message format v2, uncompressed or LZ4; batches before ``fetch_offset`` and a trailing
    partial batch included, as the broker sent them), of which the ``count`` messages at offsets
    ``offset`` .. ``offset + count - 1`` are the ones `KafkaSource.poll` would return. The native
    decoder reads ``data`` as it is (chunk kind 1, native/avro2arrow/src/ingest.rs); `messages()` are
    exactly those `poll` returns, parsed by kafka-python itself."""

    frame_kind = 1  # schemas.native.chunks_frame
    __slots__ = ("topic", "partition", "fetch_offset", "offset", "count", "data")

    def __init__(self, topic: str, partition: int, fetch_offset: int, offset: int, count: int, data: bytes):
        self.topic, self.partition, self.fetch_offset = topic, partition, fetch_offset
        self.offset, self.count, self.data = offset, count, data

    def messages(self) -> list[Message]:
        part = Fetcher.PartitionRecords(self.fetch_offset, TopicPartition(self.topic, self.partition),
                                        MemoryRecords(self.data), check_crcs=True)
        return [Message(self.topic, self.partition, r.offset, r.key, r.value, r.timestamp) for r in part.take()]


class _RawPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc]
    """kafka-python's parsed fetch (`Fetcher.PartitionRecords`), handing out the whole fetch as one
    `KafkaRaw` when it is plain (message format v2, CRCs right, uncompressed or LZ4, offsets without
    gaps, read uncommitted); anything else is parsed record by record as kafka-python always does
    (and raises what it raises). Installed on a `KafkaSource`'s consumer by `poll_raw`."""

    def __init__(self, fetch_offset: int, tp: TopicPartition, records: MemoryRecords, **kw: Any):
        super().__init__(fetch_offset, tp, records, **kw)
        self._raw_bytes = getattr(records, "_buffer", None)  # kafka-python 3.0: the fetch's bytes
        self._plain_isolation = kw.get("isolation_level", IsolationLevel.READ_UNCOMMITTED) == IsolationLevel.READ_UNCOMMITTED

    def take(self, n: int | None = None) -> list[Any]:
        """Up to ``n`` messages (the fetcher's count of what this poll may still return): the whole
        fetch as one `KafkaRaw` followed by ``count - 1`` Nones (so that the fetcher counts its
        messages; `KafkaSource._poll` drops the Nones), else record by record as kafka-python does --
        what is not plain, and a fetch bigger than a small ``n`` (the rest stays for the next poll;
        `RAW_OVERSHOOT_FROM`)."""
        if self.record_iterator is not None and self.records_read == 0 and self._next_inline_exception is None:
            raw = self._whole(n)
            if raw is not None:
                return raw
        return list(super().take(n))

    def _whole(self, budget: int | None) -> list[Any] | None:
        data = self._raw_bytes
        if data is None or not self._plain_isolation:
            return None
        data = bytes(data)
        recs = MemoryRecords(data)
        first: int | None = None
        expected: int | None = None
        next_offset: int | None = None
        count, epoch = 0, getattr(self, "leader_epoch", -1)
        try:
            while (b := recs.next_batch()) is not None:
                if (b.magic != 2 or b.compression_type not in (0, 3) or not b.validate_crc()
                        or b.records_count < 0):
                    return None
                next_offset = b.next_offset
                epoch = b.leader_epoch
                if b.is_control_batch:
                    continue
                if b.records_count != b.last_offset_delta + 1:
                    return None  # offsets with gaps (a compacted topic): record by record
                lo, hi = max(b.base_offset, self.fetch_offset), b.last_offset
                if hi < lo:
                    continue
                if expected is not None and lo != expected:
                    return None
                first = lo if first is None else first
                count += hi - lo + 1
                expected = hi + 1
        except Exception:  # kafka-python's own parse says what is wrong
            return None
        if next_offset is None:
            return None  # no whole batch: kafka-python says why
        if budget is not None and count > budget and budget < RAW_OVERSHOOT_FROM:
            return None  # more than a small poll may return: record by record, exactly up to it
        tp = self.topic_partition
        self.next_fetch_offset, self.leader_epoch = next_offset, epoch
        self.records_read, self.bytes_read = count, len(data)
        self.drain()
        if count == 0 or first is None:
            return []
        # (at most ``budget`` entries: the fetcher counts them, and stops at its bound)
        pad = count - 1 if budget is None else min(count, budget) - 1
        return [KafkaRaw(tp.topic, tp.partition, self.fetch_offset, first, count, data), *[None] * pad]


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
        return [m for c in self._poll(max_records, timeout_s)
                for m in (c.messages() if isinstance(c, KafkaRaw) else c)]

    def poll_raw(self, max_records: int, timeout_s: float) -> list[KafkaRaw | list[Message]]:
        """What `poll` returns, with each plain fetch of a partition as one `KafkaRaw` (its bytes as
        the broker sent them, no Python object per record: the native decoder parses them) and the
        rest as messages; at most ``max_records`` messages, as `poll`."""
        fetcher = self._consumer._fetcher
        if fetcher.__dict__.get("PartitionRecords") is not _RawPartitionRecords:
            fetcher.PartitionRecords = _RawPartitionRecords  # this consumer's fetches only
        return self._poll(max_records, timeout_s)

    def _poll(self, max_records: int, timeout_s: float) -> list[KafkaRaw | list[Message]]:
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            raise TransportError(f"Kafka poll failed: {exc}") from exc
        out: list[KafkaRaw | list[Message]] = []
        for tp, records in batches.items():
            topic, partition = tp.topic, tp.partition
            plain: list[Message] = []
            for r in records:
                if r is None:
                    continue  # the rest of a KafkaRaw's count (_RawPartitionRecords.take)
                if isinstance(r, KafkaRaw):
                    if plain:
                        out.append(plain)
                        plain = []
                    out.append(r)
                else:
                    plain.append(Message(topic, partition, r.offset, r.key, r.value, r.timestamp))
            if plain:
                out.append(plain)
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
