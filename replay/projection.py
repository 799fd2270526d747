"""Projection: fold a session's ordered events into its state, at any point in time.

The fold is written as SQL over an ``events``-shaped table (a replay workset, or the warehouse
itself), ordered by seq, so it runs natively on millions of events. ``at`` keeps the events with
``seq <= at``: the state *after* event ``at`` (time travel).

The state (all sections sorted deterministically):

* ``session`` -- what session_started / session_ended said, and the first producer;
* ``processes`` -- every command, started and finished paired by command_id, with its outcome
  (``running`` while unfinished);
* ``files`` -- every path touched (renames count for both names), its last operation, last known
  digest and whether it still exists;
* ``approvals`` -- requests paired with decisions by request_id (``pending`` while undecided);
* ``network`` -- every attempt with its decision and outcome, paired by attempt_id;
  ``destinations`` -- the same per (host, port, protocol) with counts per decision;
* ``denials``, ``gaps``, ``checkpoints`` -- as recorded;
* ``counts`` -- events per family and kind, first and last seq and time.

The state digest is SHA-256 over the canonical JSON (sorted keys, no whitespace, UTF-8) of the
session summary, the counts and, per section, its row count and the SHA-256 of its rows as JSON
lines in the section's order (rendered natively by DuckDB, so a million-event state never has to
be brought into Python to be digested). The same events always give the same digest; a state "at" the last seq equals the full
state. Alerts are context from the warehouse, not events, and are not part of the digest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any

from agentledger.schemas.canonical import canonical_json_utf8

EV = "ev AS (SELECT * FROM events WHERE session_id = $sid AND seq <= $at)"
MAX_SEQ = 2**62


def _iso(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return v.isoformat(timespec="microseconds") + "Z"
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {k: _iso(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_iso(x) for x in v]
    return v


@dataclass
class Table:
    """One section of the state: columns and rows (lists of JSON-safe scalars)."""

    columns: list[str]
    rows: list[list[Any]]

    def dicts(self) -> list[dict]:
        return [dict(zip(self.columns, r)) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


SECTIONS = ("processes", "files", "approvals", "network", "destinations", "denials", "gaps", "checkpoints")

_SQL = {
    "processes": """
WITH {ev},
s AS (SELECT seq, occurred_at, command_started AS c FROM ev WHERE kind = 'command_started'),
f AS (SELECT seq, occurred_at, command_finished AS c FROM ev WHERE kind = 'command_finished')
SELECT coalesce(s.c.command_id, f.c.command_id) AS command_id, s.c.argv AS argv, s.c.cwd AS cwd,
       s.c.escalated AS escalated, s.c.parent_command_id AS parent_command_id,
       s.seq AS started_seq, strftime(s.occurred_at, '%Y-%m-%dT%H:%M:%S.%fZ') AS started_at, f.seq AS finished_seq, strftime(f.occurred_at, '%Y-%m-%dT%H:%M:%S.%fZ') AS finished_at,
       coalesce(f.c.status, 'running') AS status, f.c.exit_code AS exit_code, f.c.duration_ms AS duration_ms,
       f.c.stdout.sha256 AS stdout_sha256, f.c.stdout.size AS stdout_size, f.c.stderr.sha256 AS stderr_sha256,
       f.c.stderr.size AS stderr_size
FROM s FULL JOIN f ON f.c.command_id = s.c.command_id
ORDER BY coalesce(s.seq, f.seq), f.seq NULLS FIRST""",
    "files": """
WITH {ev},
fa AS (SELECT seq, file_accessed AS f FROM ev WHERE kind = 'file_accessed'),
x AS (
  SELECT seq, f.path AS path, f.operation AS op,
         CASE WHEN f.operation IN ('delete', 'rename') THEN NULL ELSE coalesce(f.digest_after, f.digest_before) END AS digest,
         CASE WHEN f.operation IN ('delete', 'rename') THEN NULL ELSE f.size_after END AS size,
         f.operation NOT IN ('delete', 'rename') AS present, f.inside_workspace AS inside
  FROM fa
  UNION ALL
  SELECT seq, f.new_path, 'renamed_to', f.digest_after, f.size_after, true, f.inside_workspace
  FROM fa WHERE f.operation = 'rename' AND f.new_path IS NOT NULL)
SELECT path, count(*) AS events,
       count(*) FILTER (WHERE op = 'read') AS reads,
       count(*) FILTER (WHERE op NOT IN ('read')) AS changes,
       min(seq) AS first_seq, max(seq) AS last_seq, arg_max(op, seq) AS last_operation,
       arg_max(digest, seq) FILTER (WHERE digest IS NOT NULL) AS last_digest,
       arg_max(size, seq) FILTER (WHERE size IS NOT NULL) AS last_size,
       arg_max(present, seq) AS present, bool_or(inside) AS inside_workspace
