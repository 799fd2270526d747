"""The Kafka sink: kafka-python's producer behind `Sink`.

Producer guarantees: ``acks="all"`` and ``enable_idempotence=True`` are passed explicitly (kafka-python
silently turns idempotence off when some other settings are given); the key is the session id, so
one session maps to one partition and keeps its order.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, cast

from kafka.errors import KafkaError, KafkaTimeoutError

from ...errors import NotDurableError
from ..base import Outgoing, Sink
from .clients import ensure_topic, partition_for_key, producer_client

log = logging.getLogger(__name__)


class KafkaSink(Sink):
    """Kafka producer: acks=all, idempotent, key = session id, kafka-python's default partitioner.
    Acknowledgements arrive in the background (see `Sink`)."""

    def __init__(self, bootstrap_servers: str, default_partitions: int = 6, **overrides: Any):
        self.bootstrap_servers = bootstrap_servers
        self.default_partitions = default_partitions
        self._producer = producer_client(bootstrap_servers, **overrides)
        self._inflight: deque[tuple[str, bytes, bytes, Any]] = deque()
        self._acked = 0
        self._aborted = False
        self._topics: set[str] = set()
        self._sends = 0
        self._partition_cache: dict[tuple[str, bytes], int] = {}

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        if topic not in self._topics:
            ensure_topic(self.bootstrap_servers, topic, partitions or self.default_partitions)
            self._topics.add(topic)

    def partition_for(self, topic: str, key: bytes) -> int | None:
        """The default partitioner's choice, computed once per session key (murmur2 is pure Python).
        Asks the broker for the topic's partitions the first time (blocks up to max_block_ms)."""
        p = self._partition_cache.get((topic, key))
        if p is None:
            parts = self._producer.partitions_for(topic)
            if parts:
                parts = sorted(parts)
                p = parts[partition_for_key(key, len(parts))]
                if len(self._partition_cache) > 100_000:
                    self._partition_cache.clear()
                self._partition_cache[(topic, key)] = p
        return p

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        if self._aborted:
            raise NotDurableError("the Kafka sink was aborted", [Outgoing(topic, key, value)])
        try:
            fut = self._producer.send(topic, key=key, value=value, partition=self.partition_for(topic, key))
        except KafkaError as exc:
            raise NotDurableError(f"Kafka did not accept the event: {exc}", [Outgoing(topic, key, value)]) from exc
        self._inflight.append((topic, key, value, fut))
        self._sends += 1
        if not self._sends & 0xFFF:
            self.failure()

    def failure(self) -> Exception | None:
        """Forgets the acknowledged prefix of the in-flight messages (bounds memory) on the way."""
        inflight = self._inflight
        while inflight:
            fut = inflight[0][3]
            if not fut.is_done:
                return None
            if fut.failed():
                return fut.exception or NotDurableError("delivery failed")
            inflight.popleft()
            self._acked += 1
        return None

    def in_flight(self) -> int:
        return len(self._inflight)

    def acknowledged(self) -> int:
        self.failure()
        return self._acked

    def unacknowledged(self) -> list[Outgoing]:
        """Messages not known to be acknowledged, in send order; forgets every tracked message."""
        out = []
        for t, k, v, fut in self._inflight:
            if not fut.is_done or fut.failed():
                out.append(Outgoing(t, k, v))
            else:
                self._acked += 1
        self._inflight = deque()
        return out

    def abort(self) -> None:
        """Stop at once: pending batches are failed and never sent again. Never blocks.

        kafka-python's ``close(timeout=0)`` first flushes, which raises while anything is pending (exactly
        when we abort), so the sender thread is force-closed directly; it fails the pending batches and
        ends by itself (a background thread closes the client's sockets once it has)."""
        self._aborted = True
        producer = self._producer
        sender = getattr(producer, "_sender", None)
        try:
            if sender is not None:
                sender.force_close()
        except Exception:  # noqa: BLE001 -- closing a broken client must not raise
            log.debug("abort: force close failed", exc_info=True)

        def finish() -> None:
            try:
                if sender is not None:
                    sender.join(30)
                producer.close(timeout=1)
            except Exception:  # noqa: BLE001
                log.debug("abort: producer close failed", exc_info=True)

        threading.Thread(target=finish, name="agentledger-kafka-abort", daemon=True).start()

    def flush(self, timeout: float | None = None) -> None:
        inflight, self._inflight = self._inflight, deque()
        try:
            self._producer.flush(timeout=timeout)
        except KafkaTimeoutError:
            pass  # the futures below say which messages are not acknowledged
        failed = []
        first_error = None
        for t, k, v, fut in inflight:
            if not fut.is_done or fut.failed():
                failed.append(Outgoing(t, k, v))
                if first_error is None:
                    first_error = fut.exception if fut.is_done else "no acknowledgement before the timeout"
            else:
                self._acked += 1
        if failed:
            raise NotDurableError(f"{len(failed)} event(s) not acknowledged by Kafka: {first_error}", failed)

    def close(self, timeout: float | None = None) -> None:
        if self._aborted:
            return
        try:
            self.flush(timeout)
        finally:
            self._producer.close(timeout=timeout if timeout is not None else 5)

    def metrics(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self._producer.metrics())  # kafka-python is untyped
