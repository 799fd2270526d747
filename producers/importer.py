"""Importing agent records (Codex rollouts, Claude Code transcripts, OTLP/JSON logs) into the event
stream, incrementally.

One run:

1. Each input file is compared with what was imported before (device, inode, size, mtime, a
   digest of its head): unchanged files are skipped, grown files are read from their stored offset
   with the parser context saved last time, replaced or truncated files are read again from the
   start. Only complete lines are consumed: an unterminated last line (a file still being
   written) is left for the next run.
2. Every file is parsed into observations (see codex_rollout.py, claude_transcript.py, otel.py);
   problems are counted
   per file and unusable lines are kept in the ``rejects`` table with their offset.
3. Per session, all observations of this run -- rollout and OTel alike -- are merged in time
   order and appended by `SessionAppender` (one chain per session, each fact once, outbox).
   Sessions with no activity for ``end_idle_s`` get a session_ended (sources have no end record).
4. Only then are the new file offsets committed. A crash before that re-reads the same bytes next
   time; their facts are already recorded, so nothing is added twice.

Guarantee: re-importing the same bytes adds no event; a grown file adds only events for facts not
recorded yet; the rollout and the OTel log of one session, imported together or in either order,
make one session with one gapless chain.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from agentledger.schemas.config import Settings

from .claude_transcript import ClaudeTranscriptParser
from .claude_transcript import SOURCE as CLAUDE_SOURCE
from .codex_rollout import RolloutParser
from .codex_rollout import SOURCE as CODEX_SOURCE
from .counts import FileCounts
from .coverage import for_parser as coverage_for
from .importstate import ProducerState
from .ledger import AppendResult, EndRule, Observation, SessionAppender, SessionInfo, producer_transforms
from .normalize import JSONTooDeep, loads_bounded
from .otel import OtelParser
from .redact import redactor_of

log = logging.getLogger(__name__)

HEAD_LEN = 4096
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors and tools put before the first line
SETTLE_S = 60.0  # a file untouched this long is not being written: its unterminated tail counts
ROLLOUT_SUFFIXES = (".jsonl",)
OTEL_SUFFIXES = (".json", ".jsonl", ".ndjson", ".otlp")
CLAUDE_SUFFIXES = (".jsonl",)
PARSERS = {"codex_rollout": RolloutParser, "otel": OtelParser, "claude_code": ClaudeTranscriptParser}
AGENT_OF = {"codex_rollout": ("codex", None, "codex_rollout"), "otel": ("unknown", None, "otel"),
            "claude_code": ("claude-code", None, CLAUDE_SOURCE)}
KIND_COMMAND = {"codex_rollout": "import codex-rollout", "otel": "import otel", "claude_code": "import claude-code"}
SUFFIXES = {"codex_rollout": ROLLOUT_SUFFIXES, "otel": OTEL_SUFFIXES, "claude_code": CLAUDE_SUFFIXES}
# Keys every Claude Code conversation entry has and no Codex rollout line or OTLP document does.
_CLAUDE_KEYS = frozenset({"sessionId", "parentUuid", "isSidechain", "leafUuid"})
_CLAUDE_STARTS = (b'{"parentUuid":', b'{"type":"summary"', b'{"type":"file-history-snapshot"')
_CLAUDE_TYPES = frozenset({"user", "assistant", "summary", "system", "file-history-snapshot", "queue-operation"})
# Limits on what one source may make the importer hold: files are read in chunks, a line longer than
# MAX_LINE_BYTES is skipped without being held (kept as a reject: offset, length, redacted excerpt),
# JSON nested deeper than MAX_JSON_DEPTH is refused (normalize.loads_bounded), and a file that is one
# pretty-printed OTLP document (which can only be parsed whole) may be at most MAX_DOCUMENT_BYTES.
CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = 16 << 20
MAX_DOCUMENT_BYTES = 64 << 20
REJECT_SCAN_BYTES = 64 * 1024  # of an unusable line, what is scanned for secrets before its excerpt is kept
REJECT_EXCERPT_CHARS = 200


@dataclass
class FileReport:
    path: str
    kind: str
    status: str = "new"  # new | grown | unchanged | rewritten | pending | error
    from_offset: int = 0
    to_offset: int = 0
    sessions: list = field(default_factory=list)
    observations: int = 0
    counts: FileCounts = field(default_factory=FileCounts)  # this run's
    error: str | None = None
    earlier: FileCounts = field(default_factory=FileCounts)  # what earlier imports of this file found

    @property
    def total(self) -> FileCounts:
        """The file's counts over every import of it (earlier runs and this one)."""
        t = FileCounts.from_dict(self.earlier.as_dict())
        t.pending_tail_bytes = 0  # a tail is pending now or not at all, never cumulative
        t.add(self.counts)
        return t

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "status": self.status, "from_offset": self.from_offset,
                "to_offset": self.to_offset, "bytes_read": self.to_offset - self.from_offset,
                "sessions": self.sessions, "observations": self.observations, "counts": self.counts.as_dict(),
                "problems": self.counts.problems, "problems_earlier": self.earlier.problems, "error": self.error}


