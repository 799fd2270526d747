"""The embedded transport: a crash-safe, append-only log of standard Avro Object Container Files.

Layout under the log root (``$AGENTLEDGER_HOME/log`` by default)::

    <topic>/meta.json                     {"partitions": N}
    <topic>/<partition>/<base>.avro       a segment: an OCF, one record per block
    <topic>/<partition>/<base>.idx        16 bytes per record: block position, append time (ms)
    <topic>/<partition>/.lock             flock held by the appending process

Offsets work as in Kafka: a partition's records are numbered from 0; a segment's file name is the
offset of its first record. Each segment is a valid OCF that any Avro tool (and DuckDB's
``read_avro``) reads directly; its single writer schema is the one in its header, so a schema
upgrade starts a new segment.

Durability protocol (one appender at a time per partition, under the flock): blocks are written
and fsync-ed to the segment first, then their index entries are written and fsync-ed. Readers
only trust indexed records, so a crash leaves at most an unindexed tail that the next appender
re-validates: complete blocks are indexed, a torn block is cut off.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .. import codec
from ..errors import DecodeError, NotDurableError, TransportError
from .base import Message, Outgoing, Sink, Source

IDX_ENTRY = struct.Struct("<QQ")  # block position, append time in ms
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
_SEGMENT_SUFFIX = ".avro"


def _sync_marker(topic: str, partition: int, base: int) -> bytes:
    # Deterministic so that the same events make byte-identical logs (reproducible simulations).
    return hashlib.sha256(f"agentledger/{topic}/{partition}/{base}".encode()).digest()[:16]


@dataclass
class _Segment:
    base: int
    path: Path
    idx_path: Path
    header: codec.OcfHeader
    fingerprint: bytes


class LocalLog:
    """The on-disk log; shared by `LocalSink`, `LocalSource` and the producer spool."""

    def __init__(
        self,
        root: Path,
        default_partitions: int = 6,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
    ):
        self.root = Path(root)
        self.default_partitions = default_partitions
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._partitions: dict[str, int] = {}
        self._headers: dict[Path, tuple[codec.OcfHeader, bytes]] = {}

    # -- topics ---------------------------------------------------------------------------
    def topic_dir(self, topic: str) -> Path:
        if not topic or "/" in topic or topic.startswith("."):
            raise TransportError(f"invalid topic name {topic!r}")
        return self.root / topic

    def topics(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "meta.json").exists())

    def ensure_topic(self, topic: str, partitions: int | None = None) -> int:
        """Create the topic (idempotent, safe across processes); returns its partition count."""
        if topic in self._partitions:
            return self._partitions[topic]
        d = self.topic_dir(topic)
        meta = d / "meta.json"
        if not meta.exists():
            d.mkdir(parents=True, exist_ok=True)
            with self._flock(d / ".lock"):
                if not meta.exists():
                    tmp = d / f".meta.{os.getpid()}.tmp"
                    tmp.write_text(json.dumps({"partitions": partitions or self.default_partitions, "format": 1}))
                    os.replace(tmp, meta)
        n = int(json.loads(meta.read_text())["partitions"])
        self._partitions[topic] = n
        return n

    def partition_count(self, topic: str) -> int:
        if topic in self._partitions:
            return self._partitions[topic]
        meta = self.topic_dir(topic) / "meta.json"
        if not meta.exists():
            return 0
        return self.ensure_topic(topic)

    def partition_for(self, topic: str, key: bytes) -> int:
        return zlib.crc32(key) % self.ensure_topic(topic)

    # -- segments -------------------------------------------------------------------------
    def _pdir(self, topic: str, partition: int) -> Path:
        return self.topic_dir(topic) / str(partition)

    def segments(self, topic: str, partition: int) -> list[int]:
        d = self._pdir(topic, partition)
        if not d.is_dir():
            return []
        return sorted(int(p.stem) for p in d.iterdir() if p.suffix == _SEGMENT_SUFFIX)

    def segment_path(self, topic: str, partition: int, base: int) -> Path:
        return self._pdir(topic, partition) / f"{base:020d}{_SEGMENT_SUFFIX}"

    def _open_segment(self, topic: str, partition: int, base: int) -> _Segment:
        path = self.segment_path(topic, partition, base)
        cached = self._headers.get(path)
        if cached is None:
            with open(path, "rb") as f:
                head = f.read(256 * 1024)
            header = codec.read_ocf_header(head)
            cached = (header, codec.fingerprint(header.schema))
            self._headers[path] = cached
        return _Segment(base, path, path.with_suffix(".idx"), cached[0], cached[1])

    @staticmethod
    def _idx_count(idx_path: Path) -> int:
        try:
            return idx_path.stat().st_size // IDX_ENTRY.size
        except FileNotFoundError:
            return 0

    def end_offset(self, topic: str, partition: int) -> int:
        bases = self.segments(topic, partition)
        if not bases:
            return 0
        last = bases[-1]
        return last + self._idx_count(self.segment_path(topic, partition, last).with_suffix(".idx"))

    @contextmanager
    def _flock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fsync(fd)

    def _tail_consistent(self, seg: _Segment, count: int) -> bool:
        """True when the segment ends exactly after its last indexed block (a few bytes read)."""
        size = seg.path.stat().st_size
        if not count:
            return size == seg.header.length
        with open(seg.idx_path, "rb") as f:
            f.seek((count - 1) * IDX_ENTRY.size)
            last_pos, _ = IDX_ENTRY.unpack(f.read(IDX_ENTRY.size))
        with open(seg.path, "rb") as f:
            f.seek(last_pos)
            head = f.read(20)
        try:
            n, p = codec.read_varint(head, 0)
            blen, p = codec.read_varint(head, p)
        except DecodeError:
            return False
        return n == 1 and size == last_pos + p + blen + codec.SYNC_LEN

    def _recover_tail(self, seg: _Segment) -> int:
        """Make the index and the segment agree after a crash; returns the record count."""
        idx_size = seg.idx_path.stat().st_size if seg.idx_path.exists() else 0
        if idx_size % IDX_ENTRY.size:
            with open(seg.idx_path, "r+b") as f:
                f.truncate(idx_size - idx_size % IDX_ENTRY.size)
            idx_size -= idx_size % IDX_ENTRY.size
        count = idx_size // IDX_ENTRY.size
        if self._tail_consistent(seg, count):
            return count  # the common case: no crash since the last append, nothing to read
        data = seg.path.read_bytes()
        if count:
            with open(seg.idx_path, "rb") as f:
                f.seek((count - 1) * IDX_ENTRY.size)
                last_pos, _ = IDX_ENTRY.unpack(f.read(IDX_ENTRY.size))
            blocks = _valid_blocks(data, seg.header.sync, last_pos)
            if not blocks:
                raise TransportError(f"{seg.path}: index entry {count - 1} points at no complete block")
            end = blocks[0].end
            extra = blocks[1:]
        else:
            end = seg.header.length
            extra = _valid_blocks(data, seg.header.sync, seg.header.length)
        now = int(time.time() * 1000)
        if extra:
            with open(seg.idx_path, "ab") as f:
                f.write(b"".join(IDX_ENTRY.pack(b.position, now) for b in extra))
                f.flush()
                self._sync(f.fileno())
            end = extra[-1].end
            count += len(extra)
        if len(data) > end:
            with open(seg.path, "r+b") as f:
                f.truncate(end)
                self._sync(f.fileno())
        return count

    def append(self, topic: str, partition: int, values: list[bytes]) -> int:
        """Append single-object-encoded events durably; returns the offset of the first one."""
        if not values:
            return self.end_offset(topic, partition)
        self.ensure_topic(topic)
        pdir = self._pdir(topic, partition)
        with self._flock(pdir / ".lock"):
            bases = self.segments(topic, partition)
            seg = self._open_segment(topic, partition, bases[-1]) if bases else None
            count = self._recover_tail(seg) if seg else 0
            end = (seg.base + count) if seg else 0
            first = end
            i = 0
            while i < len(values):
                fp = values[i][2:10]
                j = i
                while j < len(values) and values[j][2:10] == fp:
                    j += 1
                run = values[i:j]
                for v in run:
                    if v[:2] != codec.SOE_MAGIC:
                        raise TransportError("local log only stores single-object-encoded Avro events")
                if seg is None or seg.fingerprint != fp or seg.path.stat().st_size >= self.segment_bytes:
                    seg = self._new_segment(topic, partition, end, fp)
                end += self._write_blocks(seg, run)
                i = j
            return first

    def _new_segment(self, topic: str, partition: int, base: int, fp: bytes) -> _Segment:
        from ..contract import load_store

        version = load_store().by_fingerprint(fp)
        if version is None:
            raise TransportError(f"unknown writer schema fingerprint {fp.hex()}: refusing to write it")
        path = self.segment_path(topic, partition, base)
        header = codec.ocf_header(
            version.schema,
            _sync_marker(topic, partition, base),
            {"agentledger.topic": topic.encode(), "agentledger.partition": str(partition).encode(),
             "agentledger.base_offset": str(base).encode()},
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, header)
            self._sync(fd)
        finally:
            os.close(fd)
        open(path.with_suffix(".idx"), "wb").close()
        self._fsync_dir(path.parent)
        return self._open_segment(topic, partition, base)

    def _fsync_dir(self, d: Path) -> None:
        if self.fsync:
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write_blocks(self, seg: _Segment, values: list[bytes]) -> int:
        sync = seg.header.sync
        pos = seg.path.stat().st_size
        positions = []
        chunks = []
        for v in values:
            block = codec.ocf_block(v[10:], sync)
            positions.append(pos)
            pos += len(block)
            chunks.append(block)
        fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"".join(chunks))
            self._sync(fd)
        finally:
            os.close(fd)
        # The index timestamp is the event's own time (like Kafka's CreateTime), not the wall clock,
        # so that the same events make byte-identical logs, index included.
        stamps = [_event_ms(v) for v in values]
        fd = os.open(seg.idx_path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"".join(IDX_ENTRY.pack(p, t) for p, t in zip(positions, stamps)))
            self._sync(fd)
        finally:
            os.close(fd)
        return len(values)

    # -- reading --------------------------------------------------------------------------
    def read(self, topic: str, partition: int, offset: int, max_records: int) -> list[Message]:
        """Up to ``max_records`` indexed records from ``offset`` on (within one segment)."""
        bases = self.segments(topic, partition)
        base = None
        for b in bases:
            if b <= offset:
                base = b
        if base is None:
            if bases and offset < bases[0]:
                raise TransportError(f"{topic}/{partition}: offset {offset} is before the first segment")
            return []
        seg = self._open_segment(topic, partition, base)
        k = offset - base
        with open(seg.idx_path, "rb") as f:
            f.seek(k * IDX_ENTRY.size)
            raw = f.read((max_records + 1) * IDX_ENTRY.size)
        n = len(raw) // IDX_ENTRY.size
        if n == 0:
            if base != bases[-1]:  # this segment is exhausted; continue in the next one
                nxt = bases[bases.index(base) + 1]
                if offset < nxt:
                    raise TransportError(f"{topic}/{partition}: offsets {offset}..{nxt - 1} are missing")
            return []
        entries = [IDX_ENTRY.unpack_from(raw, i * IDX_ENTRY.size) for i in range(n)]
        take = min(n, max_records)
        start = entries[0][0]
        with open(seg.path, "rb") as f:
            f.seek(start)
            if n > take:
                data = f.read(entries[take][0] - start)
            else:
                data = f.read()
        header = seg.header
        prefix = codec.SOE_MAGIC + seg.fingerprint
        out = []
        blocks = codec.iter_ocf_blocks(data, header.sync, 0)
        for i, block in enumerate(blocks):
            if i >= take:
                break
            if block.count != 1:
                raise DecodeError("multi_record_block", f"{seg.path} block at {start + block.position}")
            out.append(Message(topic, partition, offset + i, None, prefix + block.data, entries[i][1]))
        if len(out) < take:
            raise TransportError(f"{seg.path}: indexed record {offset + len(out)} is not a complete block")
        return out


def _event_ms(value: bytes) -> int:
    from ..envelope import peek

    try:
        return max(0, peek(value).occurred_at_us // 1000)
    except DecodeError:
        return int(time.time() * 1000)


def _valid_blocks(data: bytes, sync: bytes, start: int) -> list[codec.RawBlock]:
    """Complete, well-formed blocks from ``start`` up to the first torn or corrupt one."""
    out = []
    try:
        for b in codec.iter_ocf_blocks(data, sync, start):
            out.append(b)
    except DecodeError:
        pass  # everything after the last good block was never acknowledged: cut it
    return out


class LocalSink(Sink):
    """Buffers sends per partition and makes them durable on `flush` (fsync)."""

    def __init__(self, log: LocalLog, max_buffered: int = 5000):
        self.log = log
        self.max_buffered = max_buffered
        self._pending: list[Outgoing] = []

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        self.log.ensure_topic(topic, partitions)

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        self._pending.append(Outgoing(topic, key, value))
        if len(self._pending) >= self.max_buffered:
            self.flush()

    def flush(self, timeout: float | None = None) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        groups: dict[tuple[str, int], list[bytes]] = {}
        for m in pending:
            groups.setdefault((m.topic, self.log.partition_for(m.topic, m.key)), []).append(m.value)
        try:
            for (topic, partition), values in groups.items():
                self.log.append(topic, partition, values)
        except OSError as exc:
            raise NotDurableError(f"local log append failed: {exc}", pending) from exc

    def close(self, timeout: float | None = None) -> None:
        self.flush(timeout)


class LocalSource(Source):
    def __init__(self, log: LocalLog):
        self.log = log
        self._positions: dict[tuple[str, int], int] = {}
        self._rr = 0
        self._group: tuple[str, str, Callable[[list[int]], None]] | None = None
        self._group_fd: int | None = None

    def subscribe(self, topic: str, group: str, on_assigned, on_revoked) -> None:
        """A single-member group: the member holding ``<topic>/.group-<group>.lock`` reads every
        partition; another process subscribing to the same group waits (its polls return nothing)
        until the holder exits. The lock dies with its process, so a killed member is replaced."""
        if not group or "/" in group or group.startswith("."):
            raise TransportError(f"invalid group name {group!r}")
        self.log.ensure_topic(topic)
        self._group = (topic, group, on_assigned)
        self._try_join()

    def _try_join(self) -> bool:
        if self._group_fd is not None:
            return True
        topic, group, on_assigned = self._group
        path = self.log.topic_dir(topic) / f".group-{group}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._group_fd = fd
        parts = self.partitions(topic)
        for p in parts:
            self._positions.setdefault((topic, p), 0)
        on_assigned(parts)
        return True

    def assigned(self) -> list[tuple[str, int]]:
        if self._group is not None and self._group_fd is None:
            return []
        return sorted(self._positions)

    def close(self) -> None:
        if self._group_fd is not None:
            os.close(self._group_fd)  # releases the flock
            self._group_fd = None

    def partitions(self, topic: str) -> list[int]:
        return list(range(self.log.partition_count(topic)))

    def assign(self, topic: str, offsets: dict[int, int]) -> None:
        for p in self.partitions(topic):
            self._positions[(topic, p)] = offsets.get(p, 0)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._positions[(topic, partition)] = offset

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        deadline = time.monotonic() + timeout_s
        if self._group is not None and not self._try_join():
            while time.monotonic() < deadline:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                if self._try_join():
                    break
            else:
                return []
        while True:
            out: list[Message] = []
            keys = list(self._positions)
            if keys:
                self._rr = (self._rr + 1) % len(keys)
                keys = keys[self._rr :] + keys[: self._rr]
            for tp in keys:
                topic, p = tp
                while len(out) < max_records:
                    msgs = self.log.read(topic, p, self._positions[tp], max_records - len(out))
                    if not msgs:
                        break
                    self._positions[tp] = msgs[-1].offset + 1
                    out.extend(msgs)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def end_offsets(self, topic: str) -> dict[int, int]:
        return {p: self.log.end_offset(topic, p) for p in self.partitions(topic)}

    def positions(self) -> dict[tuple[str, int], int]:
        return dict(self._positions)
