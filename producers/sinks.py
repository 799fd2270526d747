"""The sink every producer writes through (recorder, simulator, hooks, importers, sandbox).

    sink = open_producer_sink(settings)                  # options: see ProducerOptions
    sink.send(topic, session_id.encode(), value)         # never blocks longer than max_block_ms
    sink.flush()                                         # durable (Kafka ack or spool fsync) or NotDurableError

Without Kafka configured this is the embedded log's sink (durable at flush, fsync). With Kafka it is a
`SpoolingSink`:

- **direct**: events go to Kafka (acks=all, idempotent, key = session id). A send that cannot be
  queued within ``max_block_ms`` (broker down: no metadata; broker slow: buffer full), an in-flight
  message that fails, or a flush that is not acknowledged within ``flush_timeout_ms`` switches the
  sink to **spooling**: the producer is stopped, every message it had not acknowledged is written to
  the spool first, in send order, then every later event follows it into the spool. Nothing Kafka
  acknowledged is ever spooled.
- **spooling**: events are appended to the spool (`producers.spool`, the embedded log under
  $AGENTLEDGER_HOME/spool) and fsynced at flush. A background thread reconnects with backoff and
  drains the spool to Kafka in spool order; once the spool is empty (checked under the lock that
  `send` takes, so no event can slip in between) the sink switches back to direct. A process that
  starts while the spool holds events starts in spooling mode, so a session's later events never
  overtake its spooled earlier ones, across processes too (assumption: one session is recorded by
  one process at a time, as agents run their hooks one after the other).
- **bounded**: the spool holds at most ``spool_max_bytes`` of undrained events. An event that
  does not fit is refused with `SpoolFullError` (nothing is written; the `Recorder` keeps its chain
  intact and records a ``gap`` event of kind ``spool_overflow`` saying what was lost, using a small
  reserve kept for such control events) and counted in the spool's overflow.json, which
  `agentledger spool status` shows. Never a silent drop.

Failure meaning: `NotDurableError` from `send` or `flush` lists in ``undelivered`` the messages
that are NOT durable and that this sink has forgotten: per session they are always a suffix of what
was sent, so the recorder can roll its chain back to the last durable event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from agentledger.schemas import envvars
from agentledger.schemas.config import Settings
from agentledger.schemas.envvars import parse_size
from agentledger.schemas.envelope import peek
from agentledger.schemas.errors import ConfigError, NotDurableError, TransportError
from agentledger.schemas.transport import kafka_sink, kafka_source
from agentledger.schemas.transport.base import Outgoing, Sink
from agentledger.schemas.transport.local import LocalLog, LocalSink

from .spool import OverflowStats, Spool

log = logging.getLogger(__name__)

MODES = envvars.declared("AGENTLEDGER_RECORDING_MODE").choices


class SpoolFullError(NotDurableError):
    """The spool is at its size bound: the event was refused, nothing was written."""


class RecordingRefused(NotDurableError):
    """Fail-closed mode: the event describing an action could not be made durable, so the action must
    be denied. Nothing of it was recorded."""


def recording_mode_from_env(env: dict[str, str] | None = None) -> str:
    """AGENTLEDGER_RECORDING_MODE as the producers read it ("" when unset)."""
    return envvars.get("AGENTLEDGER_RECORDING_MODE", env) if envvars.raw("AGENTLEDGER_RECORDING_MODE", env) else ""


@dataclass(frozen=True)
class ProducerOptions:
    """Producer durability settings (environment variables in brackets).

    mode               spool | fail_closed: what the recorder does when an event cannot be made durable
                       [AGENTLEDGER_RECORDING_MODE, default spool]
    max_block_ms       longest any send() may block [AGENTLEDGER_MAX_BLOCK_MS, 500]
    flush_timeout_ms   how long flush() waits for Kafka before spooling the rest [AGENTLEDGER_FLUSH_TIMEOUT_MS, 5000]
    spool_dir          [AGENTLEDGER_SPOOL_DIR, $AGENTLEDGER_HOME/spool]
    spool_max_bytes    bound on undrained spool bytes [AGENTLEDGER_SPOOL_MAX_BYTES, 1G]
    connect_timeout_ms how long one background connection attempt may take [5000]
    kafka_process      run the Kafka client in a child process (bulk producers: simulator, importers,
                       benchmarks; not for short-lived hooks) [AGENTLEDGER_KAFKA_PROCESS=1, default off]
    """

    mode: str = "spool"
    max_block_ms: int = 500
    flush_timeout_ms: int = 5000
    spool_dir: Path | None = None
    spool_max_bytes: int = 1 << 30
    connect_timeout_ms: int = 5000
    write_every: int = 2000
    kafka_process: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "ProducerOptions":
        spool_dir = envvars.raw("AGENTLEDGER_SPOOL_DIR", env)
        o = cls(mode=envvars.get("AGENTLEDGER_RECORDING_MODE", env),
                max_block_ms=envvars.get("AGENTLEDGER_MAX_BLOCK_MS", env),
                flush_timeout_ms=envvars.get("AGENTLEDGER_FLUSH_TIMEOUT_MS", env),
                spool_dir=Path(spool_dir) if spool_dir else None,
                spool_max_bytes=envvars.get("AGENTLEDGER_SPOOL_MAX_BYTES", env),
                kafka_process=envvars.get("AGENTLEDGER_KAFKA_PROCESS", env))
        o = replace(o, **{k: v for k, v in overrides.items() if v is not None})
        if isinstance(o.spool_max_bytes, str):
            o = replace(o, spool_max_bytes=parse_size(o.spool_max_bytes))
        if o.mode not in MODES:
            raise ConfigError(f"recording mode must be one of {MODES}, not {o.mode!r}")
        return o


def spool_dir(settings: Settings, options: ProducerOptions | None = None) -> Path:
    options = options or ProducerOptions.from_env()
    return Path(options.spool_dir) if options.spool_dir else settings.home / "spool"


class ProducerSink(Sink):
    """What `open_producer_sink` returns: a `Sink` that also knows the settings it was opened with
    (the `Recorder` takes its redaction and signing defaults from them) and the recording mode, and
    says whether events go straight to their transport or wait in a spool."""

    settings: Settings
    mode: str

    def wait_direct(self, timeout: float, *, until_failure: bool = False) -> bool:
        """Wait up to ``timeout`` s until events go straight to the transport (no spool in between);
        ``until_failure``: stop waiting once a connection attempt has failed. True when they do."""
        return True

    def spooled(self) -> tuple[int, Path | None]:
        """Events waiting in the spool for the transport, and the spool's directory ((0, None): none)."""
        return 0, None