@dataclass
class ImportReport:
    files: list[FileReport] = field(default_factory=list)
    sessions: list[AppendResult] = field(default_factory=list)
    resent: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    rejects: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (path, format) found under directories, of the other format
    wanted: tuple = ()  # the formats asked for

    @property
    def events_added(self) -> int:
        return sum(s.added for s in self.sessions)

    def totals(self) -> dict:
        statuses: dict[str, int] = {}
        for f in self.files:
            statuses[f.status] = statuses.get(f.status, 0) + 1
        total = FileCounts()
        for f in self.files:
            total.add(f.counts)
        kinds: dict[str, int] = {}
        for s in self.sessions:
            for k, n in s.kinds.items():
                kinds[k] = kinds.get(k, 0) + n
        return {"files": len(self.files), **{f"files_{k}": v for k, v in sorted(statuses.items())},
                "files_skipped": len(self.skipped),
                "sessions": len({s.session_id for s in self.sessions}),
                "observations": sum(f.observations for f in self.files),
                "events_added": self.events_added, "already_recorded": sum(s.already_recorded for s in self.sessions),
                "merged": sum(s.merged for s in self.sessions), "resent": self.resent, "kinds": kinds,
                "problems": sum(f.counts.problems for f in self.files),
                "problems_earlier": sum(f.earlier.problems for f in self.files), "counts": total.as_dict()}

    def nothing_usable(self) -> str | None:
        """Why this run read nothing valid (no file of the format, or no record any file holds is of
        its format, this time or before), else None. Files with no complete line yet are neutral."""
        if not self.files:
            what = " or ".join(k.replace("_", " ") for k in self.wanted) or "input"
            msg = f"no {what} files found"
            if self.skipped:
                other: dict[str, int] = {}
                for _, k in self.skipped:
                    other[k] = other.get(k, 0) + 1
                msg += "; skipped " + ", ".join(
                    f"{n} file(s) that look like {k.replace('_', ' ')} (agentledger {KIND_COMMAND[k]})"
                    for k, n in sorted(other.items()))
            return msg
        readable = [f for f in self.files if f.status != "error"]
        with_lines = [f for f in readable if f.total.lines > f.total.blank]
        if readable and with_lines and not any(f.total.recognised for f in with_lines):
            names = ", ".join(os.path.basename(f.path) for f in with_lines[:3]) + (" …" if len(with_lines) > 3 else "")
            return (f"no record of the expected format in {len(with_lines)} file(s) ({names}): "
                    f"{sum(f.total.problems for f in with_lines)} problems")
        return None

    def as_dict(self) -> dict:
        return {"totals": self.totals(), "files": [f.as_dict() for f in self.files],
                "sessions": [s.as_dict() for s in self.sessions], "seconds": round(self.seconds, 3),
                "dry_run": self.dry_run, "rejects": self.rejects[:100],
                "skipped": [{"path": p, "format": k} for p, k in self.skipped[:100]],
                "nothing_usable": self.nothing_usable()}


def _claude_line(line: bytes) -> bool:
    try:
        obj = loads_bounded(line[len(BOM):] if line.startswith(BOM) else line)
    except ValueError:
        return False
    if not isinstance(obj, dict) or "payload" in obj or not isinstance(obj.get("type"), str):
        return False
    return (bool(_CLAUDE_KEYS & set(obj)) and obj.get("type") in _CLAUDE_TYPES) or \
        obj.get("type") in ("summary", "file-history-snapshot")


