"""What the web console (`agentledger serve`) reads and writes, as plain functions over the warehouse.

Everything here opens the warehouse per call, read-only, and closes it before returning (a DuckDB
file has one writer process and no concurrent readers: the console must not hold it). The one
write, `label_alert`, opens a short write connection and appends a row to `alert_labels`.

The session list pages by key (``cursor``: the last row's (first_at, session_id), newest first)
over `chain_heads`, one row per session, never with OFFSET; only the page's sessions are then
aggregated from the events.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import ConfigError, WarehouseError

from .common import Rows
from .evidence import keyring, read_session
from .pipeline import SEVERITIES

# severity ranks as in the session_risk view: low 1 .. critical 4
_RANK_SQL = "CASE severity WHEN 'critical' THEN 4 WHEN 'high' THEN 3 WHEN 'medium' THEN 2 ELSE 1 END"
LABELS = ("acknowledged", "false_positive", "reopened")


def _has(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM (SELECT table_name AS n FROM duckdb_tables() WHERE database_name = "
                            "current_database() UNION ALL SELECT view_name FROM duckdb_views() WHERE database_name = "
                            "current_database()) WHERE n = ?", [name]).fetchone()[0])


def _kind(kind: str) -> str:
    """The table of one kind of event: the list reads these directly (binding the wide `events`
    view, a union of every kind, costs more than the query on a page's sessions)."""
    from agentledger.schemas.sql import ident
    from agentledger.schemas.warehouse import KIND_TABLE_PREFIX

    return ident(KIND_TABLE_PREFIX + kind)


def _alerts_relation(con) -> str | None:
    """The alerts with their triage state: the alert_triage view, else (a warehouse made before it,
    opened read-only) the alerts table with every alert 'new'; None without alerts."""
    if _has(con, "alert_triage"):
        return "alert_triage"
    if _has(con, "alerts"):
        return ("(SELECT *, 'new' AS triage, NULL::VARCHAR AS triage_note, NULL::VARCHAR AS labelled_by, "
                "NULL::TIMESTAMP AS labelled_at, 0 AS label_count FROM alerts)")
    return None


# the warehouse files whose views, tables and macros were last found to be this code's, with the
# files' identity then: a page re-checks only after the files changed (~40-80 ms a check)
_SCHEMA_CHECKED: dict[str, tuple] = {}


def _file_identity(warehouse: str) -> tuple | None:
    """What changes whenever a DuckDB file (or its WAL) is written, even if its mtime is set back:
    inode, size, mtime and ctime of both. None for a DuckLake (checked at every open)."""
    if warehouse.startswith("ducklake:"):
        return None
    out = []
    for path in (warehouse, warehouse + ".wal"):
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _open(s: Settings):
    """The warehouse read-only, refused when its views, tables or macros are not this code's (as
    `agentledger sql` refuses it: its pages would show other rows than the ones stored)."""
    from agentledger.schemas.warehouse import open_for, refuse_tampered_schema

    before = _file_identity(s.warehouse)  # (taken before the open: a change after it is seen next time)
    wh = open_for(s, read_only=True)
    try:
        if before is None or _SCHEMA_CHECKED.get(s.warehouse) != before:
            refuse_tampered_schema(wh)
            if before is not None:
                _SCHEMA_CHECKED[s.warehouse] = before
    except BaseException:
        wh.close()
        raise
    return wh


# --- the session list ----------------------------------------------------------------------------

def encode_cursor(first_at: dt.datetime | None, session_id: str) -> str:
    raw = f"{first_at.isoformat() if first_at else ''}|{session_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime | None, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, sid = text.split("|", 1)
        return (dt.datetime.fromisoformat(at) if at else None), sid
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not a page cursor: {cursor[:40]!r}") from exc


@dataclass
class SessionsPage:
    """One page of sessions, newest first (``rows``: dicts), and the cursor of the next page (None:
    this is the last)."""

    rows: list[dict]
    next_cursor: str | None
    agents: list[str] = field(default_factory=list)


def _timestamp(value: str | None, what: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")).replace(tzinfo=None)
    except ValueError as exc:
        raise ConfigError(f"{what}: not a date/time (YYYY-MM-DD or YYYY-MM-DDTHH:MM): {value[:40]!r}") from exc


def sessions_page(s: Settings, *, limit: int = 50, cursor: str | None = None, agent: str | None = None,
                  severity: str | None = None, since: str | None = None, until: str | None = None,
                  text: str | None = None) -> SessionsPage:
    """A page of sessions, newest first: agent, user, host, cwd, repository, started, duration, counts
    (commands, approvals asked/denied, network denied), chain status, alerts and their top severity
    (false positives not counted). Filters: ``agent``, at least ``severity``, started in
    [``since``, ``until``), ``text`` (case-insensitive) in a command line or a network host."""
    if severity is not None and severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of {', '.join(SEVERITIES)}")
    limit = max(1, min(int(limit), 500))
    where, params = ["TRUE"], []
    if cursor:
        at, sid = decode_cursor(cursor)
        if at is None:
            where.append("h.first_at IS NULL AND h.session_id < ?")
            params.append(sid)
        else:
            where.append("(h.first_at < ? OR (h.first_at = ? AND h.session_id < ?) OR h.first_at IS NULL)")
            params += [at, at, sid]
    lo, hi = _timestamp(since, "from"), _timestamp(until, "to")
    if lo is not None:
        where.append("h.first_at >= ?")
        params.append(lo)
    if hi is not None:
        where.append("h.first_at < ?")
        params.append(hi)
    if agent:
        where.append(f"h.session_id IN (SELECT session_id FROM {_kind('session_started')} "
                     "WHERE session_started.agent = ?)")
        params.append(agent)
    if text:
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append(f"h.session_id IN (SELECT session_id FROM {_kind('command_started')} "
                     "WHERE array_to_string(command_started.argv, ' ') ILIKE ? ESCAPE '\\' UNION "
                     f"SELECT session_id FROM {_kind('network_attempted')} "
                     "WHERE network_attempted.host ILIKE ? ESCAPE '\\')")
        params += [pattern, pattern]
    with _open(s) as wh:
        con = wh.con
        alerts = _alerts_relation(con)
        if severity is not None:
            if alerts is None:
                return SessionsPage([], None, _agents(con))
            where.append(f"h.session_id IN (SELECT session_id FROM {alerts} WHERE triage <> 'false_positive' "
                         f"AND {_RANK_SQL} >= ?)")
            params.append(SEVERITIES.index(severity) + 1)
        heads = con.execute(f"""
            SELECT h.session_id, h.first_at, h.last_at, h.event_count, h.ended FROM chain_heads h
            WHERE {' AND '.join(where)}
            ORDER BY h.first_at DESC NULLS LAST, h.session_id DESC LIMIT ?""", [*params, limit + 1]).fetchall()
        more = len(heads) > limit
        heads = heads[:limit]
        ids = [h[0] for h in heads]
        details = _details(con, ids, alerts) if ids else {}
        rows = []
        for sid, first_at, last_at, events, ended in heads:
            d = details.get(sid, {})
            duration = (last_at - first_at).total_seconds() if first_at and last_at else None
            rows.append({"session_id": sid, "started_at": first_at, "last_event_at": last_at, "events": events,
                         "ended": ended, "duration_s": duration, **d})
        nxt = encode_cursor(heads[-1][1], heads[-1][0]) if more and heads else None
        return SessionsPage(rows, nxt, _agents(con))


def _agents(con) -> list[str]:
    return [r[0] for r in con.execute(f"SELECT DISTINCT session_started.agent FROM {_kind('session_started')} "
                                      "WHERE session_started.agent IS NOT NULL ORDER BY 1").fetchall()]


def _details(con, ids: list[str], alerts: str | None) -> dict[str, dict]:
    """The aggregates of the page's sessions, from the kind tables they need, filtered to them."""
    out: dict[str, dict] = {sid: {} for sid in ids}
    page = "session_id IN (SELECT unnest($ids))"

    def count(kind: str, name: str, cond: str = "TRUE") -> str:
        return (f"(SELECT session_id, count(*) AS {name} FROM {_kind(kind)} WHERE {page} AND {cond} "
                "GROUP BY session_id)")

    cur = con.execute(f"""
        WITH st AS (
          SELECT session_id, any_value(session_started.agent) AS agent, any_value(session_started.cwd) AS cwd,
                 any_value(session_started.git.repository_url) AS repository, any_value(producer."user") AS "user",
                 any_value(producer.host) AS host
          FROM {_kind('session_started')} WHERE {page} GROUP BY session_id)
        SELECT i.session_id, st.agent, st.cwd, st.repository, st."user", st.host,
               coalesce(c.commands, 0) AS commands, coalesce(ar.approvals_requested, 0) AS approvals_requested,
               coalesce(ad.approvals_denied, 0) AS approvals_denied, coalesce(nd.network_denied, 0) AS network_denied,
               coalesce(na.network_attempts, 0) AS network_attempts
        FROM (SELECT unnest($ids) AS session_id) i
        LEFT JOIN st USING (session_id)
        LEFT JOIN {count('command_started', 'commands')} c USING (session_id)
        LEFT JOIN {count('approval_requested', 'approvals_requested')} ar USING (session_id)
        LEFT JOIN {count('approval_decided', 'approvals_denied',
                         "approval_decided.decision IN ('denied', 'timed_out', 'aborted')")} ad USING (session_id)
        LEFT JOIN {count('network_decided', 'network_denied', "network_decided.decision = 'deny'")} nd USING (session_id)
        LEFT JOIN {count('network_attempted', 'network_attempts')} na USING (session_id)""", {"ids": ids})
    cols = [d[0] for d in cur.description]
    for r in cur.fetchall():
        out[r[0]].update(dict(zip(cols[1:], r[1:])))
    for sid, status in con.execute("SELECT session_id, status FROM chain_status WHERE session_id IN (SELECT unnest(?))",
                                   [ids]).fetchall():
        out[sid]["chain"] = status
    if alerts is not None:
        for sid, n, rank in con.execute(f"""
                SELECT session_id, count(*), max({_RANK_SQL}) FROM {alerts}
                WHERE session_id IN (SELECT unnest(?)) AND triage <> 'false_positive' GROUP BY session_id""",
                                        [ids]).fetchall():
            out[sid]["alerts"] = n
            out[sid]["max_severity"] = SEVERITIES[rank - 1]
    return out


# --- one session, at one step ----------------------------------------------------------------------

@dataclass
class SessionView:
    """A session for the console: the whole timeline, the state after seq ``at`` (None: its end),
    the chain's verification, its alerts (with triage), and the neighbouring seqs to step to."""

    session_id: str
    at: int | None
    seqs: list[int]
    timeline: list[dict]
    state: dict
    verification: dict
    alerts: list[dict]
    decisions: dict = field(default_factory=dict)  # action seq -> {outcome, deciders, line} (the `decisions` view)
    coverage: dict = field(default_factory=dict)  # what the session's sources cannot contain (replay.session.coverage_of)

    @property
    def position(self) -> int:
        """Index of ``at`` in ``seqs`` (the last one when at is None or past the end)."""
        if self.at is None or not self.seqs:
            return len(self.seqs) - 1
        for i, q in enumerate(self.seqs):
            if q >= self.at:
                return i if q == self.at else max(i - 1, 0)
        return len(self.seqs) - 1

    @property
    def prev_seq(self) -> int | None:
        i = self.position
        return self.seqs[i - 1] if i > 0 else None

    @property
    def next_seq(self) -> int | None:
        i = self.position
        return self.seqs[i + 1] if 0 <= i < len(self.seqs) - 1 else None


class SessionViews:
    """`session_view` for a long-running reader (the console): the replays of the last ``size``
    sessions viewed stay open, keyed by the session's chain head in the warehouse (a session that
    grew is replayed anew), so stepping through a session only projects the state at the new seq.
    Not thread-safe: one call at a time."""

    def __init__(self, size: int = 4):
        from collections import OrderedDict

        self.size = size
        self._open: OrderedDict[tuple, dict] = OrderedDict()

    def warm(self) -> None:
        """Pay at start what the first session page would: importing the replay modules (~150 ms)
        and loading DuckDB's Avro extension into an in-memory workset (~40 ms)."""
        import agentledger.replay.projection  # noqa: F401
        import agentledger.replay.session  # noqa: F401
        import agentledger.replay.sources  # noqa: F401
        from agentledger.replay.workset import new_warehouse

        from . import sessions  # noqa: F401

        new_warehouse(wide=True).close()

    def view(self, s: Settings, session: str, at: int | None = None) -> SessionView:
        from agentledger.replay.session import replay as run_replay

        from .sessions import in_warehouse

        if at is not None and at < 0:
            raise ConfigError("at takes a seq of the session (0 or more)")
        from agentledger.replay.session import warehouse_alerts
        from agentledger.replay.sources import WarehouseSource

        # one connection for the whole page: opening a warehouse of 1M events costs ~25 ms
        with _open(s) as wh:
            sid = in_warehouse(wh.con, session, s.warehouse)
            head = wh.con.execute("SELECT head_seq, head_hash FROM chain_heads WHERE session_id = ?", [sid]).fetchone()
            key = (s.warehouse, sid, head)
            entry = self._open.get(key)
            if entry is None:
                raw = WarehouseSource(wh.con, label=s.warehouse).read(sid)  # as read_session(s, sid, "warehouse")
                r = run_replay(raw, keyring=keyring(s), alerts=warehouse_alerts(wh.con, sid))
                try:
                    entry = {"replay": r, "verification": r.verification.as_dict(), "timeline": r.timeline(),
                             "states": {}, "extras": _workset_extras(r, sid)}
                except BaseException:
                    r.close()
                    raise
                self._open[key] = entry
                while len(self._open) > self.size:
                    self._open.popitem(last=False)[1]["replay"].close()
            alerts = _alert_rows(wh.con, session=sid, limit=1000).as_dicts()
            self._open.move_to_end(key)
            states = entry["states"]
            if at not in states:
                states[at] = entry["replay"].state(at).as_dict()
                if len(states) > 64:
                    states.pop(next(iter(states)))
            if "extras" in entry:  # the decider chains and the coverage, computed beside the above
                entry.update(_settle_extras(entry.pop("extras"), wh, sid))
        timeline = entry["timeline"]
        return SessionView(sid, at, [e["seq"] for e in timeline], timeline, states[at], entry["verification"], alerts,
                           entry["decisions"], entry["coverage"])

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1]["replay"].close()


def session_view(s: Settings, session: str, at: int | None = None) -> SessionView:
    """Read a session from the warehouse (id or unique prefix), verify it, and project its state
    after seq ``at`` (the replay projection, as `agentledger replay --at`)."""
    from agentledger.replay.session import replay as run_replay

    if at is not None and at < 0:
        raise ConfigError("at takes a seq of the session (0 or more)")
    rec = read_session(s, session, "warehouse")
    with run_replay(rec.raw, keyring=keyring(s), alerts=rec.alerts) as r:
        v = r.verification.as_dict()
        timeline = r.timeline()
        state = r.state(at).as_dict()
        coverage = r.coverage()
    sid = rec.raw.session_id
    with _open(s) as wh:
        decisions = _decisions(wh, sid)
    return SessionView(sid, at, [e["seq"] for e in timeline], timeline, state, v,
                       alert_queue(s, session=sid, limit=1000).as_dicts(), decisions, coverage)


_EXTRAS = None


def _workset_extras(r, sid: str):
    """Start computing the decider chains and the coverage of the session being shown, on its replay
    workset (the session's own events, in memory) rather than on the warehouse (~90 ms at 1M events:
    the `events` view's kind tables scanned for one session), on a cursor of its own in a worker
    thread: the chains' query is mostly planning (~30 ms), which DuckDB does without the GIL, beside
    the page's other statements. `_settle_extras` waits for it."""
    global _EXTRAS
    from concurrent.futures import ThreadPoolExecutor

    from agentledger.replay.session import coverage_of

    if _EXTRAS is None:
        _EXTRAS = ThreadPoolExecutor(1, thread_name_prefix="console-extras")
    cur = r.workset.wh.con.cursor()

    def work() -> dict:
        try:
            return {"decisions": _decisions(r.workset.wh, sid, cur), "coverage": coverage_of(cur, sid)}
        finally:
            cur.close()

    return _EXTRAS.submit(work)


def _settle_extras(future, wh, sid: str) -> dict:
    """`_workset_extras`' answer; the warehouse's when the workset could not give it."""
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - an odd workset: the warehouse answers the same
        from agentledger.replay.session import coverage_of

        return {"decisions": _decisions(wh, sid), "coverage": coverage_of(wh.con, sid)}


def _decisions(wh, sid: str, con=None) -> dict[int, dict]:
    """Each action's decider chain with its one-line "why: ..." (agentledger/api/decisions.py)."""
    from .decisions import session_decisions, why_line

    found = session_decisions(con if con is not None else wh.con, sid, wh.store)
    for d in found.values():
        d["line"] = why_line(d["deciders"], d["outcome"])
    return found


# --- alerts and their triage ------------------------------------------------------------------------

def alert_queue(s: Settings, *, severity: str | None = None, triage: str | None = None,
                session: str | None = None, limit: int = 200) -> Rows:
    """Alerts with their triage state (``triage``: new, acknowledged, false_positive), most severe
    first, then newest: at least ``severity``, of one ``session`` (full id)."""
    if severity is not None and severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of {', '.join(SEVERITIES)}")
    with _open(s) as wh:
        return _alert_rows(wh.con, severity=severity, triage=triage, session=session, limit=limit)


def _alert_rows(con, *, severity: str | None = None, triage: str | None = None, session: str | None = None,
                limit: int = 200) -> Rows:
    """`alert_queue` on an open connection."""
    rel = _alerts_relation(con)
    if rel is None:
        return Rows(["alert_id"], [])
    where, params = ["TRUE"], []
    if severity is not None:
        where.append(f"{_RANK_SQL} >= ?")
        params.append(SEVERITIES.index(severity) + 1)
    if triage:
        where.append("triage = ?")
        params.append(triage)
    if session:
        where.append("session_id = ?")
        params.append(session)
    cur = con.execute(f"""
        SELECT alert_id, session_id, rule_id, title, severity, mitre, first_seq, last_seq, evidence_seqs,
               explanation, agent, "user", host, created_at, triage, triage_note, labelled_by, labelled_at
        FROM {rel} WHERE {' AND '.join(where)}
        ORDER BY {_RANK_SQL} DESC, created_at DESC, session_id, first_seq LIMIT ?""", [*params, limit])
    return Rows([d[0] for d in cur.description], cur.fetchall())


def label_alert(s: Settings, alert_id: str, label: str, *, note: str | None = None, by: str | None = None) -> dict:
    """Record a triage label on an alert (acknowledged, false_positive, reopened) in `alert_labels`
    (appended; events and alerts are never changed). Needs a short write connection: on a DuckDB file
    it fails while another process (e.g. `ingest --follow`) holds it."""
    from agentledger.schemas.warehouse import open_for

    if label not in LABELS:
        raise ConfigError(f"label must be one of {', '.join(LABELS)}")
    with open_for(s) as wh:
        row = wh.con.execute("SELECT session_id FROM alerts WHERE alert_id = ? LIMIT 1", [alert_id]).fetchone()
        if row is None:
            raise WarehouseError(f"no alert {alert_id[:60]!r} in the warehouse")
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        wh.con.execute("INSERT INTO alert_labels VALUES (?, ?, ?, ?, ?, ?)",
                       [alert_id, row[0], label, (note or None) and note[:2000], (by or None) and by[:200], now])
    return {"alert_id": alert_id, "session_id": row[0], "label": label, "labelled_at": now}


# --- what-if ----------------------------------------------------------------------------------------

def policy_files(s: Settings) -> list[Path]:
    """The policy files in HOME/policies (what `agentledger demo` and `simulate --write-policy` write)."""
    d = s.home / "policies"
    return sorted(p for p in d.glob("*.toml") if p.is_file()) if d.is_dir() else []


def whatif_text(s: Settings, policy_toml: str, sessions_sql: str | None = None) -> dict:
    """`whatif` with the policy given as TOML text (checked as a policy file is)."""
    from agentledger.schemas.policy import Policy

    from .evidence import whatif

    Policy.from_toml(policy_toml, source="pasted policy")  # a clear error before anything is opened
    with tempfile.TemporaryDirectory(prefix="agentledger-whatif-") as d:
        p = Path(d) / "policy.toml"
        p.write_text(policy_toml)
        return whatif(s, p, sessions_sql)


def sql_limited(s: Settings, query: str, *, limit: int | None = None,
                timeout_s: float | None = None) -> tuple[Rows | None, bool]:
    """`sql` (the same read-only guard) keeping at most ``limit`` rows: (rows, whether more were cut).
    ``timeout_s``: interrupt the query (its connection) after that many seconds, a WarehouseError
    saying so."""
    import threading

    import duckdb

    from agentledger.schemas.warehouse import open_for_query

    with open_for_query(s) as wh:
        done = threading.Event()

        def interrupt() -> None:
            if not done.is_set():
                try:
                    wh.con.interrupt()
                except duckdb.Error:
                    pass

        timer = threading.Timer(timeout_s, interrupt) if timeout_s else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            cur = wh.query(query)
            if cur is None or cur.description is None:
                return None, False
            rows = cur.fetchmany(limit + 1) if limit is not None else cur.fetchall()
        except duckdb.InterruptException as exc:
            if not timeout_s:
                raise WarehouseError("query interrupted") from exc
            raise WarehouseError(f"query interrupted after {timeout_s:g} s (the time limit of a query here)") from exc
        except duckdb.Error as exc:
            raise WarehouseError(str(exc).strip()) from exc
        finally:
            done.set()
            if timer is not None:
                timer.cancel()
                timer.join()
        cut = limit is not None and len(rows) > limit
        return Rows([d[0] for d in cur.description], rows[:limit] if cut else rows), cut


def export_to_temp(s: Settings, session: str) -> tuple[Path, Path, dict]:
    """Export a session's evidence bundle into a new private temporary directory: (that directory,
    the bundle's path, document). The bundle has a fixed name in it (never one made of the session id,
    which the recorded agent chose). The caller removes the directory, and only it."""
    import shutil

    from .evidence import export_bundle

    d = Path(tempfile.mkdtemp(prefix="agentledger-export-")).resolve()
    try:
        sid = read_session_id(s, session)
        out = d / "bundle.avro"
        doc = export_bundle(s, sid, out, source="warehouse").as_dict()
        if out.resolve().parent != d:
            raise WarehouseError(f"the bundle was not written inside {d}")
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d, out, doc


def read_session_id(s: Settings, session: str) -> str:
    from .sessions import for_reading

    return for_reading(s, session, transport=None, warehouse_only=True)
