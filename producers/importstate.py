"""Producer-side state on this host: chain heads, recorded facts, the outbox, imported files.

The only module that talks to SQLite (stdlib ``sqlite3``; schema in ``importstate.sql``). One
database, ``$AGENTLEDGER_HOME/state/producers.db`` in WAL mode with ``synchronous=FULL``, shared
by every producer process of this host: the importers and every `agentledger hook` process.

Concurrency: appending to a session is serialised by a per-session ``flock`` on
``state/locks/<digest>.lock`` (`session_lock`), held from reading the chain head until the new head
is committed, with the append to the transport inside. Different sessions never wait for each
other except for SQLite's short write transactions.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from agentledger.schemas.envelope import GENESIS_HASH
from agentledger.schemas.locks import flock_within
from agentledger.schemas.errors import TransportError

SCHEMA_VERSION = 1
_DDL = Path(__file__).with_name("importstate.sql")


class LockTimeout(TransportError):
    """Another process held the session's lock for longer than allowed."""


@dataclass
class Head:
    session_id: str
    next_seq: int = 0
    head_hash: str = GENESIS_HASH
    agent: str | None = None
    first_at: int | None = None
    last_at: int | None = None
    ended: bool = False
    end_hint: str | None = None
    exists: bool = False


@dataclass
class Staged:
    seq: int
    value: bytes
    fact: str
    event_id: str
    occurred_at: int