class NotRegularFile(OSError):
    """A path the importer does not read: not a regular file, or a link it does not follow."""


_FILE_TYPES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))
NOT_FOLLOWED = "a symbolic link under a directory is not followed (name the file itself to import it)"


def _not_regular(mode: int) -> str | None:
    """Why a file of this mode is not read, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")
    return f"{what}, not a regular file: not read"


def open_regular(path: str, follow: bool = True) -> tuple[BinaryIO, os.stat_result]:
    """``path`` opened for reading, with its stat, when it is a regular file; else `NotRegularFile`.
    A FIFO, socket or device is never opened (stat first; and the open is non-blocking, so a file
    swapped for a FIFO after that cannot hang the import: fstat tells, and it is refused).
    ``follow``: False for files found under a directory: a symbolic link is not followed (O_NOFOLLOW),
    to wherever it leads; a path named by the user is theirs to choose."""
    st = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise NotRegularFile(NOT_FOLLOWED)
    if (why := _not_regular(st.st_mode)) is not None:
        raise NotRegularFile(why)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow and exc.errno == errno.ELOOP:
            raise NotRegularFile(NOT_FOLLOWED) from None
        raise
    try:
        st = os.fstat(fd)
        if (why := _not_regular(st.st_mode)) is not None:
            raise NotRegularFile(why)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def sniff(path: str, follow: bool = True) -> str | None:
    """The format of a file from its first bytes: "otel", "codex_rollout", "claude_code", or None
    (unclear, or not a regular file: see `open_regular`). A Claude Code transcript is told by the
    keys of its first complete line, before any marker is searched (its messages may quote rollouts
    or OTLP documents)."""
    try:
        f, _ = open_regular(path, follow)
        with f:
            head = f.read(65536)
    except OSError:
        return None
    if b"\n" in head and _claude_line(head.split(b"\n", 1)[0].rstrip(b"\r")):
        return "claude_code"
    if b"\n" not in head and head.removeprefix(BOM).startswith(_CLAUDE_STARTS):  # a first line over 64 KiB
        return "claude_code"
    if any(m in head for m in (b'"resourceLogs"', b'"resource_logs"', b'"logRecords"', b'"log_records"')):
        return "otel"
    if any(m in head for m in (b'"session_meta"', b'"turn_context"', b'"response_item"', b'"event_msg"',
                               b'"record_type"')):
        return "codex_rollout"
    first_line = head.split(b"\n", 1)[0]
    try:
        obj = loads_bounded(first_line)
    except ValueError:
        return None
    if isinstance(obj, dict) and ("payload" in obj and "type" in obj or {"id", "timestamp"} <= set(obj)):
        return "codex_rollout"
    return None


def discover(paths: Iterable[str | Path], kind: str, skipped: list[tuple[str, str]] | None = None,
             refused: list[tuple[str, str, str]] | None = None) -> list[tuple[str, str, bool]]:
    """(path, format, named) of the files named (named = True) and of the files under the directories
    named (recursively, by suffix). A named file that is clearly of the other format is imported as
    that format; under directories only files of the wanted format are taken (sniffed from their
    first bytes), the others are added to ``skipped``. Under directories, symbolic links are not
    followed (links to directories are not descended into, as ever; links to files are not read)
    and only regular files are opened: the others are added to ``refused`` as (path, format, why)."""
    suffixes = SUFFIXES[kind]
    out: list[tuple[str, str, bool]] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if f.endswith(suffixes) and not f.startswith("."):
                        full = os.path.abspath(os.path.join(root, f))
                        try:
                            mode = os.lstat(full).st_mode
                        except OSError:
                            continue  # (gone since it was listed)
                        why = NOT_FOLLOWED if stat.S_ISLNK(mode) else _not_regular(mode)
                        if why is not None:
                            if refused is not None:
                                refused.append((full, kind, why))
                            continue
                        found = sniff(full, follow=False) or kind
                        if found == kind:
                            out.append((full, kind, False))
                        elif skipped is not None:
                            skipped.append((full, found))
        else:
            full = os.path.abspath(str(p))
            out.append((full, sniff(full) or kind, True))
    return out


@dataclass
class _Line:
    offset: int
    raw: bytes  # the line without its newline; of a line over MAX_LINE_BYTES only the first REJECT_SCAN_BYTES
    length: int
    too_long: bool = False


class _LineReader:
    """The complete lines of a file between ``start`` and ``stop``, read in chunks: at most about
    MAX_LINE_BYTES + CHUNK_BYTES are held, whatever the file holds. After iterating, ``end`` is the
    offset after the last line consumed and ``pending`` the size of an unterminated tail left for
    the next run (consumed only once the file has settled, or when it is a complete JSON object)."""

    def __init__(self, f, start: int, stop: int, settled: bool):
        self.f, self.start, self.stop, self.settled = f, start, stop, settled
        self.end = start
        self.pending = 0

    def __iter__(self):
        f = self.f
        f.seek(self.start)
        pos = self.start  # file offset of buf[0]
        buf = bytearray()
        skip: _Line | None = None  # a line over the limit, being skipped to its newline
        remaining = self.stop - self.start
        while remaining > 0:
            chunk = f.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            if skip is not None:
                nl = chunk.find(b"\n")
                if nl < 0:
                    skip.length += len(chunk)
                    continue
                skip.length += nl
                yield skip
                pos = skip.offset + skip.length + 1
                self.end = pos
                skip = None
                chunk = chunk[nl + 1:]
            buf += chunk
            i = 0
            while True:
                nl = buf.find(b"\n", i)
                if nl < 0:
                    break
                with memoryview(buf) as view:  # (one copy of the line, not two)
                    if nl - i > MAX_LINE_BYTES:
                        line = _Line(pos + i, bytes(view[i:i + REJECT_SCAN_BYTES]), nl - i, too_long=True)
                    else:
                        line = _Line(pos + i, bytes(view[i:nl]), nl - i)
                yield line
                i = nl + 1
            del buf[:i]
            pos += i
            self.end = pos
            if len(buf) > MAX_LINE_BYTES:
                skip = _Line(pos, bytes(buf[:REJECT_SCAN_BYTES]), len(buf), too_long=True)
                buf = bytearray()
        if skip is not None:  # an unterminated tail over the limit
            if self.settled:
                yield skip
                self.end = self.stop
            else:
                self.pending = skip.length
        elif buf.strip():
            # A complete JSON *object* cannot be the prefix of a longer one-line object, so such a tail
            # is a whole record even while the file is written (hand-made files often lack the final
            # newline); anything else waits until the file has settled.
            tail = bytes(buf)
            try:
                obj = loads_bounded(tail[len(BOM):] if pos == 0 and tail.startswith(BOM) else tail)
            except ValueError:
                obj = None
            if isinstance(obj, dict) or (obj is not None and self.settled):
                yield _Line(pos, tail, len(tail))
                self.end = self.stop
            else:
                self.pending = len(tail)
        else:
            self.end = pos + len(buf)


def _decode(raw: bytes, counts: FileCounts) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts.non_utf8 += 1
        return raw.decode("utf-8", "replace")


def _one_document(f, size: int) -> bool:
    """Whether an OTel file is one (pretty-printed) JSON document rather than JSON lines: it starts
    with ``{`` and its first line is not JSON by itself."""
    head = f.read(min(size, 65536))
    head = head[len(BOM):] if head.startswith(BOM) else head
    if head.lstrip()[:1] != b"{" or (b"\n" not in head and size > len(head)):
        return False
    try:
        loads_bounded(head.split(b"\n", 1)[0])
    except ValueError:
        return True
    return False


def _parse_file(path: str, kind: str, row: dict | None, file_index: int, now: float, idle_s: float,
                report: FileReport, rejects: list, ids: Callable = lambda obj: obj,
                follow: bool = True) -> tuple[object | None, dict | None]:
    """Parse what is new in one file. ``ids``: redacts the agent's ids in a parsed record
    (`Redactor.redact_ids_in`) before the parser sees it, so every id the parser keeps (its
    context, observations, fact keys) is the redacted one. ``follow``: see `open_regular`."""
    f, st = open_regular(path, follow)
    with f:
        return _parse_open(f, st, path, kind, row, file_index, now, idle_s, report, rejects, ids)


def _parse_open(f: BinaryIO, st: os.stat_result, path: str, kind: str, row: dict | None, file_index: int, now: float,
                idle_s: float, report: FileReport, rejects: list, ids: Callable) -> tuple[object | None, dict | None]:
    settled = now - st.st_mtime >= SETTLE_S
    same_file = row is not None and row["dev"] == st.st_dev and row["inode"] == st.st_ino
    if same_file and row["size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns and row["offset"] == st.st_size:
        report.status = "unchanged"
        report.from_offset = report.to_offset = row["offset"]
        report.sessions = list(row["sessions"])
        report.earlier = FileCounts.from_dict(row["counts"])
        return None, None
    head = f.read(HEAD_LEN)
    start, ctx = 0, None
    if same_file and st.st_size >= row["offset"]:
        if hashlib.sha256(head[:row["head_len"]]).hexdigest() == row["head_sha"]:
            start, ctx = row["offset"], row["context"]
            report.status = "grown" if st.st_size > row["offset"] else "unchanged"
            report.earlier = FileCounts.from_dict(row["counts"])
    if row is not None and start == 0:
        report.status = "rewritten"
    report.from_offset = start
    parser = PARSERS[kind](path, ctx, file_index, report.counts)
    if kind == "otel" and start == 0:
        f.seek(0)
        if _one_document(f, st.st_size):
            done = _parse_document(f, path, st, settled, parser, head, report, rejects, ids)
            if done is not None:
                return done
    lineno = int((ctx or {}).get("_lines", 0))
    reader = _LineReader(f, start, st.st_size, settled)
    for line in reader:
        lineno += 1
        report.counts.lines += 1
        _parse_line(path, line, lineno, parser, report.counts, rejects, ids)
    report.counts.pending_tail_bytes = reader.pending
    _finish(path, parser, settled and (now - st.st_mtime) >= idle_s, reader.end, lineno, report.counts, rejects)
    _finish_report(report, parser, reader.end, head, st, lineno)
    if report.status == "grown" and reader.end == start:
        report.status = "unchanged"  # only an unterminated tail was added: nothing to read yet
    return parser, st


def _parse_line(path: str, line: _Line, lineno: int, parser, counts: FileCounts, rejects: list,
                ids: Callable = lambda obj: obj) -> None:
    """One line to the parser (its ids redacted by ``ids``), or to the rejects (and the session's
    gaps) with the reason it is unusable."""
    off, raw = line.offset, line.raw
    if line.too_long:
        counts.too_long += 1
        reason = f"line of {line.length} bytes is longer than the limit of {MAX_LINE_BYTES} bytes (not read)"
        rejects.append((path, off, lineno, reason, raw[:REJECT_SCAN_BYTES]))
        parser.garbage(off, lineno, raw, reason, line.length)
        return
    raw = raw.rstrip(b"\r")
    if off == 0 and raw.startswith(BOM):
        raw = raw[len(BOM):]
    if not raw.strip():
        counts.blank += 1
        return
    text = _decode(raw, counts)
    try:
        obj = loads_bounded(text)
    except JSONTooDeep as exc:
        counts.too_deep += 1
        rejects.append((path, off, lineno, f"JSON {exc}", raw[:REJECT_SCAN_BYTES]))
        parser.garbage(off, lineno, raw, f"JSON {exc}")
        return
    except ValueError as exc:
        counts.invalid_json += 1
        rejects.append((path, off, lineno, f"invalid JSON: {getattr(exc, 'msg', exc)}", raw[:REJECT_SCAN_BYTES]))
        parser.garbage(off, lineno, raw, "not valid JSON")
        return
    if not isinstance(obj, dict):
        rejects.append((path, off, lineno, f"JSON {type(obj).__name__}, not an object", raw[:REJECT_SCAN_BYTES]))
    try:
        parser.feed(ids(obj), off, lineno)
    except Exception as exc:  # noqa: BLE001 - one record the parser cannot use never costs the file's others
        _unusable(path, off, lineno, raw, parser, counts, rejects, exc)


UNUSABLE = "(record the parser failed on)"  # its unknown_types name: counted as a problem


def _unusable(path: str, off: int, lineno: int, raw: bytes, parser, counts: FileCounts, rejects: list,
              exc: Exception) -> None:
    """A record that is valid JSON but that the parser failed on (a field of a type it does not
    expect: a list where a name belongs, a number no duration can be): a problem, a reject with
    its bytes, and a gap in the session like an undecodable line; the file's other records are used.
    The reason names the error and where the parser failed, never the exception's message (which
    may quote the record)."""
    log.debug("%s line %d: the parser failed", path, lineno, exc_info=True)
    reason = f"record not usable: {_failure(exc)}"
    counts.bump("unknown_types", UNUSABLE)
    rejects.append((path, off, lineno, reason, raw[:REJECT_SCAN_BYTES]))
    try:
        parser.garbage(off, lineno, raw, reason)
    except Exception:  # noqa: BLE001 - (the reject and the count are kept all the same)
        log.debug("%s line %d: no gap recorded", path, lineno, exc_info=True)


def _finish(path: str, parser, settled_idle: bool, end: int, lineno: int, counts: FileCounts, rejects: list) -> None:
    """``parser.finish``: what it fails on is a problem of the file (a reject with no bytes), and
    everything read before is still used."""
    try:
        parser.finish(settled_idle)
    except Exception as exc:  # noqa: BLE001
        log.debug("%s: the parser failed at the end", path, exc_info=True)
        counts.bump("unknown_types", UNUSABLE)
        rejects.append((path, end, lineno, f"end of the records not usable: {_failure(exc)}", b""))


def _failure(exc: Exception) -> str:
    """An exception's type and where in our code it was raised (never its message: it may quote the record)."""
    tb = traceback.extract_tb(exc.__traceback__)
    return f"{type(exc).__name__} at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else type(exc).__name__


