"""The adapter of the native decoder ``agentledger-avro2arrow`` (native/avro2arrow, Rust): where it
is, the reader schema it decodes with, a scratch directory for its files, and its ``--ingest`` mode.

``scripts/bootstrap`` builds it with cargo into ``.venv/bin``. It is an accelerator, never a
dependency: replay (`replay.native`) and ingest (`consumers.ingest`) work without it, slower, with
the same answers. ``$AGENTLEDGER_AVRO2ARROW`` names another build, or ``off``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, cast

from . import envvars
from .errors import AgentLedgerError


BINARY = "agentledger-avro2arrow"
ENV = "AGENTLEDGER_AVRO2ARROW"  # a path to the binary, or "off"
_REPO_BUILD = Path(__file__).resolve().parents[1] / "native" / "avro2arrow" / "target" / "release" / BINARY


class NativeDecodeError(AgentLedgerError):
    """The native decoder is missing or could not decode the input."""


def decoder() -> Path | None:
    """The decoder to use: ``$AGENTLEDGER_AVRO2ARROW`` ("off" disables it), else the one installed
    next to this Python (``scripts/bootstrap`` puts it in ``.venv/bin``), else one on ``PATH``, else
    a build in the source tree. None when there is none."""
    env = envvars.raw(ENV)
    if env is not None:
        if env.strip().lower() in ("", "off", "0", "none"):
            return None
        p = Path(env)
        return p if p.is_file() and os.access(p, os.X_OK) else None
    for c in (Path(sys.prefix) / "bin" / BINARY, shutil.which(BINARY), _REPO_BUILD):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


def reader_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema to decode with: the writer's, with ``uuid`` strings kept as strings (arrow-avro
    would parse them into 16 bytes, losing their exact text) and ``timestamp-micros`` read as
    local timestamps (the warehouse keeps UTC as TIMESTAMP without a zone). Avro resolves these
    by their primitive types, so the bytes decode identically."""

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            o = {k: walk(v) for k, v in o.items()}
            if o.get("logicalType") == "uuid":
                del o["logicalType"]
            elif o.get("logicalType") == "timestamp-micros":
                o["logicalType"] = "local-timestamp-micros"
            return o
        if isinstance(o, list):
            return [walk(x) for x in o]
        return o

    return cast(dict[str, Any], walk(copy.deepcopy(schema)))




@contextmanager
def scratch_dir(need_bytes: int = 0) -> Iterator[Path]:
    """A private (0700) temporary directory for the decoder's input and output: in memory (/dev/shm)
    when it has room for ``need_bytes``, else the default temporary directory. It is removed on
    exit, by a thread: freeing a large tmpfs file takes a while, and nothing waits for it (the
    interpreter does, at exit)."""
    shm = Path("/dev/shm")
    try:
        roomy = shm.is_dir() and shutil.disk_usage(shm).free > need_bytes
    except OSError:
        roomy = False
    d = tempfile.mkdtemp(prefix="agentledger-native-", dir=shm if roomy else None)
    try:
        yield Path(d)
    finally:
        threading.Thread(target=shutil.rmtree, args=(d,), kwargs={"ignore_errors": True}).start()


# --- --ingest: one ingest batch ------------------------------------------------------------------

FRAME_MAGIC = b"ALFRAME1"
_CHUNK = struct.Struct("<B3xiqQQQQIxxxxQ")  # 64 bytes: kind, partition, first offset, data, aux, n, base
assert _CHUNK.size == 64


def values_frame(values: list[bytes], partitions: list[int], offsets: list[int]) -> list[bytes]:
    """An ingest frame (as its parts, to be written one after the other) of one *values* chunk
    (src/ingest.rs): the messages one after the other, and per message (offset i64, partition i32,
    length u32). Message ``k`` is numbered ``k``."""
    n = len(values)
    aux = _values_table(values, partitions, offsets)
    head = 16 + _CHUNK.size
    data_off = head + len(aux)
    hdr = FRAME_MAGIC + struct.pack("<I4x", 1) + _CHUNK.pack(0, 0, 0, data_off, sum(map(len, values)), head, len(aux), n, 0)
    return [hdr, aux, *values]


def _values_table(values: list[bytes], partitions: list[int], offsets: list[int]) -> bytes:
    """A values chunk's table: per message (offset i64, partition i32, length u32), little-endian."""
    n = len(values)
    # the table as 32-bit words: offset (low, high), partition, length -- filled column by column
    words = array("I", bytes(16 * n))
    off = array("q", offsets)
    if sys.byteorder != "little":
        off.byteswap()
    off_w = array("I")
    off_w.frombytes(off.tobytes())
    words[0::4] = off_w[0::2]
    words[1::4] = off_w[1::2]
    part = array("I")
    part.frombytes(array("i", partitions).tobytes())
    words[2::4] = part
    lens = array("I", map(len, values))
    words[3::4] = lens
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()


