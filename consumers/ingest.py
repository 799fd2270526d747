"""Exactly-once ingest of encoded events from a transport into the warehouse (DuckDB file or DuckLake).

Guarantee (the one auditors rely on): for every batch, the accepted events, the quarantined
messages, the new chain heads and the next offset of every (topic, partition) in the batch are
written in ONE warehouse transaction. A crash before COMMIT loses the whole batch and the offsets
with it, so the restarted consumer reads the same messages again; a crash after COMMIT keeps both.
The source never commits offsets of its own.

Two guards make a stale writer harmless (a "zombie": a group member that lost its partitions but
does not know yet, or a second process on the same warehouse): the offset of a partition only
advances if the stored offset is exactly where the batch starts, checked inside the transaction
(else the transaction rolls back and the consumer re-seeks); and an event is only accepted if it
extends its session's chain head (seq = head + 1, prev_hash = head hash) and its event_id is new.
On a DuckLake, a commit that loses a race with another writer is retried from the start.

Speed: a fetch thread polls the source (kafka-python decodes record batches in Python) while the
main thread runs the previous batch through DuckDB, which releases the GIL -- the two overlap on
two cores. Decoding is native. A batch of `NATIVE_MIN_MESSAGES` or more goes to
``agentledger-avro2arrow --ingest`` (native/avro2arrow/src/ingest.rs, adapter `schemas.native`): it
checks every message's header, size, writer schema and hash, decodes it, and writes one Arrow file
per event kind that goes straight into that kind's table; the chain guard below then runs on the
envelope rows as always. Only when it vouches for *every* message of the batch are its rows used;
otherwise (damage, an older writer schema, a decoder missing or failing) the whole batch takes the
Python path, so the verdicts never depend on the decoder (tests/test_native_ingest.py). The Python
path: message bodies that share a writer schema are framed as one in-memory Avro Object Container
File and DuckDB's avro extension turns them into rows; Python checks each message's header and
hash (SHA-256 over the raw bytes).

Chains continue across batches, restarts and partitions (the heads are in `chain_heads`). An event
that arrived before its predecessor is parked in `dead_letters` (seq_gap) and ingested, in the same
transaction, as soon as the predecessor lands; its dead letter is then marked resolved.

The log-wide Merkle tree (schemas/treelog.py): every transaction that advances sessions -- a batch,
the healing of parked events, `deadletters retry`, `import bundle`, all through `_update_heads` --
appends one leaf per advanced session (its new chain head) in that same transaction. With an
operator key (``tree_heads``), the tree head is signed in the committing transaction (while
following: at most every ``every_s`` seconds, and always at the end of a run), then published.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable

import duckdb
import fsspec
import pyarrow as pa

from agentledger.schemas import codec, native, treelog
from agentledger.schemas.contract import SchemaStore
from agentledger.schemas.envelope import GENESIS_HASH, HASH_FIELD_LEN
from agentledger.schemas.errors import AgentLedgerError, DecodeError
from agentledger.schemas.transport.base import Message, Source
from agentledger.schemas.retry import retry_transaction
from agentledger.schemas.sql import literal
from agentledger.schemas.warehouse import Warehouse, transaction

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024
# Large transactions: DuckDB's per-commit cost is high (see bench/ingest.py and docs/warehouse.md).
DEFAULT_BATCH = 100_000
_HASH_TAG = b"\x80\x01"
# Reasons whose dead letters may become acceptable later without any change to the event itself.
_PARKED = ("seq_gap",)
# Batches of fewer messages skip the native decoder (starting a process costs more than it saves).
NATIVE_MIN_MESSAGES = 2000

MAX_SESSION_ID = 256
_BAD_SESSION_ID = (f"(session_id = '' OR length(session_id) > {MAX_SESSION_ID} "
                   "OR regexp_matches(session_id, '[\\x00-\\x1f\\x7f]'))")


class OffsetConflict(AgentLedgerError):
    """The stored offset of a partition is not where this batch starts: another writer (a zombie, or
    the new owner after a rebalance) committed it. The batch is rolled back, never half-applied."""

    def __init__(self, conflicts: dict[tuple[str, int], tuple[int | None, int]]):
        self.conflicts = conflicts
        super().__init__("; ".join(f"{t}/{p}: stored {s}, batch starts at {b}" for (t, p), (s, b) in conflicts.items()))


@dataclass
class BatchResult:
    messages: int = 0
    accepted: int = 0
    dead_letters: int = 0
    healed: int = 0  # parked dead letters accepted because their predecessor arrived
    reasons: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    sessions: list[str] = field(default_factory=list)  # sessions that gained events (committed)
    decoder: str = "python"  # "native": agentledger-avro2arrow vouched for every message of the batch


@dataclass
class IngestStats:
    batches: int = 0
    messages: int = 0
    accepted: int = 0
    dead_letters: int = 0
    healed: int = 0
    retries: int = 0
    offset_conflicts: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, r: BatchResult) -> None:
        self.batches += 1
        self.messages += r.messages
        self.accepted += r.accepted
        self.dead_letters += r.dead_letters
        self.healed += r.healed
        self.retries += r.retries
        for k, v in r.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def as_dict(self) -> dict:
        return {"batches": self.batches, "messages": self.messages, "events": self.accepted,
                "dead_letters": self.dead_letters, "healed": self.healed, "retries": self.retries,
                "offset_conflicts": self.offset_conflicts, "seconds": round(self.seconds, 3),
                "reasons": self.reasons}


@dataclass
class _Dead:
    i: int
    reason: str
    detail: str
    session_id: str | None = None
    seq: int | None = None
    event_id: str | None = None


@dataclass
class Batch:
    """Messages polled together, with the source position of each of their partitions before and after."""

    messages: list[Message]
    start: dict[tuple[str, int], int]
    end: dict[tuple[str, int], int]
    generation: int = 0

    @classmethod
    def of(cls, msgs: list[Message]) -> "Batch":
        start: dict[tuple[str, int], int] = {}
        end: dict[tuple[str, int], int] = {}
        for m in msgs:
            k = (m.topic, m.partition)
            if k not in start or m.offset < start[k]:
                start[k] = m.offset
            if m.offset + 1 > end.get(k, -1):
                end[k] = m.offset + 1
        return cls(msgs, start, end)


@dataclass
class _Retry:
    """Dead letters fed through validation again (deadletters retry, or a predecessor arrived)."""

    ids: list[str]


_DONE = object()


class Ingestor:
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

    # -- tree heads ---------------------------------------------------------------------------
    def _may_sign(self) -> bool:
        th = self.tree_heads
        if th is None or th.signer is None:
            return False
        return not self._follow or time.monotonic() - self._last_signed >= th.every_s

    def _sign_in_transaction(self) -> treelog.TreeHead | None:
        """Inside the committing transaction: sign the tree head if this one added leaves and it is time."""
        if not self._tree_added:
            return None
        self._unsigned = True
        if not self._may_sign():
            return None
        return treelog.sign_head(self.con, self.tree_heads.signer)

    def _after_commit(self, head: treelog.TreeHead | None) -> None:
        if head is None:
            return
        self._unsigned = False
        self._last_signed = time.monotonic()
        self.publish_heads()

    def publish_heads(self) -> None:
        th = self.tree_heads
        if th is not None and th.publisher is not None:
            th.publisher.publish(self.con)

    def _maybe_sign_pending(self) -> None:
        if self._unsigned and self._may_sign():
            self.finish_tree()

    def finish_tree(self) -> treelog.TreeHead | None:
        """Sign the tree if leaves were appended since the last head (its own small transaction), then
        publish whatever head is not published yet. Run at the end of every run and stop."""
        th = self.tree_heads
        if th is None or th.signer is None:
            return None
        signer = th.signer

        def sign() -> treelog.TreeHead | None:
            with transaction(self.con):
                return treelog.sign_head(self.con, signer)

        head = retry_transaction(sign, "signing the tree head", attempts=self.max_retries + 1)
        self._unsigned = False
        self._last_signed = time.monotonic()
        self.publish_heads()
        return head

    # -- offsets ------------------------------------------------------------------------------
    def stored_offsets(self, con: duckdb.DuckDBPyConnection | None = None) -> dict[int, int]:
        rows = (con or self.con).execute(
            'SELECT "partition", max(next_offset) FROM ingest_offsets WHERE topic = ? GROUP BY 1', [self.topic]).fetchall()
        return {p: o for p, o in rows}

    def assign(self) -> None:
        """Read every partition, each from the offset stored with the data (the beginning if none)."""
        self.source.assign(self.topic, self.stored_offsets())
        self._assigned = True

    def subscribe(self) -> None:
        """Join the consumer group: partitions come and go with rebalances (see _on_assigned/_on_revoked)."""
        self.source.subscribe(self.topic, self.group, self._on_assigned, self._on_revoked)
        self._assigned = True

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
        fetcher = threading.Thread(target=self._fetch_loop, args=(q, follow, stop, halt, idle_exit_s),
                                   name="agentledger-fetch", daemon=True)
        stats = IngestStats()
        t0 = time.perf_counter()
        fetcher.start()
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
                    self.after_commit(r)
                if on_batch:
                    on_batch(r, stats)
                self._maybe_compact(follow)
        finally:
            halt.set()
            fetcher.join(timeout=30)
            if self._fetch_con is not None:
                self._fetch_con.close()
                self._fetch_con = None
        self.finish_tree()
        stats.seconds = time.perf_counter() - t0
        return stats

    def _fetch_loop(self, q: queue.Queue, follow: bool, stop: threading.Event, halt: threading.Event,
                    idle_exit_s: float | None) -> None:
        def put(item) -> bool:
            while not (halt.is_set() or stop.is_set()):
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

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
                    b = Batch.of(msgs)
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

    def _collect(self) -> list[Message]:
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
            out = self.wh.compact()
            log.info("compacted the lake: %s", out)
        except duckdb.Error as exc:  # compaction is housekeeping: a lost race waits for the next round
            log.warning("compaction skipped: %s", str(exc).splitlines()[0])

    # -- one batch, one transaction -----------------------------------------------------------
    def ingest_batch(self, msgs: list[Message]) -> BatchResult:
        """Ingest ``msgs`` in one transaction (offsets: from the messages themselves)."""
        return self.ingest(Batch.of(msgs))

    def ingest(self, batch: Batch) -> BatchResult:
        """Commit ``batch`` exactly once. Retries a transaction that lost a race on a DuckLake;
        raises `OffsetConflict` (nothing written) if another writer already committed these offsets."""
        staged = self._native(batch.messages)
        checked = None if staged is not None else self._precheck(batch.messages)
        retries = 0

        def lost_race(attempt: int, exc: BaseException) -> None:
            nonlocal retries
            retries = attempt + 1

        r = retry_transaction(lambda: self._transaction(batch.messages, checked, batch=batch, native_stage=staged),
                              "ingest transaction", attempts=self.max_retries + 1, on_retry=lost_race)
        r.retries = retries
        r.decoder = "native" if staged is not None else "python"
        return r

    def _native(self, msgs: list[Message]) -> "_NativeStage | None":
        """The batch decoded by the native decoder (`_NativeStage`), when it vouches for every
        message of it; else None, and the whole batch takes the Python path (`_precheck`, `_stage`),
        which quarantines what is wrong with a reason -- so the verdicts never depend on the decoder."""
        if (len(msgs) < NATIVE_MIN_MESSAGES or self._native_off
                or any(m.damaged is not None or m.value is None for m in msgs)
                or len({m.topic for m in msgs}) != 1):
            return None
        cur = self.store.current
        try:
            with native.scratch_dir(2 * sum(len(m.value) for m in msgs)) as work:
                frame = native.values_frame([m.value for m in msgs], [m.partition for m in msgs],
                                            [m.offset for m in msgs])
                d = native.decode_ingest(frame, cur.schema, cur.fingerprint, work,
                                         max_message_bytes=self.max_message_bytes, ended_branch=self._ended_index)
                del frame
                if d.punted or d.records != len(msgs) or -1 in d.chunks:
                    log.debug("the native decoder left %d of %d messages to Python: the batch takes the Python path",
                              len(d.punted), len(msgs))
                    return None
                return _NativeStage.load(d, msgs[0].topic, cur.fingerprint.hex())
        except native.NativeDecodeError as exc:
            log.info("native decoder: %s; this batch takes the Python path", exc)
            if native.decoder() is None:
                self._native_off = True
            return None

    def retry_dead_letters(self, letters: list[tuple[str, Message]], heal: bool = True) -> BatchResult:
        """Feed dead letters ``(dead_letter_id, message)`` through the same validation, in one
        transaction: accepted ones become events (with the letter's provenance) and their letters
        are resolved; identical duplicates are resolved as such; the rest stay, with the new reason."""
        msgs = [m for _, m in letters]
        checked = self._precheck(msgs)
        return retry_transaction(lambda: self._transaction(msgs, checked, retry=_Retry([i for i, _ in letters]),
                                                           heal=heal),
                                 "retry transaction", attempts=self.max_retries + 1)

    def _precheck(self, msgs: list[Message]) -> tuple[list[_Dead], dict[bytes, list[int]]]:
        """Header, size, writer schema and hash of every message, from raw bytes (no decoding)."""
        dead: list[_Dead] = []
        groups: dict[bytes, list[int]] = {}
        max_len = self.max_message_bytes
        sha = hashlib.sha256
        by_fp = self.store.by_fingerprint
        known: dict[bytes, bool] = {}
        min_len = codec.SOE_HEADER_LEN + HASH_FIELD_LEN
        magic = codec.SOE_MAGIC
        for i, m in enumerate(msgs):
            if m.damaged is not None:  # the source could not read this offset back whole: keep its bytes
                dead.append(_Dead(i, "log_damaged", m.damaged))
                continue
            v = m.value
            if v is None or len(v) < min_len or v[:2] != magic:
                dead.append(_Dead(i, "undecodable", "not an agentledger event (bad single-object header or too short)"))
                continue
            if len(v) > max_len:
                dead.append(_Dead(i, "oversized", f"{len(v)} bytes > {max_len}"))
                continue
            fp = v[2:10]
            ok = known.get(fp)
            if ok is None:
                ok = known[fp] = by_fp(fp) is not None
            if not ok:
                dead.append(_Dead(i, "unknown_fingerprint", f"writer schema {fp.hex()} is not in the schema store"))
                continue
            if v[-HASH_FIELD_LEN:-64] != _HASH_TAG or sha(v[:-HASH_FIELD_LEN]).hexdigest().encode() != v[-64:]:
                dead.append(_Dead(i, "hash_mismatch", "the message bytes do not hash to the hash it carries"))
                continue
            groups.setdefault(fp, []).append(i)
        return dead, groups

    def _transaction(self, msgs: list[Message], checked, *, batch: Batch | None = None,
                     retry: _Retry | None = None, heal: bool = True,
                     native_stage: "_NativeStage | None" = None) -> BatchResult:
        con = self.con
        if native_stage is not None:
            dead: list[_Dead] = []
            staged = native_stage.stage(con)
        else:
            dead = list(checked[0])
            # Decode BEFORE the transaction: a failed statement aborts a DuckDB transaction, and
            # isolating an undecodable body means letting the reader fail (then bisecting).
            staged = self._stage(msgs, checked[1], dead)
        try:
            with transaction(con):
                if batch is not None:
                    self._check_offsets(batch)
                result = self._apply(msgs, staged, dead, retry=retry, native_stage=native_stage)
                if batch is not None:
                    self._write_offsets(msgs, batch)
                head = self._sign_in_transaction()
        finally:
            for t in ("stage", "rejected", "new_heads"):
                con.execute(f"DROP TABLE IF EXISTS temp.{t}")
        self._after_commit(head)
        if heal and result.accepted and self._touched:
            healed_sessions: list[str] = []
            result.healed = self._heal(healed_sessions)
            result.accepted += result.healed
            result.sessions = list(dict.fromkeys([*result.sessions, *healed_sessions]))
        return result

    def _apply(self, msgs: list[Message], staged: int, dead: list[_Dead], *, retry: _Retry | None,
               native_stage: "_NativeStage | None" = None) -> BatchResult:
        """Chain-check and insert what `_stage` (or the native decoder) decoded, inside the caller's
        transaction."""
        result = BatchResult(messages=len(msgs))
        con = self.con
        self._touched = []
        self._batch_sessions = []
        self._tree_added = 0
        con.execute("CREATE OR REPLACE TEMP TABLE rejected (_i BIGINT, reason VARCHAR, detail VARCHAR)")
        if staged:
            accepted = self._check_chains(msgs, dead)
            if accepted:
                some_rejected = con.execute("SELECT count(*) FROM rejected").fetchone()[0] > 0
                where = "WHERE s._i NOT IN (SELECT _i FROM rejected)" if some_rejected else ""
                if native_stage is not None:
                    native_stage.insert(self.wh, where)
                else:
                    self.wh.insert_events("stage", where, materialize=False)
                self._update_heads("s.branch = %d" % self._ended_index if native_stage is not None
                                   else f"union_tag(s.payload) = '{self._ended_tag}'")
            result.accepted = accepted
            result.sessions = list(self._batch_sessions)
        if retry is None:
            self._write_dead_letters(msgs, dead)
        else:
            self._resolve_letters(msgs, dead, retry)
        result.dead_letters = len(dead)
        for d in dead:
            result.reasons[d.reason] = result.reasons.get(d.reason, 0) + 1
        return result

    def _heal(self, sessions_out: list[str] | None = None) -> int:
        """Parked events whose predecessor just landed: accept them now, in transactions of their own
        (a run of them: each round may unblock the next). Sessions that gained events are appended
        to ``sessions_out``."""
        healed = 0
        sessions = self._touched
        for _ in range(1000):
            con = self.con
            con.register("_touched", pa.table({"session_id": pa.array(sessions, pa.string())}))
            try:
                # every parked event of those sessions, so that a whole reordered run lands at once
                rows = con.execute(f"""
                    SELECT d.dead_letter_id, d.topic, d."partition", d."offset", d."key", d.raw
                    FROM dead_letters d JOIN chain_heads h USING (session_id)
                    WHERE d.resolved_at IS NULL AND d.reason IN {_sql_list(_PARKED)} AND d.seq > h.head_seq
                      AND d.session_id IN (SELECT session_id FROM _touched)
                    ORDER BY d.session_id, d.seq, d.received_at""").fetchall()
            finally:
                con.unregister("_touched")
            if not rows:
                break
            r = self.retry_dead_letters([(lid, Message(t, p, o, k, bytes(raw))) for lid, t, p, o, k, raw in rows],
                                        heal=False)
            healed += r.accepted
            if sessions_out is not None:
                sessions_out.extend(r.sessions)
            if not r.accepted:
                break
            sessions = self._touched
        return healed

    # -- staging ------------------------------------------------------------------------------
    def _stage(self, msgs: list[Message], groups: dict[bytes, list[int]], dead: list[_Dead]) -> int:
        """Decode the hash-valid messages natively into TEMP TABLE stage (+ provenance, + _i)."""
        con = self.con
        path = self._put_ocf([])
        try:
            con.register("_meta", self._meta(msgs, b"", []))
            con.execute(f"CREATE OR REPLACE TEMP TABLE stage AS {self._stage_sql(path)}")
        finally:
            con.unregister("_meta")
            self._fs.rm(path)
        total = 0
        for fp, idxs in groups.items():
            version = self.store.by_fingerprint(fp)
            bodies = [msgs[i].value[10:] for i in idxs]
            if fp != self.store.current.fingerprint:
                bodies, idxs = self._upcast(version, bodies, idxs, msgs, dead)
            total += self._stage_part(msgs, fp, idxs, bodies, dead)
        return total

    @staticmethod
    def _stage_sql(path: str) -> str:
        return (f"SELECT a.*, m.*, now()::TIMESTAMP AS ingested_at FROM read_avro('memory://{path}') a "
                "POSITIONAL JOIN _meta m")

    @staticmethod
    def _meta(msgs: list[Message], fp: bytes, idxs: list[int]) -> pa.Table:
        return pa.table({
            "_i": pa.array(idxs, pa.int64()),
            "_claimed": pa.array([msgs[i].value[-64:].decode("ascii", "replace") for i in idxs], pa.string()),
            "schema_fingerprint": pa.array([fp.hex()] * len(idxs), pa.string()),
            "source_topic": pa.array([msgs[i].topic for i in idxs], pa.string()),
            "source_partition": pa.array([msgs[i].partition for i in idxs], pa.int32()),
            "source_offset": pa.array([msgs[i].offset for i in idxs], pa.int64()),
        })

    def _stage_part(self, msgs, fp: bytes, idxs: list[int], bodies: list[bytes], dead: list[_Dead]) -> int:
        """Stage one run of bodies; if they do not decode cleanly, bisect to isolate the bad ones.

        Every staged body already passed the hash check, so a bad body means a producer sealed bytes
        its own schema cannot read. DuckDB's reader does not stop a record at its block's end, so a
        body that decodes short shifts the records after it: each row's decoded ``hash`` must equal
        the hash its message carries, or the run is split. Rare enough to cost nothing in practice."""
        if not idxs:
            return 0
        con = self.con
        meta = self._meta(msgs, fp, idxs)
        path = self._put_ocf(bodies)
        con.register("_meta", meta)
        err = None
        try:
            before = con.execute("SELECT count(*) FROM stage").fetchone()[0]
            con.execute(f"INSERT INTO stage {self._stage_sql(path)}")
            n, bad = con.execute(f"""SELECT count(*), count(*) FILTER (WHERE hash IS DISTINCT FROM _claimed)
                                     FROM stage WHERE _i >= {min(idxs)} AND _i IN (SELECT _i FROM _meta)""").fetchone()
            if n == len(idxs) and bad == 0 and n + before == con.execute("SELECT count(*) FROM stage").fetchone()[0]:
                return len(idxs)
            err = ("the Avro body does not span the message (short or trailing bytes)" if len(idxs) == 1
                   else "records decoded out of step")
            con.execute("DELETE FROM stage WHERE _i IN (SELECT _i FROM _meta)")
        except duckdb.Error as exc:
            err = "DuckDB avro reader: " + str(exc).splitlines()[0]
        finally:
            con.unregister("_meta")
            self._fs.rm(path)
        if len(idxs) == 1:
            dead.append(_Dead(idxs[0], "undecodable", err))
            return 0
        mid = len(idxs) // 2
        return (self._stage_part(msgs, fp, idxs[:mid], bodies[:mid], dead)
                + self._stage_part(msgs, fp, idxs[mid:], bodies[mid:], dead))

    def _put_ocf(self, bodies: list[bytes]) -> str:
        path = f"/agentledger-ingest/{uuid.uuid4().hex}.avro"
        with self._fs.open(path, "wb") as f:
            f.write(self._ocf_header)
            f.write(codec.ocf_blocks(bodies, self._sync))
        return path

    def _upcast(self, version, bodies, idxs, msgs, dead):
        """Older writer schema: resolve to the current reader in Python (rare; hashes stay the writer's)."""
        out_b, out_i = [], []
        cur = self.store.current.parsed
        for i, body in zip(idxs, bodies):
            try:
                rec = codec.decode(body, version.parsed, cur)
                out_b.append(codec.encode(cur, rec))
                out_i.append(i)
            except DecodeError as exc:
                dead.append(_Dead(i, "undecodable", exc.detail))
        return out_b, out_i

    # -- the chain guard ----------------------------------------------------------------------
    def _check_chains(self, msgs: list[Message], dead: list[_Dead]) -> int:
        """Accept what extends each session's chain head; everything else goes to `rejected`."""
        con = self.con
        bad_sessions = [r[0] for r in con.execute(f"""
            WITH b AS (
              SELECT s._i, s.session_id, s.seq, s.prev_hash,
                     lag(s.seq) OVER w AS p_seq, lag(s.hash) OVER w AS p_hash, row_number() OVER w AS rn
              FROM stage s WINDOW w AS (PARTITION BY s.session_id ORDER BY s._i))
            SELECT DISTINCT b.session_id FROM b LEFT JOIN chain_heads h USING (session_id)
            WHERE NOT (CASE WHEN b.rn = 1
                            THEN b.seq::HUGEINT = coalesce(h.head_seq, -1) + 1 AND b.prev_hash = coalesce(h.head_hash, '{GENESIS_HASH}')
                            ELSE b.seq::HUGEINT = b.p_seq::HUGEINT + 1 AND b.prev_hash = b.p_hash END)
        """).fetchall()]
        # event_id must be new: against the warehouse (zone maps prune by the UUIDv7 range) ...
        excluded: dict[int, _Dead] = {}
        for i, sid, seq, eid in con.execute("""
            WITH r AS (SELECT min(event_id) lo, max(event_id) hi FROM stage)
            SELECT s._i, s.session_id, s.seq, s.event_id FROM stage s, r
            JOIN events e ON e.event_id = s.event_id
            WHERE e.event_id BETWEEN r.lo AND r.hi AND (e.session_id <> s.session_id OR e.seq <> s.seq)
        """).fetchall():
            excluded[i] = _Dead(i, "duplicate_event_id", f"event_id {eid} is already used by another event", sid, seq, eid)
        # ... and values the contract's types promise (a sealed record may still carry absurd ones)
        for i, sid, seq, eid, why in con.execute(
                f"SELECT _i, session_id, seq, event_id, CASE WHEN {_BAD_SESSION_ID} THEN"
                f" 'session_id is empty, longer than {MAX_SESSION_ID} characters or has control characters'"
                " WHEN TRY_CAST(event_id AS UUID) IS NULL THEN 'event_id is not a UUID'"
                " ELSE 'occurred_at outside 1970..9999' END FROM stage WHERE TRY_CAST(event_id AS UUID) IS NULL"
                f" OR {_BAD_SESSION_ID} OR NOT (occurred_at BETWEEN TIMESTAMP '1970-01-01' AND TIMESTAMP '9999-12-31')"
                ).fetchall():
            excluded.setdefault(i, _Dead(i, "invalid_value", why, sid, seq, eid))
        sessions = set(bad_sessions) | {d.session_id for d in excluded.values()}
        folded: list[_Dead] = []
        while True:
            folded = self._fold(sorted(sessions), set(excluded)) if sessions else []
            self._set_rejected([*excluded.values(), *folded])
            # ... and within the batch: of accepted events sharing an id, the first keeps it
            collisions = con.execute("""
                SELECT _i, session_id, seq, event_id FROM (
                  SELECT _i, session_id, seq, event_id,
                         first_value(session_id) OVER w AS s0, first_value(seq) OVER w AS q0
                  FROM stage WHERE _i NOT IN (SELECT _i FROM rejected)
                  WINDOW w AS (PARTITION BY event_id ORDER BY _i))
                WHERE session_id <> s0 OR seq <> q0""").fetchall()
            if not collisions:
                break
            for i, sid, seq, eid in collisions:
                excluded[i] = _Dead(i, "duplicate_event_id", f"event_id {eid} is already used in this batch", sid, seq, eid)
                sessions.add(sid)
        # a message ahead of its chain that reuses the id of an accepted event is a conflicting
        # duplicate, as it is when that event sits in an earlier batch: the reason must not depend on
        # where the batches were cut (and it is not parked as a gap that could heal)
        gaps = [d for d in folded if d.reason == "seq_gap"]
        if gaps:
            taken = {r[0] for r in con.execute(
                "SELECT event_id FROM stage WHERE _i NOT IN (SELECT _i FROM rejected) AND event_id IN (SELECT unnest(?))",
                [sorted({d.event_id for d in gaps})]).fetchall()}
            for d in gaps:
                if d.event_id in taken:
                    d.reason, d.detail = "duplicate_event_id", (f"event_id {d.event_id} is already used in this batch "
                                                                f"(and seq {d.seq} is ahead of the chain)")
        dead.extend(excluded.values())
        dead.extend(folded)
        n_stage = con.execute("SELECT count(*) FROM stage").fetchone()[0]
        return n_stage - len(excluded) - len(folded)

    def _set_rejected(self, rejected: list[_Dead]) -> None:
        con = self.con
        con.execute("DELETE FROM rejected")
        if not rejected:
            return
        tbl = pa.table({"_i": pa.array([d.i for d in rejected], pa.int64()),
                        "reason": pa.array([d.reason for d in rejected], pa.string()),
                        "detail": pa.array([d.detail for d in rejected], pa.string())})
        con.register("_rej", tbl)
        try:
            con.execute("INSERT INTO rejected SELECT * FROM _rej")
        finally:
            con.unregister("_rej")

    def _fold(self, sessions: list[str], excluded: set[int]) -> list[_Dead]:
        """Sequential chain check for the few sessions whose batch is not a clean continuation."""
        con = self.con
        con.register("_sess", pa.table({"session_id": pa.array(sessions, pa.string())}))
        try:
            rows = con.execute("""
                SELECT s.session_id, s._i, s.seq, s.prev_hash, s.hash, s.event_id
                FROM stage s JOIN _sess USING (session_id) ORDER BY s.session_id, s._i""").fetchall()
            heads = {sid: (seq, h) for sid, seq, h in con.execute(
                "SELECT session_id, head_seq, head_hash FROM chain_heads JOIN _sess USING (session_id)").fetchall()}
        finally:
            con.unregister("_sess")
        by_session: dict[str, list[tuple]] = {}
        for r in rows:
            if r[1] not in excluded:
                by_session.setdefault(r[0], []).append(r)
        rejected = []
        for sid, srows in by_session.items():
            head_seq, head_hash = heads.get(sid, (-1, GENESIS_HASH))
            accepted_hash: dict[int, str] = {}
            pending = list(srows)
            progress = True
            while progress and pending:  # fixpoint: accept events that arrived out of order within the batch
                progress = False
                rest = []
                for r in pending:
                    _, i, seq, prev, h, eid = r
                    if seq == head_seq + 1 and prev == head_hash:
                        head_seq, head_hash = seq, h
                        accepted_hash[seq] = h
                        progress = True
                    else:
                        rest.append(r)
                pending = rest
            if not pending:
                continue
            old = {}
            older = [r[2] for r in pending if r[2] <= head_seq and r[2] not in accepted_hash]
            if older:
                old = dict(con.execute(
                    "SELECT seq, hash FROM events WHERE session_id = ? AND seq IN (SELECT unnest(?))",
                    [sid, older]).fetchall())
            seen_gap: dict[int, str] = {}
            for _, i, seq, _prev, h, eid in pending:
                if seq <= head_seq:
                    existing = accepted_hash.get(seq, old.get(seq))
                    if existing == h:
                        reason, detail = "duplicate", f"seq {seq} was already ingested with identical content"
                    else:
                        reason, detail = "conflicting_duplicate", f"seq {seq} was already ingested with different content"
                elif seq == head_seq + 1:
                    reason, detail = "chain_mismatch", f"seq {seq}: prev_hash does not match the hash of seq {head_seq}"
                elif seen_gap.get(seq) == h:
                    reason, detail = "duplicate", f"seq {seq} arrived twice with identical content, ahead of the chain"
                else:
                    reason, detail = "seq_gap", f"seq {seq} arrived while the chain head is {head_seq} (missing or reordered)"
                    seen_gap.setdefault(seq, h)
                rejected.append(_Dead(i, reason, detail, sid, seq, eid))
        return rejected

    def _update_heads(self, ended_sql: str | None = None) -> None:
        """``ended_sql``: whether stage row ``s`` ends its session (default: its payload's union tag)."""
        con = self.con
        ended_sql = ended_sql or f"union_tag(s.payload) = '{self._ended_tag}'"
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE new_heads AS
            SELECT n.session_id, n.head_seq, n.head_hash, coalesce(h.event_count, 0) + n.n AS event_count,
                   CASE WHEN h.first_at IS NULL THEN n.first_at ELSE least(h.first_at, n.first_at) END AS first_at,
                   CASE WHEN h.last_at IS NULL THEN n.last_at ELSE greatest(h.last_at, n.last_at) END AS last_at,
                   coalesce(h.ended, false) OR n.ended AS ended, now()::TIMESTAMP AS updated_at
            FROM (
              SELECT s.session_id, max(s.seq) AS head_seq, arg_max(s.hash, s.seq) AS head_hash, count(*) AS n,
                     min(s.occurred_at) AS first_at, max(s.occurred_at) AS last_at,
                     bool_or({ended_sql}) AS ended
              FROM stage s WHERE s._i NOT IN (SELECT _i FROM rejected) GROUP BY s.session_id
            ) n LEFT JOIN chain_heads h USING (session_id)
        """)
        self._batch_sessions = [r[0] for r in con.execute("SELECT session_id FROM new_heads").fetchall()]
        con.execute("DELETE FROM chain_heads WHERE session_id IN (SELECT session_id FROM new_heads)")
        con.execute("INSERT INTO chain_heads SELECT * FROM new_heads")
        # one Merkle leaf per advanced session, in this transaction (schemas/treelog.py)
        leaves = con.execute("SELECT session_id, head_seq, head_hash, event_count FROM new_heads "
                             "ORDER BY session_id").fetchall()
        if leaves:
            treelog.append_leaves(con, leaves)
        self._tree_added = len(leaves)
        # sessions whose parked events may now fit (see _heal), if any session has parked events at all
        self._touched = [r[0] for r in con.execute(f"""
            SELECT DISTINCT d.session_id FROM dead_letters d JOIN new_heads n USING (session_id)
            WHERE d.resolved_at IS NULL AND d.reason IN {_sql_list(_PARKED)} AND d.seq = n.head_seq + 1""").fetchall()]

    # -- dead letters -------------------------------------------------------------------------
    def _write_dead_letters(self, msgs: list[Message], dead: list[_Dead]) -> None:
        if not dead:
            return
        for d in dead:
            if d.session_id is None:
                d.session_id, d.seq, d.event_id = _best_effort_ids(self.store, msgs[d.i].value)
        tbl = pa.table({
            "dead_letter_id": pa.array([str(uuid.uuid4()) for _ in dead], pa.string()),
            "topic": pa.array([msgs[d.i].topic for d in dead], pa.string()),
            "partition": pa.array([msgs[d.i].partition for d in dead], pa.int32()),
            "offset": pa.array([msgs[d.i].offset for d in dead], pa.int64()),
            "key": pa.array([msgs[d.i].key for d in dead], pa.binary()),
            "raw": pa.array([msgs[d.i].value for d in dead], pa.binary()),
            "reason": pa.array([d.reason for d in dead], pa.string()),
            "detail": pa.array([d.detail for d in dead], pa.string()),
            "session_id": pa.array([d.session_id for d in dead], pa.string()),
            "seq": pa.array([d.seq for d in dead], pa.int64()),
            "event_id": pa.array([d.event_id for d in dead], pa.string()),
            "fingerprint": pa.array([msgs[d.i].value[2:10].hex() if msgs[d.i].value and len(msgs[d.i].value) >= 10
                                     and msgs[d.i].damaged is None else None for d in dead], pa.string()),
        })
        self.con.register("_dead", tbl)
        try:
            self.con.execute("""INSERT INTO dead_letters
                SELECT dead_letter_id, topic, "partition", "offset", "key", raw, reason, detail, session_id, seq,
                       event_id, fingerprint, now()::TIMESTAMP, NULL, NULL FROM _dead""")
        finally:
            self.con.unregister("_dead")

    def _resolve_letters(self, msgs: list[Message], dead: list[_Dead], retry: _Retry) -> None:
        """After re-validating dead letters: resolve the accepted and the identical duplicates; the
        others keep waiting, with the reason they failed for this time."""
        by_i = {d.i: d for d in dead}
        resolved: list[tuple[str, str]] = []
        still: list[tuple[str, str, str]] = []
        for i, lid in enumerate(retry.ids):
            d = by_i.get(i)
            if d is None:
                resolved.append((lid, "ingested on retry"))
            elif d.reason == "duplicate":
                resolved.append((lid, "duplicate: an identical event is in the warehouse"))
            else:
                still.append((lid, d.reason, d.detail))
        con = self.con
        if resolved:
            con.register("_res", pa.table({"id": pa.array([r[0] for r in resolved], pa.string()),
                                           "resolution": pa.array([r[1] for r in resolved], pa.string())}))
            try:
                con.execute("""UPDATE dead_letters SET resolved_at = now()::TIMESTAMP, resolution = r.resolution
                               FROM _res r WHERE dead_letters.dead_letter_id = r.id""")
            finally:
                con.unregister("_res")
        changed = still
        if changed:
            con.register("_still", pa.table({"id": pa.array([s[0] for s in changed], pa.string()),
                                             "reason": pa.array([s[1] for s in changed], pa.string()),
                                             "detail": pa.array([s[2] for s in changed], pa.string())}))
            try:
                con.execute("""UPDATE dead_letters SET reason = s.reason, detail = s.detail
                               FROM _still s WHERE dead_letters.dead_letter_id = s.id
                                 AND (dead_letters.reason <> s.reason OR dead_letters.detail <> s.detail)""")
            finally:
                con.unregister("_still")

    # -- offsets --------------------------------------------------------------------------------
    def _check_offsets(self, batch: Batch) -> None:
        """The zombie guard: each partition's stored offset must be exactly where this batch starts."""
        if not batch.start:
            return
        stored = {(self.topic, p): o for p, o in self.stored_offsets().items()}
        conflicts = {}
        begin = None
        for k, first in batch.start.items():
            s = stored.get(k) if k[0] == self.topic else self._stored_other(k)
            if s is None or s == first:
                continue
            if first > s:
                # Not a zombie if retention removed [s, first): the messages are gone from the source.
                begin = begin if begin is not None else self._beginning()
                if begin.get(k[1], 0) >= first:
                    log.error("%s/%d: offsets %d..%d were deleted by retention before they were ingested",
                              k[0], k[1], s, first - 1)
                    continue
            conflicts[k] = (s, first)
        if conflicts:
            raise OffsetConflict(conflicts)

    def _stored_other(self, k: tuple[str, int]) -> int | None:
        row = self.con.execute('SELECT max(next_offset) FROM ingest_offsets WHERE topic = ? AND "partition" = ?',
                               list(k)).fetchone()
        return row[0] if row else None

    def _beginning(self) -> dict[int, int]:
        try:
            return self.source.beginning_offsets(self.topic)
        except Exception:
            return {}

    def _write_offsets(self, msgs: list[Message], batch: Batch | None = None) -> None:
        nxt = dict((batch or Batch.of(msgs)).end)
        if not nxt:
            return
        tbl = pa.table({"topic": pa.array([k[0] for k in nxt], pa.string()),
                        "partition": pa.array([k[1] for k in nxt], pa.int32()),
                        "next_offset": pa.array(list(nxt.values()), pa.int64())})
        self.con.register("_off", tbl)
        try:
            self.con.execute("""DELETE FROM ingest_offsets WHERE topic || '/' || "partition"
                                IN (SELECT topic || '/' || "partition" FROM _off)""")
            self.con.execute('INSERT INTO ingest_offsets SELECT topic, "partition", next_offset, now()::TIMESTAMP FROM _off')
        finally:
            self.con.unregister("_off")


def _sql_list(items: Iterable[str]) -> str:
    return "(" + ", ".join(literal(i) for i in items) + ")"


def _best_effort_ids(store: SchemaStore, value: bytes | None) -> tuple[str | None, int | None, str | None]:
    """Session, seq and event id of a quarantined message, if it decodes at all (helps auditors)."""
    if not value:
        return None, None, None
    try:
        rec = store.decode(value)
        eid = rec.get("event_id")
        return rec.get("session_id"), rec.get("seq"), None if eid is None else str(eid)
    except Exception:  # bad input is data here, not an error
        return None, None, None


class _NativeStage:
    """A batch the native decoder vouched for: its envelope rows (the chain guard's ``stage``: _i,
    session_id, seq, prev_hash, hash, event_id, occurred_at, branch) and one Arrow table per kind
    (every field of the event, ``payload`` as that kind's record, _i and the source position), held
    in memory so that a retried transaction reads them again."""

    def __init__(self, env: pa.Table, kinds: dict[int, pa.Table], topic: str, fingerprint_hex: str):
        self.env, self.kinds, self.topic, self.fingerprint_hex = env, kinds, topic, fingerprint_hex

    @classmethod
    def load(cls, d: "native.IngestDecoded", topic: str, fingerprint_hex: str) -> "_NativeStage":
        import pyarrow.ipc as ipc

        def read(path) -> pa.Table:
            with pa.memory_map(str(path)) as src:
                return ipc.open_file(src).read_all()

        try:
            env = read(d.env_file)
            kinds = {t: read(d.kind_file(t)) for t in d.kinds}
        except (OSError, pa.ArrowException) as exc:
            raise native.NativeDecodeError(f"cannot read what the decoder wrote: {exc}") from exc
        if env.num_rows != d.rows or sum(t.num_rows for t in kinds.values()) != d.rows:
            raise native.NativeDecodeError("the decoder's files do not hold the rows it reports")
        return cls(env, kinds, topic, fingerprint_hex)

    def stage(self, con: duckdb.DuckDBPyConnection) -> int:
        con.register("_native_env", self.env)
        try:
            con.execute("CREATE OR REPLACE TEMP TABLE stage AS SELECT * FROM _native_env")
        finally:
            con.unregister("_native_env")
        return self.env.num_rows

    def insert(self, wh: Warehouse, where: str) -> None:
        kinds = {k.index: k for k in wh.store.kinds}
        constants = {"schema_fingerprint": literal(self.fingerprint_hex),
                     "source_topic": literal(self.topic),
                     "ingested_at": "now()::TIMESTAMP"}
        for t, table in self.kinds.items():
            wh.con.register("_native_kind", table)
            try:
                wh.insert_kind(kinds[t], "_native_kind", table.column_names, constants, where)
            finally:
                wh.con.unregister("_native_kind")