def _parse_document(f, path: str, st, settled: bool, parser, head: bytes, report: FileReport,
                    rejects: list, ids: Callable = lambda obj: obj) -> tuple[object | None, dict | None] | None:
    """An OTel file that is one (pretty-printed) OTLP/JSON document, parsed whole (so bounded by
    MAX_DOCUMENT_BYTES). None: it is not one valid document after all, read it as lines."""
    if st.st_size > MAX_DOCUMENT_BYTES:
        raise ValueError(f"one JSON document of {st.st_size} bytes, over the limit of {MAX_DOCUMENT_BYTES} bytes "
                         "for a pretty-printed OTLP file (export JSON lines: one document per line)")
    f.seek(0)
    data = f.read(st.st_size)
    doc_data = data[len(BOM):] if data.startswith(BOM) else data
    probe = FileCounts()
    lines = data.count(b"\n") + 1
    try:
        doc = loads_bounded(_decode(doc_data, probe))
    except JSONTooDeep as exc:
        report.counts.lines += lines
        report.counts.too_deep += 1
        rejects.append((path, 0, 1, f"JSON document {exc}", doc_data[:REJECT_SCAN_BYTES]))
        _finish_report(report, parser, len(data), head, st, lines)
        return parser, st
    except ValueError:
        if settled:
            return None
        report.counts.pending_tail_bytes = len(data)  # a document still being written
        report.to_offset = 0
        report.status = "pending"
        return None, None
    report.counts.lines += lines
    report.counts.non_utf8 += probe.non_utf8
    try:
        parser.feed(ids(doc), 0, 1)
    except Exception as exc:  # noqa: BLE001 - as a line (_parse_line)
        _unusable(path, 0, 1, doc_data, parser, report.counts, rejects, exc)
    _finish(path, parser, settled, len(data), lines, report.counts, rejects)
    _finish_report(report, parser, len(data), head, st, lines)
    return parser, st


