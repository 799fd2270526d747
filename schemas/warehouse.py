"""The warehouse: the one module that owns DuckDB DDL (tables, views) and how to open it.

The contract (docs/warehouse.md) is generated from the Avro reader schema: every envelope field
is a column of ``events``; every payload kind is a STRUCT column named after its kind, NULL on rows
of other kinds; ``family`` and ``kind`` say which one is set. Enums are stored as VARCHAR so that
adding a symbol never needs a migration.
"""

from __future__ import annotations

import importlib
import importlib.resources as ilr
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from .contract import PayloadKind, SchemaStore, load_store
from .errors import WarehouseError

# Columns the warehouse adds to each event (where it came from, when it landed).
PROVENANCE_COLUMNS = [
    ("schema_fingerprint", "VARCHAR"),
    ("source_topic", "VARCHAR"),
    ("source_partition", "INTEGER"),
    ("source_offset", "BIGINT"),
    ("ingested_at", "TIMESTAMP"),
]
NOT_NULL = {"event_id", "session_id", "seq", "occurred_at", "family", "kind", "prev_hash", "hash"}


def extension_path(name: str) -> Path:
    """The extension binary shipped in the ``duckdb-extension-<name>`` wheel (no download, no INSTALL)."""
    try:
        module = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError as exc:
        raise WarehouseError(f"the DuckDB {name} extension is not installed (pip package duckdb-extension-{name})") from exc
    root = Path(str(ilr.files(module))) / "extensions"
    for candidate in (root / f"v{duckdb.__version__}", root / duckdb.__version__):
        p = candidate / f"{name}.duckdb_extension"
        if p.exists():
            return p
    raise WarehouseError(f"duckdb-extension-{name} has no build for duckdb {duckdb.__version__} under {root}")


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> None:
    con.execute(f"LOAD '{extension_path(name)}'")


# --- Avro -> DuckDB types ---------------------------------------------------------------


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
        fields = ", ".join(f"{_q(f['name'])} {duck_type(f['type'], named, ns)}" for f in t["fields"])
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


def event_columns(store: SchemaStore) -> list[Column]:
    schema = store.current.schema
    ns = schema.get("namespace", "")
    named: dict[str, Any] = {}
    cols: list[Column] = []
    fam = " ".join(f"WHEN 'u{k.index}' THEN '{k.family}'" for k in store.kinds)
    kind = " ".join(f"WHEN 'u{k.index}' THEN '{k.kind}'" for k in store.kinds)
    payload_type = None
    for f in schema["fields"]:
        name = f["name"]
        if name == "payload":
            payload_type = f["type"]
            cols.append(Column("family", "VARCHAR", f"CASE union_tag(s.payload) {fam} END"))
            cols.append(Column("kind", "VARCHAR", f"CASE union_tag(s.payload) {kind} END"))
            continue
        t = duck_type(f["type"], named, ns)
        cols.append(Column(name, t, f"s.{_q(name)}::{t}" if t.startswith(("STRUCT", "MAP")) or "[]" in t else f"s.{_q(name)}"))
    for name, t in PROVENANCE_COLUMNS:
        cols.append(Column(name, t, f"s.{name}"))
    for k in store.kinds:
        t = duck_type(payload_type[k.index], named, ns)
        cols.append(Column(k.column, t, f"union_extract(s.payload, 'u{k.index}')::{t}"))
    return cols


# --- DDL ----------------------------------------------------------------------------------

def _tables_ddl(store: SchemaStore, constraints: bool) -> list[str]:
    cols = ",\n  ".join(
        f"{_q(c.name)} {c.type}{' NOT NULL' if constraints and c.name in NOT_NULL else ''}" for c in event_columns(store)
    )
    return [
        f"CREATE TABLE IF NOT EXISTS events (\n  {cols}\n)",
        """CREATE TABLE IF NOT EXISTS ingest_offsets (
  topic VARCHAR, "partition" INTEGER, next_offset BIGINT, updated_at TIMESTAMP
)""",
        """CREATE TABLE IF NOT EXISTS chain_heads (
  session_id VARCHAR, head_seq BIGINT, head_hash VARCHAR, event_count BIGINT,
  first_at TIMESTAMP, last_at TIMESTAMP, ended BOOLEAN, updated_at TIMESTAMP
)""",
        """CREATE TABLE IF NOT EXISTS dead_letters (
  dead_letter_id VARCHAR, topic VARCHAR, "partition" INTEGER, "offset" BIGINT,
  "key" BLOB, raw BLOB, reason VARCHAR, detail VARCHAR,
  session_id VARCHAR, seq BIGINT, event_id VARCHAR, fingerprint VARCHAR,
  received_at TIMESTAMP, resolved_at TIMESTAMP, resolution VARCHAR
)""",
        """CREATE TABLE IF NOT EXISTS schema_versions (
  fingerprint VARCHAR, subject VARCHAR, version VARCHAR, schema_json VARCHAR, first_seen_at TIMESTAMP
)""",
    ]


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
  count(*) FILTER (WHERE e.kind = 'gap') AS gaps
