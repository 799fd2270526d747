"""Detection over the warehouse: rules and the anomaly model, alerts and scores written idempotently.

A detection pass takes a set of sessions (those an ingest batch touched, those whose chain head
moved since they were last examined, or all), rebuilds ``detect_events`` for them (whole sessions,
so sequences that span ingest batches are seen whole), runs every rule and the model, and writes in
ONE warehouse transaction:

* ``alerts``: one alert per (rule or model, session). Its ``alert_id`` is a UUIDv5 of (rule id,
  session id, first evidence seq; model alerts: model id, session id), so running detection again -- after a crash, from
  ``agentledger detect``, or from another ingest process -- finds the same alert instead of making a
  second one. When new events add evidence or raise the severity, the alert is rewritten with
  ``revision + 1``. Alerts are never withdrawn by later events (an alert that was published stays
  true of the events it cites); ``rebuild`` recomputes them from scratch.
* ``anomaly_scores``: the model's latest score of each session (replaced each pass).
* ``detection_state``: the chain head each session was examined at and the digest of the rules and
  model that examined it, so ``pending_sessions`` knows what is left to do after a crash or a rule
  change.

DuckLake has no keys, so every upsert is DELETE + INSERT inside that transaction; a commit that
loses a race with another writer is retried from the reads. Publishing to the alerts topic is an
outbox: after the commit, every alert whose ``published_at`` is NULL is sent (key = session id),
and only once the transport acknowledged it (Kafka acks=all, or the local log's fsync) is
``published_at`` set. A crash in between republishes the same (alert_id, revision): consumers keep
the highest revision per alert_id.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa

from agentledger.schemas import alerts as alert_codec
from agentledger.schemas.config import ALERTS_TOPIC
from agentledger.schemas.errors import NotDurableError, TransportError
from agentledger.schemas.retry import retry_transaction
from agentledger.schemas.transport.base import Sink
from agentledger.schemas.warehouse import Warehouse, transaction

from . import features as F
from . import prepare as P
from .model import DEFAULT_MODEL, AnomalyModel
from .rules import SEVERITIES, Rule, load_rules, rule_dirs

log = logging.getLogger(__name__)

ALERT_NAMESPACE = uuid.UUID("6f1d8c1e-5a0b-4d55-9a43-2f3c9e7b0a11")
MAX_EVIDENCE = 500
CITED = 12
CHUNK_EVENTS = 500_000
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def _secret_flows(sid: str, seqs: list[int], secrets: dict, summary: str, limit: int = 3) -> str:
    """The secrets that flowed between an alert's evidence events: one read (redacted from an
    event's output) and carried by a later one (its redaction token, same keyed id, in that event's
    command line, request or tool arguments). Names the token and its source -> sink seqs, except
    those the rule's own summary already names."""
    read: dict[str, int] = {}
    flows: dict[str, tuple[int, int]] = {}
    for q in seqs:  # in seq order
        out_ids, in_ids = secrets.get((sid, q), ((), ()))
        for k in in_ids:
            if k in read and k not in flows:
                flows[k] = (read[k], q)
        for k in out_ids:
            read.setdefault(k, q)
    named = [(k, src, sink) for k, (src, sink) in sorted(flows.items(), key=lambda x: x[1]) if f"…:{k}" not in summary]
    if not named:
        return ""
    text = "; ".join(f"secret …:{k} read by #{src}, sent by #{sink}" for k, src, sink in named[:limit])
    return f". Secret flow: {text}" + (f"; … and {len(named) - limit} more" if len(named) > limit else "")


def alert_id(rule_id: str, session_id: str, first_seq: int | None) -> str:
    """UUIDv5 of (rule id, session id, first evidence seq); a model alert is one per (model, session),
    whatever its evidence (``first_seq=None``): a session scored while unfinished and again when
    complete cites different events, but is the same finding."""
    key = f"{rule_id}\n{session_id}" + ("" if first_seq is None else f"\n{first_seq}")
    return str(uuid.uuid5(ALERT_NAMESPACE, key))


