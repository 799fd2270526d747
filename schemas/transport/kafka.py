"""The Kafka adapter: the only module that imports kafka-python.

Producer guarantees: ``acks="all"`` and ``enable_idempotence=True`` are passed explicitly (kafka-python
silently turns idempotence off when some other settings are given); the key is the session id, so
one session maps to one partition and keeps its order. Consumers never commit offsets to Kafka:
the warehouse stores them in the same transaction as the rows (see consumers/ingest.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

from .. import envvars
from ..errors import ConfigError, NotDurableError, TransportError
from .base import Message, Outgoing, PartitionCallback, Sink, Source

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


def security_config(env=None) -> dict[str, Any]:
    """kafka-python settings for a secured cluster, from the AGENTLEDGER_KAFKA_SECURITY_PROTOCOL,
    _SASL_* and _SSL_* variables (schemas/envvars.py); empty for a plaintext broker. Every client this
    module makes (producer, consumer, admin, the child process sink) gets them. Settings that cannot
    work together are a `ConfigError` here, not a timeout later."""
    get = lambda name: envvars.get(f"AGENTLEDGER_KAFKA_{name}", env)  # noqa: E731
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


def _unreachable(what: str, bootstrap_servers: str, exc: Exception) -> TransportError:
    """The one error line for a client that could not connect."""
    if isinstance(exc, KafkaTimeoutError) or "bootstrap" in str(exc).lower():
        return TransportError(f"Kafka at {bootstrap_servers} is not reachable: no broker answered within "
                              f"{CONNECT_TIMEOUT_MS / 1000:.0f}s ({what}; --verbose shows the client's log)")
    return TransportError(f"cannot connect {what} to {bootstrap_servers}: {exc}")


def partition_for_key(key: bytes, partitions: int) -> int:
    """Partition the Java and kafka-python default partitioners choose for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int, timeout_s: float = 30) -> None:
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="agentledger-admin",
                                 **connect_config(request_timeout_ms=int(timeout_s * 1000)))
    except KafkaError as exc:
        raise _unreachable("an admin client", bootstrap_servers, exc) from exc
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


class KafkaSink(Sink):
    def __init__(self, bootstrap_servers: str, default_partitions: int = 6, **overrides: Any):
        self.bootstrap_servers = bootstrap_servers
        self.default_partitions = default_partitions
        config = {**PRODUCER_DEFAULTS, **security_config(), **overrides}
        config["acks"] = "all"
        config["enable_idempotence"] = True
        try:
            self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers, client_id="agentledger", **config)
        except KafkaError as exc:
            raise _unreachable("a producer", bootstrap_servers, exc) from exc
        self._inflight: deque[tuple[str, bytes, bytes, Any]] = deque()
        self._topics: set[str] = set()
        self._sends = 0
        self._partition_cache: dict[tuple[str, bytes], int] = {}

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        if topic not in self._topics:
            ensure_topic(self.bootstrap_servers, topic, partitions or self.default_partitions)
            self._topics.add(topic)

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        try:
            # The default partitioner's choice, computed once per session key (murmur2 is pure Python).
            p = self._partition_cache.get((topic, key))
            if p is None:
                parts = self._producer.partitions_for(topic)
                if parts:
                    parts = sorted(parts)
                    p = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
                    if len(self._partition_cache) > 100_000:
                        self._partition_cache.clear()
                    self._partition_cache[(topic, key)] = p
            fut = self._producer.send(topic, key=key, value=value, partition=p)
        except KafkaError as exc:
            raise NotDurableError(f"Kafka did not accept the event: {exc}", [Outgoing(topic, key, value)]) from exc
        self._inflight.append((topic, key, value, fut))
        self._sends += 1
        if not self._sends & 0xFFF:
            self.prune()

    def prune(self) -> Exception | None:
        """Forget the acknowledged prefix of the in-flight messages (bounds memory). Returns the error
        of the oldest in-flight message if it failed (the caller decides: retry, spool, refuse)."""
        inflight = self._inflight
        while inflight:
            fut = inflight[0][3]
            if not fut.is_done:
                return None
            if fut.failed():
                return fut.exception or NotDurableError("delivery failed")
            inflight.popleft()
        return None

    def in_flight(self) -> int:
        return len(self._inflight)

    def oldest(self) -> int | None:
        """Identity of the oldest unacknowledged message (to notice that acknowledgements stopped)."""
        self.prune()
        return id(self._inflight[0][2]) if self._inflight else None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for acknowledgements; True when nothing is in flight any more."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaTimeoutError:
            pass
        return self.prune() is None and not self._inflight

    def unacknowledged(self) -> list[Outgoing]:
        """Messages not known to be acknowledged, in send order; forgets every tracked message."""
        out = [Outgoing(t, k, v) for t, k, v, fut in self._inflight if not fut.is_done or fut.failed()]
        self._inflight = deque()
        return out

    def abort(self) -> None:
        """Stop at once: pending batches are failed and never sent again. Never blocks.

        kafka-python's ``close(timeout=0)`` first flushes, which raises while anything is pending (exactly
        when we abort), so the sender thread is force-closed directly; it fails the pending batches and
        ends by itself (a background thread closes the client's sockets once it has)."""
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
        config = {**CONSUMER_DEFAULTS, **security_config(), **overrides}
        config["enable_auto_commit"] = False
        try:
            self._consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentledger-ingest", **config)
        except KafkaError as exc:
            raise _unreachable("a consumer", bootstrap_servers, exc) from exc

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