def chunks_frame(chunks: "list[Any]") -> list[bytes]:
    """An ingest frame (as its parts) of chunks in order (src/ingest.rs): lists of messages (values
    chunks: what a source parsed itself; every message must have a value), Kafka fetches
    (``frame_kind`` 1: `schemas.transport.kafka.KafkaRaw`, a partition's record batches as the broker
    sent them, read from ``fetch_offset`` on) and embedded-log ranges (``frame_kind`` 2:
    `schemas.transport.local.RawRange` with a readable segment header: its bytes from ``lo`` on, the
    file positions of its records and of the end of the last, its sync marker and the single-object
    prefix of its writer schema). Message ``k`` of chunk ``c`` is numbered ``c << 32 | k``."""
    head = 16 + _CHUNK.size * len(chunks)
    hdrs, body = [], []
    at = head
    for c in chunks:
        if isinstance(c, list):
            values = [m.value for m in c]
            aux = _values_table(values, [m.partition for m in c], [m.offset for m in c])
            size = sum(map(len, values))
            hdrs.append(_CHUNK.pack(0, 0, 0, at + len(aux), size, at, len(aux), len(c), 0))
            body += [aux, *values]
        elif c.frame_kind == 1:
            aux, size = b"", len(c.data)
            hdrs.append(_CHUNK.pack(1, c.partition, c.fetch_offset, at, size, at, 0, c.count, 0))
            body.append(c.data)
        else:
            if c.sync is None or c.prefix is None:
                raise ValueError(f"chunks_frame: {c.name} has no readable segment header ({c.header_error})")
            pos = array("Q", c.end_positions)
            if sys.byteorder != "little":
                pos.byteswap()
            aux, size = pos.tobytes() + c.sync + c.prefix, len(c.data)
            hdrs.append(_CHUNK.pack(2, c.partition, c.offset, at + len(aux), size, at, len(aux), c.count, c.lo))
            body += [aux, c.data]
        at += len(aux) + size
    return [FRAME_MAGIC + struct.pack("<I4x", len(chunks)), *hdrs, *body]


@dataclass
class IngestDecoded:
    """What ``--ingest`` made of a batch: a file per event kind (union branch -> path), the chain
    guard's envelope rows (``env.arrow``), the messages it did not vouch for, and the counts."""

    workdir: Path
    records: int
    rows: int
    punted: list[int]
    kinds: dict[int, int]
    chunks: list[int]
    dup_event_ids: bool = True  # some event_id occurs twice among the vouched rows (False: none does)

    def kind_file(self, branch: int) -> Path:
        return self.workdir / f"kind-{branch}.arrow"

    @property
    def env_file(self) -> Path:
        return self.workdir / "env.arrow"

    @property
    def sessions_file(self) -> Path:
        return self.workdir / "sessions.arrow"


def decode_ingest(frame: bytes | list[bytes], schema: dict[str, Any], fingerprint: bytes, workdir: Path, *,
                  max_message_bytes: int,
                  ended_branch: int, timeout: float | None = None) -> IngestDecoded:
    """Run ``agentledger-avro2arrow --ingest`` over ``frame`` (`values_frame`, `chunks_frame`: its
    parts) in ``workdir``.
    Raises `NativeDecodeError` when the decoder is missing, fails, or says something that does not
    add up (then the caller takes its Python path)."""
    exe = decoder()
    if exe is None:
        raise NativeDecodeError(f"{BINARY} is not installed")
    workdir = Path(workdir)
    try:
        (workdir / "reader.avsc").write_text(json.dumps(reader_schema(schema), separators=(",", ":")))
        parts = [frame] if isinstance(frame, (bytes, bytearray, memoryview)) else frame
        size = sum(len(p) for p in parts)
        with open(workdir / "frame.bin", "wb") as f:
            f.writelines(parts)
    except OSError as exc:
        raise NativeDecodeError(f"cannot hand the batch to {BINARY}: {exc}") from exc
    args = [str(exe), "--ingest", "--input", str(workdir / "frame.bin"), "--out-dir", str(workdir),
            "--schema", str(workdir / "reader.avsc"), "--fingerprint", fingerprint.hex(),
            "--max-message-bytes", str(max_message_bytes), "--ended-branch", str(ended_branch)]
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout if timeout is not None else 10 + size / 10e6)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise NativeDecodeError(f"{BINARY} --ingest did not finish: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise NativeDecodeError(err[-1] if err else f"{BINARY} --ingest exited with {proc.returncode}")
    try:
        s = json.loads(proc.stdout)
        punted = array("q")
        punted.frombytes((workdir / "punted.bin").read_bytes())
        if sys.byteorder != "little":
            punted.byteswap()
        out = IngestDecoded(workdir, int(s["records"]), int(s["rows"]), punted.tolist(),
                            {int(t): int(n) for t, n in s["kinds"].items()}, [int(c) for c in s["chunks"]],
                            s.get("dup_event_ids", True) is not False)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise NativeDecodeError(f"{BINARY} --ingest printed an unreadable summary: {proc.stdout[:200]!r} ({exc})") from exc
    if (sum(out.kinds.values()) != out.rows or out.rows + len(out.punted) != out.records
            or not all(out.kind_file(t).is_file() for t in out.kinds)):
        raise NativeDecodeError(f"{BINARY} --ingest: its summary does not add up ({proc.stdout[:200]!r})")
    return out