def _finish_report(report: FileReport, parser, end: int, head: bytes, st, lineno: int) -> None:
    report.to_offset = end
    parser.ctx["_lines"] = lineno
    report.observations = len(parser.observations) + len(parser.infos)
    sids = {o.session_id for o in parser.observations} | {i.session_id for i in parser.infos}
    if getattr(parser, "session_id", None):
        sids.add(parser.session_id)
    sids |= getattr(parser, "sessions", set())
    report.sessions = sorted(s for s in sids if s)
    parser._file_row = {"dev": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "offset": end, "head_len": min(len(head), end),
                        "head_sha": hashlib.sha256(head[:min(len(head), end)]).hexdigest()}


REJECT_SCAN_BYTES = 64 * 1024  # of an unusable line, what is scanned for secrets before its excerpt is kept
REJECT_EXCERPT_CHARS = 200


def _redacted_rejects(red, rejects: list[tuple]) -> list[tuple]:
    """Unusable lines are kept as excerpts (local state and the report): secrets in them are
    replaced by the same tokens as in events before the excerpt is cut, so none is kept in clear."""
    if not rejects or red is None:
        return rejects
    out = []
    for *head, raw in rejects:
        text, _ = red.scan(bytes(raw).decode("utf-8", "replace"))
        out.append((*head, text[:REJECT_EXCERPT_CHARS].encode()))
    return out