def raw_poll(bootstrap_servers: str, topic: str, expected: int, timeout_s: float = 300,
             **overrides: Any) -> tuple[int, float]:
    """Baseline for benchmarks: plain kafka-python poll of a whole topic, values touched, nothing
    decoded or stored, with the consumer settings of `KafkaSource` (``overrides`` changes some).
    Returns (messages, seconds)."""
    config = {**CONSUMER_DEFAULTS, **security_config(), **overrides}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, **config)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        n = 0
        nbytes = 0
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        while n < expected and time.perf_counter() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=config["max_poll_records"]).values():
                n += len(records)
                nbytes += sum(len(r.value) for r in records)
        return n, time.perf_counter() - t0
    finally:
        consumer.close(autocommit=False)


def raw_send(bootstrap_servers: str, topic: str, values: list[bytes], keys: list[bytes],
             timeout_s: float = 300, **overrides: Any) -> float:
    """Baseline for benchmarks: plain kafka-python `send()` of pre-encoded values with the same producer
    settings as `KafkaSink` (acks=all, idempotence), then one flush. Returns seconds, send to last ack."""
    config = {**PRODUCER_DEFAULTS, **security_config(), **overrides, "acks": "all", "enable_idempotence": True}
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, client_id="agentledger-bench-raw", **config)
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
    """Chaos tests and tools: send (key, value) pairs as they are -- any bytes, empty, or a None value
    (a tombstone) -- in order through one idempotent producer (acks=all), bypassing every check of
    `KafkaSink`. Returns the (partition, offset) each landed at."""
    config = {**PRODUCER_DEFAULTS, "acks": "all", "enable_idempotence": True, "max_request_size": 8 * 1024 * 1024,
              "linger_ms": 5}
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, client_id="agentledger-chaos", **config)
    try:
        producer.partitions_for(topic)
        futures = [producer.send(topic, key=k, value=v) for k, v in messages]
        producer.flush(timeout=timeout_s)
        return [(md.partition, md.offset) for md in (f.get(timeout=timeout_s) for f in futures)]
    finally:
        producer.close(timeout=10)