@dataclass
class DetectResult:
    sessions: int = 0
    events: int = 0
    alerts_new: int = 0
    alerts_updated: int = 0
    scored: int = 0
    anomalous: int = 0
    published: int = 0
    retries: int = 0
    seconds: float = 0.0
    by_severity: dict[str, int] = field(default_factory=dict)
    by_rule: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    changed: list[dict] = field(default_factory=list)  # the alerts written (new or new revision)

    def add(self, other: "DetectResult") -> None:
        for k in ("sessions", "events", "alerts_new", "alerts_updated", "scored", "anomalous", "published", "retries"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for d, o in ((self.by_severity, other.by_severity), (self.by_rule, other.by_rule), (self.timings, other.timings)):
            for k, v in o.items():
                d[k] = d.get(k, 0) + v
        self.changed.extend(other.changed)

    def as_dict(self) -> dict:
        return {"sessions": self.sessions, "events": self.events, "alerts_new": self.alerts_new,
                "alerts_updated": self.alerts_updated, "scored": self.scored, "anomalous": self.anomalous,
                "published": self.published, "retries": self.retries, "seconds": round(self.seconds, 3),
                "by_severity": self.by_severity, "by_rule": self.by_rule,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


_ALERT_SCHEMA = pa.schema([
    ("alert_id", pa.string()), ("revision", pa.int32()), ("session_id", pa.string()), ("detector", pa.string()),
    ("rule_id", pa.string()), ("title", pa.string()), ("severity", pa.string()), ("mitre", pa.list_(pa.string())),
    ("first_seq", pa.int64()), ("last_seq", pa.int64()), ("evidence_seqs", pa.list_(pa.int64())),
    ("explanation", pa.string()), ("score", pa.float64()), ("threshold", pa.float64()),
    ("first_event_at", pa.timestamp("us")), ("last_event_at", pa.timestamp("us")), ("agent", pa.string()),
    ("user", pa.string()), ("host", pa.string()), ("detector_version", pa.string()),
    ("created_at", pa.timestamp("us")), ("updated_at", pa.timestamp("us")), ("published_at", pa.timestamp("us")),
])


class Detector:
    """Rules + model over a warehouse connection. Not thread-safe: one detector per connection."""

    def __init__(self, warehouse: Warehouse, *, rules_dirs: list[Path] | None = None,
                 model: AnomalyModel | Path | str | None | bool = True, sink: Sink | None = None,
                 alerts_topic: str = ALERTS_TOPIC, chunk_events: int = CHUNK_EVENTS, max_retries: int = 30):
        self.wh = warehouse
        self.con = warehouse.con
        dirs = rule_dirs(rules_dirs)
        self.lists = P.load_lists(dirs)
        self.rules: list[Rule] = load_rules(dirs)
        if model is True:
            model = DEFAULT_MODEL if DEFAULT_MODEL.exists() else None
        if isinstance(model, (str, Path)):
            model = AnomalyModel.load(model)
        self.model: AnomalyModel | None = model or None
        self.sink = sink
        self.alerts_topic = alerts_topic
        self.chunk_events = chunk_events
        self.max_retries = max_retries
        self._topic_ready = False
        parts = sorted(f"{r.id}:{r.digest}" for r in self.rules) + [f"lists:{self._lists_digest()}"]
        if self.model is not None:
            parts.append(f"model:{self.model.model_id}:{self.model.digest}")
        self.digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _lists_digest(self) -> str:
        return hashlib.sha256(repr(sorted((n, l.kind, l.values) for n, l in self.lists.items())).encode()).hexdigest()[:16]

    # -- which sessions -------------------------------------------------------------------------
    def pending_sessions(self) -> list[str]:
        """Sessions never examined, examined at an older chain head, or by other rules/model."""
        return [r[0] for r in self.con.execute("""
            SELECT h.session_id FROM chain_heads h LEFT JOIN detection_state d USING (session_id)
            WHERE d.session_id IS NULL OR d.head_seq < h.head_seq OR d.detector_digest <> ?
            ORDER BY h.last_at""", [self.digest]).fetchall()]

    def all_sessions(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT session_id FROM chain_heads ORDER BY last_at").fetchall()]

    def _chunks(self, sessions: list[str]) -> list[list[str]]:
        if not sessions:
            return []
        self.con.register("_want", pa.table({"session_id": pa.array(sessions, pa.string())}))
        try:
            sizes = dict(self.con.execute(
                "SELECT session_id, event_count FROM chain_heads JOIN _want USING (session_id)").fetchall())
        finally:
            self.con.unregister("_want")
        chunks, cur, n = [], [], 0
        for s in sessions:
            c = sizes.get(s, 0)
            if cur and n + c > self.chunk_events:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(s)
            n += c
        if cur:
            chunks.append(cur)
        return chunks

    # -- a pass ---------------------------------------------------------------------------------
    def detect(self, sessions: list[str] | None = None, *, pending: bool = False, rebuild: bool = False,
               publish: bool = True, progress=None) -> DetectResult:
        """Examine ``sessions`` (default: every pending one; ``pending`` adds the pending ones to the
        given list). Idempotent: examining a session again with no new events changes nothing."""
        t0 = time.perf_counter()
        if sessions is None:
            todo = self.all_sessions() if rebuild else self.pending_sessions()
        else:
            todo = list(dict.fromkeys(sessions))
            if pending:
                todo += [s for s in self.pending_sessions() if s not in set(todo)]
        result = DetectResult()
        for chunk in self._chunks(todo):
            result.add(self._detect_chunk(chunk, rebuild=rebuild))
            if progress:
                progress(len(chunk))
        if publish and self.sink is not None:
            result.published = self.publish()
        result.seconds = time.perf_counter() - t0
        return result

    def _detect_chunk(self, sessions: list[str], *, rebuild: bool) -> DetectResult:
        res = DetectResult(sessions=len(sessions))
        con = self.con
        try:
            t = time.perf_counter()
            res.events = P.prepare(con, self.lists, sessions)
            res.timings["prepare"] = time.perf_counter() - t
            cands = self._run_rules(res)
            scores = self._run_model(res, cands)
            t = time.perf_counter()
            heads = con.execute("""SELECT session_id, max(seq), any_value("agent"), any_value("user"),
                                          any_value(machine) FROM detect_events GROUP BY 1""").fetchall()
            head_seqs = {h[0]: h[1] for h in heads}
            self._explain(cands, {h[0]: h[2:] for h in heads}, head_seqs)
            res.timings["explain"] = time.perf_counter() - t
            t = time.perf_counter()
            def counted(attempt: int, exc: BaseException) -> None:
                res.retries += 1

            written = retry_transaction(lambda: self._write(sessions, cands, scores, head_seqs, rebuild),
                                        "detection transaction", attempts=self.max_retries + 1, on_retry=counted)
            res.timings["write"] = time.perf_counter() - t
        finally:
            P.drop(con)
        for a, is_new in written:
            res.changed.append(a)
            if is_new:
                res.alerts_new += 1
            else:
                res.alerts_updated += 1
            res.by_severity[a["severity"]] = res.by_severity.get(a["severity"], 0) + 1
            res.by_rule[a["rule_id"]] = res.by_rule.get(a["rule_id"], 0) + 1
        return res

    def _run_rules(self, res: DetectResult) -> list[dict]:
        cands: list[dict] = []
        t = time.perf_counter()
        for r in self.rules:
            try:
                rows = self.con.execute(r.sql).fetchall()
            except duckdb.Error as exc:
                raise P.RuleError(f"rule {r.id} ({r.source}) failed: {str(exc).strip().splitlines()[0]}") from exc
            merged: dict[str, dict] = {}
            for row in rows:
                sid, ev = row[0], row[1]
                sev = row[2] if len(row) > 2 and row[2] else r.severity
                if sev not in _RANK:
                    raise P.RuleError(f"rule {r.id} ({r.source}) returned severity {sev!r}")
                summary = row[3] if len(row) > 3 and row[3] else r.title
                ev = sorted({int(x) for x in ev or []})
                if not sid or not ev:
                    continue
                m = merged.get(sid)
                if m is None:
                    merged[sid] = {"session_id": sid, "detector": "rule", "rule_id": r.id, "title": r.title,
                                   "severity": sev, "mitre": list(r.mitre), "evidence_seqs": ev, "summary": summary,
                                   "score": None, "threshold": None, "detector_version": r.digest}
                else:
                    m["evidence_seqs"] = sorted(set(m["evidence_seqs"]) | set(ev))
                    if _RANK[sev] > _RANK[m["severity"]]:
                        m["severity"] = sev
            cands.extend(merged.values())
        res.timings["rules"] = time.perf_counter() - t
        return cands

    def _run_model(self, res: DetectResult, cands: list[dict]) -> list[dict]:
        if self.model is None:
            return []
        t = time.perf_counter()
        ev = F.load_events(self.con)
        feats, evidence = F.session_features(ev, self.model.vocabulary)
        ended = set(ev.filter(pl.col("kind") == "session_ended")["session_id"].unique().to_list())
        assessed = self.model.assess(feats, evidence, ended)
        res.scored = len(assessed)
        for a in assessed:
            if not a["anomalous"]:
                continue
            res.anomalous += 1
            seqs = sorted({q for n in (["rare_events"] if a["novelty"] >= self.model.novelty_threshold else [])
                           + a["top_features"] for q in a["evidence"].get(n, [])[:50]})
            cands.append({"session_id": a["session_id"], "detector": "model", "rule_id": self.model.model_id,
                          "title": "Session behaviour unlike the benign sessions the model was trained on",
                          "severity": a["severity"], "mitre": [], "evidence_seqs": seqs, "assessment": a,
                          "score": a["score"], "threshold": self.model.threshold,
                          "detector_version": self.model.digest})
        res.timings["model"] = time.perf_counter() - t
        return assessed

    def _explain(self, cands: list[dict], who: dict[str, tuple], heads: dict[str, int]) -> None:
        """Fill in explanation, first/last seq and times, citing evidence events by seq."""
        pairs_s, pairs_q = [], []
        for c in cands:
            for q in c["evidence_seqs"][:MAX_EVIDENCE]:
                pairs_s.append(c["session_id"])
                pairs_q.append(q)
        info: dict[tuple[str, int], tuple[str, dt.datetime]] = {}
        secrets: dict[tuple[str, int], tuple[list, list]] = {}  # (read from its output, carried in it)
        if pairs_s:
            self.con.register("_ev", pa.table({"session_id": pa.array(pairs_s, pa.string()),
                                               "seq": pa.array(pairs_q, pa.int64())}))
            try:
                for sid, q, d, ts, read, carried in self.con.execute("""
                        SELECT DISTINCT e.session_id, e.seq, e.describe, e.ts, e.output_secret_ids, e.secret_ids
                        FROM detect_events e JOIN _ev USING (session_id, seq)""").fetchall():
                    info[(sid, q)] = (d, ts)
                    if read or carried:
                        secrets[(sid, q)] = (read or [], carried or [])
            finally:
                self.con.unregister("_ev")
        for c in cands:
            sid = c["session_id"]
            if c["detector"] == "model":
                describe = {q: info.get((sid, q), ("", None))[0] for q in c["assessment"]["evidence"].get(
                    "rare_events", []) + [x for n in c["assessment"]["top_features"]
                                           for x in c["assessment"]["evidence"].get(n, [])]}
                text, _ = self.model.explain(c["assessment"], describe)
                c["summary"] = text
                if not c["evidence_seqs"]:  # unusual as a whole, no feature stands out: cite the session's head
                    c["evidence_seqs"] = [heads.get(sid, 0)]
            ev = c["evidence_seqs"][:MAX_EVIDENCE]
            c["evidence_seqs"] = ev
            cited = "; ".join(f"#{q} {info.get((sid, q), ('?', None))[0]}" for q in ev[:CITED])
            more = f"; … and {len(ev) - CITED} more" if len(ev) > CITED else ""
            if c["detector"] == "model":
                c["explanation"] = c["summary"]
            else:
                c["explanation"] = f"{c['summary']}. Evidence: {cited}{more}" + _secret_flows(sid, ev, secrets,
                                                                                             c["summary"])
            c["first_seq"], c["last_seq"] = ev[0], ev[-1]
            c["first_event_at"] = info.get((sid, ev[0]), (None, None))[1]
            c["last_event_at"] = info.get((sid, ev[-1]), (None, None))[1]
            agent, user, host = who.get(sid, (None, None, None))
            c.update(agent=agent, user=user, host=host)

    def check_rules(self) -> int:
        """Run every rule on an empty scope: raises `RuleError` naming the first rule whose SQL fails."""
        try:
            P.prepare(self.con, self.lists, [])
            self._run_rules(DetectResult())
        finally:
            P.drop(self.con)
        return len(self.rules)

    # -- the transaction ------------------------------------------------------------------------
    def _write(self, sessions: list[str], cands: list[dict], scores: list[dict], heads: dict[str, int],
               rebuild: bool) -> list[tuple[dict, bool]]:
        con = self.con
        now = _now()
        with transaction(con):
            con.register("_scope", pa.table({"session_id": pa.array(sessions, pa.string())}))
            try:
                if rebuild:
                    con.execute("DELETE FROM alerts WHERE session_id IN (SELECT session_id FROM _scope)")
                    existing = {}
                else:
                    cur = con.execute("SELECT * FROM alerts WHERE session_id IN (SELECT session_id FROM _scope)")
                    cols = [d[0] for d in cur.description]
                    existing = {}
                    for row in cur.fetchall():
                        a = dict(zip(cols, row))
                        k = (a["rule_id"], a["session_id"])
                        if k not in existing or a["revision"] > existing[k]["revision"]:
                            existing[k] = a
                written: list[tuple[dict, bool]] = []
                for c in cands:
                    old = existing.get((c["rule_id"], c["session_id"]))
                    row = {k: c.get(k) for k in _ALERT_SCHEMA.names}
                    if old is None:
                        first = None if c["detector"] == "model" else c["first_seq"]
                        row.update(alert_id=alert_id(c["rule_id"], c["session_id"], first), revision=1,
                                   created_at=now, updated_at=now, published_at=None)
                        written.append((row, True))
                        continue
                    ev = sorted(set(old["evidence_seqs"] or []) | set(c["evidence_seqs"]))[:MAX_EVIDENCE]
                    sev = c["severity"] if _RANK[c["severity"]] > _RANK.get(old["severity"], 0) else old["severity"]
                    if ev == sorted(old["evidence_seqs"] or []) and sev == old["severity"]:
                        continue  # nothing new: the alert (and what was published of it) stands
                    row.update(alert_id=old["alert_id"], revision=old["revision"] + 1, created_at=old["created_at"],
                               updated_at=now, published_at=None, evidence_seqs=ev, severity=sev,
                               first_seq=ev[0], last_seq=ev[-1])
                    if old["first_event_at"] is not None and (row["first_event_at"] is None
                                                              or old["first_event_at"] < row["first_event_at"]):
                        row["first_event_at"] = old["first_event_at"]
                    written.append((row, False))
                if written:
                    tbl = pa.Table.from_pylist([r for r, _ in written], schema=_ALERT_SCHEMA)
                    con.register("_alerts", tbl)
                    try:
                        con.execute("DELETE FROM alerts WHERE alert_id IN (SELECT alert_id FROM _alerts)")
                        con.execute("INSERT INTO alerts BY NAME SELECT * FROM _alerts")
                    finally:
                        con.unregister("_alerts")
                if self.model is not None:
                    con.execute("DELETE FROM anomaly_scores WHERE model_id = ? "
                                "AND session_id IN (SELECT session_id FROM _scope)", [self.model.model_id])
                    if scores:
                        con.register("_scores", pa.table({
                            "session_id": pa.array([s["session_id"] for s in scores], pa.string()),
                            "model_id": pa.array([self.model.model_id] * len(scores), pa.string()),
                            "head_seq": pa.array([heads.get(s["session_id"]) for s in scores], pa.int64()),
                            "score": pa.array([s["score"] for s in scores], pa.float64()),
                            "threshold": pa.array([self.model.threshold] * len(scores), pa.float64()),
                            "anomalous": pa.array([s["anomalous"] for s in scores], pa.bool_()),
                            "features": pa.array([list(s["features"].items()) for s in scores],
                                                 pa.map_(pa.string(), pa.float64())),
                            "top_features": pa.array([s["top_features"] for s in scores], pa.list_(pa.string())),
                            "scored_at": pa.array([now] * len(scores), pa.timestamp("us")),
                        }))
                        try:
                            con.execute("INSERT INTO anomaly_scores BY NAME SELECT * FROM _scores")
                        finally:
                            con.unregister("_scores")
                con.execute("DELETE FROM detection_state WHERE session_id IN (SELECT session_id FROM _scope)")
                present = [s for s in sessions if s in heads]
                con.register("_state", pa.table({
                    "session_id": pa.array(present, pa.string()),
                    "head_seq": pa.array([heads[s] for s in present], pa.int64()),
                    "detector_digest": pa.array([self.digest] * len(present), pa.string()),
                    "detected_at": pa.array([now] * len(present), pa.timestamp("us")),
                }))
                try:
                    con.execute("INSERT INTO detection_state BY NAME SELECT * FROM _state")
                finally:
                    con.unregister("_state")
            finally:
                con.unregister("_scope")
        return written

    # -- the outbox -----------------------------------------------------------------------------
    def publish(self, limit: int = 100_000) -> int:
        """Send every alert not yet acknowledged by the alerts topic; mark what was acknowledged.
        A transport failure leaves them unpublished (retried by the next pass) and is logged."""
        if self.sink is None:
            return 0
        cur = self.con.execute("SELECT * FROM alerts WHERE published_at IS NULL ORDER BY created_at, alert_id LIMIT ?",
                               [limit])
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        if not rows:
            return 0
        try:
            if not self._topic_ready:
                self.sink.ensure_topic(self.alerts_topic)
                self._topic_ready = True
            sent = []
            for a in rows:
                value = alert_codec.encode_alert(a)
                self.sink.send(self.alerts_topic, a["session_id"].encode(), value)
                sent.append((a["alert_id"], a["revision"], value))
            failed: set[bytes] = set()
            try:
                self.sink.flush(30)
            except NotDurableError as exc:
                failed = {o.value for o in exc.undelivered}
                log.warning("alerts topic: %d of %d alerts not acknowledged (%s); they are retried later",
                            len(failed), len(sent), exc)
        except (TransportError, NotDurableError) as exc:
            log.warning("alerts topic unavailable (%s); %d alerts stay unpublished", exc, len(rows))
            return 0
        done = [(i, r) for i, r, v in sent if v not in failed]
        if not done:
            return 0
        def mark() -> None:
            self.con.register("_pub", pa.table({"alert_id": pa.array([d[0] for d in done], pa.string()),
                                                "revision": pa.array([d[1] for d in done], pa.int32())}))
            try:
                self.con.execute("""UPDATE alerts SET published_at = now()::TIMESTAMP FROM _pub
                                    WHERE alerts.alert_id = _pub.alert_id AND alerts.revision = _pub.revision""")
            finally:
                self.con.unregister("_pub")

        retry_transaction(mark, "marking alerts published", attempts=self.max_retries + 1)
        return len(done)

