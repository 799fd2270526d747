"""`agentledger mcp proxy --server NAME -- CMD [ARGS...]`: a stdio MCP proxy in front of one MCP
server, which records the server's tool definitions (producers/mcpdefs.py).

The agent starts the proxy instead of the server (its MCP configuration names `agentledger` as
the command); the proxy starts the server and copies bytes both ways unchanged, as they arrive
(the MCP stdio transport: newline-delimited JSON-RPC messages on stdin / stdout; the server's
stderr is the proxy's). Beside the copy it watches the messages: a client request
``{"method": "tools/list", "id": X}`` and the server's response with id X (each page of a
paginated listing is a response of its own) -- each tool of ``result.tools`` goes to the
definitions store, redacted, a line only when its definition changed.

The watching never touches the traffic: lines are inspected by another thread (a bounded queue;
a full queue, a line longer than `INSPECT_MAX`, malformed JSON, a response that is no object:
not recorded, never an error), and a failure to record is said once on stderr. EOF is passed on
both ways; SIGTERM, SIGINT and SIGHUP are forwarded to the server; the proxy exits with the
server's exit code (128 + N when a signal N ended it).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from . import mcpdefs

INSPECT_MAX = 8 * 1024 * 1024  # bytes of one message inspected at most (longer: passed on, not recorded)
CHUNK = 64 * 1024
PENDING_MAX = 1024  # tools/list request ids remembered at most
QUEUE_MAX = 256  # lines waiting for inspection


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _Lines:
    """Splits a byte stream into the lines worth inspecting (bounded; an oversized line is dropped)."""

    def __init__(self, wanted: Callable[[bytes], bool]):
        self.buf = bytearray()
        self.over = False
        self.wanted = wanted

    def feed(self, chunk: bytes) -> list[bytes]:
        out = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            part = chunk[start:] if nl < 0 else chunk[start:nl]
            if not self.over:
                if len(self.buf) + len(part) > INSPECT_MAX:
                    self.over = True
                    self.buf.clear()
                else:
                    self.buf += part
            if nl < 0:
                return out
            if not self.over and self.buf.strip() and self.wanted(self.buf):
                out.append(bytes(self.buf))
            self.buf.clear()
            self.over = False
            start = nl + 1


class Proxy:
    def __init__(self, server: str, cmd: list[str], home: Path, redact: Callable[[str], str] | None = None,
                 stdin_fd: int = 0, stdout_fd: int = 1, clock: Callable[[], int] = lambda: time.time_ns() // 1000):
        self.server = server
        self.cmd = cmd
        self.home = Path(home)
        self.redact = redact
        self.stdin_fd, self.stdout_fd = stdin_fd, stdout_fd
        self.clock = clock
        self.q: queue.Queue = queue.Queue(QUEUE_MAX)
        self.pending: dict[str, None] = {}
        self.recorded = 0
        self.dropped = 0
        # tools/list requests seen by the copy and not yet answered (or found to be none): while any
        # is, every server line is inspected (never a guess at its bytes: a server may escape "tools")
        self.outstanding = 0
        self._count = threading.Lock()
        self._warned = False
        self.child: subprocess.Popen | None = None

    # -- the copy -----------------------------------------------------------------------------
    def _offer(self, direction: str, line: bytes) -> None:
        try:
            self.q.put_nowait((direction, line, self.clock()))
        except queue.Full:
            self.dropped += 1
            self._warn("a message was not inspected (the inspection queue is full)")
            return
        if direction == "c":
            self._outstanding(+1)

    def _outstanding(self, n: int) -> None:
        with self._count:
            self.outstanding = max(0, self.outstanding + n)

    def _client_to_server(self) -> None:
        lines = _Lines(lambda b: b"tools/list" in b)
        dst = self.child.stdin.fileno()
        try:
            while True:
                chunk = os.read(self.stdin_fd, CHUNK)
                if not chunk:
                    break
                for line in lines.feed(chunk):  # before the server can see it: its answer comes after
                    self._offer("c", line)
                _write_all(dst, chunk)
        except OSError:
            pass  # the server closed its stdin (or ours failed): nothing more to pass on
        finally:
            try:
                self.child.stdin.close()  # EOF to the server
            except OSError:
                pass

    def _server_to_client(self) -> None:
        lines = _Lines(lambda b: self.outstanding > 0)
        src = self.child.stdout.fileno()
        broken = False
        while True:
            try:
                chunk = os.read(src, CHUNK)
            except OSError:
                break
            if not chunk:
                break
            if not broken:
                try:
                    _write_all(self.stdout_fd, chunk)
                except OSError:
                    broken = True  # the client is gone: keep draining the server so that it never blocks
            for line in lines.feed(chunk):
                self._offer("s", line)
        try:  # EOF to the client: our end of its pipe closed (/dev/null in its place, for whatever writes later)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stdout_fd)
            os.close(devnull)
        except OSError:
            pass

    # -- the watching --------------------------------------------------------------------------
    def _inspect(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            try:
                self._message(*item)
            except Exception as exc:  # noqa: BLE001 - recording never breaks the proxy
                self._warn(f"{type(exc).__name__}: {exc}")

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            try:
                sys.stderr.write(f"agentledger mcp proxy ({self.server}): tool definitions not recorded: {what}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def _message(self, direction: str, line: bytes, at_us: int) -> None:
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            msg = None
        if direction == "c":  # counted when offered; only its tools/list requests stay outstanding (one step:
            # never 0 in between, while the server may be answering)
            self._outstanding(sum(1 for m in (msg if isinstance(msg, list) else [msg])[:1000]
                                  if isinstance(m, dict) and "id" in m and m.get("method") == "tools/list") - 1)
        for m in (msg if isinstance(msg, list) else [msg])[:1000]:  # a JSON-RPC batch
            if not isinstance(m, dict) or "id" not in m:
                continue
            key = json.dumps(m["id"], sort_keys=True, default=str)
            if direction == "c":
                if m.get("method") == "tools/list":
                    self.pending[key] = None
                    if len(self.pending) > PENDING_MAX:
                        self.pending.pop(next(iter(self.pending)))
                        self._outstanding(-1)
            elif key in self.pending and "method" not in m:
                self.pending.pop(key)
                self._outstanding(-1)
                result = m.get("result")
                if isinstance(result, dict):
                    entries = mcpdefs.definition_entries(self.server, result.get("tools"), at_us, self.redact)
                    self.recorded += len(mcpdefs.append_changed(self.home, entries))

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.child = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            sys.stderr.write(f"agentledger mcp proxy: cannot start {self.cmd[0]!r}: {exc}\n")
            return 127
        inspector = threading.Thread(target=self._inspect, name="mcp-inspect", daemon=True)
        up = threading.Thread(target=self._client_to_server, name="mcp-c2s", daemon=True)
        down = threading.Thread(target=self._server_to_client, name="mcp-s2c", daemon=True)
        for t in (inspector, up, down):
            t.start()
        old = {}

        def forward(signum, _frame):
            try:
                self.child.send_signal(signum)
            except OSError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                old[sig] = signal.signal(sig, forward)
            except (ValueError, OSError):  # not the main thread
                pass
        try:
            while True:
                try:
                    code = self.child.wait()
                    break
                except InterruptedError:
                    continue
            down.join(5)  # what the server wrote before it exited still reaches the client
            self.q.put(None)
            inspector.join(5)
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        return code if code >= 0 else 128 - code


def run_proxy(server: str, cmd: list[str], home: Path, redact: Callable[[str], str] | None = None) -> int:
    return Proxy(server, cmd, home, redact).run()
