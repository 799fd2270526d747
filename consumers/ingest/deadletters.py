"""Dead letters: quarantined messages (raw bytes and a reason), retried and healed."""

from __future__ import annotations

import logging
import uuid

import pyarrow as pa

from agentledger.schemas.transport.base import Message
from agentledger.schemas.retry import retry_transaction

from .common import (
    _PARKED, BatchResult, _Dead, _Retry, _sql_list, _best_effort_ids,
)

log = logging.getLogger("agentledger.consumers.ingest")  # one logger for the package, as before the split


class DeadLetters:
    """Dead letters: quarantined messages (raw bytes and a reason), retried and healed. A part of
    `Ingestor`."""

    def retry_dead_letters(self, letters: list[tuple[str, Message]], heal: bool = True) -> BatchResult:
        """Feed dead letters ``(dead_letter_id, message)`` through the same validation, in one
        transaction: accepted ones become events (with the letter's provenance) and their letters
        are resolved; identical duplicates are resolved as such; the rest stay, with the new reason."""
        msgs = [m for _, m in letters]
        checked = self._precheck(msgs)
        return retry_transaction(lambda: self._transaction(msgs, checked, retry=_Retry([i for i, _ in letters]),
                                                           heal=heal),
                                 "retry transaction", attempts=self.max_retries + 1)

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
