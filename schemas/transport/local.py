"""The embedded transport: a crash-safe, append-only log of standard Avro Object Container Files.

Layout under the log root (``$AGENTLEDGER_HOME/log`` by default)::

    <topic>/meta.json                     {"partitions": N}
    <topic>/<partition>/<base>.avro       a segment: an OCF, one record per block
    <topic>/<partition>/<base>.idx        16 bytes per record: block position, append time (ms)
    <topic>/<partition>/.lock             flock held by the appending process
    <topic>/<partition>/<file>.quarantine-<time>[.json]   bytes a repair cut off, and why (see below)

Offsets work as in Kafka: a partition's records are numbered from 0; a segment's file name is the
offset of its first record. Each segment is a valid OCF that any Avro tool (and DuckDB's
``read_avro``) reads directly; its single writer schema is the one in its header, so a schema
upgrade starts a new segment.

Durability protocol (one appender at a time per partition, under the flock):

1. Every ``os.write`` is checked for its full length and repeated for the rest (a write may be
   short: a full disk, a signal). A write that fails (ENOSPC, EIO, ...) is undone: what it added
   that no reader can have seen (blocks without an index entry, a torn index entry) is truncated
   away again, so a failed append leaves nothing behind that breaks a later open, and `append`
   raises `AppendFailed` (a `NotDurableError`) saying how many values are durable (a prefix) and
   which are not. A whole index entry is never taken back, because a concurrent reader may have
   read it and stored the offset past it: when an index write fails half way, the entries it left
   whole are fsync-ed and count as durable. (After a failed *fsync* nothing is known to be durable
   -- a retried fsync proves nothing -- so the entries stay, reported as not durable, like a message
   Kafka did not acknowledge.)
2. Blocks are written to the segment and the segment is fsync-ed; only then are their index
   entries written and the index fsync-ed. Readers only trust indexed records, and `append` (hence
   `LocalSink.flush`, hence "recorded") returns only after both fsyncs: an acknowledged record's
   bytes and its index entry are on disk.
3. A new segment's header is written and fsync-ed, its empty index created, then the partition
   directory is fsync-ed (and the topic directory, so a new partition's directory entry is
   durable). A topic's meta.json is written to a temporary file, fsync-ed, renamed, and its
   directory fsync-ed. A segment whose creation fails is removed again.

``LocalLog(fsync=False)`` skips the fsyncs (for tests; no command uses it).

Repair on open: the next appender of a partition (under the flock) checks the last segment against
its index before writing -- one stat and a few bytes read when they agree -- and repairs what an
interrupted append (a crash, a full disk with an undo that could not run) left behind:

- a torn index entry (fewer than 16 bytes) is cut;
- a segment without a readable header and without index entries (its creation never finished) is
  removed, so the next append recreates it at the same offset;
- complete, well-formed blocks after the last index entry are indexed (they were fsync-ed but the
  process stopped before their index entries were written; like Kafka, a record that was never
  acknowledged may still appear);
- bytes after the last whole block (a torn block) are cut.

Nothing is dropped silently: cut bytes are first written to ``<file>.quarantine-<time>`` (mode
0600, fsync-ed) next to the file they came from, with ``<file>.quarantine-<time>.json`` saying why,
from which file and byte range, and when; a warning is logged. Those bytes were never acknowledged
(an acknowledged record is indexed, and repair never touches indexed bytes). An operator keeps
them as evidence of the incident or deletes them; `docs/warehouse.md` says how to inspect them.

Damage is a different thing: indexed bytes that are not a whole record (a segment cut short, a
block count or size that makes no sense, a wrong sync marker, a broken segment header, offsets
whose segment is gone). The appender never rewrites indexed bytes: when the last segment is
damaged it starts a new segment after it, so the partition stays appendable. Readers never stop
either: `read` returns each damaged offset as a `Message` with ``damaged`` set and the raw bytes
the index points at (one message per offset; a broken header makes every offset of its segment
such a message, each with its own block's bytes; missing offsets come with no bytes). Ingest turns
them into ``log_damaged`` dead letters and goes on with the rest of the partition and all others.
An I/O error (EIO) is not damage -- it may pass -- and is raised: nothing is quarantined for it.
An index entry that points outside its segment is damage too (a new segment is started).

What another process of the same user can plant is refused, never waited for or followed: a
partition's lock is waited for at most ``lock_timeout_s`` (30 s; a sink's flush timeout, which is
the hook's budget, when shorter), and a segment, index or lock that is a link, FIFO or device, or a
partition directory that is a link, fails the append (`AppendFailed`: fail-closed denies, the
event stays in the producer's outbox) instead of hanging it or writing outside the log.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import stat
import struct
import sys
import time
import zlib
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from .. import codec
from ..errors import DecodeError, NotDurableError, TransportError
from ..locks import flock_within
from .base import Message, Outgoing, PartitionCallback, Scan, Sink, Source

log = logging.getLogger(__name__)

IDX_ENTRY = struct.Struct("<QQ")  # block position, append time in ms
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
_SEGMENT_SUFFIX = ".avro"
QUARANTINE_MODE = 0o600
_QUARANTINE_SEQ = itertools.count()


def partition_for_key(key: bytes, partitions: int) -> int:
    """The local log's partitioner: crc32 of the key (the session id)."""
    return zlib.crc32(key) % partitions