# --- the Kafka client in a child process --------------------------------------------------------
#
# kafka-python does its per-message work (partitioning, batch building, futures) in Python, under the
# GIL of the process that calls send(). A producer that also builds, redacts, encodes and hashes every
# event pays for both on one core. `KafkaProcessSink` moves the client into a child process: the parent
# ships batches of encoded events over a pipe and keeps its own copy of every message until the child
# reports it acknowledged (acks=all), so the durability contract of `Sink` is unchanged: flush waits for
# acknowledgements, `unacknowledged()` hands back exactly what Kafka has not confirmed, and `abort()`
# kills the child. Worth it for bulk producers (simulator, importers, benchmarks); a short-lived hook
# process should use `KafkaSink` (starting the child costs a Python start-up).

import os as _os
import pickle as _pickle
import struct as _struct
import subprocess as _subprocess
import sys as _sys
import threading as _threading

_FRAME = _struct.Struct("<I")
SHIP_EVERY = 512


def _write_frame(f, obj) -> None:
    data = _pickle.dumps(obj, protocol=_pickle.HIGHEST_PROTOCOL)
    f.write(_FRAME.pack(len(data)) + data)
    f.flush()


def _read_frame(f):
    head = f.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (n,) = _FRAME.unpack(head)
    return _pickle.loads(f.read(n))


def _child_main() -> None:
    """Entry point of the child: ``python -c 'from agentledger.schemas.transport.kafka import _child_main; _child_main()'``."""
    import queue

    inp, out = _sys.stdin.buffer, _sys.stdout.buffer
    _sys.stdout = _sys.stderr  # nothing else may write to the frame channel
    out_lock = _threading.Lock()

    def reply(obj) -> None:
        with out_lock:
            try:
                _write_frame(out, obj)
            except OSError:  # the parent is gone (it gave up on us and closed the pipe): nobody to tell
                _os._exit(0)

    bootstrap, config = _read_frame(inp)
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, client_id="agentledger", **config)
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which decides
        reply(("error", f"{type(exc).__name__}: {exc}"))
        return
    reply(("ready",))
    work: queue.Queue = queue.Queue()
    acks: queue.Queue = queue.Queue()

    def reader() -> None:
        while True:
            item = _read_frame(inp)
            work.put(item if item is not None else ("close", 5.0))
            if item is None or item[0] == "close":
                return

    def acker() -> None:
        while True:
            item = acks.get()
            if item is None:
                return
            bid, futures, error = item
            if error is None:
                for fut in futures:
                    try:
                        fut.get()
                    except Exception as exc:  # noqa: BLE001
                        error = f"{type(exc).__name__}: {exc}"
                        break
            reply(("fail", bid, error) if error else ("ack", bid))

    _threading.Thread(target=reader, daemon=True).start()
    ack_thread = _threading.Thread(target=acker, daemon=True)
    ack_thread.start()
    partitions: dict[str, list[int]] = {}
    cache: dict[tuple[str, bytes], int] = {}
    while True:
        item = work.get()
        if item[0] == "close":
            producer.flush(timeout=item[1])
            acks.put(None)
            ack_thread.join(item[1])
            producer.close(timeout=1)
            return
        _, bid, batch = item
        futures, error = [], None
        try:
            for topic, key, value in batch:
                # Same partition as kafka-python's default partitioner, computed once per session key.
                p = cache.get((topic, key))
                if p is None:
                    parts = partitions.get(topic)
                    if parts is None:
                        parts = partitions[topic] = sorted(producer.partitions_for(topic))
                    p = cache[(topic, key)] = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
                futures.append(producer.send(topic, key=key, value=value, partition=p))
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        acks.put((bid, futures, error))


