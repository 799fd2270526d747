"""The warehouse: the one module that owns DuckDB DDL (tables, views) and how to open it.

The contract (docs/warehouse.md) is generated from the Avro reader schema: every envelope field
is a column of ``events``; every payload kind is a STRUCT column named after its kind, NULL on rows
of other kinds; ``family`` and ``kind`` say which one is set. Enums are stored as VARCHAR so that
adding a symbol never needs a migration.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources as ilr
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb

from . import envvars
from .contract import PayloadKind, SchemaStore, load_store
from .errors import ConfigError, WarehouseError
from .retry import is_transient, retry_transaction
from .sql import ident, literal

if TYPE_CHECKING:
    from .config import Settings

# Columns the warehouse adds to each event (where it came from, when it landed).
PROVENANCE_COLUMNS = [
    ("schema_fingerprint", "VARCHAR"),
    ("source_topic", "VARCHAR"),
    ("source_partition", "INTEGER"),
    ("source_offset", "BIGINT"),
    ("ingested_at", "TIMESTAMP"),
]
NOT_NULL = {"event_id", "session_id", "seq", "occurred_at", "family", "kind", "prev_hash", "hash"}


T = TypeVar("T")


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``with transaction(con):`` -- BEGIN, the body, COMMIT. Any exception in the body (or a failed
    COMMIT) rolls back and propagates unchanged; a ROLLBACK that fails in turn (a failed COMMIT
    already ended the transaction) never hides it. One attempt: `run_transaction` retries."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass
        raise


def run_transaction(con: duckdb.DuckDBPyConnection, body: Callable[[duckdb.DuckDBPyConnection], T], what: str, *,
                    attempts: int = 20) -> T:
    """``body(con)`` in one `transaction`, redone from the start while it loses a race with another
    writer (`schemas.retry`): the result of the attempt that committed. A terminal error, or the last
    transient one, is a `WarehouseError` "``what`` failed: ..."."""
    def once() -> T:
        with transaction(con):
            return body(con)
    return retry_transaction(once, what, attempts=attempts)


def scalar(cur: duckdb.DuckDBPyConnection) -> Any:
    """The first value of the next row of ``cur``, for a query that returns one row (``count(*)``, ``max()``)."""
    row = cur.fetchone()
    if row is None:
        raise WarehouseError("a query that returns one row returned none")
    return row[0]


# Extensions of the extra "scale" (a Postgres catalog, data in S3): not installed by default.
SCALE_EXTENSIONS = frozenset({"postgres_scanner", "httpfs", "aws"})


def extension_path(name: str) -> Path:
    """The extension binary shipped in the ``duckdb-extension-<name>`` wheel (no download, no INSTALL)."""
    try:
        module = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError as exc:
        hint = " or the extra: pip install 'agentledger[scale]'" if name in SCALE_EXTENSIONS else ""
        raise WarehouseError(f"the DuckDB {name} extension is not installed (pip package "
                             f"duckdb-extension-{name.replace('_', '-')}{hint})") from exc
    root = Path(str(ilr.files(module))) / "extensions"
    for candidate in (root / f"v{duckdb.__version__}", root / duckdb.__version__):
        p = candidate / f"{name}.duckdb_extension"
        if p.exists():
            return p
    raise WarehouseError(f"duckdb-extension-{name} has no build for duckdb {duckdb.__version__} under {root}")


# Table functions a user query (a detection rule) may call: none of them reads or writes anything.
SAFE_TABLE_FUNCTIONS = frozenset({"unnest", "range", "generate_series"})


def parser_connection() -> duckdb.DuckDBPyConnection:
    """An empty in-memory connection for `check_select_only` to parse with (no extension loads)."""
    return duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                              "autoload_known_extensions": False})


def check_select_only(sql: str, parser: duckdb.DuckDBPyConnection | None = None) -> None:
    """Refuse user SQL that is more than one SELECT over the warehouse's own relations, whatever
    connection runs it: several statements, anything but a SELECT (COPY, ATTACH, INSTALL, SET ...),
    a table function that reads files or the network (read_csv, read_text, glob, ...), or a table
    name DuckDB would take for a file (``FROM 'x.csv'``). Parsed by DuckDB's own parser
    (``json_serialize_sql``) on ``parser`` (a `parser_connection`, reused when checking many: a new
    connection per check costs ~30 ms), else on one of its own. Raises `WarehouseError` saying what
    is not allowed."""
    con = parser or parser_connection()
    try:
        tree = json.loads(scalar(con.execute("SELECT json_serialize_sql(?)", [sql])))
    finally:
        if parser is None:
            con.close()
    if tree.get("error"):
        raise WarehouseError(f"only one SELECT is allowed: {tree.get('error_message') or 'unparsable'}")
    if len(tree.get("statements") or []) != 1:
        raise WarehouseError(f"only one SELECT is allowed, not {len(tree.get('statements') or [])} statements")

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for x in node:
                walk(x)
            return
        if not isinstance(node, dict):
            return
        if node.get("type") == "TABLE_FUNCTION":
            fn = node.get("function") or {}
            name = str(fn.get("function_name") or "").lower()
            if name not in SAFE_TABLE_FUNCTIONS or fn.get("schema") or fn.get("catalog"):
                raise WarehouseError(f"the table function {name or '?'}() is not allowed here (only "
                                     f"{', '.join(sorted(SAFE_TABLE_FUNCTIONS))}): no file or network access")
        elif node.get("type") == "BASE_TABLE":
            name = str(node.get("table_name") or "")
            if not name.replace("_", "a").isalnum() or not name.isascii() or node.get("catalog_name"):
                raise WarehouseError(f"{name!r} is not a warehouse relation (a file path or another catalog)")
        for v in node.values():
            walk(v)

    walk(tree["statements"])


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> None:
    con.execute(f"LOAD {literal(str(extension_path(name)))}")


# --- Avro -> DuckDB types ---------------------------------------------------------------


def duck_type(t: Any, named: dict[str, Any], namespace: str = "") -> str:
    if isinstance(t, list):
        members = [m for m in t if m != "null"]
        if len(members) != 1:
            raise WarehouseError(f"only [null, T] unions map to a column type, not {t}")
        return duck_type(members[0], named, namespace)
    if isinstance(t, str):
        prim = {"boolean": "BOOLEAN", "int": "INTEGER", "long": "BIGINT", "float": "FLOAT", "double": "DOUBLE",
                "bytes": "BLOB", "string": "VARCHAR"}
        if t in prim:
            return prim[t]
        full = t if "." in t else f"{namespace}.{t}"
        if full in named:
            return duck_type(named[full], named, namespace)
        raise WarehouseError(f"unknown Avro type {t}")
    lt = t.get("logicalType")
    if lt == "timestamp-micros" or lt == "timestamp-millis":
        return "TIMESTAMP"
    if lt == "uuid":
        return "VARCHAR"
    kind = t["type"]
    ns = t.get("namespace", namespace)
    if kind in ("record", "enum", "fixed"):
        named[t["name"] if "." in t["name"] else f"{ns}.{t['name']}"] = t
    if kind == "record":
        fields = ", ".join(f"{ident(f['name'])} {duck_type(f['type'], named, ns)}" for f in t["fields"])
        return f"STRUCT({fields})"
    if kind == "enum":
        return "VARCHAR"
    if kind == "fixed":
        return "BLOB"
    if kind == "array":
        return f"{duck_type(t['items'], named, ns)}[]"
    if kind == "map":
        return f"MAP(VARCHAR, {duck_type(t['values'], named, ns)})"
    return duck_type(kind, named, ns)


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    source: str  # SQL expression over a read_avro row aliased `s`


_EVENT_COLUMNS: dict[tuple[Any, ...], tuple[Column, ...]] = {}


def event_columns(store: SchemaStore) -> list[Column]:
    """The columns of ``events`` (computed once per schema: DDL and row readers ask for them often)."""
    key = (store.current.fingerprint_hex, tuple((k.index, k.kind, k.family, k.column) for k in store.kinds))
    if key not in _EVENT_COLUMNS:
        _EVENT_COLUMNS[key] = tuple(_event_columns(store))
    return list(_EVENT_COLUMNS[key])


def _event_columns(store: SchemaStore) -> list[Column]:
    schema = store.current.schema
    ns = schema.get("namespace", "")
    named: dict[str, Any] = {}
    cols: list[Column] = []
    fam = " ".join(f"WHEN 'u{k.index}' THEN '{k.family}'" for k in store.kinds)
    kind = " ".join(f"WHEN 'u{k.index}' THEN '{k.kind}'" for k in store.kinds)
    payload_type: Any = None
    for f in schema["fields"]:
        name = f["name"]
        if name == "payload":
            payload_type = f["type"]
            cols.append(Column("family", "VARCHAR", f"CASE union_tag(s.payload) {fam} END"))
            cols.append(Column("kind", "VARCHAR", f"CASE union_tag(s.payload) {kind} END"))
            continue
        t = duck_type(f["type"], named, ns)
        cols.append(Column(name, t, f"s.{ident(name)}::{t}" if t.startswith(("STRUCT", "MAP")) or "[]" in t else f"s.{ident(name)}"))
    for name, t in PROVENANCE_COLUMNS:
        cols.append(Column(name, t, f"s.{name}"))
    for k in store.kinds:
        t = duck_type(payload_type[k.index], named, ns)
        cols.append(Column(k.column, t, f"union_extract(s.payload, 'u{k.index}')::{t}"))
    return cols


def struct_fields(store: SchemaStore) -> dict[str, list[tuple[str, str]]]:
    """(field, type) of every STRUCT column of ``events`` (one level: the record's own fields)."""
    schema = store.current.schema
    ns = schema.get("namespace", "")
    named: dict[str, Any] = {}
    out: dict[str, list[tuple[str, str]]] = {}

    def record(column: str, t: Any) -> None:
        duck_type(t, named, ns)  # registers the named types it defines, in schema order
        if isinstance(t, list):
            t = next((m for m in t if m != "null"), None)
        if isinstance(t, str):
            t = named.get(t if "." in t else f"{ns}.{t}")
        if isinstance(t, dict) and t.get("type") == "record":
            out[column] = [(f["name"], duck_type(f["type"], named, t.get("namespace", ns))) for f in t["fields"]]

    for f in schema["fields"]:
        if f["name"] == "payload":
            for k in store.kinds:
                record(k.column, f["type"][k.index])
        else:
            record(f["name"], f["type"])
    return out


# --- DDL ----------------------------------------------------------------------------------
#
# Each event kind has a table of its own, ``events_<kind>``: the envelope columns, the provenance
# columns, then the kind's STRUCT column. ``events`` is a UNION ALL view over them with exactly the
# columns and types of the one wide table the warehouse had before (docs/warehouse.md), so every
# query reads the same. A wide table stores a null STRUCT for every other kind on every row, and
# DuckDB decoding, storing and committing them cost more than everything else ingest does.

KIND_TABLE_PREFIX = "events_"


def kind_table(kind: PayloadKind) -> str:
    """The table holding the events of one kind."""
    return KIND_TABLE_PREFIX + kind.kind


def stored_columns(store: SchemaStore) -> list[Column]:
    """The columns every kind table has before its payload column: the envelope, then provenance."""
    payload = {k.column for k in store.kinds}
    return [c for c in event_columns(store) if c.name not in payload and c.name not in ("family", "kind")]


def kind_columns(store: SchemaStore, kind: PayloadKind) -> list[Column]:
    """The columns of ``kind``'s table, in order; the payload column's source reads the union branch."""
    payload = next(c for c in event_columns(store) if c.name == kind.column)
    return [*stored_columns(store), payload]


def event_table_names(store: SchemaStore | None = None) -> list[str]:
    """The tables that hold the events (``events`` is a view over them), in union branch order."""
    return [kind_table(k) for k in (store or load_store()).kinds]


def _kind_table_ddl(store: SchemaStore, kind: PayloadKind, constraints: bool) -> str:
    cols = ",\n  ".join(f"{ident(c.name)} {c.type}{' NOT NULL' if constraints and c.name in NOT_NULL else ''}"
                        for c in kind_columns(store, kind))
    return f"CREATE TABLE IF NOT EXISTS {ident(kind_table(kind))} (\n  {cols}\n)"


def events_view_ddl(store: SchemaStore) -> str:
    """``events``: every kind table, with the columns (names, order, types) of the wide table.

    Another kind's payload column is an untyped NULL: the UNION takes each column's type from the
    one branch that has it. ``NULL::STRUCT(...)`` casts gave the same types but cost DuckDB ~5x more
    to bind, at every query that reads ``events`` and at every view made over it: a new
    warehouse's views 0.28 -> 0.05 CPU-s, a query of ``decisions`` 93 -> 16 ms of binding."""
    cols = event_columns(store)
    payload = {k.column for k in store.kinds}
    branches = []
    for k in store.kinds:
        sel = []
        for c in cols:
            if c.name == "family":
                e = f"'{k.family}'"
            elif c.name == "kind":
                e = f"'{k.kind}'"
            elif c.name in payload and c.name != k.column:
                e = "NULL"
            else:
                e = ident(c.name)
            sel.append(e if e == ident(c.name) else f"{e} AS {ident(c.name)}")
        branches.append(f"SELECT {', '.join(sel)} FROM {ident(kind_table(k))}")
    return "CREATE OR REPLACE VIEW events AS\n" + "\nUNION ALL\n".join(branches)


def events_relation(con: duckdb.DuckDBPyConnection, store: SchemaStore) -> str:
    """What to read the events from, never the stored ``events`` view (whoever can write the file can
    redefine it, even to show other rows to other queries: `Warehouse.schema_problems`): this code's
    UNION ALL of the kind tables, or the ``events`` table of a warehouse made before them (not
    migrated yet)."""
    have = {r[0]: r[1] for r in con.execute("""
        SELECT table_name, table_type FROM information_schema.tables
        WHERE table_catalog = current_database() AND table_schema = current_schema()
          AND (table_name = 'events' OR table_name LIKE 'events\\_%' ESCAPE '\\')""").fetchall()}
    if have.get("events") == "BASE TABLE" and not any(t in have for t in event_table_names(store)):
        return "events"
    return f"({events_query(store)})"


def events_query(store: SchemaStore) -> str:
    """The ``events`` view's query as this code defines it, to read the kind tables without the view
    stored in the warehouse (which whoever can write the file can redefine: `schema_problems`)."""
    return events_view_ddl(store).split(" AS\n", 1)[1]

MCP_TOOL_DEFINITIONS_EMPTY = """
CREATE OR REPLACE VIEW mcp_tool_definitions AS
SELECT session_id, seq, occurred_at AS session_started_at, NULL::VARCHAR AS server, NULL::VARCHAR AS tool,
  NULL::VARCHAR AS definition_digest, NULL::VARCHAR AS description_digest, NULL::VARCHAR AS input_schema_digest,
  NULL::VARCHAR AS description, NULL::TIMESTAMP AS listed_at, producer.agent_name AS agent
FROM events WHERE false
"""

CONTROL_SURFACE_EMPTY = """
CREATE OR REPLACE VIEW control_surface AS
SELECT session_id, seq, occurred_at, occurred_at AS started_at, producer.agent_name AS agent, producer."user" AS "user",
  producer.host AS host, NULL::VARCHAR AS cwd, NULL::VARCHAR AS row_kind, NULL::VARCHAR AS observed_by,
  NULL::BOOLEAN AS workspace_trusted, NULL::VARCHAR AS path, NULL::VARCHAR AS role, NULL::VARCHAR AS digest,
  NULL::BIGINT AS size, NULL::BOOLEAN AS truncated, NULL::VARCHAR AS content, NULL::VARCHAR AS operation,
  NULL::VARCHAR AS command_id, NULL::VARCHAR AS previous_digest, NULL::VARCHAR AS previous_session_id,
  NULL::BOOLEAN AS changed
FROM events WHERE false
"""


def views_ddl(store: SchemaStore) -> dict[str, str]:
    """Every view for ``store``, ``events`` first (the others read it)."""
    views = {"events": events_view_ddl(store), **VIEWS}
    types = {c.name: c.type for c in event_columns(store)}
    started = types.get("command_started", "")
    if '"mcp" STRUCT' not in started:
        # a store from before v3 (an older release's warehouse, rebuilt as that release made it): no
        # `mcp` records yet, so mcp_calls finds MCP calls by their argv alone
        views["mcp_calls"] = re.sub(r"\b[sf]\.command_(?:started|finished)\.mcp\.\w+", "NULL", views["mcp_calls"])
        views["mcp_calls"] = views["mcp_calls"].replace("s.command_started.mcp IS NOT NULL", "false")
        views["decisions"] = views["decisions"].replace("command_started.mcp IS NOT NULL", "false")
    elif '"definition_digest"' not in started:  # a v3 store: `mcp` records without the definition (v4)
        views["mcp_calls"] = views["mcp_calls"].replace("s.command_started.mcp.definition_digest", "NULL::VARCHAR")
    if '"scope"' not in types.get("approval_decided", ""):  # before v4: no scope / rule_source / grant_request_id / reported_as
        views["decisions"] = re.sub(r"\bd\.approval_decided\.(?:scope|rule_source|grant_request_id|reported_as)\b",
                                    "NULL::VARCHAR", views["decisions"])
    session = types.get("session_started", "")
    if '"mcp_tools"' not in session:  # before v4: no tool definitions, an empty view of the same columns
        views["mcp_tool_definitions"] = MCP_TOOL_DEFINITIONS_EMPTY
    if '"control_surface"' not in session:  # before v4: no snapshots, an empty view of the same columns
        views["control_surface"] = CONTROL_SURFACE_EMPTY
    return views


def session_decisions_sql(store: SchemaStore) -> str:
    """The `decisions` view's query for one session (parameter ``$session_id``): the session's events
    are read once (a materialized CTE) instead of the whole warehouse, for the console and `why`."""
    body = views_ddl(store)["decisions"].split(" AS\n", 1)[1]
    head = "WITH acts AS ("
    if not body.lstrip().startswith(head):
        raise AssertionError("the decisions view no longer starts with its acts CTE")
    body = re.sub(r"\bevents\b", "session_events", body)
    return body.replace(head, "WITH session_events AS MATERIALIZED (SELECT * FROM events WHERE session_id = "
                              "$session_id),\nacts AS (", 1)


def _tables_ddl(store: SchemaStore, constraints: bool) -> dict[str, str]:
    return {
        **{kind_table(k): _kind_table_ddl(store, k, constraints) for k in store.kinds},
        "ingest_offsets": """CREATE TABLE IF NOT EXISTS ingest_offsets (
  topic VARCHAR, "partition" INTEGER, next_offset BIGINT, updated_at TIMESTAMP
)""",
        "chain_heads": CHAIN_HEADS_DDL,
        "dead_letters": """CREATE TABLE IF NOT EXISTS dead_letters (
  dead_letter_id VARCHAR, topic VARCHAR, "partition" INTEGER, "offset" BIGINT,
  "key" BLOB, raw BLOB, reason VARCHAR, detail VARCHAR,
  session_id VARCHAR, seq BIGINT, event_id VARCHAR, fingerprint VARCHAR,
  received_at TIMESTAMP, resolved_at TIMESTAMP, resolution VARCHAR
)""",
        "schema_versions": """CREATE TABLE IF NOT EXISTS schema_versions (
  fingerprint VARCHAR, subject VARCHAR, version VARCHAR, schema_json VARCHAR, first_seen_at TIMESTAMP
)""",
    }


CHAIN_HEADS_DDL = """CREATE TABLE IF NOT EXISTS chain_heads (
  session_id VARCHAR, head_seq BIGINT, head_hash VARCHAR, event_count BIGINT,
  first_at TIMESTAMP, last_at TIMESTAMP, ended BOOLEAN, updated_at TIMESTAMP
)"""


# The log-wide Merkle tree (schemas/treelog.py). Created together, with the one tree_state row, in
# one transaction: two writers creating them on a new DuckLake conflict, and one retries.
TREE_TABLES = {
    "tree_leaves": """CREATE TABLE IF NOT EXISTS tree_leaves (
  leaf_index BIGINT, session_id VARCHAR, head_seq BIGINT, head_hash VARCHAR, event_count BIGINT,
  leaf_hash VARCHAR, appended_at TIMESTAMP
)""",
    "tree_heads": """CREATE TABLE IF NOT EXISTS tree_heads (
  log_id VARCHAR, tree_size BIGINT, root_hash VARCHAR, timestamp_ms BIGINT, algorithm VARCHAR, key_id VARCHAR,
  signature VARCHAR, frontier VARCHAR[], created_at TIMESTAMP
)""",
    "tree_state": """CREATE TABLE tree_state (
  log_id VARCHAR, tree_size BIGINT, root_hash VARCHAR, frontier VARCHAR[], updated_at TIMESTAMP
)""",
}


VIEWS = {
    "sessions": """
CREATE OR REPLACE VIEW sessions AS
SELECT
  e.session_id,
  any_value(e.session_started.agent) FILTER (WHERE e.kind = 'session_started') AS agent,
  any_value(e.session_started.model) FILTER (WHERE e.kind = 'session_started') AS model,
  any_value(e.producer."user") AS "user",
  any_value(e.producer.host) AS host,
  min(e.occurred_at) FILTER (WHERE e.kind = 'session_started') AS started_at,
  max(e.occurred_at) FILTER (WHERE e.kind = 'session_ended') AS ended_at,
  any_value(e.session_ended.status) FILTER (WHERE e.kind = 'session_ended') AS end_status,
  count(*) AS event_count,
  max(e.seq) AS last_seq,
  count(*) FILTER (WHERE e.kind = 'command_started') AS commands,
  count(*) FILTER (WHERE e.kind = 'file_accessed') AS file_events,
  count(*) FILTER (WHERE e.kind = 'network_attempted') AS network_attempts,
  count(*) FILTER (WHERE e.kind = 'approval_requested') AS approvals_requested,
  count(*) FILTER (WHERE e.kind = 'sandbox_denied') AS sandbox_denied,
  count(*) FILTER (WHERE e.kind = 'command_finished' AND e.command_finished.status = 'declined') AS commands_declined,
  count(*) FILTER (WHERE e.kind = 'approval_decided'
                   AND e.approval_decided.decision IN ('denied', 'timed_out', 'aborted')) AS approvals_denied,
  count(*) FILTER (WHERE e.kind = 'network_decided' AND e.network_decided.decision = 'deny') AS network_denied,
  count(*) FILTER (WHERE e.kind = 'gap' AND e.gap.gap_kind IS DISTINCT FROM 'not_observable') AS gaps
FROM events e
GROUP BY e.session_id
""",
    "chain_status": """
CREATE OR REPLACE VIEW chain_status AS
WITH letters AS (
  SELECT d.session_id, d.seq, d.reason, d.detail
  FROM dead_letters d
  WHERE d.resolved_at IS NULL AND d.session_id IS NOT NULL AND d.seq IS NOT NULL
    AND d.reason NOT IN ('duplicate', 'offsets_skipped')
),
blocking AS (
  -- what should extend the chain but was quarantined, or a second, different event for a seq
  SELECT l.session_id, l.seq, l.reason, l.detail
  FROM letters l LEFT JOIN chain_heads h USING (session_id)
  WHERE l.seq > coalesce(h.head_seq, -1) OR l.reason = 'conflicting_duplicate'
),
pending AS (
  SELECT session_id, min(seq) AS first_letter_seq, arg_min(reason, seq) AS reason,
         arg_min(detail, seq) AS detail, count(*) AS quarantined,
         bool_or(reason = 'conflicting_duplicate') AS forked, min(seq) FILTER (WHERE reason = 'conflicting_duplicate') AS fork_seq
  FROM blocking GROUP BY session_id
)
SELECT
  coalesce(h.session_id, p.session_id) AS session_id,
  CASE WHEN p.session_id IS NOT NULL THEN 'broken' WHEN h.ended THEN 'ok' ELSE 'open' END AS status,
  CASE WHEN p.session_id IS NULL THEN NULL
       WHEN p.forked THEN least(p.fork_seq, coalesce(h.head_seq, -1) + 1)
       ELSE coalesce(h.head_seq, -1) + 1 END AS first_bad_seq,
  p.reason, p.detail,
  h.head_seq, h.head_hash, coalesce(h.event_count, 0) AS event_count,
  coalesce(p.quarantined, 0) AS quarantined_after_head,
  h.first_at, h.last_at, h.updated_at
FROM chain_heads h FULL OUTER JOIN pending p ON p.session_id = h.session_id
""",
    # --- auditor views (docs/warehouse.md) ------------------------------------------------
    "approvals": """
CREATE OR REPLACE VIEW approvals AS
SELECT
  r.session_id, r.approval_requested.request_id AS request_id, r.seq AS request_seq,
  r.occurred_at AS requested_at, r.approval_requested.action_kind AS action_kind,
  r.approval_requested.subject AS subject, r.approval_requested.risk AS risk,
  r.approval_requested.justification AS justification, r.approval_requested.command_id AS command_id,
  d.seq AS decision_seq, d.occurred_at AS decided_at,
  coalesce(d.approval_decided.decision, 'pending') AS decision,
  d.approval_decided.decided_by AS decided_by, d.approval_decided.decider AS decider,
  d.approval_decided.rule AS rule,
  coalesce(d.approval_decided.latency_ms, date_diff('millisecond', r.occurred_at, d.occurred_at)) AS latency_ms,
  d.approval_decided.action_digest IS NOT NULL
    AND d.approval_decided.action_digest <> r.approval_requested.action_digest AS digest_mismatch,
  r.producer."user" AS "user", r.producer.host AS host, r.producer.agent_name AS agent
FROM events r
LEFT JOIN events d
  ON d.kind = 'approval_decided' AND d.session_id = r.session_id
 AND d.approval_decided.request_id = r.approval_requested.request_id
WHERE r.kind = 'approval_requested'
""",
    "denied_actions": """
CREATE OR REPLACE VIEW denied_actions AS
SELECT session_id, seq, occurred_at, 'approval' AS source, approval_decided.decision AS decision,
       approval_decided.request_id AS subject, approval_decided.rule AS rule, NULL AS reason,
       producer."user" AS "user", producer.host AS host
FROM events WHERE kind = 'approval_decided' AND approval_decided.decision IN ('denied', 'timed_out', 'aborted')
UNION ALL
SELECT session_id, seq, occurred_at, 'command', command_finished.status, command_finished.command_id, NULL, NULL,
       producer."user", producer.host
FROM events WHERE kind = 'command_finished' AND command_finished.status = 'declined'
UNION ALL
SELECT session_id, seq, occurred_at, 'sandbox', sandbox_denied.operation, sandbox_denied.target,
       sandbox_denied.rule, sandbox_denied.reason, producer."user", producer.host
FROM events WHERE kind = 'sandbox_denied'
UNION ALL
SELECT session_id, seq, occurred_at, 'network', network_decided.decision, network_decided.attempt_id,
       network_decided.rule, network_decided.reason, producer."user", producer.host
FROM events WHERE kind = 'network_decided' AND network_decided.decision = 'deny'
""",
    "network_egress": """
CREATE OR REPLACE VIEW network_egress AS
SELECT
  a.session_id, a.seq, a.occurred_at, a.network_attempted.attempt_id AS attempt_id,
  a.network_attempted.host AS host, a.network_attempted.port AS port,
  a.network_attempted.protocol AS protocol, a.network_attempted.method AS method,
  coalesce(d.network_decided.decision, 'undecided') AS decision, d.network_decided.rule AS rule,
  d.network_decided.reason AS reason, d.network_decided.policy_source AS policy_source,
  c.network_completed.outcome AS outcome, c.network_completed.status AS status,
  c.network_completed.bytes_in AS bytes_in, c.network_completed.bytes_out AS bytes_out,
  a.network_attempted.command_id AS command_id, a.producer."user" AS "user", a.producer.host AS agent_host
FROM events a
LEFT JOIN events d ON d.kind = 'network_decided' AND d.session_id = a.session_id
 AND d.network_decided.attempt_id = a.network_attempted.attempt_id
LEFT JOIN events c ON c.kind = 'network_completed' AND c.session_id = a.session_id
 AND c.network_completed.attempt_id = a.network_attempted.attempt_id
WHERE a.kind = 'network_attempted'
""",
    # MCP tool calls (v3 `mcp` records; earlier MCP commands by their `mcp__<server>__<tool>` argv)
    "mcp_calls": """
CREATE OR REPLACE VIEW mcp_calls AS
SELECT
  s.session_id, s.seq, s.occurred_at AS ts, s.command_started.command_id AS command_id,
  s.tool_call_id, s.turn_id,
  coalesce(s.command_started.mcp.server, regexp_extract(s.command_started.argv[1], '^mcp__(.+?)__(.+)$', 1)) AS server,
  coalesce(s.command_started.mcp.tool, regexp_extract(s.command_started.argv[1], '^mcp__(.+?)__(.+)$', 2)) AS tool,
  s.command_started.mcp.arguments_digest AS args_digest, s.command_started.mcp.arguments_size AS args_size,
  s.command_started.argv[2] AS arguments,
  s.command_started.mcp.definition_digest AS definition_digest,
  coalesce(f.command_finished.mcp.outcome,
           CASE f.command_finished.status WHEN 'completed' THEN 'ok' WHEN 'declined' THEN 'declined'
                WHEN 'failed' THEN 'error' WHEN 'timed_out' THEN 'error' WHEN 'killed' THEN 'error' END,
           'pending') AS outcome,
  f.command_finished.mcp.error AS error, f.seq AS finished_seq, f.occurred_at AS finished_at,
  f.command_finished.duration_ms AS duration_ms,
  s.producer.agent_name AS agent, s.producer.source AS source, s.producer."user" AS "user", s.producer.host AS host
FROM events s
LEFT JOIN events f ON f.kind = 'command_finished' AND f.session_id = s.session_id
 AND f.command_finished.command_id = s.command_started.command_id
WHERE s.kind = 'command_started'
  AND (s.command_started.mcp IS NOT NULL
       OR (s.command_started.sandbox_profile = 'mcp' AND starts_with(s.command_started.argv[1], 'mcp__')))
""",
    # MCP tool definitions in force when each session started (v4 session_started.mcp_tools, as
    # agentledger's MCP proxy recorded them)
    "mcp_tool_definitions": """
CREATE OR REPLACE VIEW mcp_tool_definitions AS
SELECT
  e.session_id, e.seq, e.occurred_at AS session_started_at, t.d.server AS server, t.d.tool AS tool,
  t.d.definition_digest AS definition_digest, t.d.description_digest AS description_digest,
  t.d.input_schema_digest AS input_schema_digest, t.d.description AS description, t.d.listed_at AS listed_at,
  e.producer.agent_name AS agent
FROM events e, (SELECT unnest(e.session_started.mcp_tools) AS d) t
WHERE e.kind = 'session_started'
""",
    "sandbox_denials": """
CREATE OR REPLACE VIEW sandbox_denials AS
SELECT
  d.session_id, d.seq, d.occurred_at, d.sandbox_denied.operation AS operation, d.sandbox_denied.target AS target,
  d.sandbox_denied.rule AS rule, d.sandbox_denied.reason AS reason, d.sandbox_denied.inferred AS inferred,
  d.sandbox_denied.command_id AS command_id, c.command_started.argv AS argv, c.command_started.cwd AS cwd,
  d.producer."user" AS "user", d.producer.host AS host, d.producer.agent_name AS agent
FROM events d
LEFT JOIN events c ON c.kind = 'command_started' AND c.session_id = d.session_id
 AND c.command_started.command_id = d.sandbox_denied.command_id
WHERE d.kind = 'sandbox_denied'
""",
    # What each source recorded of a session, and what it says it cannot contain (issue 24: coverage
    # statements, gap_kind not_observable) next to what it lost (the other gap kinds).
    "coverage": """
CREATE OR REPLACE VIEW coverage AS
WITH per_kind AS (
  SELECT session_id, producer.source AS source, kind, count(*) AS n
  FROM events GROUP BY ALL
),
kinds AS (
  SELECT session_id, source, map_from_entries(list({'k': kind, 'v': n} ORDER BY kind)) AS kinds
  FROM per_kind GROUP BY ALL
)
SELECT
  e.session_id, e.producer.source AS source, any_value(e.producer.agent_name) AS agent,
  count(*) AS events, any_value(k.kinds) AS kinds,
  count(*) FILTER (WHERE e.kind = 'command_started') AS commands,
  count(*) FILTER (WHERE e.kind = 'command_finished') AS command_outcomes,
  count(*) FILTER (WHERE e.kind = 'approval_requested') AS approvals_requested,
  count(*) FILTER (WHERE e.kind = 'approval_decided') AS approvals_decided,
  count(*) FILTER (WHERE e.kind = 'file_accessed') AS file_events,
  count(*) FILTER (WHERE e.kind LIKE 'network_%') AS network_events,
  coalesce(list({'field': e.gap.field, 'reason': e.gap.reason} ORDER BY e.gap.field)
           FILTER (WHERE e.kind = 'gap' AND e.gap.gap_kind = 'not_observable'), []) AS not_observable,
  coalesce(list(e.gap.field ORDER BY e.gap.field)
           FILTER (WHERE e.kind = 'gap' AND e.gap.gap_kind = 'not_observable'), []) AS cannot_show,
  count(*) FILTER (WHERE e.kind = 'gap' AND e.gap.gap_kind IS DISTINCT FROM 'not_observable') AS losses,
  coalesce(list({'seq': e.seq, 'gap_kind': e.gap.gap_kind, 'reason': e.gap.reason, 'field': e.gap.field,
                 'lost_events': e.gap.lost_events, 'lost_bytes': e.gap.lost_bytes} ORDER BY e.seq)
           FILTER (WHERE e.kind = 'gap' AND e.gap.gap_kind IS DISTINCT FROM 'not_observable'), []) AS gaps,
  min(e.occurred_at) AS first_at, max(e.occurred_at) AS last_at
FROM events e
JOIN kinds k ON k.session_id = e.session_id AND k.source = e.producer.source
GROUP BY e.session_id, e.producer.source
""",
    # Decision provenance (issue 24): per action, the chain of deciders that allowed or denied it,
    # joined by call id, request id, command id and attempt id; derived steps where no source states one
    "decisions": """
CREATE OR REPLACE VIEW decisions AS
WITH acts AS (
  SELECT session_id, seq, occurred_at,
         CASE WHEN command_started.mcp IS NOT NULL
                OR (command_started.sandbox_profile = 'mcp' AND starts_with(command_started.argv[1], 'mcp__'))
              THEN 'mcp_call' ELSE 'command' END AS action_kind,
         coalesce(command_started.shell, array_to_string(command_started.argv, ' ')) AS subject,
         tool_call_id, command_started.command_id AS command_id, NULL::VARCHAR AS attempt_id
  FROM events WHERE kind = 'command_started'
  UNION ALL
  SELECT session_id, seq, occurred_at, 'file_' || file_accessed.operation,
         file_accessed.path || coalesce(' -> ' || file_accessed.new_path, ''),
         tool_call_id, file_accessed.command_id, NULL
  FROM events WHERE kind = 'file_accessed' AND file_accessed.operation IN ('write', 'create', 'delete', 'rename')
  UNION ALL
  SELECT session_id, seq, occurred_at, 'network',
         network_attempted.host || ':' || network_attempted.port::VARCHAR,
         tool_call_id, network_attempted.command_id, network_attempted.attempt_id
  FROM events WHERE kind = 'network_attempted'
),
act_keys AS (
  SELECT DISTINCT session_id, seq, k AS key FROM (
    SELECT session_id, seq, tool_call_id AS k FROM acts UNION ALL SELECT session_id, seq, command_id FROM acts
  ) WHERE k IS NOT NULL AND k <> ''
),
decided AS (
  SELECT d.session_id, d.seq, d.occurred_at, d.tool_call_id, d.approval_decided.request_id AS request_id,
         d.approval_decided.decided_by AS decided_by, d.approval_decided.decision AS decision,
         d.approval_decided.decider AS decider, d.approval_decided.rule AS rule,
         d.approval_decided.rule_source AS rule_source, d.approval_decided.scope AS scope,
         d.approval_decided.latency_ms AS latency_ms, d.approval_decided.grant_request_id AS grant_request_id,
         d.approval_decided.reported_as AS reported_as, d.producer.source AS source,
         any_value(r.seq) AS request_seq, any_value(r.approval_requested.command_id) AS req_command_id,
         any_value(r.approval_requested.subject) AS req_subject,
         any_value(r.approval_requested.action_kind) AS req_kind
  FROM events d
  LEFT JOIN events r ON r.kind = 'approval_requested' AND r.session_id = d.session_id
   AND r.approval_requested.request_id = d.approval_decided.request_id
  WHERE d.kind = 'approval_decided'
  GROUP BY ALL
),
dec_keys AS (
  SELECT DISTINCT session_id, seq, k AS key FROM (
    SELECT session_id, seq, tool_call_id AS k FROM decided UNION ALL SELECT session_id, seq, request_id FROM decided
    UNION ALL SELECT session_id, seq, req_command_id FROM decided
  ) WHERE k IS NOT NULL AND k <> ''
),
-- requests and decisions of calls that never ran (a denied call has no command, file or network event)
orphan_requests AS (
  SELECT r.session_id, r.seq, r.occurred_at,
         CASE r.approval_requested.action_kind WHEN 'exec' THEN 'command' WHEN 'patch' THEN 'file_write'
              WHEN 'network' THEN 'network' ELSE 'permission' END AS action_kind,
         r.approval_requested.subject AS subject, r.tool_call_id, r.approval_requested.command_id AS command_id,
         NULL::VARCHAR AS attempt_id, r.approval_requested.request_id AS request_id
  FROM events r
  WHERE r.kind = 'approval_requested' AND NOT starts_with(r.approval_requested.request_id, 'policy:')
    AND NOT EXISTS (SELECT 1 FROM act_keys k WHERE k.session_id = r.session_id
                    AND k.key IN (r.tool_call_id, r.approval_requested.request_id, r.approval_requested.command_id))
),
orphan_decisions AS (
  SELECT d.session_id, d.seq, d.occurred_at, 'tool_call' AS action_kind, coalesce(d.rule, d.request_id) AS subject,
         d.tool_call_id, NULL::VARCHAR AS command_id, NULL::VARCHAR AS attempt_id, d.request_id
  FROM decided d
  WHERE d.request_seq IS NULL AND NOT starts_with(d.request_id, 'policy:')
    AND NOT EXISTS (SELECT 1 FROM act_keys k WHERE k.session_id = d.session_id
                    AND k.key IN (d.tool_call_id, d.request_id))
),
actions AS (
  SELECT * FROM acts
  UNION ALL SELECT * EXCLUDE (request_id) FROM orphan_requests
  UNION ALL SELECT * EXCLUDE (request_id) FROM orphan_decisions
),
keys AS (
  SELECT * FROM act_keys
  UNION ALL SELECT session_id, seq, request_id FROM orphan_requests
  UNION ALL SELECT session_id, seq, tool_call_id FROM orphan_requests WHERE tool_call_id IS NOT NULL
  UNION ALL SELECT session_id, seq, command_id FROM orphan_requests WHERE command_id IS NOT NULL
  UNION ALL SELECT session_id, seq, tool_call_id FROM orphan_decisions WHERE tool_call_id IS NOT NULL
  UNION ALL SELECT session_id, seq, request_id FROM orphan_decisions
),
explicit AS (
  SELECT DISTINCT k.session_id, k.seq AS action_seq, d.seq, d.decided_by, d.decision, d.decider, d.rule,
         d.rule_source, d.scope, d.latency_ms, d.grant_request_id, d.reported_as, d.source, 1 AS ord
  FROM keys k JOIN dec_keys dk ON dk.session_id = k.session_id AND dk.key = k.key
  JOIN decided d ON d.session_id = dk.session_id AND d.seq = dk.seq
  UNION ALL
  SELECT a.session_id, a.seq, n.seq, 'policy',
         CASE n.network_decided.decision WHEN 'allow' THEN 'approved' WHEN 'deny' THEN 'denied'
              ELSE n.network_decided.decision END,
         coalesce(n.network_decided.policy_source, 'network policy'),
         coalesce(n.network_decided.rule || coalesce(': ' || n.network_decided.reason, ''), n.network_decided.reason),
         n.network_decided.policy_source, NULL, NULL, NULL, n.network_decided.decision, n.producer.source, 2
  FROM acts a JOIN events n ON n.kind = 'network_decided' AND n.session_id = a.session_id
   AND n.network_decided.attempt_id = a.attempt_id
),
sandbox AS (
  SELECT DISTINCT k.session_id, k.seq AS action_seq, s.seq, 'sandbox' AS decided_by, 'denied' AS decision,
         'sandbox' AS decider, coalesce(s.sandbox_denied.rule, s.sandbox_denied.reason) AS rule, NULL AS rule_source,
         NULL AS scope, NULL::BIGINT AS latency_ms, NULL AS grant_request_id,
         CASE WHEN s.sandbox_denied.inferred THEN 'inferred: ' ELSE '' END || s.sandbox_denied.operation
           || ' ' || s.sandbox_denied.target AS reported_as, s.producer.source AS source, 3 AS ord
  FROM keys k JOIN events s ON s.kind = 'sandbox_denied' AND s.session_id = k.session_id
   AND s.sandbox_denied.command_id = k.key
),
grants AS (  -- session-wide or permanent approvals, with the subject they were given for
  SELECT DISTINCT d.session_id, d.seq, d.request_id, d.decider, d.scope, coalesce(a.subject, d.req_subject) AS subject,
         a.action_kind
  FROM decided d
  LEFT JOIN dec_keys dk ON dk.session_id = d.session_id AND dk.seq = d.seq
  LEFT JOIN act_keys ak ON ak.session_id = dk.session_id AND ak.key = dk.key
  LEFT JOIN acts a ON a.session_id = ak.session_id AND a.seq = ak.seq
  WHERE (d.decision = 'approved_for_session' OR d.scope IN ('session', 'persistent'))
    AND d.decision NOT IN ('denied', 'timed_out', 'aborted')
),
undecided AS (
  SELECT a.* FROM actions a
  WHERE NOT EXISTS (SELECT 1 FROM explicit e WHERE e.session_id = a.session_id AND e.action_seq = a.seq)
),
granted AS (
  SELECT u.session_id, u.seq AS action_seq, max(g.seq) AS seq, arg_max(g.request_id, g.seq) AS grant_request_id,
         arg_max(g.decider, g.seq) AS decider, arg_max(g.scope, g.seq) AS scope
  FROM undecided u JOIN grants g ON g.session_id = u.session_id AND g.subject = u.subject AND g.seq < u.seq
   AND (g.action_kind IS NULL OR g.action_kind = u.action_kind)
  GROUP BY ALL
),
modes AS (
  SELECT session_id, arg_min(session_started.approval_policy, seq) AS approval_policy, min(seq) AS seq,
         arg_min(producer.source, seq) AS source
  FROM events WHERE kind = 'session_started' GROUP BY session_id
),
derived AS (
  SELECT session_id, action_seq, seq, 'grant' AS decided_by, 'approved' AS decision, decider,
         'approved earlier for the ' || coalesce(scope, 'session') || ' (request ' || grant_request_id || ')' AS rule,
         NULL AS rule_source, coalesce(scope, 'session') AS scope, NULL::BIGINT AS latency_ms, grant_request_id,
         NULL AS reported_as, 'derived' AS source, 0 AS ord
  FROM granted
  UNION ALL
  SELECT u.session_id, u.seq, CASE WHEN m.approval_policy NOT IN ('unknown') THEN m.seq END,
         CASE WHEN m.approval_policy NOT IN ('unknown') THEN 'policy' ELSE 'unknown' END,
         CASE WHEN m.approval_policy NOT IN ('unknown') THEN 'approved' ELSE 'unknown' END,
         CASE WHEN m.approval_policy NOT IN ('unknown') THEN 'approval_policy ' || m.approval_policy END,
         CASE WHEN m.approval_policy = 'never' THEN 'approval_policy = never: auto-approved by mode'
              WHEN m.approval_policy NOT IN ('unknown') THEN 'approval_policy = ' || m.approval_policy
                   || ': no decision on record; the mode lets it run unasked where the sandbox or a rule allows,'
                   || ' and an approval may be one its sources cannot record (see coverage)'
              ELSE 'not recorded by any source' END,
         NULL, NULL, NULL, NULL, NULL, 'derived', 0
  FROM undecided u LEFT JOIN modes m ON m.session_id = u.session_id
  WHERE NOT EXISTS (SELECT 1 FROM granted g WHERE g.session_id = u.session_id AND g.action_seq = u.seq)
),
steps AS (
  SELECT *, row_number() OVER (PARTITION BY session_id, action_seq ORDER BY coalesce(seq, -1), ord) AS step
  FROM (SELECT * FROM explicit UNION ALL SELECT * FROM sandbox UNION ALL SELECT * FROM derived)
),
chains AS (
  SELECT session_id, action_seq,
         list(struct_pack(step := step, decided_by := decided_by::VARCHAR, decision := decision::VARCHAR,
                          decider := decider::VARCHAR, rule := rule::VARCHAR, rule_source := rule_source::VARCHAR,
                          "scope" := scope::VARCHAR, latency_ms := latency_ms::BIGINT,
                          grant_request_id := grant_request_id::VARCHAR, reported_as := reported_as::VARCHAR,
                          seq := seq::BIGINT, source := source::VARCHAR) ORDER BY step) AS deciders,
         arg_max(decision, step) AS last_decision
  FROM steps GROUP BY session_id, action_seq
)
SELECT a.session_id, a.seq, a.occurred_at, a.action_kind, a.subject, a.tool_call_id, a.command_id, a.attempt_id,
       c.deciders,
       CASE WHEN c.last_decision IN ('approved', 'approved_for_session', 'allow') THEN 'allowed'
            WHEN c.last_decision IN ('denied', 'timed_out', 'aborted', 'deny') THEN 'denied'
            ELSE 'unknown' END AS outcome
FROM actions a JOIN chains c ON c.session_id = a.session_id AND c.action_seq = a.seq
""",
    # The control-surface timeline (issue 24): each session's snapshot of the agent's configuration,
    # permission rules, instructions, MCP servers, hooks and git hooks (v4 session_started.control_surface,
    # producers/controlsurface.py), each file against the same file in the previous session that
    # observed it, plus the recorded writes to such files (docs/warehouse.md)
    "control_surface": """
CREATE OR REPLACE VIEW control_surface AS
WITH starts AS (
  SELECT e.session_id, e.seq, e.occurred_at AS started_at, e.session_started.cwd AS cwd,
         e.session_started.observed_by AS observed_by, e.session_started.workspace_trusted AS workspace_trusted,
         e.producer."user" AS "user", e.producer.host AS host, e.producer.agent_name AS agent,
         e.session_started.control_surface AS files,
         -- the user's home, from the repository root's .mcp.json (always listed) written under ~
         (SELECT CASE WHEN starts_with(p, '~/') AND p <> '~/.mcp.json'
                      AND strpos(e.session_started.cwd || '/', substr(p, 2, length(p) - 11) || '/') > 1
                      THEN left(e.session_started.cwd,
                                strpos(e.session_started.cwd || '/', substr(p, 2, length(p) - 11) || '/') - 1) END
          FROM (SELECT list_filter(e.session_started.control_surface,
                                   c -> ends_with(c.path, '/.mcp.json') AND CAST(c.role AS VARCHAR) = 'mcp_config')[1].path
                       AS p)) AS home
  FROM events e WHERE e.kind = 'session_started'
),
snaps AS (
  SELECT s.session_id, s.seq, s.started_at AS occurred_at, s.started_at, s.agent, s."user", s.host, s.cwd,
         'snapshot' AS row_kind, s.observed_by, s.workspace_trusted, f.c.path AS path,
         CAST(f.c.role AS VARCHAR) AS role, f.c.digest AS digest, f.c.size AS size, f.c.truncated AS truncated,
         f.c.content AS content, NULL::VARCHAR AS operation, NULL::VARCHAR AS command_id
  FROM starts s, (SELECT unnest(s.files) AS c) f
),
timeline AS (
  SELECT *, lag(digest) OVER w AS previous_digest, lag(session_id) OVER w AS previous_session_id,
         min(started_at) OVER (PARTITION BY host, "user", cwd) < started_at AS workspace_seen
  FROM snaps
  WINDOW w AS (PARTITION BY host, "user", path ORDER BY started_at, session_id)
),
raw_writes AS (
  SELECT w.session_id, w.seq, w.occurred_at, w.producer."user" AS "user", w.producer.host AS host,
         w.producer.agent_name AS agent, CAST(w.file_accessed.operation AS VARCHAR) AS operation,
         w.file_accessed.command_id AS command_id, w.file_accessed.size_after AS size,
         CASE WHEN w.file_accessed.digest_after IS NULL OR starts_with(w.file_accessed.digest_after, 'sha256:')
              THEN w.file_accessed.digest_after ELSE 'sha256:' || w.file_accessed.digest_after END AS digest,
         unnest(list_filter([w.file_accessed.path, w.file_accessed.new_path],
                            p -> p IS NOT NULL AND NOT ends_with(p, '.sample') AND regexp_matches(p,
           '(^|/)(\\.codex/(config\\.toml|AGENTS\\.md|rules/[^/]+)|\\.claude/(settings(\\.local)?\\.json|CLAUDE\\.md|hooks/[^/]+)|\\.mcp\\.json|(AGENTS|AGENTS\\.override|CLAUDE|CLAUDE\\.local)\\.md|\\.git/hooks/[^/]+|\\.git/config)$'
                            ))) AS wpath,
         w.file_accessed.new_path AS new_path
  FROM events w
  WHERE w.kind = 'file_accessed' AND CAST(w.file_accessed.operation AS VARCHAR) IN ('write', 'create', 'delete', 'rename')
),
writes AS (
  SELECT r.session_id, r.seq, r.occurred_at, s.started_at, coalesce(s.agent, r.agent) AS agent, r."user", r.host,
         s.cwd, 'write' AS row_kind, s.observed_by, s.workspace_trusted,
         CASE WHEN s.home IS NOT NULL AND starts_with(r.wpath, s.home || '/')
              THEN '~' || substr(r.wpath, length(s.home) + 1) ELSE r.wpath END AS path,
         CASE WHEN regexp_matches(r.wpath, '(^|/)\\.mcp\\.json$') THEN 'mcp_config'
              WHEN regexp_matches(r.wpath, '(^|/)\\.claude/settings\\.local\\.json$') THEN 'permissions'
              WHEN regexp_matches(r.wpath, '(^|/)(\\.claude/settings\\.json|\\.codex/config\\.toml)$') THEN 'agent_config'
              WHEN regexp_matches(r.wpath, '(^|/)\\.codex/rules/') THEN 'exec_rules'
              WHEN regexp_matches(r.wpath, '(^|/)\\.claude/hooks/') THEN 'hooks'
              WHEN regexp_matches(r.wpath, '(^|/)\\.git/(hooks/|config$)') THEN 'git_hooks'
              ELSE 'instructions' END AS role,
         CASE WHEN r.operation = 'delete' OR (r.operation = 'rename' AND r.wpath IS DISTINCT FROM r.new_path)
              THEN NULL ELSE r.digest END AS digest,
         CASE WHEN r.operation = 'delete' OR (r.operation = 'rename' AND r.wpath IS DISTINCT FROM r.new_path)
              THEN NULL ELSE r.size END AS size,
         false AS truncated, NULL::VARCHAR AS content, r.operation, r.command_id
  FROM raw_writes r LEFT JOIN starts s ON s.session_id = r.session_id
)
SELECT t.session_id, t.seq, t.occurred_at, t.started_at, t.agent, t."user", t.host, t.cwd, t.row_kind,
       t.observed_by, t.workspace_trusted, t.path, t.role, t.digest, t.size, t.truncated, t.content, t.operation,
       t.command_id, t.previous_digest, t.previous_session_id,
       CASE WHEN t.previous_session_id IS NOT NULL THEN t.digest IS DISTINCT FROM t.previous_digest
            WHEN t.workspace_seen AND t.digest IS NOT NULL THEN true END AS changed
FROM timeline t
UNION ALL
SELECT w.session_id, w.seq, w.occurred_at, w.started_at, w.agent, w."user", w.host, w.cwd, w.row_kind,
       w.observed_by, w.workspace_trusted, w.path, w.role, w.digest, w.size, w.truncated, w.content, w.operation,
       w.command_id, s.digest AS previous_digest, s.session_id AS previous_session_id, true AS changed
FROM writes w
ASOF LEFT JOIN timeline s ON s.host IS NOT DISTINCT FROM w.host AND s."user" IS NOT DISTINCT FROM w."user"
 AND s.path = w.path AND w.occurred_at >= s.started_at
""",
    "sessions_without_end": """
CREATE OR REPLACE VIEW sessions_without_end AS
SELECT h.session_id, h.first_at AS started_at, h.last_at AS last_event_at, h.head_seq AS last_seq,
       h.event_count, date_diff('second', h.last_at, now()::TIMESTAMP) AS silent_for_s
FROM chain_heads h WHERE NOT h.ended
""",
    "dead_letter_summary": """
CREATE OR REPLACE VIEW dead_letter_summary AS
SELECT reason, topic, count(*) AS letters, count(*) FILTER (WHERE resolved_at IS NULL) AS unresolved,
       count(DISTINCT session_id) AS sessions, min(received_at) AS first_received_at,
       max(received_at) AS last_received_at, sum(octet_length(raw)) AS raw_bytes
FROM dead_letters GROUP BY reason, topic
""",
}


LAKE_PREFIX = "ducklake:"
LAKE_ALIAS = "lake"
# DuckDB settings for the ingest connection. Measured (bench/ingest.py): commits below
# auto_checkpoint_skip_wal_threshold rows go through the WAL and a later checkpoint rewrites the
# table's trailing row group, so small transactions cost far more per row than large ones.
INGEST_SETTINGS = {"preserve_insertion_order": "false"}
# A DuckDB file also checkpoints whenever its WAL passes checkpoint_threshold (16 MB by default),
# i.e. every few thousand of our wide rows; raising it let the ingest connection run ~1.4x faster
# (210k events: 28.8k -> 39.7k ev/s, same machine, same run). The WAL is replayed on the next open
# after a crash, so the bound is also the most that replay has to read.
FILE_INGEST_SETTINGS = {"checkpoint_threshold": "'512MB'"}
# The ingest's own statements on a DuckDB file run on one DuckDB thread: the native decoder has the
# other core, and DuckDB's parallel insert only contended with it (bench/ingest.py, same machine, one
# run each: embedded 105.6k -> 124.2k ev/s, Kafka 48.5k -> 54.6k). Detection after a batch (its
# catch-up can scan the whole warehouse) runs with every thread again (`Warehouse.all_threads`).
INGEST_THREADS = 1


@dataclass(frozen=True)
class LakeLocation:
    """Where a DuckLake warehouse lives: its catalog database and its data (Parquet) directory."""

    catalog: str  # what follows "ducklake:" -- sqlite:/path/meta.sqlite, postgres:dbname=..., /path/x.ducklake
    data_path: str | None

    @property
    def kind(self) -> str:
        if self.catalog.startswith("sqlite:"):
            return "sqlite"
        if self.catalog.startswith(("postgres:", "postgresql:")):
            return "postgres"
        return "duckdb"

    @property
    def catalog_file(self) -> Path | None:
        if self.kind == "sqlite":
            return Path(self.catalog.split(":", 1)[1])
        if self.kind == "duckdb":
            return Path(self.catalog[len("duckdb:"):] if self.catalog.startswith("duckdb:") else self.catalog)
        return None


def parse_lake(url: str, data_path: str | None = None, *, read_only: bool = False) -> LakeLocation:
    """``ducklake:<catalog>``; the data path defaults to ``<catalog file>.files/`` next to a file catalog.
    A Postgres catalog needs one to write (a reader finds it in the catalog)."""
    catalog = url[len(LAKE_PREFIX):]
    if not catalog:
        raise WarehouseError("a DuckLake warehouse needs a catalog: ducklake:sqlite:/path/meta.sqlite")
    loc = LakeLocation(catalog, data_path)
    if loc.catalog_file is not None:
        f = loc.catalog_file.expanduser().absolute()
        cat = f"sqlite:{f}" if loc.kind == "sqlite" else str(f)
        loc = LakeLocation(cat, data_path or str(f) + ".files/")
    elif not data_path and not read_only:
        raise WarehouseError("a DuckLake warehouse on Postgres needs a data path (AGENTLEDGER_LAKE_DATA_PATH), "
                             "e.g. s3://bucket/agentledger/ or a shared directory")
    return loc


class Warehouse:
    """An open warehouse connection: a DuckDB file (or ``:memory:``), or a DuckLake (``ducklake:...``).

    A DuckDB file has one writer process and no concurrent readers. A DuckLake has any number of
    readers, which see committed snapshots, and several writers; a writer whose commit loses a race
    gets an error `schemas.retry.is_transient` recognises, and must redo its transaction (`run_transaction`).
    """

    def __init__(self, url: str, read_only: bool = False, store: SchemaStore | None = None, *,
                 snapshot: int | None = None, data_path: str | None = None):
        self.url = url
        self.read_only = read_only
        self.store = store or load_store()
        self.snapshot = snapshot
        self.lake: LakeLocation | None = None
        self._threads: int | None = None  # DuckDB's thread count before `tune_for_ingest`
        config: dict[str, str | bool | int | float | list[str]] = {
            "autoinstall_known_extensions": False, "autoload_known_extensions": False}
        threads = envvars.get("AGENTLEDGER_DUCKDB_THREADS")
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"AGENTLEDGER_DUCKDB_THREADS must be at least 1, not {threads}")
            config["threads"] = threads
        if url.startswith(LAKE_PREFIX):
            self.lake = parse_lake(url, data_path or envvars.get("AGENTLEDGER_LAKE_DATA_PATH"), read_only=read_only)
            self.con = duckdb.connect(":memory:", config=config)
            self._attach_lake()
            return
        if snapshot is not None:
            raise WarehouseError("snapshots (--snapshot) need a DuckLake warehouse (AGENTLEDGER_WAREHOUSE=ducklake:...)")
        path = Path(url) if url != ":memory:" else None
        if path is not None and not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        if path is not None and read_only and not path.exists():
            raise WarehouseError(f"no warehouse at {path}: run `agentledger ingest` first")
        try:
            self.con = duckdb.connect(url, read_only=read_only, config=config)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise WarehouseError(
                    f"the warehouse {url} is locked by another process (an `ingest --follow`?). A DuckDB file "
                    "has one writer and no concurrent readers; use a DuckLake warehouse to query while ingesting."
                ) from exc
            raise WarehouseError(f"cannot open warehouse {url}: {exc}") from exc

    @property
    def is_lake(self) -> bool:
        return self.lake is not None

    def _attach_lake(self) -> None:
        lake = self.lake
        assert lake is not None
        if lake.kind == "sqlite":
            load_extension(self.con, "sqlite_scanner")
        elif lake.kind == "postgres":
            load_extension(self.con, "postgres_scanner")
        s3_secret(self.con, lake.data_path)
        load_extension(self.con, "ducklake")
        f = lake.catalog_file
        if f is not None:
            if not f.exists():
                if self.read_only:
                    raise WarehouseError(f"no DuckLake catalog at {f}: run `agentledger ingest` first")
                f.parent.mkdir(parents=True, exist_ok=True)
                if lake.kind == "sqlite":
                    _sqlite_wal(f)
            if lake.data_path and "://" not in lake.data_path and not self.read_only:
                Path(lake.data_path).mkdir(parents=True, exist_ok=True)
        opts = []
        if lake.data_path and not self.read_only:
            opts.append(f"DATA_PATH {literal(lake.data_path)}")
        if self.read_only:
            opts.append("READ_ONLY")
        else:
            # No rows stored inline in the catalog: DuckLake 1.5.5 gives a BLOB inside a STRUCT back
            # from there as the text "CAST('...' AS BLOB)", which changed every checkpoint signature
            # ingested in a small batch (tests/test_replay.py). Small batches become small files,
            # which `agentledger compact` merges.
            opts.append("DATA_INLINING_ROW_LIMIT 0")
        if self.snapshot is not None:
            opts.append(f"SNAPSHOT_VERSION {int(self.snapshot)}")
        def detach(attempt: int, exc: BaseException) -> None:
            try:
                self.con.execute(f"DETACH {LAKE_ALIAS}")
            except duckdb.Error:
                pass

        # several processes creating / attaching one catalog race on its lock
        retry_transaction(lambda: self.con.execute(f"ATTACH {literal(LAKE_PREFIX + lake.catalog)} AS {LAKE_ALIAS}"
                                                   + (f" ({', '.join(opts)})" if opts else "")),
                          f"attaching DuckLake {self.url}", attempts=40, on_retry=detach,
                          delay=lambda attempt: 0.05 * (attempt + 1))
        self.con.execute(f"USE {LAKE_ALIAS}")

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """Another connection to the same database, for another thread (a connection is not thread-safe)."""
        cur = self.con.cursor()
        if self.is_lake:
            cur.execute(f"USE {LAKE_ALIAS}")
        return cur

    def lock_down(self) -> None:
        """For user-supplied SQL: no file or network access beyond the warehouse, settings frozen."""
        if self.is_lake:
            data_path = scalar(self.con.execute(f"SELECT data_path FROM ducklake_settings('{LAKE_ALIAS}')"))
            self.con.execute("SET allowed_directories = ?", [[data_path]])
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def check_query(self, sql: str) -> None:
        """Refuse what read-only SQL must not run (raises WarehouseError naming it): any statement but
        SELECT and EXPLAIN (writes, COPY, EXPORT, ATTACH, INSTALL/LOAD, SET/PRAGMA settings, CALL,
        CHECKPOINT, transactions ...), table functions not in `READ_ONLY_TABLE_FUNCTIONS` (those that
        run SQL given as text, such as query(), or read files), and functions that change state from
        inside a SELECT. Meant with `lock_down`, which blocks the file and network access of what
        remains; see `open_for_query`. `check_read_only` on this connection."""
        check_read_only(self.con, sql)

    def query(self, sql: str, params: Any = None) -> duckdb.DuckDBPyConnection:
        """Run user-supplied read-only SQL after `check_query` (the cursor, to fetch from)."""
        self.check_query(sql)
        return self.con.execute(sql, params)

    def load(self, extension: str) -> None:
        load_extension(self.con, extension)

    def tune_for_ingest(self) -> None:
        settings = INGEST_SETTINGS if self.is_lake else {**INGEST_SETTINGS, **FILE_INGEST_SETTINGS}
        for k, v in settings.items():
            self.con.execute(f"SET {k} = {v}")
        if not self.is_lake:
            self._threads = int(scalar(self.con.execute("SELECT current_setting('threads')")))
            self.con.execute(f"SET threads = {INGEST_THREADS}")

    @contextmanager
    def all_threads(self) -> Iterator[None]:
        """The body runs with DuckDB's thread count as it was before `tune_for_ingest`."""
        before = self._threads
        if before is None:
            yield
            return
        self.con.execute(f"SET threads = {before}")
        try:
            yield
        finally:
            self.con.execute(f"SET threads = {INGEST_THREADS}")

    def _relations(self) -> dict[str, str]:
        """Tables and views of the warehouse database (not temp, not other attached ones)."""
        rows = self.con.execute("""
            SELECT table_name, table_type FROM information_schema.tables
            WHERE table_catalog = current_database() AND table_schema = current_schema()""").fetchall()
        return {name: kind for name, kind in rows}

    def ensure_schema(self) -> None:
        """Create missing tables and views; recreate views whose definition changed. Idempotent;
        never drops data. Several processes may run it at once on a DuckLake: a lost race is retried."""
        if self.read_only:
            return
        # Besides a lost commit: the other process created a table between our look and our CREATE.
        retry_transaction(self._ensure_schema_once, "creating the warehouse schema", attempts=20,
                          transient=lambda exc: is_transient(exc) or "already exists" in str(exc),
                          delay=lambda attempt: 0.05 * (attempt + 1))

    def _ensure_schema_once(self) -> None:
        have = self._relations()
        if self._schema_is_current(have):
            return
        if have.get("events") == "BASE TABLE":
            self._migrate_wide_events()
            have = self._relations()
        tables, views = _tables_ddl(self.store, constraints=True), self._views()
        # A new database has nothing to compare with what DuckDB would store: it skips building the
        # canonical forms (the whole schema again, in memory: half the CPU of creating a warehouse).
        fresh = not (have.keys() & (tables.keys() | views.keys()))
        # (outside the transaction: it builds an in-memory database)
        wanted = {} if fresh else _canonical_views(self.store)
        # One transaction: all or nothing, and on a DuckLake one commit (one snapshot) instead of one
        # per statement: a new lake's schema took 2.1 s of ~70 commits, now ~0.4 s.
        with transaction(self.con):
            for name, ddl in tables.items():
                if name not in have:
                    self.con.execute(ddl)
            if not fresh:
                self._add_missing_columns()
            if "tree_state" not in have:
                self._create_tree_tables()
            self._ensure_detection_schema(have)
            current = {} if fresh else self._view_definitions()
            for name, ddl in views.items():
                if fresh or _norm(current.get(name, "")) != _norm(wanted[name]):
                    self.con.execute(ddl)
            self.record_schema_versions()
        # after the commit: a DuckLake shows the views' SQL as stored only then
        self.con.execute(f"COMMENT ON TABLE schema_versions IS {literal(self._schema_marker())}")

    # Whether the schema is current is answered from a few cheap catalog reads when nothing changed
    # since the last write-open: every relation is there, and the comment of `schema_versions` holds
    # the digest of this code's DDL (and DuckDB's version) and of the views and columns as stored
    # then. A view or column changed or dropped since, other code or another DuckDB: the full check.
    # (The full check builds the canonical forms in an in-memory database: ~0.3 CPU-s a process.)

    def _schema_marker(self) -> str:
        return f"{_code_schema_digest(self.store)}:{self._stored_catalog_digest()}"

    def _stored_catalog_digest(self) -> str:
        """Digest of the view definitions and the table columns (with their types) as stored."""
        columns = self.con.execute("""
            SELECT table_name, column_name, data_type FROM duckdb_columns()
            WHERE database_name = current_database() AND schema_name = current_schema()
            ORDER BY table_name, column_index""").fetchall()
        # DuckDB re-serialises a view's SQL when it loads the catalog (other parentheses, spacing)
        views = sorted((n, re.sub(r"[\s();\"]", "", sql).lower()) for n, sql in self._view_definitions().items())
        rows = [views, [list(c) for c in columns]]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def _schema_is_current(self, have: dict[str, str]) -> bool:
        if not _expected_relations(self.store) <= have.keys() or have.get("events") != "VIEW":
            return False
        row = self.con.execute("""
            SELECT comment FROM duckdb_tables() WHERE table_name = 'schema_versions'
              AND database_name = current_database() AND schema_name = current_schema()""").fetchone()
        return row is not None and row[0] == self._schema_marker()

    def create_wide_events(self) -> None:
        """``events`` as one TABLE with the view's columns, in a new, empty database: a small replay
        workset (`replay.workset`), where the kind tables and their UNION ALL view cost more than they
        save -- DuckDB plans the 13-branch view again for every query (~10-20 ms each) and an insert
        is one statement per kind. `insert_events` fills it in one statement."""
        cols = ",\n  ".join(f"{ident(c.name)} {c.type}" for c in event_columns(self.store))
        self.con.execute(f"CREATE TABLE events (\n  {cols}\n)")
        self._wide_events = True

    def create_event_schema(self) -> None:
        """The kind tables and the ``events`` view in a new, empty database (a replay's private
        in-memory warehouse, which reads nothing else): none of `ensure_schema`'s comparisons, other
        views (each binds the 13-table ``events`` again: most of its cost), detection or tree tables."""
        for k in self.store.kinds:
            self.con.execute(_kind_table_ddl(self.store, k, constraints=True))
        self.con.execute(events_view_ddl(self.store))

    def _views(self) -> dict[str, str]:
        """Every view, ``events`` first (the others read it)."""
        return views_ddl(self.store)

    def _migrate_wide_events(self) -> None:
        """Convert a warehouse made before the kind tables, in place and in one transaction: the
        rows of the wide ``events`` table move to their kind's table, and ``events`` becomes the
        view over them. Nothing else changes (offsets, chain heads, dead letters, the tree). A
        DuckLake keeps the old table in its earlier snapshots (``--snapshot`` still reads them)."""
        con = self.con
        with transaction(con):
            self._add_missing_columns_wide()
            n_before = scalar(con.execute("SELECT count(*) FROM events"))
            moved = 0
            for k in self.store.kinds:
                table = kind_table(k)
                con.execute(_kind_table_ddl(self.store, k, constraints=True))
                cols = kind_columns(self.store, k)
                names = ", ".join(ident(c.name) for c in cols)
                moved += scalar(con.execute(f"INSERT INTO {ident(table)} ({names}) SELECT {names} FROM events "
                                     "WHERE kind = ?", [k.kind]))
            if moved != n_before:
                kinds = [r[0] for r in con.execute("SELECT DISTINCT kind FROM events").fetchall()]
                raise WarehouseError(f"cannot migrate the events table: {n_before - moved} of its {n_before} rows "
                                     f"are of no kind of the current schema (kinds there: {kinds})")
            con.execute("DROP TABLE events")
            con.execute(events_view_ddl(self.store))

    def _add_missing_columns_wide(self) -> None:
        """The wide table of a warehouse made before the kind tables gains what the current schema
        added since (before its rows move: `_migrate_wide_events`)."""
        have = {r[0] for r in self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'events' "
            "AND table_catalog = current_database() AND table_schema = current_schema()").fetchall()}
        for c in event_columns(self.store):
            if c.name not in have:
                self.con.execute(f"ALTER TABLE events ADD COLUMN {ident(c.name)} {c.type}")
        for column, fields in struct_fields(self.store).items():
            present = {r[0] for r in self.con.execute(f"DESCRIBE SELECT {ident(column)}.* FROM events").fetchall()}
            for name, t in fields:
                if name not in present:
                    self.con.execute(f"ALTER TABLE events ADD COLUMN {ident(column)}.{ident(name)} {t}")

    def _create_tree_tables(self) -> None:
        """The tree's tables and its first state, inside the caller's transaction."""
        from .treelog import create_tree

        for ddl in TREE_TABLES.values():
            self.con.execute(ddl)
        create_tree(self.con)

    def _ensure_detection_schema(self, have: dict[str, str]) -> None:
        ensure_detection_schema(self.con, have)

    def events_relation(self) -> str:
        """`events_relation` on this connection."""
        return events_relation(self.con, self.store)

    def schema_problems(self, columns: bool = True) -> list[tuple[str, str]]:
        """(relation, what is wrong) for each view, table or macro of the warehouse that is not as this
        code defines it: a view whose query differs from the code's (compared as parsed by DuckDB, which
        re-formats the SQL it stores), a table made a view or a view a table, a column with a default or
        generated expression (the code defines none), a macro (the code defines none; one can shadow a
        built-in function the views call) and, with ``columns``, a kind table's columns or types other
        than the code's. Views a warehouse made before the kind tables holds (not migrated yet: its
        views are an older release's) are not compared. ~30 ms without ``columns``."""
        have = self._relations()
        problems: list[tuple[str, str]] = []
        legacy = have.get("events") == "BASE TABLE" and not any(t in have for t in event_table_names(self.store))
        code_views = {**views_ddl(self.store), **DETECTION_VIEWS}
        tables = [*_tables_ddl(self.store, constraints=True), *TREE_TABLES, *_detection_tables_ddl()]
        for name in tables:
            if have.get(name, "BASE TABLE") != "BASE TABLE":
                problems.append((name, f"{name} is a {have[name].lower()}, not the table this code makes"))
        for name in code_views:
            if name in have and have[name] != "VIEW" and not (legacy and name == "events"):
                problems.append((name, f"{name} is a {have[name].lower()}, not the view this code defines"))
        for (name,) in self.con.execute("""
                SELECT DISTINCT function_name FROM duckdb_functions()
                WHERE NOT internal AND database_name = current_database() ORDER BY 1""").fetchall():
            problems.append((name, f"the warehouse defines a function {name}() (this code defines none; a macro "
                                   "can replace a built-in function in every view)"))
        for table, column, default in self.con.execute("""
                SELECT table_name, column_name, column_default FROM duckdb_columns()
                WHERE database_name = current_database() AND schema_name = current_schema()
                  AND column_default IS NOT NULL AND upper(column_default) <> 'NULL'  -- (a DuckLake's)
                ORDER BY 1, 2""").fetchall():
            problems.append((table, f"column {table}.{column} has a default or generated expression ({default}); "
                                    "this code defines none"))
        stored = {n: sql for n, sql in self._view_definitions().items() if n in code_views and have.get(n) == "VIEW"}
        if not legacy and stored:
            names = sorted(stored)
            rows = [{"name": n, "stored": _view_query(stored[n]), "code": _view_query(code_views[n])} for n in names]
            differ = self.con.execute(f"""
                SELECT r.name FROM (SELECT unnest(?) AS r)
                WHERE {_PARSED.format(x="r.stored")} IS DISTINCT FROM {_PARSED.format(x="r.code")}
                ORDER BY 1""", [rows]).fetchall()
            for (name,) in differ:
                problems.append((name, f"the view {name} is not the one this code defines (its stored query "
                                       "differs)"))
        if columns and not legacy:
            wanted = _canonical_columns(self.store)
            got: dict[str, dict[str, str]] = {}
            for table, column, dtype in self.con.execute("""
                    SELECT table_name, column_name, data_type FROM duckdb_columns()
                    WHERE database_name = current_database() AND schema_name = current_schema()""").fetchall():
                if table in wanted:
                    got.setdefault(table, {})[column] = dtype
            for table in sorted(wanted):
                if table in got and got[table] != wanted[table] and have.get(table) == "BASE TABLE":
                    diff = sorted(set(got[table].items()) ^ set(wanted[table].items()))
                    problems.append((table, f"the columns of {table} are not this code's ({_short_list(diff)})"))
        return problems

    def _view_definitions(self) -> dict[str, str]:
        rows = self.con.execute("""
            SELECT view_name, sql FROM duckdb_views()
            WHERE NOT internal AND database_name = current_database() AND schema_name = current_schema()""").fetchall()
        return {name: sql for name, sql in rows}

    def _add_missing_columns(self) -> None:
        """Columns and STRUCT fields the current schema added since a kind table was made (a field
        added to a record, with its default as the evolution rule says, is a field added to that
        column's STRUCT; the rows before it read NULL there). One catalog query when nothing is
        missing."""
        wanted = _canonical_columns(self.store)
        have: dict[str, dict[str, str]] = {}
        for table, column, dtype in self.con.execute(f"""
                SELECT table_name, column_name, data_type FROM information_schema.columns
                WHERE table_catalog = current_database() AND table_schema = current_schema()
                  AND table_name LIKE '{KIND_TABLE_PREFIX}%'""").fetchall():
            have.setdefault(table, {})[column] = dtype
        fields = struct_fields(self.store)
        for k in self.store.kinds:
            table = kind_table(k)
            present = have.get(table, {})
            for c in kind_columns(self.store, k):
                if c.name not in present:
                    self.con.execute(f"ALTER TABLE {ident(table)} ADD COLUMN {ident(c.name)} {c.type}")
                elif present[c.name] != wanted[table][c.name] and c.name in fields:
                    got = {r[0] for r in self.con.execute(
                        f"DESCRIBE SELECT {ident(c.name)}.* FROM {ident(table)}").fetchall()}
                    for name, t in fields[c.name]:
                        if name not in got:
                            self.con.execute(f"ALTER TABLE {ident(table)} ADD COLUMN {ident(c.name)}.{ident(name)} {t}")

    def record_schema_versions(self) -> None:
        known = {r[0] for r in self.con.execute("SELECT fingerprint FROM schema_versions").fetchall()}
        for v in [*self.store.released, self.store.current]:
            if v.fingerprint_hex not in known:
                known.add(v.fingerprint_hex)
                self.con.execute(
                    "INSERT INTO schema_versions VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                    [v.fingerprint_hex, v.subject, v.label, json.dumps(v.schema)],
                )

    def events_by_kind(self, sources: Iterable[tuple[int, str]], fingerprint_hex: str) -> None:
        """Insert events decoded by kind (a replay workset's fast load, `replay.native`).

        ``sources`` yields (branch, relation) pairs (each used as soon as it is yielded): the
        relation holds the events of payload union branch ``branch`` of the *current* schema: its
        top-level fields except ``payload``, then ``payload`` as that kind's record. Each goes into
        that kind's table, every column cast to the table's type (what does not fit is an error,
        not a column of another type); provenance is the fingerprint, the rest NULL. All or nothing:
        on an error nothing has changed."""
        with transaction(self.con):
            kinds = {k.index: k for k in self.store.kinds}
            for branch, rel in sources:
                k = kinds.get(branch)
                if k is None:
                    raise WarehouseError(f"payload branch {branch} is not a kind of the current schema")
                self.insert_kind(k, rel, [c.name for c in stored_columns(self.store) if c.name not in _PROVENANCE]
                                 + ["payload"], {"schema_fingerprint": literal(fingerprint_hex)})

    def insert_kind(self, kind: PayloadKind, relation: str, have: list[str], constants: dict[str, str],
                    where: str = "") -> None:
        """INSERT into ``kind``'s table from ``relation`` (aliased ``s``) whose columns ``have`` are
        named as the table's (``payload`` for the kind's record), cast to the table's types; a
        column it does not have is ``constants[name]`` (an SQL expression) or NULL."""
        cols = kind_columns(self.store, kind)
        have_set = set(have)
        exprs = []
        for c in cols:
            src = "payload" if c.name == kind.column and "payload" in have_set else c.name
            if src in have_set:
                exprs.append(f"CAST(s.{ident(src)} AS {c.type})")
            elif c.name in constants:
                exprs.append(f"CAST({constants[c.name]} AS {c.type})")
            else:
                exprs.append(f"NULL::{c.type}")
        names = ", ".join(ident(c.name) for c in cols)
        self.con.execute(f"INSERT INTO {ident(kind_table(kind))} ({names}) SELECT {', '.join(exprs)} "
                         f"FROM {relation} s {where}")

    def insert_events(self, source_sql: str, where: str = "", *, materialize: bool = True) -> int:
        """INSERT the events of a relation shaped like read_avro() of the *current* schema plus the
        provenance columns (aliased ``s``; ``where`` filters it) into their kind tables. The source
        is read once into a temporary table, unless it is one already (``materialize=False``: a
        table name). Returns the rows inserted."""
        con = self.con
        if getattr(self, "_wide_events", False):
            cols = event_columns(self.store)
            names = ", ".join(ident(c.name) for c in cols)
            return int(scalar(con.execute(f"INSERT INTO events ({names}) SELECT {', '.join(c.source for c in cols)} "
                                          f"FROM {source_sql} s {where}")))
        if materialize:
            con.execute(f"CREATE OR REPLACE TEMP TABLE _insert_events AS SELECT * FROM {source_sql} s {where}")
            source_sql, where = "_insert_events", ""
        try:
            tags = dict(con.execute(f"SELECT union_tag(s.payload), count(*) FROM {source_sql} s {where} "
                                    "GROUP BY 1").fetchall())
            cond = f"{where} AND" if where else "WHERE"
            for k in self.store.kinds:
                tag = f"u{k.index}"
                if tag not in tags:
                    continue
                cols = kind_columns(self.store, k)
                names = ", ".join(ident(c.name) for c in cols)
                exprs = ", ".join(c.source for c in cols)
                con.execute(f"INSERT INTO {ident(kind_table(k))} ({names}) SELECT {exprs} FROM {source_sql} s "
                            f"{cond} union_tag(s.payload) = '{tag}'")
            return sum(tags.values())
        finally:
            if materialize:
                con.execute("DROP TABLE IF EXISTS temp._insert_events")

    # -- DuckLake: snapshots and maintenance ------------------------------------------------
    def snapshots(self, limit: int = 20) -> list[tuple[Any, ...]]:
        """(snapshot_id, time, changes) of the lake, newest first."""
        self._need_lake("snapshots")
        return self.con.execute(
            f"SELECT snapshot_id, snapshot_time::TIMESTAMP, changes::VARCHAR FROM {LAKE_ALIAS}.snapshots() "
            "ORDER BY snapshot_id DESC LIMIT ?", [limit]).fetchall()

    def current_snapshot(self) -> int | None:
        if not self.is_lake:
            return None
        if self.snapshot is not None:
            return self.snapshot
        return int(scalar(self.con.execute(f"SELECT id FROM ducklake_current_snapshot('{LAKE_ALIAS}')")))

    def compact(self, expire_older_than: str | None = "1 hour", merge: bool = False) -> dict[str, Any]:
        """Expire old snapshots and delete files nothing refers to any more; with ``merge``, first merge
        small Parquet files.

        Without ``merge`` it is safe while ingest and readers run (a reader pinned to an expired snapshot
        loses it, so ``expire_older_than`` keeps recent ones for reproducible audits). ``merge`` is not:
        while DuckLake 1.5.5's ``ducklake_merge_adjacent_files`` commits, a reader in another process
        sees the tables being merged as empty (measured on a SQLite catalog: 11 of 88 `count(*)` reads
        during `ingest --follow` went back, to 0 rows in the merged tables, scans included; time travel
        to the same snapshots afterwards gives the right counts) -- run it when nothing else uses the
        warehouse.
        """
        self._need_lake("compaction")
        out: dict[str, Any] = {}
        before = self._file_count()
        out["files_before"] = before
        if merge:
            self.con.execute(f"CALL ducklake_flush_inlined_data('{LAKE_ALIAS}')")
            self.con.execute(f"CALL ducklake_merge_adjacent_files('{LAKE_ALIAS}')")
            out["files_after_merge"] = self._file_count()
        if expire_older_than:
            # Snapshot ids are chosen here rather than with older_than => ...: this DuckLake build
            # compared older_than wrongly (it expired snapshots seconds old; seen with 1.5.5).
            ids = [r[0] for r in self.con.execute(
                f"SELECT snapshot_id FROM {LAKE_ALIAS}.snapshots() "
                f"WHERE snapshot_time < now() - INTERVAL {literal(expire_older_than)} "
                f"AND snapshot_id < (SELECT max(snapshot_id) FROM {LAKE_ALIAS}.snapshots())").fetchall()]
            out["snapshots_expired"] = len(ids)
            if ids:
                self.con.execute(f"CALL ducklake_expire_snapshots('{LAKE_ALIAS}', versions => ?)", [ids])
            rows = self.con.execute(f"CALL ducklake_cleanup_old_files('{LAKE_ALIAS}', cleanup_all => true)").fetchall()
            out["files_deleted"] = len(rows)
        return out

    def _file_count(self) -> int:
        return int(scalar(self.con.execute(
            f"SELECT count(*) FROM __ducklake_metadata_{LAKE_ALIAS}.ducklake_data_file "
            "WHERE end_snapshot IS NULL")))

    def _need_lake(self, what: str) -> None:
        if not self.is_lake:
            raise WarehouseError(f"{what} needs a DuckLake warehouse (AGENTLEDGER_WAREHOUSE=ducklake:...)")

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Warehouse":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PROVENANCE = {name for name, _ in PROVENANCE_COLUMNS}
TABLE_NAMES = ["ingest_offsets", "chain_heads", "dead_letters", "schema_versions"]
TREE_TABLE_NAMES = list(TREE_TABLES)