def key_of(value: bytes) -> bytes | None:
    """The key a record was sent with: the log stores none, so it is the session id its envelope
    starts with (read without decoding the body); None when the value has no readable envelope."""
    from ..envelope import peek

    if value[:2] != codec.SOE_MAGIC:
        return None
    try:
        return peek(value).session_id.encode()
    except (DecodeError, ValueError, UnicodeError):
        return None


class AppendFailed(NotDurableError):
    """`LocalLog.append` made only ``values[:durable]`` durable; ``undelivered`` holds the rest (the
    values, in order). Nothing of the failed part is left on disk (or, if even the undo failed, the
    next appender's repair removes it)."""

    def __init__(self, message: str, durable: int, undelivered: list[bytes]):
        super().__init__(message, undelivered)
        self.durable = durable


def _os_error_args(exc: OSError) -> tuple[object, ...]:
    """The arguments that make an OSError (subclass) with ``exc``'s errno, message and file names."""
    if exc.errno is None:
        return exc.args
    return (exc.errno, exc.strerror, exc.filename, None, exc.filename2)


class ShortWriteError(OSError):
    """A write that failed part way (ENOSPC, EIO, ...): ``written`` bytes of it reached the file.
    Same errno and message as the OSError that stopped it (its ``__cause__``)."""

    def __init__(self, cause: OSError, written: int):
        super().__init__(*_os_error_args(cause))
        self.written = written


