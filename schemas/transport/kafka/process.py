"""The Kafka client in a child process: `KafkaProcessSink`.

kafka-python does its per-message work (partitioning, batch building, futures) in Python, under the
GIL of the process that calls send(). A producer that also builds, redacts, encodes and hashes every
event pays for both on one core. `KafkaProcessSink` moves the client into a child process: the parent
ships batches of encoded events over a pipe and keeps its own copy of every message until the child
reports it acknowledged (acks=all), so the durability contract of `Sink` is unchanged: flush waits for
acknowledgements, `unacknowledged()` hands back exactly what Kafka has not confirmed, and `abort()`
kills the child. Worth it for bulk producers (simulator, importers, benchmarks); a short-lived hook
process should use `KafkaSink` (starting the child costs a Python start-up).
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections import deque
from typing import IO, Any

from kafka.errors import KafkaTimeoutError

from ...errors import NotDurableError, TransportError
from ..base import Outgoing, Sink
from .clients import (PRODUCER_DEFAULTS, consumer_client, ensure_topic, partition_for_key, producer_client,
                      security_config, topic_partitions, unreachable)

log = logging.getLogger(__name__)

# The directory that holds the `agentledger` package this module was imported from (a checkout or
# site-packages): one level up per part of the module name. Not resolved: agentledger/schemas is a
# symlink to the checkout's schemas/ folder.
REPO_ROOT = os.path.abspath(__file__)
for _ in __name__.split("."):
    REPO_ROOT = os.path.dirname(REPO_ROOT)


_FRAME = struct.Struct("<I")
SHIP_EVERY = 512


def _write_frame(f: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_FRAME.pack(len(data)) + data)
    f.flush()


def _read_frame(f: IO[bytes]) -> Any:
    head = f.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (n,) = _FRAME.unpack(head)
    return pickle.loads(f.read(n))


def _child_main() -> None:
    """Entry point of the child: ``python -c 'from agentledger.schemas.transport.kafka.process import _child_main; _child_main()'``."""
    import queue

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the frame channel
    out_lock = threading.Lock()

    def reply(obj: object) -> None:
        with out_lock:
            try:
                _write_frame(out, obj)
            except OSError:  # the parent is gone (it gave up on us and closed the pipe): nobody to tell
                os._exit(0)

    bootstrap, config = _read_frame(inp)
    try:
        producer = producer_client(bootstrap, **config)
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which decides
        reply(("error", f"{type(exc).__name__}: {exc}"))
        return
    reply(("ready",))
    work: queue.Queue[tuple[Any, ...]] = queue.Queue()
    acks: queue.Queue[tuple[int, list[Any], str | None] | None] = queue.Queue()

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

    threading.Thread(target=reader, daemon=True).start()
    ack_thread = threading.Thread(target=acker, daemon=True)
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
        futures: list[Any] = []
        error: str | None = None
        try:
            for topic, key, value in batch:
                # Same partition as kafka-python's default partitioner, computed once per session key.
                p = cache.get((topic, key))
                if p is None:
                    parts = partitions.get(topic)
                    if parts is None:
                        parts = partitions[topic] = sorted(producer.partitions_for(topic))
                    p = cache[(topic, key)] = parts[partition_for_key(key, len(parts))]
                futures.append(producer.send(topic, key=key, value=value, partition=p))
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
        acks.put((bid, futures, error))


class KafkaProcessSink(Sink):
    """`KafkaSink` semantics with the Kafka client in a child process (see above)."""

    def __init__(self, bootstrap_servers: str, default_partitions: int = 6, **overrides: Any):
        self.bootstrap_servers = bootstrap_servers
        self.default_partitions = default_partitions
        self._aborted = False
        config = {**PRODUCER_DEFAULTS, **security_config(), **overrides}  # a setting that cannot work fails here
        connect_s = config.get("bootstrap_timeout_ms", 30_000) / 1000 + 10
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from agentledger.schemas.transport.kafka.process import _child_main; _child_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        if self._proc.stdin is None or self._proc.stdout is None:  # never with PIPE
            self._proc.kill()
            raise TransportError("cannot start the Kafka client process: it has no pipes")
        self._stdin: IO[bytes] = self._proc.stdin
        self._stdout: IO[bytes] = self._proc.stdout
        self._cond = threading.Condition()
        self._ready: tuple[str, ...] | None = None
        self._acked = -1
        self._error: str | None = None
        self._reader = threading.Thread(target=self._read_replies, daemon=True)
        self._reader.start()
        try:
            _write_frame(self._stdin, (bootstrap_servers, config))
        except OSError as exc:
            self.abort()
            raise TransportError(f"cannot start the Kafka client process: {exc}") from exc
        ready = self._first_reply(connect_s)
        if ready is None or ready[0] != "ready":
            # the reason is the child's own answer, or the timeout -- never the abort below, which the
            # reader would otherwise report as the child's last word
            why = ready[1] if ready is not None else f"no answer within {connect_s:.0f}s"
            self.abort()
            raise unreachable("a producer", bootstrap_servers, KafkaTimeoutError(why) if "bootstrap" in why
                               else TransportError(why))
        self._batch: list[tuple[str, bytes, bytes]] = []
        self._shipped: deque[tuple[int, list[tuple[str, bytes, bytes]]]] = deque()
        self._next_bid = 0
        self._count = 0
        self._acked_count = 0
        self._topics: set[str] = set()
        self._partitions: dict[str, int] = {}

    def _first_reply(self, timeout: float) -> tuple[str, ...] | None:
        """The child's first reply, ("ready",) or ("error", why), waiting up to ``timeout`` s for it."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready is not None, timeout=timeout)
            return self._ready

    def _read_replies(self) -> None:
        out = self._stdout
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
            _write_frame(self._stdin, ("batch", bid, batch))
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
            n = len(shipped.popleft()[1])
            self._count -= n
            self._acked_count += n

    def partition_for(self, topic: str, key: bytes) -> int | None:
        """The child's choice (kafka-python's default partitioner), from the topic's partition count
        (read once per topic with a short-lived consumer)."""
        n = self._partitions.get(topic)
        if n is None:
            consumer = consumer_client(self.bootstrap_servers, "agentledger-metadata")
            try:
                n = len(topic_partitions(consumer, topic))
            finally:
                consumer.close(autocommit=False)
            if not n:
                return None
            self._partitions[topic] = n
        return partition_for_key(key, n)

    def failure(self) -> Exception | None:
        self._forget_acked()
        return NotDurableError(self._error) if self._error else None

    def in_flight(self) -> int:
        return self._count

    def acknowledged(self) -> int:
        self._forget_acked()
        return self._acked_count

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
        self._aborted = True
        with self._cond:
            self._error = self._error or "the Kafka sink was aborted"
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
        if self._aborted:
            return
        try:
            self.flush(timeout)
        finally:
            try:
                _write_frame(self._stdin, ("close", 5.0))
                self._stdin.close()
                self._proc.wait(timeout if timeout is not None else 10)
            except Exception:  # noqa: BLE001
                self.abort()