class KafkaProcessSink(Sink):
    """`KafkaSink` semantics with the Kafka client in a child process (see above)."""

    def __init__(self, bootstrap_servers: str, default_partitions: int = 6, **overrides: Any):
        self.bootstrap_servers = bootstrap_servers
        self.default_partitions = default_partitions
        config = {**PRODUCER_DEFAULTS, **security_config(), **overrides, "acks": "all", "enable_idempotence": True}
        connect_s = config.get("bootstrap_timeout_ms", 30_000) / 1000 + 10
        env = {**_os.environ, "PYTHONPATH": _os.pathsep.join(p for p in [_REPO_ROOT, _os.environ.get("PYTHONPATH")] if p)}
        self._proc = _subprocess.Popen(
            [_sys.executable, "-c", "from agentledger.schemas.transport.kafka import _child_main; _child_main()"],
            stdin=_subprocess.PIPE, stdout=_subprocess.PIPE, env=env)
        self._cond = _threading.Condition()
        self._ready: tuple | None = None
        self._acked = -1
        self._error: str | None = None
        self._reader = _threading.Thread(target=self._read_replies, daemon=True)
        self._reader.start()
        try:
            _write_frame(self._proc.stdin, (bootstrap_servers, config))
        except OSError as exc:
            self.abort()
            raise TransportError(f"cannot start the Kafka client process: {exc}") from exc
        with self._cond:
            self._cond.wait_for(lambda: self._ready is not None, timeout=connect_s)
        if self._ready is None or self._ready[0] != "ready":
            self.abort()
            why = self._ready[1] if self._ready else f"no answer within {connect_s:.0f}s"
            raise _unreachable("a producer", bootstrap_servers, KafkaTimeoutError(why) if "bootstrap" in why
                               else TransportError(why))
        self._batch: list[tuple[str, bytes, bytes]] = []
        self._shipped: deque[tuple[int, list[tuple[str, bytes, bytes]]]] = deque()
        self._next_bid = 0
        self._count = 0
        self._topics: set[str] = set()

    def _read_replies(self) -> None:
        out = self._proc.stdout
        while True:
            try:
                msg = _read_frame(out)
            except Exception:  # noqa: BLE001 -- a dying child
                msg = None
            with self._cond:
                if msg is None:
                    self._error = self._error or "the Kafka client process ended"
                    if self._ready is None:
                        self._ready = ("error", self._error)
                    self._cond.notify_all()
                    return
                if msg[0] in ("ready", "error") and self._ready is None:
                    self._ready = msg
                elif msg[0] == "ack":
                    self._acked = msg[1]
                elif msg[0] == "fail":
                    self._error = self._error or msg[2]
                self._cond.notify_all()

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        if topic not in self._topics:
            ensure_topic(self.bootstrap_servers, topic, partitions or self.default_partitions)
            self._topics.add(topic)

    def _ship(self) -> None:
        batch, self._batch = self._batch, []
        bid = self._next_bid
        self._next_bid += 1
        self._shipped.append((bid, batch))
        try:
            _write_frame(self._proc.stdin, ("batch", bid, batch))
        except OSError as exc:
            with self._cond:
                self._error = self._error or f"the Kafka client process is gone: {exc}"

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        if self._error is not None:
            raise NotDurableError(f"Kafka client failed: {self._error}", [Outgoing(topic, key, value)])
        self._batch.append((topic, key, value))
        self._count += 1
        if len(self._batch) >= SHIP_EVERY:
            self._ship()

    def _forget_acked(self) -> None:
        acked = self._acked
        shipped = self._shipped
        while shipped and shipped[0][0] <= acked:
            self._count -= len(shipped.popleft()[1])

    def prune(self) -> Exception | None:
        self._forget_acked()
        return NotDurableError(self._error) if self._error else None

    def in_flight(self) -> int:
        return self._count

    def oldest(self) -> int | None:
        self._forget_acked()
        if self._shipped:
            return id(self._shipped[0][1])
        return id(self._batch[0][2]) if self._batch else None

    def wait(self, timeout: float) -> bool:
        if self._batch:
            self._ship()
        last = self._next_bid - 1
        with self._cond:
            self._cond.wait_for(lambda: self._acked >= last or self._error is not None, timeout=timeout)
        self._forget_acked()
        return self._error is None and not self._shipped

    def unacknowledged(self) -> list[Outgoing]:
        self._forget_acked()
        out = [Outgoing(*m) for _, batch in self._shipped for m in batch] + [Outgoing(*m) for m in self._batch]
        self._shipped.clear()
        self._batch = []
        self._count = 0
        return out

    def abort(self) -> None:
        try:
            self._proc.kill()
            self._proc.wait(5)
        except Exception:  # noqa: BLE001
            log.debug("abort: killing the Kafka client process failed", exc_info=True)

    def flush(self, timeout: float | None = None) -> None:
        ok = self.wait(3600.0 if timeout is None else timeout)
        if not ok:
            why = self._error or "no acknowledgement before the timeout"
            undelivered = self.unacknowledged()
            if undelivered:
                raise NotDurableError(f"{len(undelivered)} event(s) not acknowledged by Kafka: {why}", undelivered)

    def close(self, timeout: float | None = None) -> None:
        try:
            self.flush(timeout)
        finally:
            try:
                _write_frame(self._proc.stdin, ("close", 5.0))
                self._proc.stdin.close()
                self._proc.wait(timeout if timeout is not None else 10)
            except Exception:  # noqa: BLE001
                self.abort()