FROM events e
GROUP BY e.session_id
""",
    "chain_status": """
CREATE OR REPLACE VIEW chain_status AS
WITH pending AS (
  SELECT d.session_id, min(d.seq) AS first_bad_seq, arg_min(d.reason, d.seq) AS reason,
         arg_min(d.detail, d.seq) AS detail, count(*) AS quarantined
  FROM dead_letters d
  JOIN chain_heads h ON h.session_id = d.session_id
  WHERE d.resolved_at IS NULL AND d.seq > h.head_seq
  GROUP BY d.session_id
)
SELECT
  h.session_id,
  CASE WHEN p.session_id IS NOT NULL THEN 'broken' WHEN h.ended THEN 'ok' ELSE 'open' END AS status,
  CASE WHEN p.session_id IS NOT NULL THEN h.head_seq + 1 END AS first_bad_seq,
  p.reason, p.detail,
  h.head_seq, h.head_hash, h.event_count, coalesce(p.quarantined, 0) AS quarantined_after_head,
  h.first_at, h.last_at, h.updated_at
FROM chain_heads h LEFT JOIN pending p USING (session_id)
""",
}


class Warehouse:
    """An open warehouse connection (a DuckDB file, or ``:memory:``)."""

    def __init__(self, url: str, read_only: bool = False, store: SchemaStore | None = None):
        self.url = url
        self.read_only = read_only
        self.store = store or load_store()
        if url.startswith("ducklake:"):
            raise WarehouseError("DuckLake warehouses are not supported by this build yet")
        path = Path(url) if url != ":memory:" else None
        if path is not None and not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        if path is not None and read_only and not path.exists():
            raise WarehouseError(f"no warehouse at {path}: run `agentledger ingest` first")
        config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
        try:
            self.con = duckdb.connect(url, read_only=read_only, config=config)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise WarehouseError(
                    f"the warehouse {url} is locked by another process (an `ingest --follow`?). A DuckDB file "
                    "has one writer and no concurrent readers; use a DuckLake warehouse to query while ingesting."
                ) from exc
            raise WarehouseError(f"cannot open warehouse {url}: {exc}") from exc

    def lock_down(self) -> None:
        """For user-supplied SQL: no file or network access beyond the warehouse, settings frozen."""
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def load(self, extension: str) -> None:
        load_extension(self.con, extension)

    def ensure_schema(self) -> None:
        """Create missing tables and (re)create views. Idempotent; never drops data."""
        if self.read_only:
            return
        for ddl in _tables_ddl(self.store, constraints=True):
            self.con.execute(ddl)
        self._add_missing_columns()
        for ddl in VIEWS.values():
            self.con.execute(ddl)
        self.record_schema_versions()

    def _add_missing_columns(self) -> None:
        have = {r[0] for r in self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'events'").fetchall()}
        for c in event_columns(self.store):
            if c.name not in have:
                self.con.execute(f"ALTER TABLE events ADD COLUMN {_q(c.name)} {c.type}")

    def record_schema_versions(self) -> None:
        known = {r[0] for r in self.con.execute("SELECT fingerprint FROM schema_versions").fetchall()}
        for v in [*self.store.released, self.store.current]:
            if v.fingerprint_hex not in known:
                known.add(v.fingerprint_hex)
                self.con.execute(
                    "INSERT INTO schema_versions VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                    [v.fingerprint_hex, v.subject, v.label, json.dumps(v.schema)],
                )

    def insert_select_sql(self, source_sql: str) -> str:
        """INSERT of events from a relation shaped like read_avro() of the *current* schema plus
        the provenance columns, aliased ``s``."""
        cols = event_columns(self.store)
        names = ", ".join(_q(c.name) for c in cols)
        exprs = ",\n  ".join(f"{c.source} AS {_q(c.name)}" for c in cols)
        return f"INSERT INTO events ({names})\nSELECT\n  {exprs}\nFROM {source_sql} s"

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Warehouse":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_warehouse(url: str, read_only: bool = False) -> Warehouse:
    wh = Warehouse(url, read_only=read_only)
    if not read_only:
        wh.ensure_schema()
    return wh


def kinds(store: SchemaStore | None = None) -> list[PayloadKind]:
    return (store or load_store()).kinds
