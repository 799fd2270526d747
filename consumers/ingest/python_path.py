"""The Python decoding path: raw-byte checks, then DuckDB's avro reader over in-memory OCF files."""

from __future__ import annotations

import hashlib
import logging
import uuid

import duckdb
import pyarrow as pa

from agentledger.schemas import codec
from agentledger.schemas.envelope import HASH_FIELD_LEN
from agentledger.schemas.errors import DecodeError
from agentledger.schemas.transport.base import Message

from .common import (
    _HASH_TAG, _Dead,
)

log = logging.getLogger("agentledger.consumers.ingest")  # one logger for the package, as before the split


class PythonDecoder:
    """The Python decoding path: raw-byte checks, then DuckDB's avro reader over in-memory OCF files. A
    part of `Ingestor`."""

    def _precheck(self, msgs: list[Message]) -> tuple[list[_Dead], dict[bytes, list[int]]]:
        """Header, size, writer schema and hash of every message, from raw bytes (no decoding)."""
        dead: list[_Dead] = []
        groups: dict[bytes, list[int]] = {}
        max_len = self.max_message_bytes
        sha = hashlib.sha256
        by_fp = self.store.by_fingerprint
        known: dict[bytes, bool] = {}
        min_len = codec.SOE_HEADER_LEN + HASH_FIELD_LEN
        magic = codec.SOE_MAGIC
        for i, m in enumerate(msgs):
            if m.damaged is not None:  # the source could not read this offset back whole: keep its bytes
                dead.append(_Dead(i, "log_damaged", m.damaged))
                continue
            v = m.value
            if v is None or len(v) < min_len or v[:2] != magic:
                dead.append(_Dead(i, "undecodable", "not an agentledger event (bad single-object header or too short)"))
                continue
            if len(v) > max_len:
                dead.append(_Dead(i, "oversized", f"{len(v)} bytes > {max_len}"))
                continue
            fp = v[2:10]
            ok = known.get(fp)
            if ok is None:
                ok = known[fp] = by_fp(fp) is not None
            if not ok:
                dead.append(_Dead(i, "unknown_fingerprint", f"writer schema {fp.hex()} is not in the schema store"))
                continue
            if v[-HASH_FIELD_LEN:-64] != _HASH_TAG or sha(v[:-HASH_FIELD_LEN]).hexdigest().encode() != v[-64:]:
                dead.append(_Dead(i, "hash_mismatch", "the message bytes do not hash to the hash it carries"))
                continue
            groups.setdefault(fp, []).append(i)
        return dead, groups

    # -- staging ------------------------------------------------------------------------------
    def _stage(self, msgs: list[Message], groups: dict[bytes, list[int]], dead: list[_Dead]) -> int:
        """Decode the hash-valid messages natively into TEMP TABLE stage (+ provenance, + _i)."""
        con = self.con
        path = self._put_ocf([])
        try:
            con.register("_meta", self._meta(msgs, b"", []))
            con.execute(f"CREATE OR REPLACE TEMP TABLE stage AS {self._stage_sql(path)}")
        finally:
            con.unregister("_meta")
            self._fs.rm(path)
        total = 0
        for fp, idxs in groups.items():
            version = self.store.by_fingerprint(fp)
            bodies = [msgs[i].value[10:] for i in idxs]
            if fp != self.store.current.fingerprint:
                bodies, idxs = self._upcast(version, bodies, idxs, msgs, dead)
            total += self._stage_part(msgs, fp, idxs, bodies, dead)
        return total

    @staticmethod
    def _stage_sql(path: str) -> str:
        return (f"SELECT a.*, m.*, now()::TIMESTAMP AS ingested_at FROM read_avro('memory://{path}') a "
                "POSITIONAL JOIN _meta m")

    @staticmethod
    def _meta(msgs: list[Message], fp: bytes, idxs: list[int]) -> pa.Table:
        return pa.table({
            "_i": pa.array(idxs, pa.int64()),
            "_claimed": pa.array([msgs[i].value[-64:].decode("ascii", "replace") for i in idxs], pa.string()),
            "schema_fingerprint": pa.array([fp.hex()] * len(idxs), pa.string()),
            "source_topic": pa.array([msgs[i].topic for i in idxs], pa.string()),
            "source_partition": pa.array([msgs[i].partition for i in idxs], pa.int32()),
            "source_offset": pa.array([msgs[i].offset for i in idxs], pa.int64()),
        })

    def _stage_part(self, msgs, fp: bytes, idxs: list[int], bodies: list[bytes], dead: list[_Dead]) -> int:
        """Stage one run of bodies; if they do not decode cleanly, bisect to isolate the bad ones.

        Every staged body already passed the hash check, so a bad body means a producer sealed bytes
        its own schema cannot read. DuckDB's reader does not stop a record at its block's end, so a
        body that decodes short shifts the records after it: each row's decoded ``hash`` must equal
        the hash its message carries, or the run is split. Rare enough to cost nothing in practice."""
        if not idxs:
            return 0
        con = self.con
        meta = self._meta(msgs, fp, idxs)
        path = self._put_ocf(bodies)
        con.register("_meta", meta)
        err = None
        try:
            before = con.execute("SELECT count(*) FROM stage").fetchone()[0]
            con.execute(f"INSERT INTO stage {self._stage_sql(path)}")
            n, bad = con.execute(f"""SELECT count(*), count(*) FILTER (WHERE hash IS DISTINCT FROM _claimed)
                                     FROM stage WHERE _i >= {min(idxs)} AND _i IN (SELECT _i FROM _meta)""").fetchone()
            if n == len(idxs) and bad == 0 and n + before == con.execute("SELECT count(*) FROM stage").fetchone()[0]:
                return len(idxs)
            err = ("the Avro body does not span the message (short or trailing bytes)" if len(idxs) == 1
                   else "records decoded out of step")
            con.execute("DELETE FROM stage WHERE _i IN (SELECT _i FROM _meta)")
        except duckdb.Error as exc:
            err = "DuckDB avro reader: " + str(exc).splitlines()[0]
        finally:
            con.unregister("_meta")
            self._fs.rm(path)
        if len(idxs) == 1:
            dead.append(_Dead(idxs[0], "undecodable", err))
            return 0
        mid = len(idxs) // 2
        return (self._stage_part(msgs, fp, idxs[:mid], bodies[:mid], dead)
                + self._stage_part(msgs, fp, idxs[mid:], bodies[mid:], dead))

    def _put_ocf(self, bodies: list[bytes]) -> str:
        path = f"/agentledger-ingest/{uuid.uuid4().hex}.avro"
        with self._fs.open(path, "wb") as f:
            f.write(self._ocf_header)
            f.write(codec.ocf_blocks(bodies, self._sync))
        return path

    def _upcast(self, version, bodies, idxs, msgs, dead):
        """Older writer schema: resolve to the current reader in Python (rare; hashes stay the writer's)."""
        out_b, out_i = [], []
        cur = self.store.current.parsed
        for i, body in zip(idxs, bodies):
            try:
                rec = codec.decode(body, version.parsed, cur)
                out_b.append(codec.encode(cur, rec))
                out_i.append(i)
            except DecodeError as exc:
                dead.append(_Dead(i, "undecodable", exc.detail))
        return out_b, out_i
