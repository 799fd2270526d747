"""The runner: the poll loop (a fetch thread feeding the committing thread), follow mode, batching,
progress."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from typing import Callable

import duckdb
import fsspec

from agentledger.schemas import codec, native, treelog
from agentledger.schemas.contract import SchemaStore
from agentledger.schemas.envelope import peek
from agentledger.schemas.errors import DecodeError
from agentledger.schemas.transport.base import Source
from agentledger.schemas.retry import retry_transaction
from agentledger.schemas.warehouse import Warehouse

from .common import (
    MAX_MESSAGE_BYTES, DEFAULT_BATCH, OffsetConflict, LogWentBackwards, BatchResult, IngestStats, Batch, chunk_len,
)
from .deadletters import DeadLetters
from .native_path import NativeDecoder
from .python_path import PythonDecoder
from .transaction import IngestTransaction

log = logging.getLogger("agentledger.consumers.ingest")  # one logger for the package, as before the split


_DONE = object()


def _digest(value: bytes) -> str:
    """A record as `Ingestor._ingested_from` names what the warehouse holds from its offset: an event
    by its hash (read from its envelope), anything else by its bytes."""
    try:
        return "hash:" + peek(value).hash
    except DecodeError:
        return "raw:" + hashlib.sha256(value).hexdigest()


class Ingestor(IngestTransaction, DeadLetters, PythonDecoder, NativeDecoder):
    """Exactly-once ingest of one topic into one warehouse (the package doc says how); the
    runner: assignment, the fetch thread, batching, progress and compaction."""

    def __init__(
        self,
        warehouse: Warehouse,
        source: Source,
        topic: str,
        *,
        batch_records: int = DEFAULT_BATCH,
        poll_timeout_s: float = 0.5,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        group: str | None = None,
        prefetch: int = 1,
        max_retries: int = 30,
        compact_every_s: float | None = None,
        after_commit: Callable[[BatchResult], None] | None = None,
        tree_heads: treelog.TreeHeads | None = None,
    ):
        self.wh = warehouse
        self.con = warehouse.con
        self.store: SchemaStore = warehouse.store
        self.source = source
        self.topic = topic
        self.batch_records = batch_records
        self.poll_timeout_s = poll_timeout_s
        self.max_message_bytes = max_message_bytes
        self.group = group
        self.prefetch = max(1, prefetch)
        self.max_retries = max_retries
        self.compact_every_s = compact_every_s
        # Called on the ingest thread after each batch committed (detection: consumers/detect). An
        # exception stops ingest; the batch itself is committed and stays.
        self.after_commit = after_commit
        self._batch_sessions: list[str] = []
        self._fs = fsspec.filesystem("memory")
        protocol = self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]
        if not self.con.filesystem_is_registered(protocol):
            self.con.register_filesystem(self._fs)
        self.wh.load("avro")
        self.wh.tune_for_ingest()
        cur = self.store.current
        self._sync = os.urandom(16)
        self._ocf_header = codec.ocf_header(cur.schema, self._sync)
        self._ended_index = self.store.kind_by_label("session", "session_ended").index
        self._ended_tag = "u%d" % self._ended_index
        self._native_off = native.decoder() is None
        self._raw = False  # the fetch thread polls raw chunks (LocalSource.poll_raw) for the decoder
        self._assigned = False
        # fetch thread <-> main thread
        self._lock = threading.Condition()
        self._generation = 0
        self._busy = False
        self._resync = False
        self._fetch_con: duckdb.DuckDBPyConnection | None = None
        self._last_compact = time.monotonic()
        self._touched: list[str] = []
        # the Merkle tree: leaves appended by the transaction in progress, heads signed and published
        self.tree_heads = tree_heads
        self._tree_added = 0
        self._unsigned = False
        self._last_signed = float("-inf")
        self._follow = False

    def assign(self, *, log_replaced: bool = False) -> None:
        """Read every partition, each from the offset stored with the data (the beginning if none).
        ``log_replaced``: see `check_not_behind`."""
        self.check_not_behind(log_replaced=log_replaced)
        self.source.assign(self.topic, self.stored_offsets())
        self._assigned = True

    def subscribe(self, *, log_replaced: bool = False) -> None:
        """Join the consumer group: partitions come and go with rebalances (see _on_assigned/_on_revoked)."""
        self.check_not_behind(log_replaced=log_replaced)
        self.source.subscribe(self.topic, self.group, self._on_assigned, self._on_revoked)
        self._assigned = True

    def check_not_behind(self, *, log_replaced: bool = False) -> None:
        """Raise `LogWentBackwards` when a partition is not the one ingested: it now ends below its
        stored offset, or the record at the offset ingested last (when the source can read it,
        `Source.record_at`) is not the event or dead letter the warehouse holds from there. With
        ``log_replaced`` (the user knows why), those partitions' stored offsets are dropped instead,
        so they are read from their beginning again."""
        stored = self.stored_offsets()  # (first: ends only grow, so a concurrent commit cannot pass them)
        if not stored:
            return
        ends = self.source.end_offsets(self.topic)
        why = {p: f"ends at offset {ends.get(p, 0)} but was ingested up to {o}"
               for p, o in stored.items() if ends.get(p, 0) < o}
        now = {p: r for p, o in stored.items() if p not in why and o > 0
               for r in [self.source.record_at(self.topic, p, o - 1)] if r is not None}
        held = self._ingested_from({p: stored[p] - 1 for p in now}) if now else {}
        for p, value in now.items():
            if held.get(p) not in (None, _digest(value)):
                why[p] = f"holds another record at offset {stored[p] - 1} than the one ingested from there"
        if not why:
            return
        if not log_replaced:
            raise LogWentBackwards(self.topic, why)
        log.warning("%s: reading partitions %s from their beginning again (--log-replaced): %s", self.topic,
                    sorted(why), why)

        def drop(con: duckdb.DuckDBPyConnection) -> None:
            con.execute("BEGIN")
            try:
                con.executemany('DELETE FROM ingest_offsets WHERE topic = ? AND "partition" = ?',
                                [[self.topic, p] for p in why])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

        retry_transaction(lambda: drop(self.con), "forgetting the offsets of a replaced log")

    def _ingested_from(self, offsets: dict[int, int]) -> dict[int, str]:
        """What the warehouse holds from one offset of each partition, as `_digest` of its bytes would
        be: the stored event's hash, or the digest of a dead letter's raw bytes. (One equality query per
        partition: its filters reach each table's zone maps, ~10 ms at 20M rows; a row-value IN list
        scanned everything, 2.3 s.)"""
        out: dict[int, str] = {}
        for p, o in offsets.items():
            row = self.con.execute("SELECT hash FROM events WHERE source_topic = ? AND source_partition = ? "
                                   "AND source_offset = ? LIMIT 1", [self.topic, p, o]).fetchone()
            if row is None:
                row = self.con.execute('SELECT raw FROM dead_letters WHERE topic = ? AND "partition" = ? '
                                       'AND "offset" = ? AND raw IS NOT NULL LIMIT 1', [self.topic, p, o]).fetchone()
                if row is not None:
                    out[p] = "raw:" + hashlib.sha256(bytes(row[0])).hexdigest()
            else:
                out[p] = "hash:" + row[0]
        return out

    def lag(self) -> int:
        ends = self.source.end_offsets(self.topic)
        pos = self.source.positions()
        mine = {p for t, p in self.source.assigned() if t == self.topic}
        return sum(max(0, end - pos.get((self.topic, p), 0)) for p, end in ends.items() if p in mine)

    # -- consumer-group callbacks (run during poll; kafka-python runs them on its IO thread) ---
    def _on_revoked(self, partitions: list[int]) -> None:
        """Drop what was fetched but not processed; wait until the batch in flight commits or aborts."""
        with self._lock:
            self._generation += 1
            while self._busy:
                self._lock.wait()
        log.info("partitions revoked: %s", partitions)

    def _on_assigned(self, partitions: list[int]) -> None:
        with self._lock:
            self._generation += 1
            while self._busy:
                self._lock.wait()
        stored = self._read_offsets_retrying()
        for p in partitions:  # no blocking client calls here: the Kafka client may run this on its IO thread
            if p in stored:
                self.source.seek(self.topic, p, stored[p])
            else:
                self.source.seek_to_beginning(self.topic, p)
        log.info("partitions assigned: %s (from %s)", partitions, {p: stored.get(p, "beginning") for p in partitions})

    def _read_offsets_retrying(self) -> dict[int, int]:
        return retry_transaction(lambda: self.stored_offsets(self._fetch_cursor()), "reading the stored offsets",
                                 attempts=self.max_retries + 1)

    def _fetch_cursor(self) -> duckdb.DuckDBPyConnection:
        if self._fetch_con is None:
            self._fetch_con = self.wh.cursor()
        return self._fetch_con

    # -- main loop ----------------------------------------------------------------------------
    def run(
        self,
        *,
        follow: bool = False,
        stop: threading.Event | None = None,
        on_batch: Callable[[BatchResult, IngestStats], None] | None = None,
        idle_exit_s: float | None = None,
    ) -> IngestStats:
        """Ingest until caught up (zero lag) or, with ``follow``, until ``stop`` is set.

        A fetch thread fills a small queue of batches while this thread commits them, so polling
        and DuckDB overlap. Any error stops both and is raised here; committed batches stay."""
        if not self._assigned:
            self.subscribe() if self.group else self.assign()
        self._follow = follow
        self.publish_heads()  # a head signed by an earlier run but never published goes out first
        stop = stop or threading.Event()
        halt = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        # With the native decoder, a third thread decodes each batch (its process runs on the other
        # core) while this one commits the previous batch and the fetch thread polls the next.
        decode_ahead = not self._native_off
        fetched: queue.Queue = queue.Queue(maxsize=self.prefetch) if decode_ahead else q
        self._raw = decode_ahead and hasattr(self.source, "poll_raw")
        threads = [threading.Thread(target=self._fetch_loop, args=(fetched, follow, stop, halt, idle_exit_s),
                                    name="agentledger-fetch", daemon=True)]
        if decode_ahead:
            threads.append(threading.Thread(target=self._decode_loop, args=(fetched, q, stop, halt),
                                            name="agentledger-decode", daemon=True))
        stats = IngestStats()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        try:
            while not stop.is_set():
                try:
                    item = q.get(timeout=0.2)
                except queue.Empty:
                    self._maybe_sign_pending()
                    self._maybe_compact(follow)
                    continue
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                with self._lock:
                    if item.generation != self._generation:
                        self._resync = True  # fetched before a rebalance: read again from the stored offsets
                        continue
                    self._busy = True
                try:
                    r = self.ingest(item)
                except OffsetConflict as exc:
                    stats.offset_conflicts += 1
                    log.warning("offset conflict, re-seeking: %s", exc)
                    with self._lock:
                        self._resync = True
                        self._generation += 1
                    continue
                finally:
                    with self._lock:
                        self._busy = False
                        self._lock.notify_all()
                stats.add(r)
                log.info("committed batch %d: %d messages, %d events, %d quarantined, %d healed",
                         stats.batches, r.messages, r.accepted, r.dead_letters, r.healed)
                if self.after_commit:
                    with self.wh.all_threads():
                        self.after_commit(r)
                if on_batch:
                    on_batch(r, stats)
                self._maybe_compact(follow)
        finally:
            halt.set()
            for t in threads:
                t.join(timeout=30)
            if self._fetch_con is not None:
                self._fetch_con.close()
                self._fetch_con = None
        self.finish_tree()
        stats.seconds = time.perf_counter() - t0
        return stats

    @staticmethod
    def _put(q: queue.Queue, item, stop: threading.Event, halt: threading.Event) -> bool:
        while not (halt.is_set() or stop.is_set()):
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _decode_loop(self, src: queue.Queue, dst: queue.Queue, stop: threading.Event, halt: threading.Event) -> None:
        """Between the fetch thread and the committing thread: each batch decoded by the native
        decoder ahead of its transaction (``Batch.native``); everything else passed on as it is."""
        while not (halt.is_set() or stop.is_set()):
            try:
                item = src.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, Batch) and item.generation == self._generation:
                try:
                    item.native = self._native(item)
                except Exception:  # left to the committing thread, which tries again and raises
                    log.debug("decoding ahead failed", exc_info=True)
            if not self._put(dst, item, stop, halt) or item is _DONE or isinstance(item, BaseException):
                return

    def _fetch_loop(self, q: queue.Queue, follow: bool, stop: threading.Event, halt: threading.Event,
                    idle_exit_s: float | None) -> None:
        def put(item) -> bool:
            return self._put(q, item, stop, halt)

        idle_since = time.monotonic()
        try:
            while not (halt.is_set() or stop.is_set()):
                if self._resync:
                    self._do_resync()
                with self._lock:
                    gen = self._generation
                start = self._positions()
                msgs = self._collect()
                if self._generation != gen:
                    # a rebalance (or a resync) happened during the poll: what was fetched may mix
                    # old and new positions -- drop it and restart every partition from the warehouse
                    self._do_resync()
                    continue
                if msgs:
                    idle_since = time.monotonic()
                    end = self._positions()
                    b = Batch.of_chunks(msgs) if self._raw else Batch.of(msgs)
                    for k in b.start:
                        b.start[k] = start.get(k, b.start[k])
                        b.end[k] = max(end.get(k, b.end[k]), b.end[k])
                    b.generation = gen
                    if not put(b):
                        return
                    continue
                if not follow and self._caught_up():
                    put(_DONE)
                    return
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    put(_DONE)
                    return
        except BaseException as exc:  # handed to the main thread, which raises it
            put(exc)

    def _caught_up(self) -> bool:
        if self.group and not self.source.assigned():
            return False  # not a member yet: nothing assigned is not the same as nothing to read
        return self.lag() == 0

    def _positions(self) -> dict[tuple[str, int], int]:
        try:
            return self.source.positions()
        except Exception:  # a position the client cannot tell yet; the batch's own offsets will do
            return {}

    def _do_resync(self) -> None:
        """After an offset conflict: every partition restarts from the offset stored in the warehouse."""
        with self._lock:
            self._resync = False
            self._generation += 1
        stored = self._read_offsets_retrying()
        for t, p in self.source.assigned():
            if t != self.topic:
                continue
            if p in stored:
                self.source.seek(t, p, stored[p])
            else:
                self.source.seek_to_beginning(t, p)

    def _collect(self) -> list:
        """Up to ``batch_records`` messages (raw: `LocalSource.poll_raw` chunks)."""
        if self._raw:
            chunks = self.source.poll_raw(self.batch_records, self.poll_timeout_s)
            got = sum(chunk_len(c) for c in chunks)
            while chunks and got < self.batch_records:
                more = self.source.poll_raw(self.batch_records - got, 0.05)
                if not more:
                    break
                chunks.extend(more)
                got += sum(chunk_len(c) for c in more)
            return chunks
        batch = self.source.poll(self.batch_records, self.poll_timeout_s)
        while batch and len(batch) < self.batch_records:
            more = self.source.poll(self.batch_records - len(batch), 0.05)
            if not more:
                break
            batch.extend(more)
        return batch

    def _maybe_compact(self, follow: bool) -> None:
        if not (follow and self.compact_every_s and self.wh.is_lake):
            return
        if time.monotonic() - self._last_compact < self.compact_every_s:
            return
        self._last_compact = time.monotonic()
        try:
            out = self.wh.compact()  # never merge here: readers would see merged tables empty (Warehouse.compact)
            log.info("compacted the lake: %s", out)
        except duckdb.Error as exc:  # compaction is housekeeping: a lost race waits for the next round
            log.warning("compaction skipped: %s", str(exc).splitlines()[0])