def _control_surface(infos: list[SessionInfo]):
    """``prepare`` for `SessionAppender.append`: a session of a rollout or transcript that is not
    recorded yet gets the control surface of its cwd (producers/controlsurface.py) *as it is at
    import time*, which may be long after the session (observed_by "import"); only when that cwd
    exists on this machine, and under the importing user's home."""
    mine = [i for i in infos if i.source in (CODEX_SOURCE, CLAUDE_SOURCE)]
    cwd = next((str(i.fields["cwd"]) for i in sorted(mine, key=lambda i: -i.priority) if i.fields.get("cwd")), "")
    if not cwd:
        return None

    def prepare(head) -> tuple[list, list[SessionInfo]]:
        if head.next_seq > 0 or not os.path.isabs(cwd) or not os.path.isdir(cwd):
            return [], []
        from .controlsurface import snapshot

        ref = mine[0]
        snap = snapshot(cwd, os.environ.get("HOME"), ref.agent)
        return [], [SessionInfo(ref.session_id, min(i.at_us for i in mine), ref.agent, ref.source,
                                {**snap, "observed_by": "import"}, ref.agent_version, priority=-1)]

    return prepare


def run_import(
    settings: Settings,
    rollouts: Iterable[str | Path] = (),
    otel: Iterable[str | Path] = (),
    *,
    claude: Iterable[str | Path] = (),
    end_idle_s: float | None = 3600.0,
    dry_run: bool = False,
    now: float | None = None,
    appender: SessionAppender | None = None,
    on_file: Callable[[FileReport], None] | None = None,
    on_session: Callable[[AppendResult], None] | None = None,
) -> ImportReport:
    """Import the given rollout, Claude Code transcript and OTel files/directories in one run (see
    the module doc).

    ``end_idle_s``: a session with no activity for that long (by source time) is ended; None keeps
    every session open. Raises `NotDurableError` / `LockTimeout` when events cannot be made durable;
    file offsets are then not advanced (the next run redoes the work, adding nothing twice)."""
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    rollouts, otel, claude = list(rollouts), list(otel), list(claude)
    report = ImportReport(dry_run=dry_run, wanted=tuple(k for k, paths in (("codex_rollout", rollouts), ("otel", otel),
                                                                           ("claude_code", claude)) if paths))
    state = appender.state if appender is not None else ProducerState(settings.home)
    # The producers' redaction (the appender's, or the one it will get): ids are redacted as each
    # record is read, rejects and the parsers' saved context before they are stored.
    transforms = appender.transforms if appender is not None else producer_transforms(settings)
    red = redactor_of(transforms)
    ids = red.redact_ids_in if red is not None else (lambda obj: obj)
    inputs, seen = [], set()
    refused: list[tuple[str, str, str]] = []
    found = (discover(rollouts, "codex_rollout", report.skipped, refused)
             + discover(claude, "claude_code", report.skipped, refused)
             + discover(otel, "otel", report.skipped, refused))
    for path, kind, named in found:
        if path not in seen:
            seen.add(path)
            inputs.append((path, kind, named))
    report.skipped = [(p, k) for p, k in report.skipped if p not in seen]
    for path, kind, why in refused:  # not read: a problem of that path, the others are imported
        if path not in seen:
            seen.add(path)
            report.files.append(FileReport(path, kind, status="error", error=why))
            if on_file:
                on_file(report.files[-1])
    parsed: list[tuple[FileReport, object, object]] = []
    rejects: list[tuple] = []
    idle = end_idle_s if end_idle_s is not None else float("inf")
    for i, (path, kind, named) in enumerate(inputs):
        fr = FileReport(path, kind)
        report.files.append(fr)
        file_rejects: list[tuple] = []
        try:
            row = state.file_row(path)
            parser, st = _parse_file(path, kind, row, i, now, idle, fr, file_rejects, ids, follow=named)
        except Exception as exc:  # noqa: BLE001 - one file that cannot be read never stops the others
            log.debug("importing %s failed", path, exc_info=True)
            fr.status, fr.error = "error", str(exc) if isinstance(exc, NotRegularFile) else f"{type(exc).__name__}: {exc}"
            parser = None
        if parser is not None:
            parsed.append((fr, parser, row))
            rejects += file_rejects
        if on_file:
            on_file(fr)
    # What each source cannot contain, stated once per session it contributed to (producers/coverage.py).
    for _fr, parser, _ in parsed:
        parser.observations += coverage_for(parser, parser.file_index)
    # -- merge per session, in time order ------------------------------------------------------
    obs: dict[str, list[Observation]] = {}
    infos: dict[str, list[SessionInfo]] = {}
    hints: dict[str, tuple[int, str]] = {}
    agents: dict[str, tuple] = {}
    activity: dict[str, int] = {}
    turns: dict[tuple[str, str], str] = {}
    for _fr, parser, _ in parsed:
        for o in parser.observations:
            obs.setdefault(o.session_id, []).append(o)
            agents.setdefault(o.session_id, (o.agent, o.agent_version, o.source))
            activity[o.session_id] = max(activity.get(o.session_id, 0), o.at_us)
            if o.turn_id and o.tool_call_id:
                turns[(o.session_id, o.tool_call_id)] = o.turn_id
        for sid, last in getattr(parser, "activity", {}).items():
            activity[sid] = max(activity.get(sid, 0), last)
        for inf in parser.infos:
            infos.setdefault(inf.session_id, []).append(inf)
        sid = getattr(parser, "session_id", None)
        if sid and parser.ctx.get("last_us"):
            activity[sid] = max(activity.get(sid, 0), parser.ctx["last_us"])
        if sid and parser.end_hint:
            last = parser.ctx.get("last_us") or 0
            if sid not in hints or hints[sid][0] <= last:
                hints[sid] = (last, parser.end_hint)
    for sid, lst in obs.items():  # OTel records carry no turn id: take the one the rollout gives the call
        for o in lst:
            if o.turn_id is None and o.tool_call_id:
                o.turn_id = turns.get((sid, o.tool_call_id))
    # MCP calls: the tool definition in force at each call (the MCP proxy's store, producers/mcpdefs.py)
    from .mcpdefs import link_calls as link_mcp_definitions
    link_mcp_definitions(settings.home, (o for lst in obs.values() for o in lst))
    rejects = _redacted_rejects(red, rejects)
    report.rejects = [{"path": r[0], "offset": r[1], "line": r[2], "reason": r[3],
                       "excerpt": bytes(r[4]).decode("utf-8", "replace")} for r in rejects]
    every = set(obs) | set(infos)
    for fr in report.files:
        every |= set(fr.sessions)
        for s in fr.sessions:
            agents.setdefault(s, AGENT_OF[fr.kind])
    if dry_run:
        report.seconds = time.perf_counter() - t0
        return report
    own = appender is None
    appender = appender or SessionAppender(settings, state=state, transforms=transforms)
    try:
        report.resent = appender.drain_all()
        end = EndRule(int((now - idle) * 1e6)) if end_idle_s is not None else None

        def first_at(sid: str) -> int:
            return min([o.at_us for o in obs.get(sid, [])] + [i.at_us for i in infos.get(sid, [])], default=0)

        for sid in sorted(every, key=lambda s: (first_at(s), s)):
            res = appender.append(sid, obs.get(sid, []), infos.get(sid, []), end=end,
                                  end_hint=hints.get(sid, (0, None))[1], activity_us=activity.get(sid),
                                  default_agent=agents.get(sid, ("unknown", None, "unknown")), start_if_new=True,
                                  prepare=_control_surface(infos.get(sid, [])))
            report.sessions.append(res)
            if on_session:
                on_session(res)
        # Every event parsed from these bytes is durable and committed: now advance the offsets.
        rows = []
        for fr, parser, _row in parsed:
            ctx = parser.ctx
            if red is not None:  # what the parser keeps for the next run (open calls' argv, ...) is state too
                ctx = red.walk(ctx, "context", [])
            rows.append({"path": fr.path, "kind": fr.kind, **parser._file_row, "context": ctx,
                         "sessions": fr.sessions, "counts": fr.total.as_dict()})
        state.save_files(rows, rejects)
    finally:
        if own:
            appender.close()
    report.seconds = time.perf_counter() - t0
    return report

