"""A session's events decoded into an in-memory DuckDB table shaped exactly like the warehouse's
``events`` (same DDL, from schemas/warehouse.py), so projections and what-if queries are the same
SQL whether they run on one replayed session or on the whole warehouse.

Decoding is native: the bodies are framed as an in-memory Avro container and DuckDB's avro
extension reads them (a bundle file is read in place). Bodies of an older writer schema are
resolved to the current reader in Python first, as ingest does.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import fsspec

from schemas import codec
from schemas.contract import SchemaStore, load_store
from schemas.errors import AgentLedgerError, DecodeError
from schemas.warehouse import Warehouse

from .sources import RawSession


class WorksetError(AgentLedgerError):
    """The session's events could not be decoded."""


@dataclass
class Workset:
    wh: Warehouse
    session_id: str
    events: int

    @property
    def con(self):
        return self.wh.con

    def close(self) -> None:
        self.wh.close()

    def __enter__(self) -> "Workset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def new_warehouse(store: SchemaStore | None = None) -> Warehouse:
    wh = Warehouse(":memory:", store=store or load_store())
    wh.ensure_schema()
    wh.load("avro")
    return wh


def _insert_ocf(wh: Warehouse, path: str, fp_hex: str) -> None:
    src = (f"(SELECT a.*, '{fp_hex}' AS schema_fingerprint, NULL::VARCHAR AS source_topic, "
           "NULL::INTEGER AS source_partition, NULL::BIGINT AS source_offset, NULL::TIMESTAMP AS ingested_at "
           f"FROM read_avro('{path}') a)")
    wh.con.execute(wh.insert_select_sql(src))


def load(raw: RawSession, store: SchemaStore | None = None, wh: Warehouse | None = None) -> Workset:
    """Decode ``raw`` into a fresh in-memory warehouse (or ``wh``). Raises `WorksetError` when a body
    cannot be decoded (the chain verifier names such events; replay stops at them)."""
    store = store or load_store()
    wh = wh or new_warehouse(store)
    cur = store.current
    b = raw.bundle
    try:
        if b is not None and getattr(b, "framing_error", None) is None and b.fingerprint == cur.fingerprint \
                and b.path is not None and len(b.spans) == len(raw.values):
            _insert_ocf(wh, str(b.path).replace("'", "''"), cur.fingerprint_hex)
        else:
            _load_values(wh, raw, store)
    except Exception as exc:
        if isinstance(exc, AgentLedgerError):
            raise
        raise WorksetError(f"cannot decode the events of session {raw.session_id}: {str(exc).splitlines()[0]}") from exc
    n = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
    return Workset(wh, raw.session_id, n)


def _load_values(wh: Warehouse, raw: RawSession, store: SchemaStore) -> None:
    fs = fsspec.filesystem("memory")
    if not wh.con.filesystem_is_registered("memory"):
        wh.con.register_filesystem(fs)
    cur = store.current
    sync = os.urandom(16)
    header = codec.ocf_header(cur.schema, sync)
    run: list[bytes] = []
    run_fp: bytes | None = None

    def flush() -> None:
        if not run:
            return
        path = f"/agentledger-replay/{uuid.uuid4().hex}.avro"
        with fs.open(path, "wb") as f:
            f.write(header)
            f.write(codec.ocf_blocks(run, sync))
        try:
            _insert_ocf(wh, f"memory://{path}", run_fp.hex())
        finally:
            fs.rm(path)
        run.clear()

    for v in raw.values:
        fp = v[2:10]
        body = v[10:]
        if fp != cur.fingerprint:
            body = _upcast(store, raw, fp, body)
        if fp != run_fp:
            flush()
            run_fp = fp
        run.append(body)
    flush()


def _upcast(store: SchemaStore, raw: RawSession, fp: bytes, body: bytes) -> bytes:
    cur = store.current.parsed
    version = store.by_fingerprint(fp)
    if version is not None:
        writer = version.parsed
    elif fp in raw.writer_schemas:
        writer = codec.parse(raw.writer_schemas[fp])
    else:
        raise WorksetError(f"writer schema {fp.hex()} is unknown here (not released in this version and not "
                           "embedded in the source)")
    try:
        return codec.encode(cur, codec.decode(body, writer, cur))
    except DecodeError as exc:
        raise WorksetError(f"an event of writer schema {fp.hex()} does not decode: {exc.detail}") from exc