class LocalProducerSink(LocalSink, ProducerSink):
    """The embedded log's sink, for producers (no spool: the log is local and durable at flush)."""

    def __init__(self, settings: Settings, mode: str):
        super().__init__(LocalLog(settings.log_dir, default_partitions=settings.partitions))
        self.settings = settings
        self.mode = mode


def open_producer_sink(settings: Settings, env: Mapping[str, str] | None = None, **options) -> ProducerSink:
    """The sink for every producer. ``options``: fields of `ProducerOptions` (override the environment,
    ``env``, default os.environ); any other keyword goes to the Kafka producer."""
    fields = set(ProducerOptions.__dataclass_fields__)
    opts = ProducerOptions.from_env(env, **{k: v for k, v in options.items() if k in fields})
    kafka_overrides = {k: v for k, v in options.items() if k not in fields}
    if not settings.uses_kafka:
        return LocalProducerSink(settings, opts.mode)
    return SpoolingSink(settings, opts, **kafka_overrides)


DIRECT, SPOOLING = "direct", "spooling"
MAX_IN_FLIGHT = 100_000


class SpoolingSink(ProducerSink):
    """Kafka when it answers in time, the durable local spool when it does not; see the module doc."""

    def __init__(self, settings: Settings, options: ProducerOptions, **kafka_overrides):
        self.settings = settings
        self.options = options
        self.mode = options.mode
        self.spool = Spool(spool_dir(settings, options))
        self.max_bytes = options.spool_max_bytes
        self.reserve = max(64 * 1024, self.max_bytes // 100)
        self._kafka_overrides = {
            "max_block_ms": options.max_block_ms,
            "bootstrap_timeout_ms": options.connect_timeout_ms,
            "request_timeout_ms": max(options.flush_timeout_ms, 5000),
            "delivery_timeout_ms": max(options.flush_timeout_ms * 3, 30_000),
            "reconnect_backoff_max_ms": 2000,
            **kafka_overrides,
        }
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._state = SPOOLING  # until the background thread has connected and found the spool empty
        self._kafka: Sink | None = None  # the Kafka sink while direct
        self._acked = 0  # acknowledged by earlier Kafka sinks and by the spool
        self._kafka_acked0 = 0  # what self._kafka had acknowledged when it took over
        self._aborted = False
        self._pending: list[Outgoing] = []  # accepted for the spool, not yet written
        self._pending_bytes = 0
        self._topics: set[str] = set()
        self._usage = 0
        self._usage_known = False
        self._overflow = OverflowStats()
        self._closed = False
        self._connected = threading.Event()
        self._first_send_done = False
        self._gave_up_connecting = False
        self._kafka_up = False
        self._connecting = False
        self.last_error: str | None = None
        self.stats = {"direct": 0, "spooled": 0, "drained": 0, "refused": 0, "switches": 0}
        self._thread = threading.Thread(target=self._pump, name="agentledger-spool-pump", daemon=True)
        self._thread.start()

    # -- Sink interface ------------------------------------------------------------------------
    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        """Never blocks on Kafka: the topic is created by the background thread when it connects."""
        with self._lock:
            self._topics.add(topic)
            self._wake.notify_all()

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._send(topic, key, value, reserved=False)

    def send_control(self, topic: str, key: bytes, value: bytes) -> None:
        """For gap, checkpoint and session-end events: may use the reserve above the spool bound, so the
        record of a loss still fits when the spool is full."""
        self._send(topic, key, value, reserved=True)

    def accepting(self) -> bool:
        """True when an ordinary event would be accepted now (used to decide when a gap can be written)."""
        with self._lock:
            return self._state == DIRECT or self._spool_room(64 * 1024, reserved=False)

    def _send(self, topic: str, key: bytes, value: bytes, reserved: bool) -> None:
        with self._lock:
            if not self._first_send_done:
                # A fresh process gives the background connection up to the send bound, so that with a
                # healthy broker its events go straight to Kafka instead of through the spool.
                self._first_send_done = True
                deadline = time.monotonic() + self.options.max_block_ms / 1000
                while self._state != DIRECT and time.monotonic() < deadline and not self._gave_up_connecting:
                    self._wake.wait(max(0.0, deadline - time.monotonic()))
            if self._aborted:
                raise NotDurableError("the sink was aborted", [Outgoing(topic, key, value)])
            if self._closed:
                raise TransportError("the sink is closed")
            self._topics.add(topic)
            if self._state == DIRECT:
                try:
                    self._kafka.send(topic, key, value)
                    self.stats["direct"] += 1
                    if not self.stats["direct"] & 0xFFF and self._kafka.in_flight() > MAX_IN_FLIGHT:
                        # kafka-python's buffer is unbounded: a broker that stops acknowledging shows here
                        self._leave_direct(f"{self._kafka.in_flight()} events unacknowledged: broker too slow")
                    return
                except NotDurableError as exc:
                    self._leave_direct(f"Kafka did not take the event within {self.options.max_block_ms} ms: {exc}")
                    self._spool_one(Outgoing(topic, key, value), reserved)
                    return
            self._spool_one(Outgoing(topic, key, value), reserved)

    def flush(self, timeout: float | None = None) -> None:
        with self._lock:
            if self._state == DIRECT:
                failure = None
                try:
                    self._kafka.flush(self.options.flush_timeout_ms / 1000 if timeout is None else timeout)
                    return
                except NotDurableError as exc:
                    failure = exc
                # not acknowledged in time: what Kafka has not confirmed goes to the spool, in order
                self._leave_direct(f"flush not acknowledged: {failure}", unacked=failure.undelivered)
            self._write_pending()

    # -- acknowledgements: Kafka's while direct; a spooled event is acknowledged once fsync-ed --------
    def partition_for(self, topic: str, key: bytes) -> int | None:
        """Kafka's partition for ``key`` (None while Kafka cannot be asked)."""
        with self._lock:
            if self._kafka is not None:
                return self._kafka.partition_for(topic, key)
        try:
            src = kafka_source(self.settings.bootstrap_servers, client_id="agentledger-metadata")
        except TransportError:
            return None
        try:
            return src.partition_for(topic, key)
        except TransportError:
            return None
        finally:
            src.close()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending) + (self._kafka.in_flight() if self._kafka is not None else 0)

    def acknowledged(self) -> int:
        with self._lock:
            return self._acked + (self._kafka.acknowledged() - self._kafka_acked0 if self._kafka is not None else 0)

    def unacknowledged(self) -> list[Outgoing]:
        with self._lock:
            out = self._kafka.unacknowledged() if self._kafka is not None else []
            if self._kafka is not None:
                self._acked += self._kafka.acknowledged() - self._kafka_acked0
                self._kafka_acked0 = self._kafka.acknowledged()
            out += self._pending
            self._pending, self._pending_bytes = [], 0
            return out

    def abort(self) -> None:
        """Stop the background thread and the Kafka producer; nothing pending is spooled
        (`unacknowledged` hands it back)."""
        with self._lock:
            self._aborted = self._closed = True
            if self._kafka is not None:
                self._kafka.abort()
            self._wake.notify_all()

    def spooled(self) -> tuple[int, Path | None]:
        n = self.spool.undrained() if self._state != DIRECT else 0
        return (n, self.spool.root) if n else (0, None)

    def close(self, timeout: float | None = None) -> None:
        """Flush, give the background thread up to ``timeout`` s (default 5) to connect and drain what is
        spooled (not waiting at all once a connection attempt has failed), then stop. Whatever is still
        spooled stays durable for the next producer or `agentledger spool drain`. Short-lived processes
        that must exit fast pass a small timeout."""
        if self._aborted:
            return
        try:
            self.flush()
        finally:
            deadline = time.monotonic() + (5.0 if timeout is None else timeout)
            with self._lock:
                # Only worth waiting while Kafka answers: otherwise the spool already holds everything durably.
                while self._state != DIRECT and time.monotonic() < deadline and self._thread.is_alive() \
                        and (self._kafka_up or (self._connecting and not self._gave_up_connecting)) \
                        and self._has_spooled():
                    self._wake.wait(0.1)
                self._closed = True
                self._wake.notify_all()
            self._thread.join(max(0.2, deadline - time.monotonic()) if self._kafka_up else 0.2)
            with self._lock:
                self._persist_overflow()
                if self._kafka is not None:
                    try:
                        self._kafka.close(timeout=max(0.5, deadline - time.monotonic()))
                    except NotDurableError as exc:
                        self._spool_unacked(exc.undelivered)
                    finally:
                        self._acked += self._kafka.acknowledged() - self._kafka_acked0
                    self._kafka = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    def wait_direct(self, timeout: float, *, until_failure: bool = False) -> bool:
        """Wait until events go straight to Kafka again (tests, `spool drain`); ``until_failure``:
        stop waiting as soon as a connection attempt has failed (Kafka unreachable: spool at once)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._state != DIRECT and time.monotonic() < deadline \
                    and not (until_failure and self._gave_up_connecting):
                self._wake.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return self._state == DIRECT

    def _has_spooled(self) -> bool:
        return bool(self._pending) or any(self.spool.undrained(t) for t in self.spool.topics())

    def _leave_direct(self, why: str, unacked: list[Outgoing] | None = None) -> None:
        """Switch to spooling: stop the producer and spool what it had not acknowledged (caller holds the lock)."""
        kafka, self._kafka = self._kafka, None
        self._state = SPOOLING
        self.stats["switches"] += 1
        self.last_error = why
        log.warning("agentledger: spooling events locally: %s", why)
        t0 = time.monotonic()
        if kafka is not None:
            kafka.abort()  # first: nothing it still holds is sent after this
            if unacked is None:
                unacked = kafka.unacknowledged()
            self._acked += kafka.acknowledged() - self._kafka_acked0
        t1 = time.monotonic()
        self._spool_unacked(unacked or [])
        log.info("agentledger: switch to spool: abort %.3fs, spooled %d unacknowledged in %.3fs", t1 - t0,
                 len(unacked or []), time.monotonic() - t1)
        self._wake.notify_all()

    def _spool_unacked(self, unacked: list[Outgoing]) -> None:
        # Already chained and sent: they must not be lost, so the bound does not apply to them.
        if unacked:
            self._pending[:0] = unacked
            self._pending_bytes += sum(len(m.value) for m in unacked)
            self._write_pending()

    def _spool_room(self, nbytes: int, reserved: bool) -> bool:
        if not self._usage_known:
            try:
                self._usage = self.spool.usage_bytes()
            except (OSError, TransportError):
                self._usage = 0
            self._usage_known = True
        limit = self.max_bytes + (self.reserve if reserved else 0)
        return self._usage + self._pending_bytes + nbytes <= limit

    def _spool_one(self, msg: Outgoing, reserved: bool) -> None:
        n = len(msg.value)
        if not self._spool_room(n, reserved):
            self.stats["refused"] += 1
            try:
                sid = peek(msg.value).session_id
            except Exception:  # noqa: BLE001
                sid = msg.key.decode("utf-8", "replace")
            self._overflow.add(sid, n)
            if self._overflow.events in (1, 100, 10_000) or self._overflow.events % 100_000 == 0:
                self._persist_overflow()
            raise SpoolFullError(f"spool full ({self._usage + self._pending_bytes} of {self.max_bytes} bytes "
                                 f"undrained, Kafka unavailable): event refused", [msg])
        self._pending.append(msg)
        self._pending_bytes += n
        if len(self._pending) >= self.options.write_every:
            self._write_pending()

    def _write_pending(self) -> None:
        """Append the pending events to the spool (fsync). On failure they are handed back, forgotten."""
        if not self._pending:
            self._persist_overflow()
            return
        pending, self._pending = self._pending, []
        nbytes, self._pending_bytes = self._pending_bytes, 0
        try:
            self.spool.append_outgoing(pending)
        except NotDurableError as exc:
            # Only what the spool did not take is handed back: the rest is durable and must not be
            # rolled back (its seqs would be used twice).
            self._acked += len(pending) - len(exc.undelivered)
            self.last_error = f"spool write failed: {exc}"
            self._usage += nbytes - sum(len(m.value) for m in exc.undelivered)
            raise NotDurableError(f"neither Kafka nor the spool ({self.spool.root}) can take the events: {exc}",
                                  exc.undelivered) from exc
        self._usage += nbytes
        self._acked += len(pending)
        self.stats["spooled"] += len(pending)
        self._persist_overflow()
        self._wake.notify_all()

    def _persist_overflow(self) -> None:
        if self._overflow.events:
            try:
                self.spool.record_overflow(self._overflow)
                self._overflow = OverflowStats()
            except OSError as exc:
                log.error("agentledger: cannot record spool overflow in %s: %s", self.spool.root, exc)

    # -- background: connect, drain, switch back -----------------------------------------------
    def _connect(self) -> Sink:
        kafka = kafka_sink(self.settings.bootstrap_servers, default_partitions=self.settings.partitions,
                           process=self.options.kafka_process, **self._kafka_overrides)
        try:
            with self._lock:
                topics = set(self._topics)
            for t in topics | set(self.spool.topics()):
                kafka.ensure_topic(t)
        except Exception:
            kafka.abort()
            raise
        return kafka

    def _pump(self) -> None:
        backoff = 0.05
        kafka = None
        stuck: tuple[int, float] = (-1, 0.0)
        while True:
            with self._lock:
                if self._closed:
                    break
                if self._state == DIRECT:
                    self._wake.wait(0.5)
                    if self._aborted:
                        # abort() force-closed the producer: the failure that shows now is that close,
                        # and what it held is for `unacknowledged` to hand back, not to spool
                        break
                    if self._state == DIRECT and self._kafka is not None:
                        err = self._kafka.failure()
                        acked, waiting = self._kafka.acknowledged(), self._kafka.in_flight()
                        now = time.monotonic()
                        if not waiting or acked != stuck[0]:
                            stuck = (acked, now)
                        if err is not None:
                            self._leave_direct(f"a delivery failed: {err}")
                        elif waiting and now - stuck[1] > self.options.flush_timeout_ms / 1000:
                            # Kafka stopped acknowledging (broker gone, partition leaderless): do not keep
                            # events in memory until the client's delivery timeout; make them durable now.
                            self._leave_direct(f"no acknowledgement from Kafka for {now - stuck[1]:.1f}s")
                    continue
            try:
                if kafka is None:
                    self._connecting = True
                    try:
                        kafka = self._connect()
                    finally:
                        self._connecting = False
                    self._connected.set()
                    self._kafka_up = True
                try:
                    lock = self.spool.drain_lock()
                    held = lock.__enter__()
                except OSError as exc:
                    # No spool can exist here (unwritable, not a directory): nothing on disk can be
                    # overtaken, so Kafka alone carries the events, the memory-held ones first.
                    if self._direct_without_spool(kafka, exc):
                        kafka = None
                    continue
                try:
                    if not held:
                        time.sleep(0.2)  # another process drains; our events are in its way
                        continue
                    if self._drain_until_direct(kafka):
                        kafka = None  # handed over to the direct path
                finally:
                    lock.__exit__(None, None, None)
                backoff = 0.05
            except Exception as exc:  # noqa: BLE001 -- the pump must survive anything and retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("agentledger spool: Kafka not available yet: %s", exc)
                with self._lock:
                    self._gave_up_connecting = True
                    self._kafka_up = False
                    self._wake.notify_all()
                if kafka is not None:
                    kafka.abort()
                    kafka = None
                with self._lock:
                    if not self._closed:
                        self._wake.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        if kafka is not None:
            kafka.abort()

    def _direct_without_spool(self, kafka, why: Exception) -> bool:
        with self._lock:
            if self._closed:
                return False
            log.warning("agentledger: the spool %s is unusable (%s); sending to Kafka only", self.spool.root, why)
            self._kafka_acked0 = kafka.acknowledged()
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            for i, m in enumerate(pending):
                try:
                    kafka.send(m.topic, m.key, m.value)
                except NotDurableError:
                    self._pending = pending[i:]
                    self._pending_bytes = sum(len(x.value) for x in self._pending)
                    raise
            self._kafka = kafka
            self._state = DIRECT
            self._wake.notify_all()
            return True

    def _drain_until_direct(self, kafka) -> bool:
        """Drain the spool; when it is empty, switch to direct under the send lock. Returns True if switched."""
        flush_s = self.options.flush_timeout_ms / 1000
        while True:
            if self._closed:
                return False
            drained = 0
            for topic in self.spool.topics():
                kafka.ensure_topic(topic)
                drained += self.spool.drain_batch(topic, kafka, flush_timeout=max(flush_s, 10.0))
            if drained:
                self.stats["drained"] += drained
                with self._lock:
                    self._usage_known = False
                    self._wake.notify_all()
                continue
            with self._lock:
                # Nothing left on disk: write what is pending, and if that leaves the spool empty, go direct.
                if self._pending:
                    self._write_pending()
                    continue
                if any(self.spool.undrained(t) for t in self.spool.topics()):
                    continue
                if self._closed:
                    return False
                self._kafka = kafka
                self._kafka_acked0 = kafka.acknowledged()
                self._state = DIRECT
                self._usage_known = False
                self._wake.notify_all()
                log.info("agentledger: spool drained; events go straight to Kafka again")
                return True
