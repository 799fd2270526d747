"""Exactly-once ingest of encoded events from a transport into the DuckDB warehouse.

Guarantee (the one auditors rely on): for every batch, the accepted events, the quarantined
messages, the new chain heads and the next offset of every (topic, partition) in the batch are
written in ONE DuckDB transaction. A crash before COMMIT loses the whole batch and the offsets
with it, so the restarted consumer reads the same messages again; a crash after COMMIT keeps both.
The source never commits offsets of its own. As a second guard, an event is only accepted if it
extends its session's chain head (seq = head + 1, prev_hash = head hash) and its event_id is new.

Decoding is native: message bodies that share a writer schema are framed as one in-memory Avro
Object Container File and DuckDB's avro extension turns them into rows. Python touches each message
only to check its header and its hash (SHA-256 over the raw bytes, no decoding).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import duckdb
import fsspec
import pyarrow as pa

from schemas import codec
from schemas.contract import SchemaStore
from schemas.envelope import GENESIS_HASH, HASH_FIELD_LEN
from schemas.errors import DecodeError, WarehouseError
from schemas.transport.base import Message, Source
from schemas.warehouse import Warehouse

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024
_HASH_TAG = b"\x80\x01"


@dataclass
class BatchResult:
    messages: int = 0
    accepted: int = 0
    dead_letters: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class IngestStats:
    batches: int = 0
    messages: int = 0
    accepted: int = 0
    dead_letters: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, r: BatchResult) -> None:
        self.batches += 1
        self.messages += r.messages
        self.accepted += r.accepted
        self.dead_letters += r.dead_letters
        for k, v in r.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def as_dict(self) -> dict:
        return {"batches": self.batches, "messages": self.messages, "events": self.accepted,
                "dead_letters": self.dead_letters, "seconds": round(self.seconds, 3), "reasons": self.reasons}


@dataclass
class _Dead:
    i: int
    reason: str
    detail: str
    session_id: str | None = None
    seq: int | None = None
    event_id: str | None = None


class Ingestor:
    def __init__(
        self,
        warehouse: Warehouse,
        source: Source,
        topic: str,
        *,
        batch_records: int = 50_000,
        poll_timeout_s: float = 0.5,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.wh = warehouse
        self.con = warehouse.con
        self.store: SchemaStore = warehouse.store
        self.source = source
        self.topic = topic
        self.batch_records = batch_records
        self.poll_timeout_s = poll_timeout_s
        self.max_message_bytes = max_message_bytes
        self._fs = fsspec.filesystem("memory")
        if not self.con.filesystem_is_registered(self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]):
            self.con.register_filesystem(self._fs)
        self.wh.load("avro")
        cur = self.store.current
        self._sync = os.urandom(16)
        self._ocf_header = codec.ocf_header(cur.schema, self._sync)
        self._insert_sql = warehouse.insert_select_sql("stage")
        self._assigned = False

    # -- offsets ------------------------------------------------------------------------------
    def stored_offsets(self) -> dict[int, int]:
        rows = self.con.execute(
            'SELECT "partition", next_offset FROM ingest_offsets WHERE topic = ?', [self.topic]).fetchall()
        return {p: o for p, o in rows}

    def assign(self) -> None:
        """Seek every partition to the offset stored with the data (the beginning if none)."""
        self.source.assign(self.topic, self.stored_offsets())
        self._assigned = True

    def lag(self) -> int:
        ends = self.source.end_offsets(self.topic)
        pos = self.source.positions()
        return sum(max(0, end - pos.get((self.topic, p), 0)) for p, end in ends.items())

    # -- main loop ----------------------------------------------------------------------------
    def run(
        self,
        *,
        follow: bool = False,
        stop: threading.Event | None = None,
        on_batch: Callable[[BatchResult, IngestStats], None] | None = None,
        idle_exit_s: float | None = None,
    ) -> IngestStats:
        """Ingest until caught up (zero lag) or, with ``follow``, until ``stop`` is set."""
        if not self._assigned:
            self.assign()
        stats = IngestStats()
        t0 = time.perf_counter()
        while not (stop and stop.is_set()):
            batch = self._collect()
            if batch:
                r = self.ingest_batch(batch)
                stats.add(r)
                log.info("committed batch %d: %d messages, %d events, %d quarantined",
                         stats.batches, r.messages, r.accepted, r.dead_letters)
                if on_batch:
                    on_batch(r, stats)
                if len(batch) >= self.batch_records or follow:
                    continue
            if not follow and self.lag() == 0:
                break
        stats.seconds = time.perf_counter() - t0
        return stats

    def _collect(self) -> list[Message]:
        batch = self.source.poll(self.batch_records, self.poll_timeout_s)
        while batch and len(batch) < self.batch_records:
            more = self.source.poll(self.batch_records - len(batch), 0.05)
            if not more:
                break
            batch.extend(more)
        return batch

    # -- one batch, one transaction -----------------------------------------------------------
    def ingest_batch(self, msgs: list[Message]) -> BatchResult:
        dead: list[_Dead] = []
        groups: dict[bytes, list[int]] = {}
        max_len = self.max_message_bytes
        sha = hashlib.sha256
        by_fp = self.store.by_fingerprint
        known: dict[bytes, bool] = {}
        for i, m in enumerate(msgs):
            v = m.value
            if v is None or len(v) < codec.SOE_HEADER_LEN + HASH_FIELD_LEN or v[:2] != codec.SOE_MAGIC:
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

        result = BatchResult(messages=len(msgs))
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            staged = self._stage(msgs, groups, dead)
            if staged:
                accepted = self._check_chains(msgs, dead)
                if accepted:
                    con.execute(self._insert_sql + " WHERE s._i NOT IN (SELECT _i FROM rejected)")
                    self._update_heads()
                result.accepted = accepted
            self._write_dead_letters(msgs, dead)
            self._write_offsets(msgs)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            for t in ("stage", "rejected"):
                con.execute(f"DROP TABLE IF EXISTS {t}")
        result.dead_letters = len(dead)
        for d in dead:
            result.reasons[d.reason] = result.reasons.get(d.reason, 0) + 1
        return result

    def _stage(self, msgs: list[Message], groups: dict[bytes, list[int]], dead: list[_Dead]) -> int:
        """Decode the hash-valid messages natively into TEMP TABLE stage (+ provenance, + _i)."""
        con = self.con
        con.execute("CREATE OR REPLACE TEMP TABLE rejected (_i BIGINT, reason VARCHAR, detail VARCHAR)")
        total = 0
        for fp, idxs in groups.items():
            version = self.store.by_fingerprint(fp)
            bodies = [msgs[i].value[10:] for i in idxs]
            if fp != self.store.current.fingerprint:
                bodies, idxs = self._upcast(version, bodies, idxs, msgs, dead)
            total += self._stage_part(msgs, fp, idxs, bodies, dead, created=total > 0)
        return total

    def _stage_part(self, msgs, fp: bytes, idxs: list[int], bodies: list[bytes], dead: list[_Dead], created: bool) -> int:
        """Stage one run of bodies; if DuckDB cannot decode the run, bisect to isolate the bad body.

        Every staged body already passed the hash check, so a decode failure means a producer wrote
        bytes its own schema cannot read -- rare enough that bisecting costs nothing in practice."""
        if not idxs:
            return 0
        con = self.con
        meta = pa.table({
            "_i": pa.array(idxs, pa.int64()),
            "schema_fingerprint": pa.array([fp.hex()] * len(idxs), pa.string()),
            "source_topic": pa.array([msgs[i].topic for i in idxs], pa.string()),
            "source_partition": pa.array([msgs[i].partition for i in idxs], pa.int32()),
            "source_offset": pa.array([msgs[i].offset for i in idxs], pa.int64()),
        })
        path = self._put_ocf(bodies)
        sql = (f"SELECT a.*, m.*, now()::TIMESTAMP AS ingested_at FROM read_avro('memory://{path}') a "
               "POSITIONAL JOIN _meta m")
        con.register("_meta", meta)
        try:
            if created:
                con.execute(f"INSERT INTO stage {sql}")
            else:
                con.execute(f"CREATE OR REPLACE TEMP TABLE stage AS {sql}")
            return len(idxs)
        except duckdb.Error as exc:
            err = str(exc).splitlines()[0]
        finally:
            con.unregister("_meta")
            self._fs.rm(path)
        if len(idxs) == 1:
            dead.append(_Dead(idxs[0], "undecodable", f"DuckDB avro reader: {err}"))
            return 0
        mid = len(idxs) // 2
        n = self._stage_part(msgs, fp, idxs[:mid], bodies[:mid], dead, created)
        return n + self._stage_part(msgs, fp, idxs[mid:], bodies[mid:], dead, created or n > 0)

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
                            THEN b.seq = coalesce(h.head_seq, -1) + 1 AND b.prev_hash = coalesce(h.head_hash, '{GENESIS_HASH}')
                            ELSE b.seq = b.p_seq + 1 AND b.prev_hash = b.p_hash END)
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
                        "reason": [d.reason for d in rejected], "detail": [d.detail for d in rejected]})
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
            for _, i, seq, prev, h, eid in pending:
                if seq <= head_seq:
                    existing = accepted_hash.get(seq, old.get(seq))
                    if existing == h:
                        reason, detail = "duplicate", f"seq {seq} was already ingested with identical content"
                    else:
                        reason, detail = "conflicting_duplicate", f"seq {seq} was already ingested with different content"
                elif seq == head_seq + 1:
                    reason, detail = "chain_mismatch", f"seq {seq}: prev_hash does not match the hash of seq {head_seq}"
                else:
                    reason, detail = "seq_gap", f"seq {seq} arrived while the chain head is {head_seq} (missing or reordered)"
                rejected.append(_Dead(i, reason, detail, sid, seq, eid))
        return rejected

    def _update_heads(self) -> None:
        con = self.con
        con.execute("""
            CREATE OR REPLACE TEMP TABLE new_heads AS
            SELECT s.session_id, max(s.seq) AS head_seq, arg_max(s.hash, s.seq) AS head_hash, count(*) AS n,
                   min(s.occurred_at) AS first_at, max(s.occurred_at) AS last_at,
                   bool_or(union_tag(s.payload) = 'u%d') AS ended
            FROM stage s WHERE s._i NOT IN (SELECT _i FROM rejected) GROUP BY s.session_id
        """ % self.store.kind_by_label("session", "session_ended").index)
        con.execute("""
            CREATE OR REPLACE TEMP TABLE merged_heads AS
            SELECT n.session_id, n.head_seq, n.head_hash, coalesce(h.event_count, 0) + n.n AS event_count,
                   least(h.first_at, n.first_at) AS first_at, greatest(h.last_at, n.last_at) AS last_at,
                   coalesce(h.ended, false) OR n.ended AS ended, now()::TIMESTAMP AS updated_at
            FROM new_heads n LEFT JOIN chain_heads h USING (session_id)
        """)
        con.execute("DELETE FROM chain_heads WHERE session_id IN (SELECT session_id FROM new_heads)")
        con.execute("INSERT INTO chain_heads SELECT * FROM merged_heads")
        con.execute("DROP TABLE new_heads")
        con.execute("DROP TABLE merged_heads")

    def _write_dead_letters(self, msgs: list[Message], dead: list[_Dead]) -> None:
        if not dead:
            return
        for d in dead:
            if d.session_id is None:
                d.session_id, d.seq, d.event_id = _best_effort_ids(self.store, msgs[d.i].value)
        tbl = pa.table({
            "dead_letter_id": [str(uuid.uuid4()) for _ in dead],
            "topic": [msgs[d.i].topic for d in dead],
            "partition": pa.array([msgs[d.i].partition for d in dead], pa.int32()),
            "offset": pa.array([msgs[d.i].offset for d in dead], pa.int64()),
            "key": pa.array([msgs[d.i].key for d in dead], pa.binary()),
            "raw": pa.array([msgs[d.i].value for d in dead], pa.binary()),
            "reason": [d.reason for d in dead],
            "detail": [d.detail for d in dead],
            "session_id": pa.array([d.session_id for d in dead], pa.string()),
            "seq": pa.array([d.seq for d in dead], pa.int64()),
            "event_id": pa.array([d.event_id for d in dead], pa.string()),
            "fingerprint": [msgs[d.i].value[2:10].hex() if msgs[d.i].value and len(msgs[d.i].value) >= 10 else None
                            for d in dead],
        })
        self.con.register("_dead", tbl)
        try:
            self.con.execute("""INSERT INTO dead_letters
                SELECT dead_letter_id, topic, "partition", "offset", "key", raw, reason, detail, session_id, seq,
                       event_id, fingerprint, now()::TIMESTAMP, NULL, NULL FROM _dead""")
        finally:
            self.con.unregister("_dead")

    def _write_offsets(self, msgs: list[Message]) -> None:
        nxt: dict[tuple[str, int], int] = {}
        for m in msgs:
            k = (m.topic, m.partition)
            if m.offset + 1 > nxt.get(k, -1):
                nxt[k] = m.offset + 1
        for (topic, p), off in nxt.items():
            self.con.execute('DELETE FROM ingest_offsets WHERE topic = ? AND "partition" = ?', [topic, p])
            self.con.execute("INSERT INTO ingest_offsets VALUES (?, ?, ?, now()::TIMESTAMP)", [topic, p, off])


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