class PartialAppendError(OSError):
    """`LocalLog._write_blocks` failed, yet its first ``durable_records`` values are durable. Same
    errno and message as the OSError that stopped it (its ``__cause__``)."""

    def __init__(self, cause: OSError, durable_records: int):
        super().__init__(*_os_error_args(cause))
        self.durable_records = durable_records


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written: a write may be short (a full disk, a signal).
    Raises `ShortWriteError` (an OSError: ENOSPC, EIO, ...) when the rest cannot be written; its
    ``written`` attribute says how many bytes were."""
    view = memoryview(data)
    done = 0
    try:
        while done < len(view):
            n = os.write(fd, view[done:])
            if n <= 0:
                raise OSError(errno.EIO, f"write of {len(view) - done} bytes wrote nothing")
            done += n
    except OSError as exc:
        raise ShortWriteError(exc, done) from exc  # ``done``: how much of ``data`` did reach the file


def _plain(path: Path, *, directory: bool = False) -> None:
    """Raise OSError unless ``path`` is absent or a plain regular file (``directory``: a directory),
    not a link, FIFO, socket or device: what is planted in a log (a FIFO blocks whoever opens it, a
    link leads the appender's repairs and writes out of the log) is refused, never followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not ok:
        raise OSError(errno.EINVAL, f"{path} is not a {'directory' if directory else 'regular file'} "
                      "(a link, FIFO or device planted in the log is never followed)")


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
        root: str | Path,
        default_partitions: int = 6,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
        lock_timeout_s: float = 30.0,
    ):
        self.root = Path(root)
        self.default_partitions = default_partitions
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.lock_timeout_s = lock_timeout_s  # longest wait for a partition's (or topic's) lock
        self._partitions: dict[str, int] = {}
        self._headers: dict[Path, tuple[codec.OcfHeader, bytes, bytes]] = {}  # header, fingerprint, its bytes

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
            new_root = not self.root.exists()
            d.mkdir(parents=True, exist_ok=True)
            with self._flock(d / ".lock"):
                if not meta.exists():
                    tmp = d / f".meta.{os.getpid()}.tmp"
                    text = json.dumps({"partitions": partitions or self.default_partitions, "format": 1})
                    try:
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        try:
                            write_all(fd, text.encode())
                            self._sync(fd)
                        finally:
                            os.close(fd)
                        os.replace(tmp, meta)
                    except OSError:
                        _unlink_quietly(tmp)
                        raise
                    self._fsync_dir(d)
                    self._fsync_dir(self.root)
                    if new_root:
                        self._fsync_dir(self.root.parent)
        try:
            n = int(json.loads(meta.read_text())["partitions"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"{meta} is unreadable ({exc}): say how many partitions the topic has "
                                 '({"partitions": N, "format": 1}) to use it again') from exc
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
        """The partition of ``key`` (creates the topic when it does not exist)."""
        return partition_for_key(key, self.ensure_topic(topic))

    # -- segments -------------------------------------------------------------------------
    def _pdir(self, topic: str, partition: int) -> Path:
        return self.topic_dir(topic) / str(partition)

    def segments(self, topic: str, partition: int) -> list[int]:
        d = self._pdir(topic, partition)
        if not d.is_dir():
            return []
        return sorted(int(p.stem) for p in d.iterdir() if p.suffix == _SEGMENT_SUFFIX and p.stem.isdigit())

    def segment_path(self, topic: str, partition: int, base: int) -> Path:
        return self._pdir(topic, partition) / f"{base:020d}{_SEGMENT_SUFFIX}"

    def _open_segment(self, topic: str, partition: int, base: int, fd: int | None = None) -> _Segment:
        """The segment with its parsed header; raises DecodeError (or OSError) when the header is
        unreadable. Headers are cached; given the segment open as ``fd`` (appenders), the cached
        header is first compared with the bytes on disk, so nothing is appended behind a header
        damaged since."""
        path = self.segment_path(topic, partition, base)
        cached = self._headers.get(path)
        if cached is not None and fd is not None and os.pread(fd, len(cached[2]), 0) != cached[2]:
            cached = None
        if cached is None:
            self._headers.pop(path, None)
            if fd is None:
                with open(path, "rb") as f:
                    head = f.read(256 * 1024)
            else:
                head = os.pread(fd, 256 * 1024, 0)
            header = codec.read_ocf_header(head)
            try:
                fp = codec.fingerprint(header.schema)
            except Exception as exc:  # JSON that is no Avro schema (fastavro's errors): damage, like the rest
                raise DecodeError("bad_schema", f"the header's schema is not an Avro schema: {exc!s:.200}") from exc
            cached = (header, fp, head[:header.length])
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
    def _flock(self, path: Path, timeout_s: float | None = None) -> Iterator[None]:
        """The exclusive lock ``path``, waited for at most ``timeout_s`` (default `lock_timeout_s`):
        a process that holds it and never lets go (stopped, hung, or hostile) costs a producer an
        OSError (ETIMEDOUT: the append fails, fail-closed denies), never a hook that hangs."""
        path.parent.mkdir(parents=True, exist_ok=True)
        _plain(path.parent, directory=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            limit = self.lock_timeout_s if timeout_s is None else timeout_s
            if not flock_within(fd, limit):
                raise OSError(errno.ETIMEDOUT, f"{path} is locked by another process for over {limit:g} s "
                              "(a producer that stopped or hangs)")
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fsync(fd)

    def _fsync_dir(self, d: Path) -> None:
        if self.fsync:
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- repair on open ----------------------------------------------------------------------
    def quarantine(self, source: Path, data: bytes, reason: str, first_byte: int | None = None) -> Path:
        """Keep ``data`` (bytes taken out of ``source``) in ``<source>.quarantine-<time>`` (0600,
        fsync-ed) with a ``.json`` beside it saying why. Raises OSError if it cannot be written, in
        which case the caller must not drop the bytes."""
        now = time.time()
        stamp = (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1e6) % 1_000_000:06d}Z"
                 f"-{os.getpid()}-{next(_QUARANTINE_SEQ)}")
        path = source.with_name(f"{source.name}.quarantine-{stamp}")
        facts = {"reason": reason, "source": source.name, "bytes": len(data),
                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
        if first_byte is not None:
            facts.update(first_byte=first_byte, end_byte=first_byte + len(data))
        written = []
        try:
            for p, blob in ((path, data), (path.with_name(path.name + ".json"),
                                            (json.dumps(facts, indent=1) + "\n").encode())):
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, QUARANTINE_MODE)
                written.append(p)
                try:
                    write_all(fd, blob)
                    self._sync(fd)
                finally:
                    os.close(fd)
            self._fsync_dir(path.parent)
        except OSError:
            for p in written:
                _unlink_quietly(p)
            raise
        log.warning("agentledger log: %d bytes of %s quarantined in %s: %s", len(data), source, path.name, reason)
        return path

    def quarantine_message(self, m: Message) -> Path:
        """Keep the bytes of a damaged message (see `read`) in a quarantine file next to its segment."""
        bases = self.segments(m.topic, m.partition)
        i = bisect.bisect_right(bases, m.offset) - 1
        seg = self.segment_path(m.topic, m.partition, bases[i] if i >= 0 else m.offset)
        return self.quarantine(seg, m.value, f"offset {m.offset}: {m.damaged}")

    def _whole_index(self, idx_path: Path) -> int:
        """Whole index entries; a torn entry at the end (an interrupted index write) is cut, kept in quarantine."""
        try:
            size = idx_path.stat().st_size
        except FileNotFoundError:
            return 0
        torn = size % IDX_ENTRY.size
        if torn:
            with open(idx_path, "r+b") as f:
                f.seek(size - torn)
                self.quarantine(idx_path, f.read(), "torn index entry: an index write did not complete "
                                "(never acknowledged)", size - torn)
                f.truncate(size - torn)
                f.flush()
                self._sync(f.fileno())
        return size // IDX_ENTRY.size

    def _tail_consistent(self, seg: _Segment, count: int, fd: int) -> bool:
        """True when the segment (open as ``fd``) ends exactly after its last indexed block (a few bytes read)."""
        size = os.fstat(fd).st_size
        if not count:
            return size == seg.header.length
        with open(seg.idx_path, "rb") as f:
            f.seek((count - 1) * IDX_ENTRY.size)
            last_pos, _ = IDX_ENTRY.unpack(f.read(IDX_ENTRY.size))
        if last_pos >= size:
            return False
        head = os.pread(fd, 20, last_pos)
        try:
            n, p = codec.read_varint(head, 0)
            blen, p = codec.read_varint(head, p)
        except DecodeError:
            return False
        end = last_pos + p + blen + codec.SYNC_LEN
        return n == 1 and size == end and os.pread(fd, codec.SYNC_LEN, end - codec.SYNC_LEN) == seg.header.sync

    def _open_for_append(self, topic: str, partition: int) -> tuple[_Segment | None, int]:
        """The last segment, repaired (see the module doc), and the partition's end offset. The
        segment is None when the next append must start a new one (none yet, or the last one is
        damaged and is left as it is for readers to quarantine)."""
        bases = self.segments(topic, partition)
        if not bases:
            return None, 0
        base = bases[-1]
        path = self.segment_path(topic, partition, base)
        _plain(path)
        _plain(path.with_suffix(".idx"))
        count = self._whole_index(path.with_suffix(".idx"))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            try:
                seg = self._open_segment(topic, partition, base, fd)
            except DecodeError as exc:
                if count:
                    log.error("agentledger log: %s has %d indexed records but its header is unreadable (%s): "
                              "they are quarantined when read; appending to a new segment", path, count, exc)
                    return None, base + count
                self._discard_unfinished(path, f"segment header incomplete ({exc}): its creation never finished")
                return None, base
            if self._tail_consistent(seg, count, fd):
                return seg, base + count  # the common case: nothing to repair
        finally:
            os.close(fd)
        return self._repair_tail(seg, count)

    def _discard_unfinished(self, path: Path, reason: str) -> None:
        """Remove a segment whose creation never finished (no header, no index entry)."""
        data = path.read_bytes()
        if data:
            self.quarantine(path, data, reason, 0)
        else:
            log.warning("agentledger log: removing empty segment %s: %s", path, reason)
        self._headers.pop(path, None)
        for p in (path.with_suffix(".idx"), path):
            _unlink_quietly(p)
        self._fsync_dir(path.parent)

    def _repair_tail(self, seg: _Segment, count: int) -> tuple[_Segment | None, int]:
        """Make the index and the segment agree after an interrupted append; returns (segment, end offset)."""
        if count:
            with open(seg.idx_path, "rb") as f:
                f.seek((count - 1) * IDX_ENTRY.size)
                start, _ = IDX_ENTRY.unpack(f.read(IDX_ENTRY.size))
            if not seg.header.length <= start < seg.path.stat().st_size:
                log.error("agentledger log: %s: indexed record %d points at byte %d, outside the segment; it is "
                          "quarantined when read; appending to a new segment", seg.path, seg.base + count - 1, start)
                return None, seg.base + count
        else:
            start = seg.header.length
        with open(seg.path, "rb") as f:
            f.seek(start)
            data = f.read()
        blocks = _whole_blocks(data, seg.header.sync)
        if count:
            if not blocks:
                # An indexed record that is not a whole block: damage, not an interrupted append.
                log.error("agentledger log: %s: indexed record %d (byte %d) is not a whole block; it is "
                          "quarantined when read; appending to a new segment", seg.path, seg.base + count - 1, start)
                return None, seg.base + count
            end = blocks[0].end
            blocks = blocks[1:]
        else:
            end = 0
        if blocks:
            # Whole blocks that were written (and fsync-ed) before a crash, but never indexed.
            fd = os.open(seg.idx_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                prefix = codec.SOE_MAGIC + seg.fingerprint
                write_all(fd, b"".join(IDX_ENTRY.pack(start + b.position, _event_ms(prefix + b.data)) for b in blocks))
                self._sync(fd)
            finally:
                os.close(fd)
            log.warning("agentledger log: %s: indexed %d whole block(s) an interrupted append left unindexed",
                        seg.path, len(blocks))
            count += len(blocks)
            end = blocks[-1].end
        if len(data) > end:
            self.quarantine(seg.path, data[end:], "torn block after the last whole block: an append did not "
                            "complete (never acknowledged)", start + end)
            with open(seg.path, "r+b") as f:
                f.truncate(start + end)
                f.flush()
                self._sync(f.fileno())
        return seg, seg.base + count

    # -- appending --------------------------------------------------------------------------
    def append(self, topic: str, partition: int, values: list[bytes], lock_timeout_s: float | None = None) -> int:
        """Append single-object-encoded events durably; returns the offset of the first one.

        Raises `AppendFailed` when only a prefix of ``values`` (maybe none) could be made durable
        (the rest left nothing on disk), TransportError for values that are not events.
        ``lock_timeout_s``: the longest wait for the partition's lock (default `lock_timeout_s`)."""
        if not values:
            return self.end_offset(topic, partition)
        for v in values:
            if v[:2] != codec.SOE_MAGIC or len(v) < codec.SOE_HEADER_LEN:
                raise TransportError("local log only stores single-object-encoded Avro events")
        done = 0
        try:
            self.ensure_topic(topic)
            pdir = self._pdir(topic, partition)
            with self._flock(pdir / ".lock", lock_timeout_s):
                seg, end = self._open_for_append(topic, partition)
                first = end
                while done < len(values):
                    fp = values[done][2:10]
                    j = done
                    while j < len(values) and values[j][2:10] == fp:
                        j += 1
                    if seg is None or seg.fingerprint != fp or seg.path.stat().st_size >= self.segment_bytes:
                        seg = self._new_segment(topic, partition, end, fp)
                    end += self._write_blocks(seg, values[done:j])
                    done = j
                return first
        except (OSError, ValueError) as exc:  # (ValueError: an offset no file can have, read from damage)
            if isinstance(exc, PartialAppendError):
                done += exc.durable_records
            raise AppendFailed(f"{topic}/{partition}: {len(values) - done} of {len(values)} events not written: "
                               f"{exc}", done, values[done:]) from exc

    def _new_segment(self, topic: str, partition: int, base: int, fp: bytes) -> _Segment:
        from ..contract import load_store

        version = load_store().by_fingerprint(fp)
        if version is None:
            raise TransportError(f"unknown writer schema fingerprint {fp.hex()}: refusing to write it")
        path = self.segment_path(topic, partition, base)
        idx_path = path.with_suffix(".idx")
        header = codec.ocf_header(
            version.schema,
            _sync_marker(topic, partition, base),
            {"agentledger.topic": topic.encode(), "agentledger.partition": str(partition).encode(),
             "agentledger.base_offset": str(base).encode()},
        )
        created = []
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            created.append(path)
            try:
                write_all(fd, header)
                self._sync(fd)
            finally:
                os.close(fd)
            os.close(os.open(idx_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            created.append(idx_path)
            self._fsync_dir(path.parent)
            if base == 0:
                self._fsync_dir(path.parent.parent)  # a new partition: its directory entry too
        except OSError:
            # A segment that cannot be created completely is not left behind (else every later open fails).
            self._headers.pop(path, None)
            for p in reversed(created):
                _unlink_quietly(p)
            try:
                self._fsync_dir(path.parent)
            except OSError:
                pass  # the next appender's repair removes whatever is left
            raise
        return self._open_segment(topic, partition, base)

    def _write_blocks(self, seg: _Segment, values: list[bytes]) -> int:
        """Append ``values`` as blocks, then their index entries (see the module doc). On failure the
        OSError raised is a `PartialAppendError`, whose ``durable_records`` says how many of ``values``
        are durable anyway."""
        sync = seg.header.sync
        chunks = [codec.ocf_block(v[10:], sync) for v in values]
        # The index timestamp is the event's own time (like Kafka's CreateTime), not the wall clock,
        # so that the same events make byte-identical logs, index included.
        stamps = [_event_ms(v) for v in values]
        fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        try:
            seg_size = os.fstat(fd).st_size
            pos = seg_size
            positions = []
            for c in chunks:
                positions.append(pos)
                pos += len(c)
            try:
                write_all(fd, b"".join(chunks))
                self._sync(fd)
            except OSError:
                self._undo(fd, seg_size, seg.path)  # unindexed bytes: no reader has seen them
                raise
        finally:
            os.close(fd)
        try:
            fd = os.open(seg.idx_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            self._undo_path(seg.path, seg_size)
            raise
        entries = b"".join(IDX_ENTRY.pack(p, t) for p, t in zip(positions, stamps))
        try:
            idx_size = os.fstat(fd).st_size
            written = 0
            try:
                write_all(fd, entries)
                written = len(entries)
                self._sync(fd)
            except OSError as exc:
                # A whole index entry on disk may have been read already (by a concurrent ingest), so
                # it is never taken back: its offset must keep meaning this record. The entries a
                # failed write left whole are fsync-ed and count as durable; only a torn entry (no
                # reader counts it) and the blocks without an entry are cut. After a failed fsync
                # nothing is known to be durable (a retried fsync proves nothing): the entries stay,
                # reported as not durable, like a message Kafka did not acknowledge.
                fsync_failed = written == len(entries)
                short = exc.written if isinstance(exc, ShortWriteError) else 0
                whole = len(values) if fsync_failed else short // IDX_ENTRY.size
                durable = 0
                if whole and not fsync_failed:
                    try:
                        self._sync(fd)
                        durable = whole
                    except OSError:
                        pass
                self._undo(fd, idx_size + whole * IDX_ENTRY.size, seg.idx_path)
                if whole < len(values):
                    self._undo_path(seg.path, positions[whole])
                raise PartialAppendError(exc, durable) from exc
        finally:
            os.close(fd)
        return len(values)

    def _undo(self, fd: int, size: int, path: Path) -> None:
        """Truncate a file back to ``size`` after a failed write (best effort: repair covers the rest)."""
        try:
            os.ftruncate(fd, size)
            self._sync(fd)
        except OSError as exc:
            log.error("agentledger log: could not undo a failed write to %s (%s); the next appender repairs it",
                      path, exc)

    def _undo_path(self, path: Path, size: int) -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            log.error("agentledger log: could not undo a failed write to %s (%s)", path, exc)
            return
        try:
            self._undo(fd, size, path)
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------------------
    def read(self, topic: str, partition: int, offset: int, max_records: int) -> list[Message]:
        """Up to ``max_records`` indexed records from ``offset`` on (within one segment). Offsets that
        cannot be read back whole come back as messages with ``damaged`` set (see the module doc)."""
        got = self.read_raw(topic, partition, offset, max_records)
        return got.messages() if isinstance(got, RawRange) else got

    def read_raw(self, topic: str, partition: int, offset: int, max_records: int) -> "RawRange | list[Message]":
        """What `read` returns, as the raw bytes it is made of: a `RawRange` (the segment bytes that
        hold the records, their index positions and the segment's sync marker and writer schema),
        whose `RawRange.messages` are exactly `read`'s messages; or, where there are no such bytes
        (offsets missing, nothing to read), `read`'s list of messages itself. One read of each file,
        no per-record work: ingest hands a `RawRange` to the native decoder as it is."""
        bases = self.segments(topic, partition)
        if not bases or max_records <= 0:
            return []
        if offset < bases[0]:
            return _missing(topic, partition, offset, min(bases[0], offset + max_records),
                            f"offsets_missing: offsets {offset}..{bases[0] - 1} are not in the log "
                            f"(its first segment starts at {bases[0]})")
        i = bisect.bisect_right(bases, offset) - 1
        base = bases[i]
        nxt = bases[i + 1] if i + 1 < len(bases) else None
        limit = max_records if nxt is None else min(max_records, nxt - offset)
        path = self.segment_path(topic, partition, base)
        try:
            with open(path.with_suffix(".idx"), "rb") as f:
                f.seek((offset - base) * IDX_ENTRY.size)
                raw = f.read((limit + 1) * IDX_ENTRY.size)
        except FileNotFoundError:
            raw = b""
        n = len(raw) // IDX_ENTRY.size
        if n == 0:
            if nxt is None:
                return []
            return _missing(topic, partition, offset, offset + limit,
                            f"offsets_missing: the index of segment {path.name} ends before offset {offset}; "
                            f"the next segment starts at {nxt}")
        take = min(n, limit)
        positions = array("Q")
        positions.frombytes(raw[:n * IDX_ENTRY.size])
        if sys.byteorder != "little":
            positions.byteswap()
        # Damaged bytes are data (quarantined per offset); an I/O error is not (it may pass): it is raised.
        try:
            seg = self._open_segment(topic, partition, base)
            header_error = None
        except DecodeError as exc:
            seg, header_error = None, f"bad_segment_header: {path.name}: {exc}"
        except FileNotFoundError as exc:
            return _missing(topic, partition, offset, offset + take, f"offsets_missing: {path.name}: {exc}")
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                # each record lies between its index position and the next one's (the file end for the last)
                starts = positions[0:2 * take:2]
                ends = [*positions[2:2 * take + 1:2], *([size] if take == n else [])]
                lo = min(min(starts), size)
                hi = min(max(max(ends), lo), size)
                f.seek(lo)
                data = f.read(hi - lo)
        except FileNotFoundError as exc:
            return _missing(topic, partition, offset, offset + take, f"offsets_missing: {path.name}: {exc}")
        return RawRange(topic, partition, offset, take, data, lo, size, positions, n,
                        None if seg is None else seg.header.sync,
                        None if seg is None else codec.SOE_MAGIC + seg.fingerprint, header_error, path.name)


@dataclass
class RawRange:
    """``count`` records of a partition from ``offset`` on, as raw bytes (see `LocalLog.read_raw`):
    ``data`` is the segment from byte ``lo`` on; ``positions`` the index entries read (block
    position, append time, ..., ``entries`` pairs; record k's bytes run from its position to the
    next entry's, or to the file ``size`` for the last entry); ``sync`` and ``prefix`` (magic and
    fingerprint) come from the segment header, None when it is unreadable (``header_error``)."""

    topic: str
    partition: int
    offset: int
    count: int
    data: bytes
    lo: int
    size: int
    positions: array[int]
    entries: int
    sync: bytes | None
    prefix: bytes | None
    header_error: str | None
    name: str
    frame_kind: ClassVar[int] = 2  # schemas.native.chunks_frame: an embedded-log chunk

    def span(self, k: int) -> tuple[int, int]:
        """Record k's bytes, as file positions."""
        pos = self.positions
        return pos[2 * k], (pos[2 * k + 2] if k + 1 < self.entries else self.size)

    @property
    def end_positions(self) -> list[int]:
        """The ``count`` record positions, then the end of the last record (file positions)."""
        return [*self.positions[0:2 * self.count:2], self.span(self.count - 1)[1]]

    def messages(self) -> list[Message]:
        """Exactly the messages `LocalLog.read` returns for this range."""
        out = []
        data, lo, topic, partition, offset = self.data, self.lo, self.topic, self.partition, self.offset
        sync, prefix = self.sync, self.prefix  # both None (or both set): the segment header is unreadable
        pos = self.positions
        problem: str | None
        for k in range(self.count):
            s, e = self.span(k)
            rs, rend = min(max(s - lo, 0), len(data)), min(max(e - lo, 0), len(data))
            if sync is not None and prefix is not None:
                body, problem = _block_at(data, s - lo, rend, sync)
                if body is not None:
                    out.append(Message(topic, partition, offset + k, None, prefix + body, pos[2 * k + 1]))
                    continue
                problem = f"{problem} ({self.name}, record at byte {s})"
            else:
                problem = self.header_error
            out.append(Message(topic, partition, offset + k, None, data[rs:max(rs, rend)], pos[2 * k + 1], problem))
        return out


def _block_at(data: bytes, pos: int, end: int, sync: bytes) -> tuple[bytes | None, str]:
    """The record of the one-record block at ``pos`` that must end by ``end``, or (None, why not)."""
    if pos < 0 or pos >= len(data):
        return None, "truncated: the segment ends before the record's position"
    try:
        count, p = codec.read_varint(data, pos, end)
        size, p = codec.read_varint(data, p, end)
    except DecodeError as exc:
        kind = "truncated" if exc.reason == "truncated" and end >= len(data) else "bad_block"
        return None, f"{kind}: block header: {exc.detail}"
    if count != 1 or size < 0:
        return None, f"bad_block: block count {count}, size {size} (one record per block expected)"
    stop = p + size + codec.SYNC_LEN
    if stop > end:
        if stop > len(data) and end >= len(data):
            return None, f"truncated: the record is cut short ({size}-byte body, {len(data) - p} bytes there)"
        return None, f"bad_block: a {size}-byte body runs past the next record"
    if data[p + size:stop] != sync:
        return None, "bad_sync: the block does not end with the segment's sync marker"
    return data[p:p + size], ""


def _missing(topic: str, partition: int, first: int, stop: int, why: str) -> list[Message]:
    return [Message(topic, partition, o, None, b"", 0, why) for o in range(first, stop)]


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _event_ms(value: bytes) -> int:
    from ..envelope import peek

    try:
        return max(0, peek(value).occurred_at_us // 1000)
    except DecodeError:
        return int(time.time() * 1000)


def _whole_blocks(data: bytes, sync: bytes) -> list[codec.RawBlock]:
    """The well-formed one-record blocks at the start of ``data``, up to the first torn or corrupt one."""
    out = []
    try:
        for b in codec.iter_ocf_blocks(data, sync, 0):
            if b.count != 1:
                break
            out.append(b)
    except DecodeError:
        pass  # everything after the last good block was never acknowledged: it is cut (and kept)
    return out


def append_outgoing(target: LocalLog, pending: list[Outgoing], partition_of: Callable[[Outgoing], int],
                    lock_timeout_s: float | None = None) -> None:
    """Append ``pending`` to ``target``, one append per (topic, partition), send order kept within each.
    Every group is tried, so one full or broken partition does not hold back the others. On failure
    raises `NotDurableError` whose ``undelivered`` are exactly the messages that are not durable, in
    send order: per partition (so per session) a suffix of what was sent."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, m in enumerate(pending):
        groups.setdefault((m.topic, partition_of(m)), []).append(i)
    failed: list[int] = []
    first_error: Exception | None = None
    for (topic, partition), idxs in groups.items():
        try:
            target.append(topic, partition, [pending[i].value for i in idxs], lock_timeout_s)
        except AppendFailed as exc:
            failed.extend(idxs[exc.durable:])
            first_error = first_error or exc
        except (OSError, TransportError) as exc:
            failed.extend(idxs)
            first_error = first_error or exc
    if first_error is not None:
        raise NotDurableError(f"local log append failed: {first_error}",
                              [pending[i] for i in sorted(failed)]) from first_error


class LocalSink(Sink):
    """Buffers sends per partition and makes them durable on `flush` (fsync): a message is in flight
    from `send` until the flush that appends it (or until ``max_buffered`` are waiting)."""

    def __init__(self, log: LocalLog, max_buffered: int = 5000):
        self.log = log
        self.max_buffered = max_buffered
        self._pending: list[Outgoing] = []
        self._acked = 0
        self._aborted = False

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        self.log.ensure_topic(topic, partitions)

    def partition_for(self, topic: str, key: bytes) -> int | None:
        n = self.log.partition_count(topic)
        return partition_for_key(key, n) if n else None

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        if self._aborted:
            raise NotDurableError("the local log sink was aborted", [Outgoing(topic, key, value)])
        self._pending.append(Outgoing(topic, key, value))
        if len(self._pending) >= self.max_buffered:
            self.flush()

    def flush(self, timeout: float | None = None) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            parts = {m.topic: self.log.ensure_topic(m.topic) for m in pending}
        except (OSError, TransportError) as exc:
            raise NotDurableError(f"local log append failed: {exc}", pending) from exc
        try:
            append_outgoing(self.log, pending, lambda m: partition_for_key(m.key, parts[m.topic]), timeout)
        except NotDurableError as exc:
            self._acked += len(pending) - len(exc.undelivered)
            raise
        self._acked += len(pending)

    def in_flight(self) -> int:
        return len(self._pending)

    def acknowledged(self) -> int:
        return self._acked

    def unacknowledged(self) -> list[Outgoing]:
        out, self._pending = self._pending, []
        return out

    def abort(self) -> None:
        """Nothing still buffered is written (`unacknowledged` hands it back)."""
        self._aborted = True

    def close(self, timeout: float | None = None) -> None:
        if not self._aborted:
            self.flush(timeout)


class LocalSource(Source):
    def __init__(self, log: LocalLog):
        self.log = log
        self._positions: dict[tuple[str, int], int] = {}
        self._rr = 0
        self._group: tuple[str, str, PartitionCallback] | None = None
        self._group_fd: int | None = None

    def subscribe(self, topic: str, group: str, on_assigned: PartitionCallback, on_revoked: PartitionCallback) -> None:
        """A single-member group: the member holding ``<topic>/.group-<group>.lock`` reads every
        partition; another process subscribing to the same group waits (its polls return nothing)
        until the holder exits. The lock dies with its process, so a killed member is replaced."""
        if not group or "/" in group or group.startswith("."):
            raise TransportError(f"invalid group name {group!r}")
        self.log.ensure_topic(topic)
        self._group = (topic, group, on_assigned)
        self._try_join(self._group)

    def _try_join(self, member: tuple[str, str, PartitionCallback]) -> bool:
        if self._group_fd is not None:
            return True
        topic, group, on_assigned = member
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
        return [m for got in self._poll(max_records, timeout_s)
                for m in (got.messages() if isinstance(got, RawRange) else got)]

    def poll_raw(self, max_records: int, timeout_s: float) -> "list[RawRange | list[Message]]":
        """What `poll` returns, as `LocalLog.read_raw` results in order (a `RawRange`'s messages are
        ``.messages()``): the same records, read the same way, without a Python object per record."""
        return self._poll(max_records, timeout_s)

    def _poll(self, max_records: int, timeout_s: float) -> list[RawRange | list[Message]]:
        deadline = time.monotonic() + timeout_s
        member = self._group
        if member is not None and not self._try_join(member):
            while time.monotonic() < deadline:
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                if self._try_join(member):
                    break
            else:
                return []
        while True:
            out: list[RawRange | list[Message]] = []
            count = 0
            keys = list(self._positions)
            if keys:
                self._rr = (self._rr + 1) % len(keys)
                keys = keys[self._rr :] + keys[: self._rr]
            for tp in keys:
                topic, p = tp
                while count < max_records:
                    got = self.log.read_raw(topic, p, self._positions[tp], max_records - count)
                    if isinstance(got, RawRange):
                        n, last = got.count, got.offset + got.count - 1
                    else:
                        if not got:
                            break
                        n, last = len(got), got[-1].offset
                    self._positions[tp] = last + 1
                    out.append(got)
                    count += n
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def end_offsets(self, topic: str) -> dict[int, int]:
        return {p: self.log.end_offset(topic, p) for p in self.partitions(topic)}

    def record_at(self, topic: str, partition: int, offset: int) -> bytes | None:
        try:
            got = self.log.read(topic, partition, offset, 1)
        except (OSError, TransportError):
            return None
        return got[0].value if got and got[0].offset == offset and got[0].damaged is None else None

    def partition_for(self, topic: str, key: bytes) -> int | None:
        n = self.log.partition_count(topic)
        return partition_for_key(key, n) if n else None

    def scan(self, topic: str, partition: int, start: int | None = None, *, key: bytes | None = None,
             max_found: int | None = None, timeout_s: float = 120) -> Scan:
        """The log stores no keys: with ``key``, a record's key is its session id (`key_of`)."""
        end = self.log.end_offset(topic, partition)
        bases = self.log.segments(topic, partition)
        begin = bases[0] if bases else 0
        first = begin if start is None or start < begin or start > end else start
        out: list[Message] = []
        off = first
        while off < end:
            msgs = self.log.read(topic, partition, off, min(50_000, end - off))
            if not msgs:
                break
            for m in msgs:
                if key is None:
                    out.append(m)
                elif m.damaged is None and key_of(m.value) == key:
                    out.append(Message(m.topic, m.partition, m.offset, key, m.value, m.timestamp_ms))
                if max_found is not None and len(out) >= max_found:
                    return Scan(out, first, end)
            off = msgs[-1].offset + 1
        return Scan(out, first, end)

    def positions(self) -> dict[tuple[str, int], int]:
        return dict(self._positions)
