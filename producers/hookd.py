"""The warm hook server: one per $AGENTLEDGER_HOME, so that a hook call costs a bare interpreter.

A hook call is a fresh process per tool use; most of its cost is starting Python and importing
the recorder (fastavro, the schema, SQLite). `agentledger hook` therefore first offers its input to
this server over a Unix socket (``$AGENTLEDGER_HOME/state/hookd.sock``, owner-only) and only falls
back to doing the work itself when no server answers -- after which it starts one in the
background for the next calls. The server runs exactly the same `producers.hook.handle`, with the
same per-session locks, outbox and fact table, so answers and guarantees are identical either way:
the client returns only once the server says the events are durable, and any failure on the way
(server gone, stale code, timeout) makes the client redo the call in-process, where the fact table
and the outbox make a repeat harmless.

Lifecycle: a singleton per home (flock on ``hookd.lock``); exits after ``idle_s`` without requests,
when asked (``stop`` request), or when a client runs different code (``code`` digest mismatch:
upgraded install). Protocol: length-prefixed frames (4-byte big-endian length): a JSON header
``{"v", "code", "env", "args"}`` then the raw hook input; the answer is one JSON frame
``{"exit", "stdout", "stderr"}`` or ``{"stale": true}`` / ``{"error": ...}``; a header
``{"stop": true}`` or ``{"status": true}`` (answer ``{"pid", "served"}``) asks for no work.

Every setting of a call is read from the client's AGENTLEDGER_* variables (and HOME/XDG_DATA_HOME,
which locate the per-user home: schemas/homes.py) sent in ``env``, never from the server's own
environment: a server started by one client must record another exactly as that client would
in-process (recording mode, redaction key, signing key, checkpoint interval, and the home `~` means
in the policy and in paths: the client's HOME).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agentledger.schemas import envvars
from agentledger.schemas.homes import HOME_VARS

PROTO = 1
_LEN = struct.Struct(">I")
MAX_FRAME = 32 * 1024 * 1024


def read_frame(sock: socket.socket) -> bytes:
    head = _recv_exact(sock, 4)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def write_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


class HookServer:
    def __init__(self, home: Path, code: str, idle_s: float = 900.0, workers: int = 4):
        self.home = Path(home)
        self.state = self.home / "state"
        self.sock_path = self.state / "hookd.sock"
        self.code = code
        self.idle_s = idle_s
        self.stop = threading.Event()
        self.inflight = 0
        self.last = time.monotonic()
        self.served = 0
        self._mu = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hookd")

    # -- per worker thread: one appender per transport configuration ------------------------
    def _appender(self, settings, budget: float, env: dict[str, str]):
        from .hook import kafka_options
        from .ledger import SessionAppender

        cache = getattr(self._local, "appenders", None)
        if cache is None:
            cache = self._local.appenders = {}
        key = (settings, budget, tuple(sorted(env.items())))
        app = cache.get(key)
        if app is None:
            app = SessionAppender(settings, sink_options=kafka_options(budget) if settings.uses_kafka else {},
                                  lock_timeout_s=budget, flush_timeout_s=budget, env=env, key_fallback=True)
            cache[key] = app
        return app, cache, key

    def _serve_one(self, conn: socket.socket) -> None:
        from agentledger.schemas.config import from_env

        from .hook import handle

        try:
            conn.settimeout(30)
            header = json.loads(read_frame(conn))
            raw = read_frame(conn)
            if header.get("stop"):
                self.stop.set()
                write_frame(conn, b'{"stopped": true}')
                return
            if header.get("status"):
                with self._mu:
                    write_frame(conn, json.dumps({"pid": os.getpid(), "served": self.served}).encode())
                return
            if header.get("v") != PROTO or header.get("code") != self.code:
                self.stop.set()  # a different install talks to us: make room for a fresh server
                write_frame(conn, b'{"stale": true}')
                return
            args = header.get("args") or {}
            budget = float(args.get("budget", 5.0))
            conn.settimeout(budget * 4 + 10)
            # Everything is read from the client's environment (its AGENTLEDGER_* and home variables), never
            # this server's: the home, transport, recording mode, redaction, signing key, checkpoints,
            # and whose `~` the policy's paths mean (the agent's).
            env = {k: v for k, v in (header.get("env") or {}).items()
                   if isinstance(k, str) and (k.startswith("AGENTLEDGER_") or k in HOME_VARS) and isinstance(v, str)}
            settings = from_env(env)
            if settings.home != self.home:
                write_frame(conn, json.dumps({"error": f"server of {self.home}, not {settings.home}"}).encode())
                return
            app, cache, key = self._appender(settings, budget, env)
            out = handle(raw, settings, policy_path=args.get("policy"), agent=args.get("agent", "auto"),
                         deny_style=args.get("deny_style", "json"), fail_closed=bool(args.get("fail_closed")),
                         budget_s=budget, appender=app, env=env)
            if out.exit_code == 1 and "not recorded" in out.stderr:
                cache.pop(key, None)  # the transport failed: start the next call from a fresh sink
                try:
                    app.close()
                except Exception:
                    pass
            write_frame(conn, json.dumps({"exit": out.exit_code, "stdout": out.stdout, "stderr": out.stderr}).encode())
            with self._mu:
                self.served += 1
        except Exception as exc:  # the client redoes the call in-process; say why
            try:
                write_frame(conn, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            except OSError:
                pass
        finally:
            conn.close()
            with self._mu:
                self.inflight -= 1
                self.last = time.monotonic()

    def run(self) -> int:
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(self.state / "hookd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + 5
            while True:  # a retiring server may still hold it for a moment
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        return 0  # another server owns this home
                    time.sleep(0.05)
            try:
                self.sock_path.unlink()
            except FileNotFoundError:
                pass
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                srv.bind(str(self.sock_path))
            finally:
                os.umask(old)
            ino = os.stat(self.sock_path).st_ino
            srv.listen(128)
            try:
                (self.state / "hookd.failed").unlink()
            except FileNotFoundError:
                pass
            srv.settimeout(0.5)
            try:
                while not self.stop.is_set():
                    try:
                        conn, _ = srv.accept()
                    except socket.timeout:
                        with self._mu:
                            idle = self.inflight == 0 and time.monotonic() - self.last > self.idle_s
                        if idle or not self.state.is_dir():
                            break
                        continue
                    with self._mu:
                        self.inflight += 1
                        self.last = time.monotonic()
                    self._pool.submit(self._serve_one, conn)
            finally:
                srv.close()
                try:
                    if os.stat(self.sock_path).st_ino == ino:
                        self.sock_path.unlink()
                except FileNotFoundError:
                    pass
                self._pool.shutdown(wait=True)
            return 0
        finally:
            os.close(lock_fd)


def serve(home: Path, code: str) -> int:
    from agentledger.schemas.homes import restrict_umask

    restrict_umask()  # everything the server creates in the home is owner-only (schemas/homes.py)
    idle = envvars.get("AGENTLEDGER_HOOK_DAEMON_IDLE")
    sys.stdin.close()
    return HookServer(home, code, idle_s=idle).run()
