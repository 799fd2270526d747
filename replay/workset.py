"""A session's events decoded into an in-memory DuckDB table shaped exactly like the warehouse's
``events`` (same DDL, from schemas/warehouse.py), so projections and what-if queries are the same
SQL whether they run on one replayed session or on the whole warehouse.

Decoding is native: the bodies are framed as an in-memory Avro container and DuckDB's avro
extension reads them. A bundle is decoded from the bytes that were read and verified, written to a
private temporary copy -- never from its path, which DuckDB would read again (the file may have
changed since) and expand as a glob (``incident[1].avro`` names ``incident1.avro``). Bodies of an
older writer schema are resolved to the current reader in Python first, as ingest does.

A decoder may stop early on a malformed record without an error: `replay.session.replay` holds the
decoded rows to the verified events (one row per event, their seqs and hashes) whatever decoded them.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.ipc as ipc

from agentledger.schemas import codec
from agentledger.schemas.contract import SchemaStore, load_store
from agentledger.schemas.errors import AgentLedgerError, DecodeError
from agentledger.schemas.sql import literal
from agentledger.schemas.warehouse import Warehouse

from . import native
from .sources import RawSession


class WorksetError(AgentLedgerError):
    """The session's events could not be decoded."""


@dataclass
class Workset:
    wh: Warehouse
    session_id: str
    events: int
    decoder: str = "duckdb"  # what decoded the events: "native" (replay.native) or "duckdb" (its avro reader)

    @property
    def con(self):
        return self.wh.con

    def close(self) -> None:
        self.wh.close()

    def __enter__(self) -> "Workset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def new_warehouse(store: SchemaStore | None = None, *, wide: bool = False) -> Warehouse:
    """A private in-memory warehouse for one session: the kind tables and the ``events`` view, or
    with ``wide`` one ``events`` table (`Warehouse.create_wide_events`: a small session's)."""
    wh = Warehouse(":memory:", store=store or load_store())
    if wide:
        wh.create_wide_events()
    else:
        wh.create_event_schema()
    wh.load("avro")
    return wh


def _insert_ocf(wh: Warehouse, target: str, fp_hex: str) -> None:
    """Insert the Avro container(s) ``target`` names (a quoted path, or a list of them) into ``events``."""
    src = (f"(SELECT a.*, {literal(fp_hex)} AS schema_fingerprint, NULL::VARCHAR AS source_topic, "
           "NULL::INTEGER AS source_partition, NULL::BIGINT AS source_offset, NULL::TIMESTAMP AS ingested_at "
           f"FROM read_avro({target}) a)")
    wh.insert_events(src)


def load(raw: RawSession, store: SchemaStore | None = None, wh: Warehouse | None = None) -> Workset:
    """Decode ``raw`` into a fresh in-memory warehouse (or ``wh``). Raises `WorksetError` when a body
    cannot be decoded (the chain verifier names such events; replay stops at them)."""
    store = store or load_store()
    b = raw.bundle
    # a small session that DuckDB's Avro reader decodes (not the native decoder: it fills kind tables)
    wide = len(raw.values) <= WIDE_MAX_EVENTS and (b is None or len(b.data) < NATIVE_MIN_BYTES)
    wh = wh or new_warehouse(store, wide=wide)
    cur = store.current
    decoder = "duckdb"
    try:
        if b is not None and b.framing_error is None and b.fingerprint == cur.fingerprint \
                and len(b.spans) == len(raw.values):
            decoder = _load_bundle(wh, b, cur.fingerprint_hex)
        else:
            _load_values(wh, raw, store)
    except Exception as exc:
        if isinstance(exc, AgentLedgerError):
            raise
        raise WorksetError(f"cannot decode the events of session {raw.session_id}: {str(exc).splitlines()[0]}") from exc
    n = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
    return Workset(wh, raw.session_id, n, decoder)


# Up to this many events a session's workset holds them in one wide ``events`` table: the state of a
# session is ~14 queries, and over the kind tables' view DuckDB plans the 13-branch UNION ALL of wide
# STRUCT casts again for each (~10-20 ms), most of a small session's replay (the console's session
# page); the wide table's rows for a session this size cost nothing to speak of.
WIDE_MAX_EVENTS = 20_000


CHUNK_EVENTS = 100_000
CHUNK_BYTES = 32 * 1024 * 1024


NATIVE_MIN_BYTES = 4 * 1024 * 1024  # a bundle this big is decoded by the native decoder when installed


