"""The native decoding path: agentledger-avro2arrow --ingest, used only when it vouches for a whole batch."""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Callable

import duckdb
import pyarrow as pa

from agentledger.schemas import native
from agentledger.schemas.sql import literal
from agentledger.schemas.warehouse import Warehouse

if TYPE_CHECKING:
    from .common import Batch

log = logging.getLogger("agentledger.consumers.ingest")  # one logger for the package, as before the split


# Batches of fewer messages skip the native decoder (starting a process costs more than it saves).
NATIVE_MIN_MESSAGES = 2000


class NativeDecoder:
    """The native decoding path: agentledger-avro2arrow --ingest, used only when it vouches for a whole
    batch. A part of `Ingestor`."""

    def _native(self, batch: Batch) -> "_NativeStage | None":
        """The batch decoded by the native decoder (`_NativeStage`), when it vouches for every
        message of it; else None, and the whole batch takes the Python path (`_precheck`, `_stage`),
        which quarantines what is wrong with a reason -- so the verdicts never depend on the decoder.
        Embedded-log batches go as the raw segment ranges they were read as (`native.chunks_frame`)."""
        n = len(batch)
        if n < NATIVE_MIN_MESSAGES or self._native_off:
            return None
        cur = self.store.current
        make: Callable[[], list[bytes]]
        if batch.chunks is not None:
            ranges = batch.chunks
            topics = {m.topic for c in ranges if isinstance(c, list) for m in c}
            topics |= {c.topic for c in ranges if not isinstance(c, list)}
            if len(topics) != 1 or any(m.damaged is not None or m.value is None
                                       for c in ranges if isinstance(c, list) for m in c):
                return None
            topic = topics.pop()
            # an embedded-log range says its writer schema once (a Kafka fetch: the decoder checks each message)
            if any(not isinstance(c, list) and c.frame_kind == 2
                   and (c.sync is None or c.prefix[2:] != cur.fingerprint) for c in ranges):
                return None  # damage, or an older writer schema: the Python path says what and upcasts
            counts = [len(c) if isinstance(c, list) else c.count for c in ranges]
            need = sum(sum(len(m.value) for m in c) if isinstance(c, list) else len(c.data) for c in ranges)

            def make() -> list[bytes]:
                return native.chunks_frame(ranges)
        else:
            msgs = batch.messages
            if (any(m.damaged is not None or m.value is None for m in msgs)
                    or len({m.topic for m in msgs}) != 1):
                return None
            counts, topic, need = [n], msgs[0].topic, sum(len(m.value) for m in msgs)

            def make() -> list[bytes]:
                return native.values_frame([m.value for m in msgs], [m.partition for m in msgs],
                                           [m.offset for m in msgs])
        try:
            with native.scratch_dir(2 * need) as work:
                frame = make()
                d = native.decode_ingest(frame, cur.schema, cur.fingerprint, work,
                                         max_message_bytes=self.max_message_bytes, ended_branch=self._ended_index)
                del frame
                if d.punted or d.records != n or d.chunks != counts:
                    log.debug("the native decoder left %d of %d messages to Python: the batch takes the Python path",
                              len(d.punted), n)
                    return None
                return _NativeStage.load(d, topic, cur.fingerprint.hex(), counts)
        except native.NativeDecodeError as exc:
            log.info("native decoder: %s; this batch takes the Python path", exc)
            if native.decoder() is None:
                self._native_off = True
            return None


class _NativeStage:
    """A batch the native decoder vouched for: its envelope rows (the chain guard's ``stage``: _i,
    session_id, seq, prev_hash, hash, event_id, occurred_at, branch) and one Arrow table per kind
    (every field of the event, ``payload`` as that kind's record, _i and the source position), held
    in memory so that a retried transaction reads them again."""

    def __init__(self, env: pa.Table, kinds: dict[int, pa.Table], topic: str, fingerprint_hex: str):
        self.env, self.kinds, self.topic, self.fingerprint_hex = env, kinds, topic, fingerprint_hex
        # the decoder's per-session summary of the batch (first seq and prev_hash, ``linked``: each
        # event extends the one before it), and whether any event_id occurs twice in it
        self.sessions: pa.Table | None = None
        self.dup_event_ids = True

    @classmethod
    def load(cls, d: "native.IngestDecoded", topic: str, fingerprint_hex: str,
             counts: list[int] | None = None) -> "_NativeStage":
        """``counts``: messages per chunk of the frame; the decoder numbers message k of chunk c
        ``c << 32 | k``, the batch ``sum(counts[:c]) + k``."""
        import pyarrow.ipc as ipc

        def read(path) -> pa.Table:
            with pa.memory_map(str(path)) as src:
                return ipc.open_file(src).read_all()

        try:
            env = read(d.env_file)
            kinds = {t: read(d.kind_file(t)) for t in d.kinds}
            sessions = read(d.sessions_file)
        except (OSError, pa.ArrowException) as exc:
            raise native.NativeDecodeError(f"cannot read what the decoder wrote: {exc}") from exc
        if env.num_rows != d.rows or sum(t.num_rows for t in kinds.values()) != d.rows:
            raise native.NativeDecodeError("the decoder's files do not hold the rows it reports")
        if counts is not None and len(counts) > 1:
            env = _renumber(env, counts)
            kinds = {t: _renumber(k, counts) for t, k in kinds.items()}
        st = cls(env, kinds, topic, fingerprint_hex)
        st.sessions, st.dup_event_ids = sessions, d.dup_event_ids
        return st

    def stage(self, con: duckdb.DuckDBPyConnection) -> int:
        """The chain guard's ``stage``: the decoder's envelope rows as they are (an Arrow table
        registered under that name, read in place; `unstage` removes it)."""
        con.register("stage", self.env)
        return self.env.num_rows

    @staticmethod
    def unstage(con: duckdb.DuckDBPyConnection) -> None:
        con.unregister("stage")

    def insert(self, wh: Warehouse, where: str) -> None:
        kinds = {k.index: k for k in wh.store.kinds}
        constants = {"schema_fingerprint": literal(self.fingerprint_hex),
                     "source_topic": literal(self.topic),
                     "ingested_at": "now()::TIMESTAMP"}
        for t, table in self.kinds.items():
            wh.con.register("_native_kind", table)
            try:
                wh.insert_kind(kinds[t], "_native_kind", table.column_names, constants, where)
            finally:
                wh.con.unregister("_native_kind")


def _renumber(t: pa.Table, counts: list[int]) -> pa.Table:
    """``_i`` from the decoder's ``chunk << 32 | k`` to the message's position in the batch."""
    import pyarrow.compute as pc

    first = pa.array([0, *itertools.accumulate(counts[:-1])], pa.int64())
    i = t.column("_i")
    new = pc.add(pc.take(first, pc.shift_right(i, 32)), pc.bit_wise_and(i, 0xFFFFFFFF))
    return t.set_column(t.column_names.index("_i"), "_i", new)