# a query's parse tree as DuckDB serialises it, without positions: the same for the SQL this code
# runs and the SQL DuckDB stores for it (re-formatted, with other parentheses); NULL if unparsable
_PARSED = "regexp_replace(json_serialize_sql({x}), '\"query_location\":[0-9]+,?', '', 'g')"


def _view_query(sql: str) -> str:
    """The query of a CREATE VIEW statement."""
    m = re.match(r"\s*create\s+(?:or\s+replace\s+)?(?:temp(?:orary)?\s+)?view\s+(?:\"[^\"]*\"|[\w.]+)\s+as\s+",
                 sql, re.I)
    return (sql[m.end():] if m else sql).strip().rstrip(";").strip()


def _short_list(items: list[Any], n: int = 4) -> str:
    text = ", ".join(str(x) for x in items[:n])
    return text + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _norm(sql: str) -> str:
    return " ".join(sql.replace(";", " ").split()).lower().replace("create or replace view", "create view")


_CANONICAL: dict[str, tuple[dict[str, str], dict[str, dict[str, str]]]] = {}
_CODE_DIGEST: dict[str, str] = {}


def _code_schema_digest(store: SchemaStore) -> str:
    """Digest of everything `ensure_schema` creates for ``store`` with this code and this DuckDB."""
    key = store.current.fingerprint_hex
    if key not in _CODE_DIGEST:
        parts = [duckdb.__version__, *sorted(_tables_ddl(store, constraints=True).items()),
                 *sorted(TREE_TABLES.items()), *sorted(_detection_tables_ddl().items()),
                 *sorted(DETECTION_VIEWS.items()), *sorted(views_ddl(store).items()), *alert_columns(),
                 *(v.fingerprint_hex for v in [*store.released, store.current])]
        _CODE_DIGEST[key] = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    return _CODE_DIGEST[key]


