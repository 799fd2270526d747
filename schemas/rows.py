"""Warehouse rows back to Avro records and wire bytes -- the inverse of the warehouse mapping.

Avro binary encoding is deterministic for a given schema and datum, so re-encoding a row with its
writer schema (``schema_fingerprint``) reproduces the exact bytes the producer sealed. That lets
`verify` and `replay` check every hash from the warehouse alone and detect edited rows.

A row holds every field of the *current* (reader) schema, but an event written under an older
release was sealed without the fields added since (v4's ``session_started.control_surface``, ...):
encoding drops them, so they are outside the hash. `reencode` therefore requires each such field to
hold the value the reader schema resolves it to (its default; NULL, the value a column added by a
migration reads, is accepted too), and raises ``DecodeError("field_not_in_writer_schema")`` naming
the field otherwise. A value the writer schema cannot encode at all (a NULL in a non-nullable field,
a wrong type) is ``DecodeError("unreadable_row")``, never a library exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import duckdb

from . import codec
from .contract import SchemaStore
from .errors import DecodeError, SchemaError
from .sql import idents
from .warehouse import PROVENANCE_COLUMNS, event_columns, events_relation

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
    """The single-object-encoded bytes of ``record`` under its writer schema.

    Raises DecodeError: ``unknown_fingerprint``; ``field_not_in_writer_schema`` (a field the writer
    schema lacks holds something else than its default: it would not be covered by the hash);
    ``unreadable_row`` (a value the writer schema cannot encode)."""
    fp = bytes.fromhex(fingerprint_hex) if fingerprint_hex else store.current.fingerprint
    version = store.by_fingerprint(fp)
    if version is None:
        raise DecodeError("unknown_fingerprint", fp.hex())
    gaps = writer_gaps(store, version)
    if gaps is not None:
        _check_gaps(gaps, record, "", version.label, record.get("seq"))
    try:
        body = codec.encode(version.parsed, record)
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError, SchemaError) as exc:
        raise DecodeError("unreadable_row", f"seq {record.get('seq')}: a value does not fit the writer schema "
                                            f"{version.label} ({type(exc).__name__}: {exc})") from exc
    return codec.soe_frame(fp, body)


# --- the fields a writer schema lacks ------------------------------------------------------------
# A record's gaps: (fields the writer lacks, with the values they may hold; fields both have whose
# type has gaps inside). A type's gaps: ("record", gaps) | ("array", type gaps) | ("map", type gaps) |
# ("union", {record full name: gaps}). None: nothing to check.

_RecordGaps = tuple[tuple[tuple[str, tuple[Any, ...]], ...], tuple[tuple[str, Any], ...]]
_GAPS: dict[tuple[bytes, bytes], _RecordGaps | None] = {}
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def writer_gaps(store: SchemaStore, version: Any) -> _RecordGaps | None:
    """What a row of writer ``version`` must hold in the fields that version lacks (computed once per
    writer and reader schema; None for the current schema, or when the writer lacks nothing)."""
    key = (version.fingerprint, store.current.fingerprint)
    if key not in _GAPS:
        if version.fingerprint == store.current.fingerprint:
            _GAPS[key] = None
        else:
            reader, writer = store.current.schema, version.schema
            rn, wn = _named_types(reader), _named_types(writer)
            gap = _type_gaps(reader, writer, reader.get("namespace", ""), writer.get("namespace", ""), rn, wn, set())
            _GAPS[key] = gap[1] if gap is not None else None
    return _GAPS[key]


def _full(name: str, ns: str) -> str:
    return name if "." in name or not ns else f"{ns}.{name}"


def _named_types(schema: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def walk(t: Any, ns: str) -> None:
        if isinstance(t, list):
            for x in t:
                walk(x, ns)
        elif isinstance(t, dict):
            kind = t.get("type")
            if kind in ("record", "error", "enum", "fixed"):
                full = _full(t["name"], t.get("namespace", ns))
                out[full] = t
                if kind != "enum" and kind != "fixed":
                    inner = full.rsplit(".", 1)[0] if "." in full else ""
                    for f in t.get("fields", []):
                        walk(f["type"], inner)
            elif kind == "array":
                walk(t.get("items"), ns)
            elif kind == "map":
                walk(t.get("values"), ns)

    walk(schema, schema.get("namespace", "") if isinstance(schema, dict) else "")
    return out


def _resolve(t: Any, ns: str, named: dict[str, dict[str, Any]]) -> tuple[Any, str]:
    """A type with a named reference resolved, and the namespace its own references resolve in."""
    if isinstance(t, str) and t not in _PRIMITIVES:
        full = _full(t, ns)
        t = named.get(full, named.get(t, t))
    if isinstance(t, dict) and t.get("type") in ("record", "error"):
        full = _full(t["name"], t.get("namespace", ns))
        return t, full.rsplit(".", 1)[0] if "." in full else ""
    return t, ns


def _record_name(t: Any, ns: str) -> str | None:
    if isinstance(t, dict) and t.get("type") in ("record", "error"):
        return _full(t["name"], t.get("namespace", ns))
    return None


def _allowed(default: Any) -> tuple[Any, ...]:
    """The values a field the writer lacks may hold: the default as the warehouse gives it back, and
    NULL (what a column a migration added reads for the rows before it)."""
    if isinstance(default, str):
        return (default, default.encode("latin-1", "replace"), None)
    return (default, None) if default is not None else (None,)


def _type_gaps(rt: Any, wt: Any, rns: str, wns: str, rn: dict[str, Any], wn: dict[str, Any],
               seen: set[str]) -> tuple[str, Any] | None:
    rt, rns = _resolve(rt, rns, rn)
    wt, wns = _resolve(wt, wns, wn)
    if isinstance(rt, list):
        branches: dict[str, Any] = {}
        wlist = wt if isinstance(wt, list) else [wt]
        wrecords = {}
        for w in wlist:
            w2, w2ns = _resolve(w, wns, wn)
            name = _record_name(w2, wns)
            if name is not None:
                wrecords[name] = (w2, w2ns)
        for r in rt:
            r2, r2ns = _resolve(r, rns, rn)
            name = _record_name(r2, rns)
            if name is not None and name in wrecords:
                g = _type_gaps(r2, wrecords[name][0], r2ns, wrecords[name][1], rn, wn, seen)
                if g is not None:
                    branches[name] = g[1]
        return ("union", branches) if branches else None
    if not isinstance(rt, dict):
        return None
    kind = rt.get("type")
    if kind in ("array", "map"):
        if not isinstance(wt, dict) or wt.get("type") != kind:
            return None
        sub = "items" if kind == "array" else "values"
        g = _type_gaps(rt[sub], wt[sub], rns, wns, rn, wn, seen)
        return (kind, g) if g is not None else None
    if kind not in ("record", "error") or not isinstance(wt, dict) or wt.get("type") not in ("record", "error"):
        return None
    name = _record_name(rt, rns) or ""
    if name in seen:  # a recursive type: checked where it first appears
        return None
    seen = seen | {name}
    wfields = {f["name"]: f for f in wt.get("fields", [])}
    for f in wt.get("fields", []):
        for alias in f.get("aliases", []):
            wfields.setdefault(alias, f)
    missing, nested = [], []
    for f in rt.get("fields", []):
        wf = wfields.get(f["name"])
        if wf is None:
            for alias in f.get("aliases", []):
                wf = wf or wfields.get(alias)
        if wf is None:
            missing.append((f["name"], _allowed(f.get("default"))))
            continue
        g = _type_gaps(f["type"], wf["type"], rns, wns, rn, wn, seen)
        if g is not None:
            nested.append((f["name"], g))
    if not missing and not nested:
        return None
    return "record", (tuple(missing), tuple(nested))


def _check_gaps(gaps: _RecordGaps, value: Any, path: str, label: str, seq: Any) -> None:
    if not isinstance(value, dict):
        return  # not a record: encoding says what is wrong with it
    missing, nested = gaps
    for name, allowed in missing:
        got = value.get(name)
        if not any(_same(got, a) for a in allowed):
            where = f"{path}{name}"
            raise DecodeError("field_not_in_writer_schema",
                              f"seq {seq}: {where} holds {_short(got)}, but the event's writer schema {label} has "
                              f"no such field, so the event's hash does not cover it (it may only hold "
                              f"{_short(allowed[0])})")
    for name, (kind, sub) in nested:
        _check_type(kind, sub, value.get(name), f"{path}{name}.", label, seq)


def _check_type(kind: str, sub: Any, value: Any, path: str, label: str, seq: Any) -> None:
    if value is None:
        return
    if kind == "record":
        _check_gaps(sub, value, path, label, seq)
    elif kind == "array":
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                _check_type(sub[0], sub[1], item, f"{path[:-1]}[{i}].", label, seq)
    elif kind == "map":
        items = value.items() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for item in items:
            k, v = (item if isinstance(item, tuple) else (item.get("key"), item.get("value")))
            _check_type(sub[0], sub[1], v, f"{path[:-1]}[{k!r}].", label, seq)
    elif kind == "union":
        if isinstance(value, tuple) and len(value) == 2:  # (record name, value), as the payload is
            name, inner = value
            g = sub.get(name) or next((g for n, g in sub.items() if n.rsplit(".", 1)[-1] == name), None)
            if g is not None:
                _check_gaps(g, inner, f"{path}{name.rsplit('.', 1)[-1]}.", label, seq)
        elif isinstance(value, dict) and len(sub) == 1:
            _check_gaps(next(iter(sub.values())), value, path, label, seq)
        elif isinstance(value, dict):  # several record branches with gaps: the one whose fields it has
            for g in sub.values():
                if {n for n, _ in g[0]} <= value.keys():
                    _check_gaps(g, value, path, label, seq)


def _same(got: Any, allowed: Any) -> bool:
    if got is None or allowed is None:
        return got is allowed
    return isinstance(got, bool) == isinstance(allowed, bool) and bool(got == allowed)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def iter_session_rows(con: duckdb.DuckDBPyConnection, store: SchemaStore, session_id: str) -> Iterator[dict[str, Any]]:
    cols = event_select_list(store)
    quoted = idents(cols)
    # the kind tables as this code reads them, never the stored `events` view (`events_relation`)
    cur = con.execute(f"SELECT {quoted} FROM {events_relation(con, store)} WHERE session_id = ? ORDER BY seq",
                      [session_id])
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