FROM x GROUP BY path ORDER BY path""",
    "approvals": """
WITH {ev},
r AS (SELECT seq, occurred_at, approval_requested AS a FROM ev WHERE kind = 'approval_requested'),
d AS (SELECT seq, occurred_at, approval_decided AS a FROM ev WHERE kind = 'approval_decided')
SELECT coalesce(r.a.request_id, d.a.request_id) AS request_id, r.seq AS requested_seq, strftime(r.occurred_at, '%Y-%m-%dT%H:%M:%S.%fZ') AS requested_at,
       r.a.action_kind AS action_kind, r.a.subject AS subject, r.a.risk AS risk, r.a.command_id AS command_id,
       r.a.justification AS justification,
       d.seq AS decided_seq, coalesce(d.a.decision, 'pending') AS decision, d.a.decided_by AS decided_by,
       d.a.decider AS decider, d.a.rule AS rule, d.a.latency_ms AS latency_ms,
       (d.a.action_digest IS NULL OR r.a.action_digest IS NULL OR d.a.action_digest = r.a.action_digest) AS digest_match
FROM r FULL JOIN d ON d.a.request_id = r.a.request_id
ORDER BY coalesce(r.seq, d.seq), d.seq NULLS FIRST""",
    "network": """
WITH {ev},
a AS (SELECT seq, occurred_at, network_attempted AS x FROM ev WHERE kind = 'network_attempted'),
d AS (SELECT min(seq) AS seq, arg_min(network_decided, seq) AS x FROM ev WHERE kind = 'network_decided'
      GROUP BY network_decided.attempt_id),
c AS (SELECT min(seq) AS seq, arg_min(network_completed, seq) AS x FROM ev WHERE kind = 'network_completed'
      GROUP BY network_completed.attempt_id)
SELECT a.x.attempt_id AS attempt_id, a.seq AS attempted_seq, strftime(a.occurred_at, '%Y-%m-%dT%H:%M:%S.%fZ') AS attempted_at, a.x.host AS host,
       a.x.port AS port, a.x.protocol AS protocol, a.x.method AS method, a.x.url AS url, a.x.command_id AS command_id,
       d.seq AS decided_seq, coalesce(d.x.decision, 'undecided') AS decision, d.x.rule AS rule,
       c.seq AS completed_seq, coalesce(c.x.outcome, 'pending') AS outcome, c.x.status AS status,
       c.x.bytes_in AS bytes_in, c.x.bytes_out AS bytes_out
FROM a LEFT JOIN d ON d.x.attempt_id = a.x.attempt_id LEFT JOIN c ON c.x.attempt_id = a.x.attempt_id
ORDER BY a.seq""",
    "destinations": """
WITH {ev},
a AS (SELECT seq, network_attempted AS x FROM ev WHERE kind = 'network_attempted'),
d AS (SELECT arg_min(network_decided, seq) AS x FROM ev WHERE kind = 'network_decided' GROUP BY network_decided.attempt_id),
c AS (SELECT arg_min(network_completed, seq) AS x FROM ev WHERE kind = 'network_completed'
      GROUP BY network_completed.attempt_id)
SELECT a.x.host AS host, a.x.port AS port, a.x.protocol AS protocol, count(*) AS attempts,
       count(*) FILTER (WHERE d.x.decision = 'allow') AS allowed,
       count(*) FILTER (WHERE d.x.decision = 'deny') AS denied,
       count(*) FILTER (WHERE d.x.decision = 'ask') AS asked,
       count(*) FILTER (WHERE d.x.decision IS NULL) AS undecided,
       count(*) FILTER (WHERE c.x.outcome = 'ok') AS completed_ok,
       coalesce(sum(c.x.bytes_in), 0)::BIGINT AS bytes_in, coalesce(sum(c.x.bytes_out), 0)::BIGINT AS bytes_out,
       min(a.seq) AS first_seq, max(a.seq) AS last_seq
FROM a LEFT JOIN d ON d.x.attempt_id = a.x.attempt_id LEFT JOIN c ON c.x.attempt_id = a.x.attempt_id
GROUP BY a.x.host, a.x.port, a.x.protocol ORDER BY a.x.host, a.x.port, a.x.protocol""",
    "denials": """
WITH {ev}
SELECT seq, strftime(occurred_at, '%Y-%m-%dT%H:%M:%S.%fZ') AS occurred_at, sandbox_denied.operation AS operation, sandbox_denied.target AS target,
       sandbox_denied.rule AS rule, sandbox_denied.reason AS reason, sandbox_denied.command_id AS command_id,
       sandbox_denied.inferred AS inferred