def _expected_relations(store: SchemaStore) -> set[str]:
    return {*_tables_ddl(store, constraints=True), *TREE_TABLES, *_detection_tables_ddl(), *DETECTION_VIEWS,
            *views_ddl(store), "schema_versions"}


def _canonical_views(store: SchemaStore) -> dict[str, str]:
    """The view definitions as DuckDB stores them (it re-formats SQL), to tell whether a stored view
    is current without re-creating it -- every DDL statement is a catalog commit on a DuckLake."""
    return _canonical(store)[0]


def _canonical_columns(store: SchemaStore) -> dict[str, dict[str, str]]:
    """Each kind table's column types as DuckDB names them, to tell in one query that none is missing."""
    return _canonical(store)[1]


def _canonical(store: SchemaStore) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    key = store.current.fingerprint_hex
    if key not in _CANONICAL:
        con = duckdb.connect(":memory:")
        try:
            for ddl in _tables_ddl(store, constraints=True).values():
                con.execute(ddl)
            for ddl in views_ddl(store).values():
                con.execute(ddl)
            views = {n: sql for n, sql in con.execute(
                "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()}
            columns: dict[str, dict[str, str]] = {}
            for table, column, dtype in con.execute(
                    "SELECT table_name, column_name, data_type FROM information_schema.columns").fetchall():
                columns.setdefault(table, {})[column] = dtype
            _CANONICAL[key] = (views, columns)
        finally:
            con.close()
    return _CANONICAL[key]


S3_SCHEMES = ("s3://", "s3a://", "s3n://")


def s3_secret(con: duckdb.DuckDBPyConnection, data_path: str | None) -> bool:
    """Give ``con`` what it needs to read and write DuckLake data in S3 (or an S3-compatible store),
    from the AGENTLEDGER_S3_* settings: the httpfs extension and one temporary (in-memory, never
    persisted) secret. With a key id: those credentials. Without one but with an ``s3://`` data path or
    an endpoint: the AWS credential chain (the aws extension: environment, config files, instance
    role). Nothing set and no ``s3://`` path (a local lake, or a reader that has not named one): no
    secret, no extension. User SQL cannot read the secret (`check_query` refuses duckdb_secrets()).
    Returns whether a secret was made."""
    key_id = envvars.get("AGENTLEDGER_S3_ACCESS_KEY_ID")
    endpoint = envvars.get("AGENTLEDGER_S3_ENDPOINT")
    on_s3 = bool(data_path) and str(data_path).lower().startswith(S3_SCHEMES)
    if not (key_id or endpoint or on_s3):
        return False
    opts = {"TYPE": "s3", "REGION": envvars.get("AGENTLEDGER_S3_REGION") or "us-east-1",
            "URL_STYLE": envvars.get("AGENTLEDGER_S3_URL_STYLE"),
            "USE_SSL": "true" if envvars.get("AGENTLEDGER_S3_USE_SSL") else "false"}
    if endpoint:
        opts["ENDPOINT"] = endpoint
    load_extension(con, "httpfs")
    if key_id:
        secret = envvars.get("AGENTLEDGER_S3_SECRET_ACCESS_KEY")
        if not secret:
            raise WarehouseError("AGENTLEDGER_S3_ACCESS_KEY_ID is set without AGENTLEDGER_S3_SECRET_ACCESS_KEY")
        opts.update(PROVIDER="config", KEY_ID=key_id, SECRET=secret)
    else:
        load_extension(con, "aws")
        opts["PROVIDER"] = "credential_chain"
    body = ", ".join(f"{k} {v if k in ('TYPE', 'PROVIDER', 'USE_SSL') else literal(str(v))}" for k, v in opts.items())
    try:
        con.execute(f"CREATE OR REPLACE TEMPORARY SECRET agentledger_s3 ({body})")
    except duckdb.Error as exc:  # the message names the option, never the values
        raise WarehouseError(f"cannot set up S3 access ({type(exc).__name__}); check the AGENTLEDGER_S3_* "
                             "settings (`agentledger config`)") from None
    return True


def _sqlite_wal(path: Path) -> None:
    """A new SQLite catalog in WAL mode, so that readers never block the writer (persistent setting)."""
    import fcntl
    import sqlite3

    # Two writers creating the same new catalog at once: switching to WAL in rollback-journal mode
    # answers "database is locked" without waiting, so they take turns (the flock dies with them).
    with open(path.with_name(path.name + ".setup-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        con = sqlite3.connect(path, timeout=60)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()


def open_warehouse(url: str, read_only: bool = False, *, snapshot: int | None = None,
                   data_path: str | None = None) -> Warehouse:
    wh = Warehouse(url, read_only=read_only, snapshot=snapshot, data_path=data_path)
    if not read_only:
        wh.ensure_schema()
    return wh


def open_for(settings: Settings, read_only: bool = False, *, snapshot: int | None = None) -> Warehouse:
    """The configured warehouse (``settings.warehouse``), created on first write."""
    return open_warehouse(settings.warehouse, read_only, snapshot=snapshot, data_path=settings.lake_data_path)


# functions that change state (or write files) even when called inside a SELECT, or list credentials
_STATEFUL = re.compile(r"^(checkpoint|force_checkpoint|enable_logging|disable_logging|truncate_duckdb_logs|"
                       r"enable_profiling|disable_profiling|duckdb_secrets|which_secret|"
                       r"ducklake_(?!(snapshots|table_info|list_files|table_changes|table_insertions|"
                       r"table_deletions|current_snapshot|last_committed_snapshot|settings|options)$).*)$", re.I)


# Table functions read-only SQL (`check_read_only`) may call: generators, the catalog's and DuckLake's
# descriptions. Not: query() / query_table() / json_execute_serialized_sql() (they run SQL given as a
# string, which the check would not see: `query('select * from enable_logging(...)')` aborted the
# process), file readers (read_*, glob, parquet_*: `lock_down` blocks them too), logs, secrets, and
# whatever changes state (checkpoint, enable_logging, ducklake_expire_snapshots, ...).
READ_ONLY_TABLE_FUNCTIONS = SAFE_TABLE_FUNCTIONS | frozenset({
    "repeat", "repeat_row", "json_each", "json_tree", "histogram", "histogram_values", "summary",
    "pg_timezone_names", "icu_calendar_names",
    "duckdb_approx_database_count", "duckdb_columns", "duckdb_connection_count", "duckdb_constraints",
    "duckdb_databases", "duckdb_dependencies", "duckdb_extensions", "duckdb_functions", "duckdb_indexes",
    "duckdb_keywords", "duckdb_memory", "duckdb_optimizers", "duckdb_schemas", "duckdb_sequences",
    "duckdb_settings", "duckdb_tables", "duckdb_types", "duckdb_views", "duckdb_secret_types",
    "pragma_collations", "pragma_database_size", "pragma_metadata_info", "pragma_platform", "pragma_show",
    "pragma_storage_info", "pragma_table_info", "pragma_user_agent", "pragma_version",
    "ducklake_snapshots", "ducklake_table_info", "ducklake_list_files", "ducklake_table_changes",
    "ducklake_table_insertions", "ducklake_table_deletions", "ducklake_current_snapshot",
    "ducklake_last_committed_snapshot", "ducklake_settings", "ducklake_options",
})


def _table_functions(node: Any) -> set[str]:
    """The names of the table functions a serialized statement (json_serialize_sql) calls."""
    found: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
        elif isinstance(n, dict):
            if n.get("type") == "TABLE_FUNCTION":
                found.add(str((n.get("function") or {}).get("function_name") or "?").lower())
            stack.extend(n.values())
    return found


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse what read-only SQL must not run on ``con`` (`Warehouse.check_query`; also the what-if's
    session query): raises WarehouseError naming it. Nothing to run (empty, only comments) is refused
    too, with its own message."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise WarehouseError(str(exc).strip()) from exc
    if not statements:
        raise WarehouseError("nothing to run: the query is empty (or only comments)")
    for st in statements:
        text, kind = st.query, st.type.name
        while kind == "EXPLAIN":
            text = re.sub(r"^\s*EXPLAIN(\s+ANALY[SZ]E)?", "", text, count=1, flags=re.I)
            try:
                inner = con.extract_statements(text)
            except duckdb.Error as exc:
                raise WarehouseError(str(exc).strip()) from exc
            if len(inner) != 1:
                break
            text, kind = inner[0].query, inner[0].type.name
        if kind != "SELECT":
            raise WarehouseError(f"refused: {st.type.name} statements are not allowed here (read-only SQL: "
                                 "SELECT and EXPLAIN only)")
        tree = scalar(con.execute("SELECT json_serialize_sql(?)", [text]))
        doc = json.loads(tree)
        if doc.get("error"):  # nothing unchecked runs
            raise WarehouseError(f"refused: this statement cannot be checked as read-only "
                                 f"({doc.get('error_message') or 'unparsable'})")
        bad = sorted({f for f in re.findall(r'"function_name":"([^"]+)"', tree) if _STATEFUL.match(f)})
        if bad:
            raise WarehouseError(f"refused: {', '.join(bad)} changes state; read-only SQL may not call it")
        other = sorted(_table_functions(doc.get("statements")) - READ_ONLY_TABLE_FUNCTIONS)
        if other:
            raise WarehouseError(f"refused: the table function {', '.join(f + '()' for f in other)} is not allowed "
                                 "in read-only SQL (it runs SQL given as text, reads files or changes state)")


def refuse_tampered_schema(wh: Warehouse) -> None:
    """Raise WarehouseError when a view, table or macro of the warehouse is not this code's
    (`Warehouse.schema_problems` without the column types: ~30 ms an open). Defining the views from
    code as TEMP views, which DuckDB resolves first, would shadow stored ones instead, but cost ~60 ms
    an open (2026-12, 16 views)."""
    problems = wh.schema_problems(columns=False)
    if problems:
        names = ", ".join(sorted({n for n, _ in problems}))
        raise WarehouseError(f"refused: the warehouse's {names} {'is' if len(problems) == 1 else 'are'} not as this "
                             f"agentledger defines {'it' if len(problems) == 1 else 'them'} ({problems[0][1]}): "
                             "its queries could show other rows than the ones stored. Run `agentledger verify` "
                             "(schema_tampered) and restore the warehouse from a trusted copy")


def open_for_query(settings: Settings, *, snapshot: int | None = None) -> Warehouse:
    """The configured warehouse for user-supplied SQL (`agentledger sql`, notebooks): read-only and
    locked down (`Warehouse.lock_down`: no file or network access beyond the warehouse, no
    extensions, settings frozen). bench/chaos.py's readonly_sql scenario measures what it refuses."""
    wh = open_for(settings, read_only=True, snapshot=snapshot)
    try:
        if snapshot is None:  # (an earlier snapshot holds the views of the code that wrote it)
            refuse_tampered_schema(wh)
        wh.lock_down()
    except BaseException:
        wh.close()
        raise
    return wh


def kinds(store: SchemaStore | None = None) -> list[PayloadKind]:
    return (store or load_store()).kinds


# --- detection (consumers/detect): alerts, anomaly scores, detection progress ------------------
# DuckLake has no PRIMARY KEY / UNIQUE: the detector upserts with DELETE + INSERT in one
# transaction, keyed as documented in docs/warehouse.md.

ALERT_EXTRA_COLUMNS = [("published_at", "TIMESTAMP")]  # outbox: NULL until the alerts topic acknowledged it


def alert_columns() -> list[tuple[str, str]]:
    """The `alerts` table: one column per field of schemas/alert.avsc (the record published to
    the alerts topic), plus the outbox column."""
    schema = load_store("alert").current.schema
    named: dict[str, Any] = {}
    ns = schema.get("namespace", "")
    return [(f["name"], duck_type(f["type"], named, ns)) for f in schema["fields"]] + ALERT_EXTRA_COLUMNS


DETECTION_TABLES = {
    "anomaly_scores": """CREATE TABLE IF NOT EXISTS anomaly_scores (
  session_id VARCHAR, model_id VARCHAR, head_seq BIGINT, score DOUBLE, threshold DOUBLE, anomalous BOOLEAN,
  features MAP(VARCHAR, DOUBLE), top_features VARCHAR[], scored_at TIMESTAMP
)""",
    "detection_state": """CREATE TABLE IF NOT EXISTS detection_state (
  session_id VARCHAR, head_seq BIGINT, detector_digest VARCHAR, detected_at TIMESTAMP
)""",
    # Triage labels people put on alerts (the console's "acknowledge" / "false positive"): an
    # append-only history, the newest row per alert wins (view alert_triage). Never touches events
    # or alerts; keyed by alert_id, which detection keeps stable across re-runs.
    "alert_labels": """CREATE TABLE IF NOT EXISTS alert_labels (
  alert_id VARCHAR, session_id VARCHAR, label VARCHAR, note VARCHAR, labelled_by VARCHAR, labelled_at TIMESTAMP
)""",
}

ALERT_LABELS = ("acknowledged", "false_positive", "reopened")

DETECTION_VIEWS = {
    "session_risk": """
CREATE OR REPLACE VIEW session_risk AS
WITH a AS (
  SELECT session_id, count(*) AS alerts,
         max(CASE severity WHEN 'critical' THEN 4 WHEN 'high' THEN 3 WHEN 'medium' THEN 2 ELSE 1 END) AS rank,
         list(DISTINCT rule_id ORDER BY rule_id) AS rules, min(created_at) AS first_alert_at
  FROM alerts GROUP BY session_id
),
s AS (
  SELECT session_id, max(score) AS anomaly_score, bool_or(anomalous) AS anomalous
  FROM anomaly_scores GROUP BY session_id
)
SELECT h.session_id, coalesce(a.alerts, 0) AS alerts,
       CASE a.rank WHEN 4 THEN 'critical' WHEN 3 THEN 'high' WHEN 2 THEN 'medium' WHEN 1 THEN 'low' END AS max_severity,
       coalesce(a.rules, []) AS rules, a.first_alert_at, s.anomaly_score, coalesce(s.anomalous, false) AS anomalous,
       h.first_at AS started_at, h.last_at AS last_event_at, h.event_count, h.ended
FROM chain_heads h LEFT JOIN a USING (session_id) LEFT JOIN s USING (session_id)
""",
    # Every alert with its current triage state: the newest label ('new' when none; 'reopened'
    # counts as new again), for notebooks and the console's queue.
    "alert_triage": """
CREATE OR REPLACE VIEW alert_triage AS
WITH l AS (
  SELECT alert_id, arg_max(label, labelled_at) AS label, arg_max(note, labelled_at) AS note,
         arg_max(labelled_by, labelled_at) AS labelled_by, max(labelled_at) AS labelled_at, count(*) AS label_count
  FROM alert_labels GROUP BY alert_id
)
SELECT a.*, CASE WHEN l.label IS NULL OR l.label = 'reopened' THEN 'new' ELSE l.label END AS triage,
       l.note AS triage_note, l.labelled_by, l.labelled_at, coalesce(l.label_count, 0) AS label_count
FROM alerts a LEFT JOIN l USING (alert_id)
""",
}


def _detection_tables_ddl() -> dict[str, str]:
    cols = ",\n  ".join(f"{ident(n)} {t}" for n, t in alert_columns())
    return {"alerts": f"CREATE TABLE IF NOT EXISTS alerts (\n  {cols}\n)", **DETECTION_TABLES}


_DETECTION_CANONICAL: dict[str, str] = {}


def ensure_detection_schema(con: duckdb.DuckDBPyConnection, have: dict[str, str]) -> None:
    """Create the detection tables and views (idempotent; adds columns a newer alert schema has)."""
    for name, ddl in _detection_tables_ddl().items():
        if name not in have:
            con.execute(ddl)
    present = {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'alerts' "
        "AND table_catalog = current_database() AND table_schema = current_schema()").fetchall()}
    for n, t in alert_columns():
        if n not in present:
            con.execute(f"ALTER TABLE alerts ADD COLUMN {ident(n)} {t}")
    if not _DETECTION_CANONICAL:
        mem = duckdb.connect(":memory:")
        try:
            mem.execute(CHAIN_HEADS_DDL)
            for ddl in _detection_tables_ddl().values():
                mem.execute(ddl)
            for ddl in DETECTION_VIEWS.values():
                mem.execute(ddl)
            _DETECTION_CANONICAL.update(mem.execute(
                "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall())
        finally:
            mem.close()
    current = {name: sql for name, sql in con.execute("""
        SELECT view_name, sql FROM duckdb_views()
        WHERE NOT internal AND database_name = current_database() AND schema_name = current_schema()""").fetchall()}
    for name, ddl in DETECTION_VIEWS.items():
        if _norm(current.get(name, "")) != _norm(_DETECTION_CANONICAL.get(name, ddl)):
            con.execute(ddl)


DETECTION_TABLE_NAMES = ["alerts", "anomaly_scores", "detection_state"]