# The directory that holds the `agentledger` package this module was imported from (a checkout or
# site-packages): one level up per part of the module name. Not resolved: agentledger/schemas is a
# symlink to the checkout's schemas/ folder.
_REPO_ROOT = _os.path.abspath(__file__)
for _ in __name__.split("."):
    _REPO_ROOT = _os.path.dirname(_REPO_ROOT)


def partition_count(bootstrap_servers: str, topic: str, timeout_s: float = 30) -> int:
    """Partitions of ``topic`` (0 when it does not exist)."""
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentledger-replay",
                                 **connect_config(request_timeout_ms=int(timeout_s * 1000) + 1000))
    except KafkaError as exc:
        raise _unreachable("a consumer", bootstrap_servers, exc) from exc
    try:
        parts = consumer.partitions_for_topic(topic)
        return len(parts) if parts else 0
    except KafkaError as exc:
        raise TransportError(f"cannot read the partitions of {topic}: {exc}") from exc
    finally:
        consumer.close(autocommit=False)


def last_message(bootstrap_servers: str, topic: str, partition: int, timeout_s: float = 30) -> Message | None:
    """The last message of one partition (None when it is empty). Nothing is committed."""
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentledger-heads",
                                 **connect_config(enable_auto_commit=False,
                                                  request_timeout_ms=int(timeout_s * 1000) + 1000))
    except KafkaError as exc:
        raise TransportError(f"cannot connect a consumer to {bootstrap_servers}: {exc}") from exc
    tp = TopicPartition(topic, partition)
    try:
        consumer.assign([tp])
        begin = consumer.beginning_offsets([tp])[tp]
        end = consumer.end_offsets([tp])[tp]
        if end <= begin:
            return None
        consumer.seek(tp, end - 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    if r.offset == end - 1:
                        return Message(topic, partition, r.offset, r.key, r.value, r.timestamp)
        raise TransportError(f"{topic}/{partition}: the last message (offset {end - 1}) did not arrive in {timeout_s:.0f}s")
    except KafkaError as exc:
        raise TransportError(f"reading the end of {topic}/{partition} failed: {exc}") from exc
    finally:
        consumer.close(autocommit=False)


def scan_partition(bootstrap_servers: str, topic: str, partition: int, start: int | None = None, *,
                   key: bytes | None = None, timeout_s: float = 120, max_found: int | None = None,
                   **overrides: Any) -> tuple[list[Message], int, int]:
    """Read one partition from ``start`` (its beginning when None or out of range) up to its end offset
    as of the call, keeping only messages whose key is ``key`` (all when None), stopping early once
    ``max_found`` are kept. Nothing is decoded and no offset is committed. Returns (messages, first
    offset read, end offset)."""
    config = {**CONSUMER_DEFAULTS, **security_config(), **overrides}
    config["enable_auto_commit"] = False
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, client_id="agentledger-replay", **config)
    except KafkaError as exc:
        raise _unreachable("a consumer", bootstrap_servers, exc) from exc
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
            for records in consumer.poll(timeout_ms=500, max_records=config["max_poll_records"]).values():
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
