"""The transaction: one batch's rows, quarantined messages, chain heads, offsets and tree leaves,
committed together."""

from __future__ import annotations

import logging
import time

import duckdb
import pyarrow as pa

from agentledger.schemas import treelog
from agentledger.schemas.envelope import GENESIS_HASH
from agentledger.schemas.transport.base import Message
from agentledger.schemas.retry import retry_transaction
from agentledger.schemas.warehouse import transaction

from .common import (
    _PARKED, MAX_SESSION_ID, _BAD_SESSION_ID, OffsetConflict, BatchResult, _Dead, Batch, _Retry, _sql_list, NOT_TRIED,
)
from .native_path import _NativeStage

log = logging.getLogger("agentledger.consumers.ingest")  # one logger for the package, as before the split


class IngestTransaction:
    """The transaction: one batch's rows, quarantined messages, chain heads, offsets and tree leaves,
    committed together. A part of `Ingestor`."""

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

    # -- one batch, one transaction -----------------------------------------------------------
    def ingest_batch(self, msgs: list[Message]) -> BatchResult:
        """Ingest ``msgs`` in one transaction (offsets: from the messages themselves)."""
        return self.ingest(Batch.of(msgs))

    def ingest(self, batch: Batch) -> BatchResult:
        """Commit ``batch`` exactly once. Retries a transaction that lost a race on a DuckLake;
        raises `OffsetConflict` (nothing written) if another writer already committed these offsets."""
        staged = batch.native if batch.native is not NOT_TRIED else self._native(batch)
        checked = None if staged is not None else self._precheck(batch.messages)
        # on the native path the messages are only made if a dead letter needs its bytes
        msgs = batch if staged is not None else batch.messages
        retries = 0

        def lost_race(attempt: int, exc: BaseException) -> None:
            nonlocal retries
            retries = attempt + 1

        r = retry_transaction(lambda: self._transaction(msgs, checked, batch=batch, native_stage=staged),
                              "ingest transaction", attempts=self.max_retries + 1, on_retry=lost_race)
        r.retries = retries
        r.decoder = "native" if staged is not None else "python"
        return r

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
            if native_stage is not None:
                native_stage.unstage(con)
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
            accepted = self._check_chains(msgs, dead, native_stage)
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

    # -- the chain guard ----------------------------------------------------------------------
    def _check_chains(self, msgs: list[Message], dead: list[_Dead], native_stage: "_NativeStage | None" = None) -> int:
        """Accept what extends each session's chain head; everything else goes to `rejected`."""
        if native_stage is not None and native_stage.sessions is not None:
            bad_sessions = self._bad_sessions_native(native_stage)
        else:
            bad_sessions = self._bad_sessions()
        return self._check_rest(bad_sessions, dead, native_stage)

    def _bad_sessions_native(self, native_stage: "_NativeStage") -> list[str]:
        """`_bad_sessions` on the decoder's one row per session: its events extend each other
        (``linked``) and the first extends the stored head."""
        con = self.con
        con.register("_native_sessions", native_stage.sessions)
        try:
            return [r[0] for r in con.execute(f"""
                SELECT s.session_id FROM _native_sessions s LEFT JOIN chain_heads h USING (session_id)
                WHERE NOT (s.linked AND s.first_seq::HUGEINT = coalesce(h.head_seq, -1) + 1
                           AND s.first_prev = coalesce(h.head_hash, '{GENESIS_HASH}'))""").fetchall()]
        finally:
            con.unregister("_native_sessions")

    def _bad_sessions(self) -> list[str]:
        """Sessions whose staged events do not each extend the one before (the first: the stored head)."""
        con = self.con
        return [r[0] for r in con.execute(f"""
            WITH b AS (
              SELECT s._i, s.session_id, s.seq, s.prev_hash,
                     lag(s.seq) OVER w AS p_seq, lag(s.hash) OVER w AS p_hash, row_number() OVER w AS rn
              FROM stage s WINDOW w AS (PARTITION BY s.session_id ORDER BY s._i))
            SELECT DISTINCT b.session_id FROM b LEFT JOIN chain_heads h USING (session_id)
            WHERE NOT (CASE WHEN b.rn = 1
                            THEN b.seq::HUGEINT = coalesce(h.head_seq, -1) + 1 AND b.prev_hash = coalesce(h.head_hash, '{GENESIS_HASH}')
                            ELSE b.seq::HUGEINT = b.p_seq::HUGEINT + 1 AND b.prev_hash = b.p_hash END)
        """).fetchall()]

    def _check_rest(self, bad_sessions: list[str], dead: list[_Dead], native_stage: "_NativeStage | None") -> int:
        con = self.con
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
            # ... and within the batch: of accepted events sharing an id, the first keeps it (the
            # decoder says when no id occurs twice at all)
            if native_stage is not None and not native_stage.dup_event_ids:
                break
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
