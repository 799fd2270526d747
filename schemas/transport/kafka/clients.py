"""Kafka clients as agentledger configures them: defaults, security settings, connection errors,
topic creation and the default partitioner. The other modules of this package (the adapter) build on
it; nothing outside the package imports kafka-python (tests/test_layering.py)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any, cast

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

from ... import envvars
from ...errors import ConfigError, TransportError

log = logging.getLogger(__name__)

# Connecting: a broker that does not answer is an error within seconds (kafka-python waits 30 s by
# default), and the client retries within that time instead of backing off for up to 30 s.
CONNECT_TIMEOUT_MS = 5_000
CONNECT_DEFAULTS: dict[str, Any] = {"bootstrap_timeout_ms": CONNECT_TIMEOUT_MS, "reconnect_backoff_max_ms": 1_000}

PRODUCER_DEFAULTS: dict[str, Any] = {
    **CONNECT_DEFAULTS,
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
    **CONNECT_DEFAULTS,
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "max_poll_records": 50_000,
    "fetch_min_bytes": 1,
    "fetch_max_wait_ms": 200,
    "check_crcs": True,
}


SASL_MECHANISMS = {"plain": "PLAIN", "scram_sha_256": "SCRAM-SHA-256", "scram_sha_512": "SCRAM-SHA-512"}


def security_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """kafka-python settings for a secured cluster, from the AGENTLEDGER_KAFKA_SECURITY_PROTOCOL,
    _SASL_* and _SSL_* variables (schemas/envvars.py); empty for a plaintext broker. Every client this
    module makes (producer, consumer, admin, the child process sink) gets them. Settings that cannot
    work together are a `ConfigError` here, not a timeout later."""
    def get(name: str) -> Any:
        return envvars.get(f"AGENTLEDGER_KAFKA_{name}", env)

    protocol = (get("SECURITY_PROTOCOL") or "plaintext").upper()
    sasl, ssl = protocol.startswith("SASL_"), protocol.endswith("SSL")
    cfg: dict[str, Any] = {} if protocol == "PLAINTEXT" else {"security_protocol": protocol}
    mechanism, user, password = get("SASL_MECHANISM"), get("SASL_USERNAME"), get("SASL_PASSWORD")
    if sasl:
        cfg["sasl_mechanism"] = SASL_MECHANISMS[mechanism or "plain"]
        if not user or not password:
            raise ConfigError(f"Kafka security protocol {protocol} needs AGENTLEDGER_KAFKA_SASL_USERNAME and "
                              "AGENTLEDGER_KAFKA_SASL_PASSWORD")
        cfg["sasl_plain_username"], cfg["sasl_plain_password"] = user, password
    elif mechanism or user or password:
        raise ConfigError("AGENTLEDGER_KAFKA_SASL_* settings need AGENTLEDGER_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT "
                          f"or SASL_SSL (it is {protocol})")
    for part in ("CAFILE", "CERTFILE", "KEYFILE"):
        path = get(f"SSL_{part}")
        if not path:
            continue
        if not ssl:
            raise ConfigError(f"AGENTLEDGER_KAFKA_SSL_{part} needs AGENTLEDGER_KAFKA_SECURITY_PROTOCOL=SSL or "
                              f"SASL_SSL (it is {protocol})")
        if not os.path.isfile(path):
            raise ConfigError(f"AGENTLEDGER_KAFKA_SSL_{part}: no such file: {path}")
        cfg[f"ssl_{part.lower()}"] = path
    return cfg


def connect_config(**extra: Any) -> dict[str, Any]:
    """What every short-lived client gets: the connect timeouts and the security settings."""
    return {**CONNECT_DEFAULTS, **security_config(), **extra}


def unreachable(what: str, bootstrap_servers: str, exc: Exception) -> TransportError:
    """The one error line for a client that could not connect."""
    if isinstance(exc, KafkaTimeoutError) or "bootstrap" in str(exc).lower():
        return TransportError(f"Kafka at {bootstrap_servers} is not reachable: no broker answered within "
                              f"{CONNECT_TIMEOUT_MS / 1000:.0f}s ({what}; --verbose shows the client's log)")
    return TransportError(f"cannot connect {what} to {bootstrap_servers}: {exc}")


def partition_for_key(key: bytes, partitions: int) -> int:
    """Partition the Java and kafka-python default partitioners choose for ``key``."""
    return (cast(int, murmur2(key)) & 0x7FFFFFFF) % partitions  # kafka-python is untyped


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int, timeout_s: float = 30) -> None:
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="agentledger-admin",
                                 **connect_config(request_timeout_ms=int(timeout_s * 1000)))
    except KafkaError as exc:
        raise unreachable("an admin client", bootstrap_servers, exc) from exc
    try:
        if topic in set(admin.list_topics()):
            return
        # -1: the broker's default.replication.factor (1 on a single broker, 3 on scripts/kafka cluster)
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1)])
    except TopicAlreadyExistsError:
        pass
    except KafkaError as exc:
        raise TransportError(f"cannot create topic {topic}: {exc}") from exc
    finally:
        admin.close()
    # Metadata propagation: wait until the topic is visible with all its partitions.
    deadline = time.monotonic() + timeout_s
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, **connect_config())
    try:
        while time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts and len(parts) >= partitions:
                return
            time.sleep(0.1)
    finally:
        consumer.close()
    raise TransportError(f"topic {topic} did not appear within {timeout_s}s")


def producer_client(bootstrap_servers: str, client_id: str = "agentledger", **overrides: Any) -> KafkaProducer:
    """A kafka-python producer with `KafkaSink`'s settings (acks=all and idempotence always on)."""
    config = {**PRODUCER_DEFAULTS, **security_config(), **overrides, "acks": "all", "enable_idempotence": True}
    try:
        return KafkaProducer(bootstrap_servers=bootstrap_servers, client_id=client_id, **config)
    except KafkaError as exc:
        raise unreachable("a producer", bootstrap_servers, exc) from exc


def consumer_client(bootstrap_servers: str, client_id: str = "agentledger-ingest", **overrides: Any) -> KafkaConsumer:
    """A kafka-python consumer with `KafkaSource`'s settings (never auto-commits)."""
    config = {**CONSUMER_DEFAULTS, **security_config(), **overrides, "enable_auto_commit": False}
    try:
        return KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id=client_id, **config)
    except KafkaError as exc:
        raise unreachable("a consumer", bootstrap_servers, exc) from exc


def topic_partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions as the consumer's assign/seek take them (empty: no such topic)."""
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]


def topic_replication(bootstrap_servers: str, topic: str) -> dict[str, Any]:
    """How ``topic`` is replicated: ``{"partitions": {p: {"leader", "replicas", "isr"}}, "brokers": n,
    "min_insync_replicas": int}`` (the topic's own setting, else the broker's). For checks of a real
    cluster (tests/test_scale_out.py, docs/scale.md), not for the data path."""
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="agentledger-admin", **connect_config())
    try:
        desc = admin.describe_topics([topic])[0]
        parts = {p["partition_index"]: {"leader": p["leader_id"], "replicas": sorted(p["replica_nodes"]),
                                        "isr": sorted(p["isr_nodes"])} for p in desc["partitions"]}
        cluster = admin.describe_cluster()
        # the topic's effective value (its own, else the broker's default)
        got = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})],
                                     config_filter="all")
        value = (got.get("topic", {}).get(topic, {}).get("min.insync.replicas") or {}).get("value")
        return {"partitions": parts, "brokers": len(cluster["brokers"]),
                "min_insync_replicas": int(value) if value is not None else None}
    finally:
        admin.close()