FROM ev WHERE kind = 'sandbox_denied' ORDER BY seq""",
    "gaps": """
WITH {ev}
SELECT seq, strftime(occurred_at, '%Y-%m-%dT%H:%M:%S.%fZ') AS occurred_at, gap.gap_kind AS gap_kind, gap.reason AS reason, gap.field AS field,
       gap.lost_events AS lost_events, gap.lost_bytes AS lost_bytes, gap.related_seq AS related_seq
FROM ev WHERE kind = 'gap' ORDER BY seq""",
    "checkpoints": """
WITH {ev}
SELECT seq, checkpoint.head_seq AS head_seq, checkpoint.head_hash AS head_hash,
       checkpoint.event_count AS event_count, checkpoint.key_id AS key_id, checkpoint."final" AS "final",
       hex(checkpoint.signature) AS signature
FROM ev WHERE kind = 'checkpoint' ORDER BY seq""",
}


@dataclass
class SessionState:
    session_id: str
    as_of_seq: int | None  # last seq folded in (None: no events)
    session: dict
    counts: dict
    tables: dict[str, Table] = field(default_factory=dict)  # empty when projected with materialize=False
    sections: dict[str, dict] = field(default_factory=dict)  # name -> {"rows": n, "digest": sha256}
    digest: str = ""

    def canonical(self) -> dict:
        return {"session_id": self.session_id, "as_of_seq": self.as_of_seq, "session": self.session,
                "counts": self.counts, "sections": self.sections}

    def as_dict(self) -> dict:
        """JSON-friendly: each section as a list of objects."""
        return {
            "session_id": self.session_id,
            "as_of_seq": self.as_of_seq,
            "state_digest": self.digest,
            "session": self.session,
            "counts": self.counts,
            **{name: t.dicts() for name, t in self.tables.items()},
        }


def state_digest(state: SessionState) -> str:
    return hashlib.sha256(canonical_json_utf8(state.canonical())).hexdigest()


def _numbered(sql: str) -> str:
    """Add ``_ord`` (the row's position in the section's documented order) to a section query."""
    head, order = sql.rsplit("ORDER BY ", 1)
    i = head.rfind("\nSELECT ") + len("\nSELECT ")
    return f"{head[:i]}row_number() OVER (ORDER BY {order}) AS _ord, {head[i:]}"


_counter = iter(range(1, 1 << 62))


def _digest_rows(con, tbl: str, batch_size: int = 1_000_000) -> tuple[int, str]:
    """(rows, SHA-256 of the rows' JSON joined by newlines in ``_ord`` order) of a section table.

    DuckDB renders the JSON lines (in parallel) and hands them over as Arrow string arrays; their
    byte buffers are hashed in place by hashlib. The same digest as DuckDB's
    ``sha256(string_agg(to_json(t)::VARCHAR, chr(10) ORDER BY _ord))``, at about a third of the
    cost for a large section (the single concatenated string is never built)."""
    import numpy as np
    import pyarrow as pa

    h = hashlib.sha256()
    n = 0
    table = con.execute(f"SELECT CASE WHEN _ord = 1 THEN '' ELSE chr(10) END || to_json(t)::VARCHAR AS j "
                        f"FROM {tbl} t ORDER BY _ord").to_arrow_table(batch_size)
    for chunk in table.column(0).chunks:
        if len(chunk) == 0:
            continue
        if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
            chunk = chunk.cast(pa.large_string())  # e.g. string_view from a newer DuckDB
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        offs = np.frombuffer(offsets, dtype=width)
        start, end = int(offs[chunk.offset]), int(offs[chunk.offset + len(chunk)])
        h.update(memoryview(data)[start:end])
        n += len(chunk)
    return n, h.hexdigest()


SMALL_STATE_EVENTS = 20_000  # a state this small is projected one statement per section (`_small_section`)


def _small_section(con, name: str, params: dict) -> tuple[dict, Table]:
    """`_section` in one statement: the section's rows with each row's JSON (as `_digest_rows`
    renders it from the temp table: the same columns, ``_ord`` included), hashed here. Building,
    reading and dropping a temp table is four statements, most of a small session's state."""
    cur = con.execute(f"WITH t AS ({_numbered(_SQL[name].format(ev=EV))}) "
                      "SELECT to_json(t)::VARCHAR AS _j, t.* FROM t ORDER BY _ord", params)
    names = [d[0] for d in cur.description]
    rows = cur.fetchall()
    keep = [i for i, n in enumerate(names) if n not in ("_j", "_ord")]
    digest = hashlib.sha256("\n".join(r[0] for r in rows).encode()).hexdigest()
    return {"rows": len(rows), "digest": digest}, Table([names[i] for i in keep], [[r[i] for i in keep] for r in rows])


def _section(con, name: str, params: dict, materialize: bool) -> tuple[dict, Table | None]:
    """Build the section natively as a temp table; digest it there; fetch it when asked."""
    tbl = f"_state_{next(_counter)}_{name}"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {tbl} AS {_numbered(_SQL[name].format(ev=EV))}", params)
    try:
        n, digest = _digest_rows(con, tbl)
        table = None
        if materialize:
            cur = con.execute(f"SELECT * EXCLUDE (_ord) FROM {tbl} ORDER BY _ord")
            table = Table([d[0] for d in cur.description], [list(r) for r in cur.fetchall()])
        return {"rows": n, "digest": digest}, table
    finally:
        con.execute(f"DROP TABLE IF EXISTS {tbl}")


def _session_info(con, params: dict) -> dict:
    started = con.execute(f"WITH {EV} SELECT seq, occurred_at, session_started FROM ev "
                          "WHERE kind = 'session_started' ORDER BY seq LIMIT 1", params).fetchone()
    ended = con.execute(f"WITH {EV} SELECT seq, occurred_at, session_ended FROM ev "
                        "WHERE kind = 'session_ended' ORDER BY seq DESC LIMIT 1", params).fetchone()
    producer = con.execute(f"WITH {EV} SELECT producer FROM ev ORDER BY seq LIMIT 1", params).fetchone()
    out: dict[str, Any] = {"started": None, "ended": None, "producer": _iso(producer[0]) if producer else None}
    if started:
        out["started"] = {"seq": started[0], "at": _iso(started[1]), **_iso(started[2])}
    if ended:
        out["ended"] = {"seq": ended[0], "at": _iso(ended[1]), **_iso(ended[2])}
    out["status"] = (ended[2]["status"] if ended else "open") if started or ended else "unknown"
    return out


def _counts(con, params: dict) -> dict:
    by_kind = con.execute(f"WITH {EV} SELECT kind, count(*) FROM ev GROUP BY 1 ORDER BY 1", params).fetchall()
    by_family = con.execute(f"WITH {EV} SELECT family, count(*) FROM ev GROUP BY 1 ORDER BY 1", params).fetchall()
    span = con.execute(f"WITH {EV} SELECT count(*), min(seq), max(seq), min(occurred_at), max(occurred_at) FROM ev",
                       params).fetchone()
    return {"events": span[0], "first_seq": span[1], "last_seq": span[2], "first_at": _iso(span[3]),
            "last_at": _iso(span[4]), "by_family": dict(by_family), "by_kind": dict(by_kind)}


PARALLEL_MIN_EVENTS = 100_000  # a state this big is projected two sections at a time


def project(con, session_id: str, at: int | None = None, *, materialize: bool = True) -> SessionState:
    """The state of ``session_id`` after event ``at`` (all events when None), from ``con``'s
    ``events`` table. Deterministic: equal events give an equal state and digest.

    Each section is computed and digested natively (SHA-256 over its rows as JSON lines, in the
    section's order); ``materialize=False`` skips bringing the rows into Python (the digest and
    counts are the same). For a big state, two sections are worked on at once, each on its own
    cursor of ``con`` (a section has serial stretches: its final sort, hashing its rows), in the
    biggest-first order; the state is assembled in `SECTIONS` order whatever finishes first."""
    params = {"sid": session_id, "at": MAX_SEQ if at is None else int(at)}
    counts = _counts(con, params)
    state = SessionState(session_id, counts["last_seq"], _session_info(con, params), counts)
    if counts["events"] >= PARALLEL_MIN_EVENTS:
        from concurrent.futures import ThreadPoolExecutor

        def work(name: str):
            cur = con.cursor()
            try:
                return _section(cur, name, params, materialize)
            finally:
                cur.close()

        with ThreadPoolExecutor(2, thread_name_prefix="agentledger-project") as pool:
            done = {name: pool.submit(work, name) for name in sorted(SECTIONS, key=_SECTION_COST.get, reverse=True)}
            results = {name: f.result() for name, f in done.items()}
    elif materialize and counts["events"] <= SMALL_STATE_EVENTS:
        results = {name: _small_section(con, name, params) for name in SECTIONS}
    else:
        results = {name: _section(con, name, params, materialize) for name in SECTIONS}
    for name in SECTIONS:
        state.sections[name], table = results[name]
        if table is not None:
            state.tables[name] = table
    state.digest = state_digest(state)
    return state


# Rough relative cost of each section, for the order they are started in.
_SECTION_COST = {"processes": 8, "network": 6, "approvals": 4, "destinations": 3, "files": 2, "denials": 1,
                 "gaps": 1, "checkpoints": 1}
