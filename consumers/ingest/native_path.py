"""The native decoding path: agentledger-avro2arrow --ingest, used only when it vouches for a whole batch."""

from __future__ import annotations

import logging

import duckdb
import pyarrow as pa

from agentledger.schemas import native
from agentledger.schemas.transport.base import Message
from agentledger.schemas.sql import literal
from agentledger.schemas.warehouse import Warehouse

log = logging.getLogger("agentledger.consumers.ingest")  # one logger for the package, as before the split


# Batches of fewer messages skip the native decoder (starting a process costs more than it saves).
NATIVE_MIN_MESSAGES = 2000


class NativeDecoder:
    """The native decoding path: agentledger-avro2arrow --ingest, used only when it vouches for a whole
    batch. A part of `Ingestor`."""

    def _native(self, msgs: list[Message]) -> "_NativeStage | None":
        """The batch decoded by the native decoder (`_NativeStage`), when it vouches for every
        message of it; else None, and the whole batch takes the Python path (`_precheck`, `_stage`),
        which quarantines what is wrong with a reason -- so the verdicts never depend on the decoder."""
        if (len(msgs) < NATIVE_MIN_MESSAGES or self._native_off
                or any(m.damaged is not None or m.value is None for m in msgs)
                or len({m.topic for m in msgs}) != 1):
            return None
        cur = self.store.current
        try:
            with native.scratch_dir(2 * sum(len(m.value) for m in msgs)) as work:
                frame = native.values_frame([m.value for m in msgs], [m.partition for m in msgs],
                                            [m.offset for m in msgs])
                d = native.decode_ingest(frame, cur.schema, cur.fingerprint, work,
                                         max_message_bytes=self.max_message_bytes, ended_branch=self._ended_index)
                del frame
                if d.punted or d.records != len(msgs) or -1 in d.chunks:
                    log.debug("the native decoder left %d of %d messages to Python: the batch takes the Python path",
                              len(d.punted), len(msgs))
                    return None
                return _NativeStage.load(d, msgs[0].topic, cur.fingerprint.hex())
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

    @classmethod
    def load(cls, d: "native.IngestDecoded", topic: str, fingerprint_hex: str) -> "_NativeStage":
        import pyarrow.ipc as ipc

        def read(path) -> pa.Table:
            with pa.memory_map(str(path)) as src:
                return ipc.open_file(src).read_all()

        try:
            env = read(d.env_file)
            kinds = {t: read(d.kind_file(t)) for t in d.kinds}
        except (OSError, pa.ArrowException) as exc:
            raise native.NativeDecodeError(f"cannot read what the decoder wrote: {exc}") from exc
        if env.num_rows != d.rows or sum(t.num_rows for t in kinds.values()) != d.rows:
            raise native.NativeDecodeError("the decoder's files do not hold the rows it reports")
        return cls(env, kinds, topic, fingerprint_hex)

    def stage(self, con: duckdb.DuckDBPyConnection) -> int:
        con.register("_native_env", self.env)
        try:
            con.execute("CREATE OR REPLACE TEMP TABLE stage AS SELECT * FROM _native_env")
        finally:
            con.unregister("_native_env")
        return self.env.num_rows

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