class ProducerState:
    def __init__(self, home: Path | str):
        self.dir = Path(home) / "state"
        self.path = self.dir / "producers.db"
        self.lock_dir = self.dir / "locks"
        self._con: sqlite3.Connection | None = None

    # -- connection -----------------------------------------------------------------------
    def ensure_dirs(self) -> None:
        # Owner-only: the outbox holds sealed events, rejects hold excerpts of source lines.
        if not self.lock_dir.is_dir():
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir(exist_ok=True, mode=0o700)
            self.lock_dir.mkdir(exist_ok=True, mode=0o700)

    @property
    def con(self) -> sqlite3.Connection:
        if self._con is None:
            self.ensure_dirs()
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            try:
                con.execute("PRAGMA busy_timeout=60000")
                # Switching a new file to WAL takes its lock in rollback-journal mode, where SQLite
                # answers "database is locked" at once (no busy wait) to processes racing to do the
                # same, e.g. the first hook calls of several sessions. One process at a time sets
                # the file up; the flock goes with the process if it dies.
                with self._exclusive(self.dir / "setup.lock"):
                    con.execute("PRAGMA journal_mode=WAL")
                    if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                        con.executescript(_DDL.read_text())  # idempotent (IF NOT EXISTS)
                        con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                con.execute("PRAGMA synchronous=FULL")
            except BaseException:
                con.close()
                raise
            self._con = con
        return self._con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    # -- per-session lock -----------------------------------------------------------------
    def lock_path(self, session_id: str) -> Path:
        return self.lock_dir / (hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".lock")

    @contextmanager
    def session_lock(self, session_id: str, timeout_s: float = 30.0) -> Iterator[None]:
        """Exclusive lock of one session across processes (flock; released if the holder dies)."""
        self.ensure_dirs()
        with self._exclusive(self.lock_path(session_id), timeout_s,
                             f"session {session_id} stayed locked by another producer for {timeout_s}s"):
            yield

    @staticmethod
    @contextmanager
    def _exclusive(path: Path, timeout_s: float = 60.0, what: str | None = None) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not flock_within(fd, timeout_s):
                raise LockTimeout(what or f"{path} stayed locked for {timeout_s}s")
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # -- sessions -------------------------------------------------------------------------
    def head(self, session_id: str) -> Head:
        row = self.con.execute(
            "SELECT next_seq, head_hash, agent, first_at, last_at, ended, end_hint FROM sessions WHERE session_id = ?",
            (session_id,)).fetchone()
        if row is None:
            return Head(session_id)
        return Head(session_id, row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], True)

    def known_facts(self, session_id: str, facts: Iterable[str]) -> set[str]:
        """Which of ``facts`` are already recorded for the session."""
        wanted = list(dict.fromkeys(facts))
        out: set[str] = set()
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            q = f"SELECT fact FROM facts WHERE session_id = ? AND fact IN ({','.join('?' * len(chunk))})"
            out.update(r[0] for r in self.con.execute(q, (session_id, *chunk)))
        return out

    def outbox(self, session_id: str) -> list[Staged]:
        return [Staged(*r) for r in self.con.execute(
            "SELECT seq, value, fact, event_id, occurred_at FROM outbox WHERE session_id = ? ORDER BY seq", (session_id,))]

    def sessions_with_outbox(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT DISTINCT session_id FROM outbox ORDER BY 1")]

    def stage(self, session_id: str, staged: list[Staged]) -> None:
        """Write-ahead: the sealed events are durable here before the transport sees them."""
        with self.transaction() as con:
            con.executemany("INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?, ?)",
                            [(session_id, s.seq, s.value, s.fact, s.event_id, s.occurred_at) for s in staged])

    def commit_head(self, head: Head, staged: list[Staged], *, extra=None) -> None:
        """The staged events are durable in the transport: advance the head, record their facts and
        clear them from the outbox, in one transaction (plus ``extra(con)``, e.g. hook call state)."""
        with self.transaction() as con:
            if staged:
                last = staged[-1]
                head.next_seq = last.seq + 1
                ats = [s.occurred_at for s in staged]
                head.first_at = min([a for a in (head.first_at, *ats) if a is not None])
                head.last_at = max([a for a in (head.last_at, *ats) if a is not None])
                con.executemany("INSERT OR IGNORE INTO facts VALUES (?, ?, ?, ?)",
                                [(head.session_id, s.fact, s.seq, s.event_id) for s in staged])
                con.execute("DELETE FROM outbox WHERE session_id = ? AND seq <= ?", (head.session_id, last.seq))
            con.execute(
                """INSERT INTO sessions (session_id, next_seq, head_hash, agent, first_at, last_at, ended, end_hint, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (session_id) DO UPDATE SET next_seq = excluded.next_seq, head_hash = excluded.head_hash,
                     agent = coalesce(sessions.agent, excluded.agent), first_at = excluded.first_at,
                     last_at = excluded.last_at, ended = excluded.ended, end_hint = excluded.end_hint,
                     updated_at = excluded.updated_at""",
                (head.session_id, head.next_seq, head.head_hash, head.agent, head.first_at, head.last_at,
                 int(head.ended), head.end_hint, int(time.time() * 1e6)))
            if extra is not None:
                extra(con)
            head.exists = True

    # -- hook tool calls ------------------------------------------------------------------
    def open_call(self, session_id: str, call_id: str) -> tuple[int, dict] | None:
        row = self.con.execute("SELECT started_at, info FROM open_calls WHERE session_id = ? AND call_id = ?",
                               (session_id, call_id)).fetchone()
        if row is None:
            return None
        try:
            info = json.loads(row[1]) if row[1] else {}
        except ValueError:
            info = {}
        return row[0], info

    def open_call_by_key(self, session_id: str, key: str) -> str | None:
        """The oldest open call of the session whose info has ``key`` (Gemini CLI's hooks name no
        call: a BeforeTool and its AfterTool are paired by a digest of tool and arguments)."""
        for call_id, info in self.con.execute(
                "SELECT call_id, info FROM open_calls WHERE session_id = ? ORDER BY started_at, call_id",
                (session_id,)).fetchall():
            try:
                if info and json.loads(info).get("key") == key:
                    return str(call_id)
            except (ValueError, AttributeError):
                continue
        return None

    # -- files ----------------------------------------------------------------------------
    def file_row(self, path: str) -> dict | None:
        cur = self.con.execute("SELECT * FROM files WHERE path = ?", (path,))
        row = cur.fetchone()
        if row is None:
            return None
        d = dict(zip([c[0] for c in cur.description], row))
        for k in ("context", "sessions", "counts"):
            try:
                d[k] = json.loads(d[k]) if d[k] else ({} if k != "sessions" else [])
            except ValueError:
                d[k] = {} if k != "sessions" else []
        return d

    def save_files(self, rows: list[dict], rejects: list[tuple]) -> None:
        """Record how far each file was imported. Called only after every event parsed from those
        bytes is durable and committed to its session (see producers/importer.py)."""
        now = int(time.time() * 1e6)
        with self.transaction() as con:
            con.executemany(
                """INSERT OR REPLACE INTO files (path, kind, dev, inode, size, mtime_ns, offset, head_len, head_sha,
                   context, sessions, counts, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [(r["path"], r["kind"], r["dev"], r["inode"], r["size"], r["mtime_ns"], r["offset"], r["head_len"],
                  r["head_sha"], json.dumps(r["context"]), json.dumps(r["sessions"]), json.dumps(r["counts"]), now)
                 for r in rows])
            con.executemany("INSERT OR IGNORE INTO rejects VALUES (?, ?, ?, ?, ?, ?)",
                            [(*r, now) for r in rejects])
