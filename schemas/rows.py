"""Warehouse rows back to Avro records and wire bytes -- the inverse of the warehouse mapping.

Avro binary encoding is deterministic for a given schema and datum, so re-encoding a row with its
writer schema (``schema_fingerprint``) reproduces the exact bytes the producer sealed. That lets
`verify` and `replay` check every hash from the warehouse alone and detect edited rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import duckdb

from . import codec
from .contract import SchemaStore
from .errors import DecodeError
from .sql import idents
from .warehouse import PROVENANCE_COLUMNS, event_columns

ENVELOPE_SKIP = {"family", "kind", *(name for name, _ in PROVENANCE_COLUMNS)}


def event_select_list(store: SchemaStore) -> list[str]:
    """Columns to SELECT from ``events`` to rebuild records (in this order)."""
    return [c.name for c in event_columns(store)]


def row_to_record(store: SchemaStore, row: dict[str, Any]) -> dict[str, Any]:
    """A warehouse row (column name -> value) as the Avro record it was decoded from."""
    kind = store.kind_by_label(row["family"], row["kind"])
    kind_columns = {k.column for k in store.kinds}
    rec = {}
    for f in store.current.schema["fields"]:
        name = f["name"]
        if name == "payload":
            rec["payload"] = (kind.name, row[kind.column])
        elif name not in kind_columns and name not in ENVELOPE_SKIP:
            rec[name] = row[name]
    return rec


def reencode(store: SchemaStore, record: dict[str, Any], fingerprint_hex: str | None) -> bytes:
    """The single-object-encoded bytes of ``record`` under its writer schema."""
    fp = bytes.fromhex(fingerprint_hex) if fingerprint_hex else store.current.fingerprint
    version = store.by_fingerprint(fp)
    if version is None:
        raise DecodeError("unknown_fingerprint", fp.hex())
    return codec.soe_frame(fp, codec.encode(version.parsed, record))


def iter_session_rows(con: duckdb.DuckDBPyConnection, store: SchemaStore, session_id: str) -> Iterator[dict[str, Any]]:
    cols = event_select_list(store)
    quoted = idents(cols)
    cur = con.execute(f"SELECT {quoted} FROM events WHERE session_id = ? ORDER BY seq", [session_id])
    while True:
        chunk = cur.fetchmany(5000)
        if not chunk:
            return
        for r in chunk:
            yield dict(zip(cols, r))


def iter_session_values(con: duckdb.DuckDBPyConnection, store: SchemaStore, session_id: str) -> Iterator[tuple[bytes, dict[str, Any], dict[str, Any]]]:
    """(re-encoded bytes, record, row) of each event of a session, in seq order."""
    for row in iter_session_rows(con, store, session_id):
        rec = row_to_record(store, row)
        yield reencode(store, rec, row.get("schema_fingerprint")), rec, row