def _load_bundle(wh: Warehouse, b, fp_hex: str) -> str:
    """A bundle is already an OCF of the current schema: the native decoder reads a big one when
    it is installed (`load_bundle_natively`); otherwise DuckDB reads its framed blocks as they were
    read and verified (``b.data``, never the file again: see the module doc), a big one cut at block
    boundaries into a few parts (see `_insert_parts`)."""
    if len(b.data) >= NATIVE_MIN_BYTES and native.decoder() is not None:
        try:
            _insert_native(wh, b, wh.store, expect_rows=len(b.spans))
            return "native"
        except native.NativeDecodeError:  # the workset is unchanged: DuckDB's reader below
            pass
    n = len(b.spans)
    if n == 0:
        return "duckdb"
    parts = 1 if n <= CHUNK_EVENTS else max(2, min(8, n // CHUNK_EVENTS))
    ends = sorted({n * k // parts for k in range(1, parts + 1)} - {0})  # event index each part ends before
    _insert_parts(wh, b, [b.header.length] + [b.spans[j - 1][1] + codec.SYNC_LEN for j in ends], fp_hex)
    return "duckdb"


def _insert_parts(wh: Warehouse, b, bounds: list[int], fp_hex: str) -> None:
    """Insert the bundle's bytes ``bounds[k]..bounds[k+1]`` (each a run of whole blocks), each part
    written as a container with the bundle's header to a private temporary directory (in memory
    where /dev/shm exists), which DuckDB decodes in parallel without calling back into Python."""
    header = memoryview(b.data)[: b.header.length]
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="agentledger-replay-", dir=shm if shm.is_dir() else None) as d:
        paths = []
        for k in range(len(bounds) - 1):
            path = Path(d) / f"part-{k}.avro"
            with open(path, "wb") as f:
                f.write(header)
                f.write(memoryview(b.data)[bounds[k] : bounds[k + 1]])
            paths.append(literal(str(path)))
        _insert_ocf(wh, "[" + ", ".join(paths) + "]", fp_hex)


def _insert_native(wh: Warehouse | Callable[[], Warehouse], b, store: SchemaStore, *, verify: bool = False,
                   expect_rows: int | None = None) -> tuple[Warehouse, "native.Vouched | None"]:
    """Decode the bundle's bytes with `replay.native` (with the current reader schema) and make
    ``events`` of ``wh`` (a warehouse, or a function making one: called while the decoder works) a
    view over one table per kind (`Warehouse.events_by_kind`); with ``verify``, the decoder also
    frames the blocks and checks the chain. ``expect_rows``: the number of events the caller framed;
    any other count is refused. All or nothing: nothing is committed unless the decoder's summary
    is sound. Returns the warehouse and what the decoder found. Raises `native.NativeDecodeError`
    (a warehouse made here is closed then)."""
    made = None
    found: dict = {}

    def relations(run: native.Decoding):
        for branch, path in run.kinds():
            with pa.memory_map(str(path)) as src:
                table = ipc.open_file(src).read_all()
            name = f"_native_kind_{branch}"
            wh.con.register(name, table)
            try:
                yield branch, name  # (its table is made before the next is asked for)
            finally:
                wh.con.unregister(name)
        found["out"] = out = run.result()  # checked before anything is committed
        if expect_rows is not None and out.rows != expect_rows:
            raise native.NativeDecodeError(f"the decoder found {out.rows} events, the framing {expect_rows}")

    # room for the input copy and the Arrow files (about 1.2x the input)
    with native.scratch_dir(3 * len(b.data)) as d, \
            native.Decoding(b.data, store.current.schema, d, bundle=b if verify else None) as run:
        gen = relations(run)
        try:
            if callable(wh):
                wh = made = wh()
            wh.events_by_kind(gen, b.fingerprint.hex())
        except BaseException as exc:
            gen.close()  # (unregisters what it registered, while the connection is open)
            if made is not None:
                made.close()
            if isinstance(exc, (OSError, pa.ArrowInvalid)):
                raise native.NativeDecodeError(f"cannot read the decoder's output: {exc}") from exc
            if "duckdb" in type(exc).__module__:  # e.g. a conversion error: the other reader is tried instead
                raise native.NativeDecodeError(f"cannot load the decoder's output: {str(exc).splitlines()[0]}") from exc
            raise
    return wh, found["out"].vouched


def load_bundle_natively(b, store: SchemaStore | None = None, *, verify: bool = False) -> tuple[Workset, "native.Vouched | None"]:
    """Decode a bundle of the current schema with the native decoder before its blocks are framed
    here; with ``verify`` the decoder frames them and checks the chain too (see `native.Vouched`).
    The caller must make sure the workset holds one row per framed event. Raises
    `native.NativeDecodeError`."""
    store = store or load_store()
    wh, vouched = _insert_native(lambda: new_warehouse(store), b, store, verify=verify)
    try:
        events = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
    except BaseException:
        wh.close()
        raise
    return Workset(wh, b.session_id, events, "native"), vouched


def load_unframed_bundle(b, store: SchemaStore | None = None) -> tuple[Workset, list[int]]:
    """Decode a bundle of the current schema whose blocks have not been framed yet (a child
    process is framing and verifying them meanwhile): the file is cut into a few parts at sync
    markers found by plain search, which DuckDB decodes in parallel.

    Returns the workset and the byte offsets where the file was cut. A sync marker can also occur
    inside an event's bytes, so the caller must check, once the framing is known, that every cut is
    where a block starts (`cuts_are_block_starts`) and otherwise load the framed bundle instead."""
    store = store or load_store()
    wh = new_warehouse(store)
    try:
        data, start, sync = b.data, b.header.length, b.header.sync
        n = len(data)
        parts = max(2, min(8, (n - start) // CHUNK_BYTES))
        cuts = []
        for k in range(1, parts):
            q = data.find(sync, start + (n - start) * k // parts)
            if q < 0:
                break
            cut = q + codec.SYNC_LEN
            if cut < n and (not cuts or cut > cuts[-1]):
                cuts.append(cut)
        _insert_parts(wh, b, [start, *cuts, n], store.current.fingerprint_hex)
        events = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
    except BaseException:
        wh.close()
        raise
    return Workset(wh, b.session_id, events), cuts


def cuts_are_block_starts(b, cuts: list[int]) -> bool:
    """True when each offset is where one of the (now framed) bundle's blocks starts."""
    from bisect import bisect_left

    spans = b.spans
    for cut in cuts:
        j = bisect_left(spans, cut - codec.SYNC_LEN, key=lambda span: span[1])
        if j >= len(spans) or spans[j][1] != cut - codec.SYNC_LEN:
            return False
    return True


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
            _insert_ocf(wh, literal(f"memory://{path}"), run_fp.hex())
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
