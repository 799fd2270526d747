"""OCSF out of the warehouse: `export_ocsf` (JSON lines to a file, or one file per OCSF class in a
directory) and `OcsfSink`, the append-only JSON-lines file `ingest --ocsf PATH` keeps up to date as
batches commit. Both read through the warehouse's read-only query path (`Warehouse.query`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from agentledger.schemas.canonical import canonical_json_utf8
from agentledger.schemas.errors import AgentLedgerError

from .ocsf import CLASSES, Mapper, join_context

CLASS_FILES = {1001: "file_activity", 1007: "process_activity", 2004: "detection_finding", 4001: "network_activity",
               6009: "ai_agent_activity"}
FETCH = 2000


@dataclass
class OcsfExport:
    """What an export wrote: records per OCSF class, event kinds not exported (checkpoints, gaps)."""

    paths: list[str] = field(default_factory=list)
    events: int = 0
    alerts: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    ai_records: int = 0  # AI Agent Activity (6009) records, written in addition to the events' own

    def count(self, rec: dict) -> None:
        name = CLASSES[rec["class_uid"]][0]
        self.classes[name] = self.classes.get(name, 0) + 1

    def as_dict(self) -> dict:
        return {"paths": self.paths, "events": self.events, "alerts": self.alerts, "sessions": self.sessions,
                "classes": self.classes, "skipped": self.skipped, "ai_records": self.ai_records}


def _dicts(cur) -> Iterator[dict]:
    cols = [d[0] for d in cur.description]
    while True:
        rows = cur.fetchmany(FETCH)
        if not rows:
            return
        for r in rows:
            yield dict(zip(cols, r))


def _has_alerts(wh) -> bool:
    return bool(wh.con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'alerts' "
                               "AND table_catalog = current_database()").fetchone()[0])


def event_rows(wh, sessions: Sequence[str] | None = None, since: str | None = None,
               after: dict[str, int] | None = None) -> Iterable[dict]:
    """Events in (session, seq) order, of ``sessions`` (all: None), at or after ``since`` (UTC),
    after seq ``after[session]``; network decisions/outcomes and approval decisions joined to their
    attempt/request (looked up in the warehouse when it is outside the selection)."""
    where, params = [], []
    if sessions is not None:
        where.append("e.session_id IN (SELECT unnest(?))")
        params.append(list(sessions))
    if since:
        where.append("e.occurred_at >= CAST(? AS TIMESTAMP)")
        params.append(since)
    join = ""
    if after:
        join = (" LEFT JOIN (SELECT unnest(?::VARCHAR[]) AS _sid, unnest(?::BIGINT[]) AS _after) w"
                " ON w._sid = e.session_id")
        params = [list(after), list(after.values()), *params]
        where.append("e.seq > coalesce(w._after, -1)")
    sql = ("SELECT e.* EXCLUDE (schema_fingerprint, source_topic, source_partition, source_offset) FROM events e"
           + join + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY e.session_id, e.seq")
    rows = _dicts(wh.query(sql, params))

    def with_context() -> Iterator[dict]:
        for row in join_context(rows):
            p = row.get(row["kind"]) or {}
            if "_attempt" in row and row["_attempt"] is None and p.get("attempt_id"):
                row["_attempt"] = _lookup(wh, row["session_id"], "network_attempted", "attempt_id", p["attempt_id"])
            if "_action_kind" in row and row["_action_kind"] is None and p.get("request_id"):
                req = _lookup(wh, row["session_id"], "approval_requested", "request_id", p["request_id"])
                row["_action_kind"] = (req or {}).get("action_kind")
            yield row

    return with_context()


def _lookup(wh, session_id: str, kind: str, key: str, value: str) -> dict | None:
    row = wh.query(f"SELECT {kind} FROM events WHERE session_id = ? AND kind = ? AND {kind}.{key} = ? "
                   "ORDER BY seq LIMIT 1", [session_id, kind, value]).fetchone()
    return row[0] if row else None


def alert_rows(wh, sessions: Sequence[str] | None = None, since: str | None = None) -> list[dict]:
    if not _has_alerts(wh):
        return []
    where, params = [], []
    if sessions is not None:
        where.append("session_id IN (SELECT unnest(?))")
        params.append(list(sessions))
    if since:
        where.append("updated_at >= CAST(? AS TIMESTAMP)")
        params.append(since)
    sql = ("SELECT * EXCLUDE (published_at) FROM alerts" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY session_id, created_at, alert_id")
    return list(_dicts(wh.query(sql, params)))


def evidence_ids(wh, alerts: list[dict]) -> dict[str, dict[int, str]]:
    """session -> seq -> event id, for every evidence seq of these alerts."""
    want: dict[str, set[int]] = {}
    for a in alerts:
        want.setdefault(a["session_id"], set()).update(a.get("evidence_seqs") or [])
    out: dict[str, dict[int, str]] = {}
    for sid, seqs in want.items():
        cur = wh.query("SELECT seq, event_id FROM events WHERE session_id = ? AND seq IN (SELECT unnest(?))",
                       [sid, sorted(seqs)])
        out[sid] = {int(s): e for s, e in cur.fetchall()}
    return out


def _line(rec: dict) -> str:
    return canonical_json_utf8(rec).decode() + "\n"


def export_ocsf(wh, out: Path, *, product_version: str, sessions: Sequence[str] | None = None,
                since: str | None = None, ai_agent_activity: bool = False) -> OcsfExport:
    """Write events and alerts as OCSF JSON lines: to ``out``, or, when ``out`` is a directory (exists
    or ends with a slash), to ``out/<class>.jsonl`` per OCSF class (file_activity, process_activity,
    network_activity, detection_finding), as security lakes partition them. Files are written whole
    (a temporary file renamed into place). ``ai_agent_activity``: also an AI Agent Activity (6009,
    draft class) record for each permission request and tool use (`Mapper.ai_records`)."""
    as_dir = out.is_dir() or str(out).endswith(os.sep)
    if as_dir:
        out.mkdir(parents=True, exist_ok=True)
    elif not out.parent.is_dir():
        raise AgentLedgerError(f"cannot write {out}: {out.parent} is not a directory")
    mapper = Mapper(product_version, ai_agent_activity=ai_agent_activity)
    res = OcsfExport()
    files: dict[str, IO[str]] = {}
    temps: dict[str, Path] = {}

    def sink(rec: dict) -> IO[str]:
        target = out / f"{CLASS_FILES[rec['class_uid']]}.jsonl" if as_dir else out
        key = str(target)
        if key not in files:
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            temps[key] = tmp
            files[key] = open(tmp, "w", encoding="utf-8")
        return files[key]

    seen: set[str] = set()
    try:
        if not as_dir:
            sink({"class_uid": 1007})  # the file exists even when nothing matched
        for row in event_rows(wh, sessions, since):
            seen.add(row["session_id"])
            for ai in mapper.ai_records(row):  # (only when asked for: AI Agent Activity 6009)
                sink(ai).write(_line(ai))
                res.ai_records += 1
                res.count(ai)
            rec = mapper.event(row)
            if rec is None:
                continue
            sink(rec).write(_line(rec))
            res.events += 1
            res.count(rec)
        alerts = alert_rows(wh, sessions, since)
        ev = evidence_ids(wh, alerts)
        for a in alerts:
            seen.add(a["session_id"])
            rec = mapper.alert(a, ev.get(a["session_id"]))
            sink(rec).write(_line(rec))
            res.alerts += 1
            res.count(rec)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        for f in files.values():
            f.close()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    for key, f in files.items():
        f.close()
        os.replace(temps[key], key)
        res.paths.append(key)
    res.skipped = dict(mapper.skipped)
    res.sessions = len(seen)
    return res


class OcsfSink:
    """``ingest --ocsf PATH``: after each committed batch (and its detection), append the batch's
    new events and the new or revised alerts of its sessions to PATH as OCSF JSON lines, fsync-ed.

    The file is its own state: on open, it is read once for what it holds (per session the last
    seq; every alert revision), a line cut by a crash is moved to ``PATH.torn-N``, and what the
    warehouse holds beyond that is appended first. So each event and alert revision is in the file
    exactly once, whatever crashed when."""

    def __init__(self, wh, path: Path, *, product_version: str):
        self.wh, self.path = wh, Path(path)
        self.mapper = Mapper(product_version)
        self.last_seq: dict[str, int] = {}
        self.alerts: set[str] = set()
        self.written = OcsfExport(paths=[str(self.path)])
        self._read_back()
        self.f = open(self.path, "a", encoding="utf-8")
        self._started = False

    def _read_back(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            n = 1
            while self.path.with_name(f"{self.path.name}.torn-{n}").exists():
                n += 1
            self.path.with_name(f"{self.path.name}.torn-{n}").write_bytes(data[cut:])
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
        for i, line in enumerate(data[:cut].splitlines(), 1):
            try:
                rec = json.loads(line)
                meta = rec["metadata"]
                sid = meta["correlation_uid"]
            except (ValueError, KeyError, TypeError) as exc:
                raise AgentLedgerError(f"{self.path} line {i} is not an OCSF record agentledger wrote ({exc}): "
                                       "give --ocsf a new file") from exc
            if rec.get("class_uid") == 2004:
                self.alerts.add(meta["uid"])
            elif meta.get("sequence") is not None:
                self.last_seq[sid] = max(self.last_seq.get(sid, -1), int(meta["sequence"]))

    def _append(self, sessions: Sequence[str] | None) -> None:
        lines: list[str] = []
        after = dict(self.last_seq)
        if sessions is not None:
            after = {s: self.last_seq.get(s, -1) for s in sessions}
        for row in event_rows(self.wh, sessions, after=after or None):
            rec = self.mapper.event(row)
            self.last_seq[row["session_id"]] = max(self.last_seq.get(row["session_id"], -1), row["seq"])
            if rec is None:
                continue
            lines.append(_line(rec))
            self.written.events += 1
            self.written.count(rec)
        alerts = [a for a in alert_rows(self.wh, sessions) if f"{a['alert_id']}/{a['revision']}" not in self.alerts]
        ev = evidence_ids(self.wh, alerts)
        for a in alerts:
            rec = self.mapper.alert(a, ev.get(a["session_id"]))
            lines.append(_line(rec))
            self.alerts.add(rec["metadata"]["uid"])
            self.written.alerts += 1
            self.written.count(rec)
        if lines:
            self.f.write("".join(lines))
            self.f.flush()
            os.fsync(self.f.fileno())

    def start(self) -> None:
        """Catch up: whatever the warehouse holds beyond the file."""
        if not self._started:
            self._started = True
            self._append(None)

    def __call__(self, batch) -> None:
        if not self._started:
            self.start()
        elif batch.sessions:
            self._append(list(batch.sessions))

    def close(self) -> None:
        self.written.skipped = dict(self.mapper.skipped)
        self.f.close()
