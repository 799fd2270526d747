"""Benchmarks' and chaos scenarios' plain Kafka baselines and tools: kafka-python clients with the
adapter's settings (`schemas.transport.kafka.producer_client` / `consumer_client`), driven directly,
with nothing of agentledger's own per-message work. Not part of agentledger: the adapter is the only
code that imports kafka-python; this module only uses the clients it makes."""

from __future__ import annotations

import time
from typing import Any

from agentledger.schemas.errors import NotDurableError
from agentledger.schemas.transport.kafka import consumer_client, producer_client, topic_partitions


def raw_poll(bootstrap_servers: str, topic: str, expected: int, timeout_s: float = 300,
             **overrides: Any) -> tuple[int, float]:
    """Baseline: plain kafka-python poll of a whole topic, values touched, nothing decoded or stored,
    with the consumer settings of `KafkaSource` (``overrides`` changes some). Returns (messages, seconds)."""
    consumer = consumer_client(bootstrap_servers, "agentledger-bench-raw", **overrides)
    try:
        tps = topic_partitions(consumer, topic)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        max_records = consumer.config["max_poll_records"]
        n = 0
        nbytes = 0
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        while n < expected and time.perf_counter() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=max_records).values():
                n += len(records)
                nbytes += sum(len(r.value) for r in records)
        return n, time.perf_counter() - t0
    finally:
        consumer.close(autocommit=False)


def raw_send(bootstrap_servers: str, topic: str, values: list[bytes], keys: list[bytes],
             timeout_s: float = 300, **overrides: Any) -> float:
    """Baseline: plain kafka-python `send()` of pre-encoded values with the same producer settings as
    `KafkaSink` (acks=all, idempotence), then one flush. Returns seconds, send to last ack."""
    producer = producer_client(bootstrap_servers, "agentledger-bench-raw", **overrides)
    try:
        producer.partitions_for(topic)  # metadata up front, as our sink has it after ensure_topic
        n = len(keys)
        t0 = time.perf_counter()
        futures = [producer.send(topic, key=keys[i % n], value=v) for i, v in enumerate(values)]
        producer.flush(timeout=timeout_s)
        elapsed = time.perf_counter() - t0
        failed = sum(1 for f in futures if not f.is_done or f.failed())
        if failed:
            raise NotDurableError(f"raw baseline: {failed} messages not acknowledged")
        return elapsed
    finally:
        producer.close(timeout=10)


def send_exact(bootstrap_servers: str, topic: str, messages: list[tuple[bytes | None, bytes | None]],
               timeout_s: float = 300) -> list[tuple[int, int]]:
    """Chaos scenarios: send (key, value) pairs as they are -- any bytes, empty, or a None value (a
    tombstone) -- in order through one idempotent producer (acks=all), bypassing every check of
    `KafkaSink`. Returns the (partition, offset) each landed at."""
    producer = producer_client(bootstrap_servers, "agentledger-chaos", max_request_size=8 * 1024 * 1024, linger_ms=5)
    try:
        producer.partitions_for(topic)
        futures = [producer.send(topic, key=k, value=v) for k, v in messages]
        producer.flush(timeout=timeout_s)
        return [(md.partition, md.offset) for md in (f.get(timeout=timeout_s) for f in futures)]
    finally:
        producer.close(timeout=10)
