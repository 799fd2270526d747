"""A fork server for the tests' CLI runs: `python -m agentledger ...` without paying for Python's start
and agentledger's imports at every run.

Every `run_cli` of the suite started a new interpreter that imported typer, rich, pydantic, duckdb,
fastavro, kafka-python, pyarrow and agentledger and built the click command before doing anything:
0.35-0.6 CPU-s a run, ~700 runs a suite on these 2 cores. This server does all of that once (per
pytest worker), freezes the heap out of the garbage collector (or every run would copy it) and then
forks. A run is still its own process: the server forks a waiter, the waiter forks the run, which
takes the caller's stdin/stdout/stderr (passed over a Unix socket), environment, working directory
and umask, and runs `agentledger` as `python -m agentledger` does (runpy, argv, `__main__`), exits
as the interpreter would (`_run`) with the CLI's own status, which the waiter sends back. Scripts
that call `agentledger` by name get the same through `conftest.cli_shim` (this file's --client).

What a fork cannot honour runs the old way, by exec (`ForkServer.can_run` says which): an environment
whose interpreter-start or import-time variables (PYTHON*, COLUMNS, NO_COLOR, TERM, TYPER_*, ...)
differ from the server's, and any subprocess option other than the ones handled here.
AGENTLEDGER_TEST_FORK=0 turns the server off (every run by exec).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Variables read when the interpreter starts or a module is imported (rich's consoles are built at
# import; typer reads TYPER_USE_RICH; the interpreter PYTHON*): a run whose values differ is exec'd.
_START_VARS = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM", "TTY_COMPATIBLE", "TTY_INTERACTIVE",
               "JUPYTER_COLUMNS", "JUPYTER_LINES", "LANG", "LC_ALL", "LC_CTYPE")


def _start_sensitive(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k in _START_VARS or k.startswith(("PYTHON", "TYPER_", "_TYPER_", "PYDANTIC", "LD_", "MALLOC",
                                                 "ARROW_", "DUCKDB"))}


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise RuntimeError("no Umask in /proc/self/status")


class ForkServer:
    """One server process; `run` is safe to call from several threads at once."""

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self.env = dict(env)
        self.cpu = self.user = self.system = 0.0  # CPU seconds of the runs so far, and how many
        self.runs = 0
        self.dir = tempfile.mkdtemp(prefix="agentledger-forkcli.")
        self.path = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], env=self.env, cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path + ".ready"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CLI fork server did not start (exit {self.proc.poll()})")
            time.sleep(0.02)

    def can_run(self, env: dict[str, str], kw: dict) -> bool:
        return (self.proc.poll() is None and set(kw) <= {"input", "cwd"}
                and _start_sensitive(env) == _start_sensitive(self.env))

    def run(self, argv: list[str], *, env: dict[str, str], cwd: str, input: str | None = None,
            timeout: float) -> subprocess.CompletedProcess | None:
        """The run's result, or None when the server says it must be exec'd."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if input is not None else (os.open(os.devnull, os.O_RDONLY), -1)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            req = json.dumps({"argv": argv, "env": env, "cwd": str(cwd), "umask": _umask()}).encode()
            socket.send_fds(conn, [struct.pack("!I", len(req)) + req], [in_r, out_w, err_w])
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

        def drain(fd: int) -> None:
            with open(fd, "rb", closefd=True) as f:
                while data := f.read1(65536):
                    chunks[fd].append(data)

        readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
        for t in readers:
            t.start()
        if in_w != -1:
            def feed() -> None:
                with open(in_w, "wb", closefd=True) as f:
                    try:
                        f.write(input.encode())
                    except BrokenPipeError:
                        pass
            threading.Thread(target=feed, daemon=True).start()
        conn.settimeout(timeout)
        pid = None
        try:
            f = conn.makefile("rb")
            first = f.readline()
            if first == b"exec\n":
                return None
            pid = int(first)
            status = f.readline()
            if not status:
                raise RuntimeError(f"the CLI fork server's waiter for {argv} went away")
            code, user, system = status.split()
            code = int(code)
            self.user += float(user)
            self.system += float(system)
            self.cpu += float(user) + float(system)
            self.runs += 1
        except (socket.timeout, TimeoutError):
            if pid:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            raise subprocess.TimeoutExpired(["agentledger", *argv], timeout) from None
        finally:
            conn.close()
        for t in readers:
            t.join()
        return subprocess.CompletedProcess([sys.executable, "-m", "agentledger", *argv], code,
                                           b"".join(chunks[out_r]).decode(errors="replace"),
                                           b"".join(chunks[err_r]).decode(errors="replace"))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for name in ("sock", "sock.ready"):
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
        os.rmdir(self.dir)


# ---- the server process ----

def _preload() -> None:
    import importlib
    import pkgutil

    import agentledger
    import agentledger.cli  # noqa: F401  typer, rich, pydantic, the application layer
    for mod in ("duckdb", "fastavro", "kafka", "pyarrow", "pyarrow.compute", "pyarrow.dataset", "pyarrow.ipc",
                "pyarrow.parquet", "agentledger.hookmain"):
        importlib.import_module(mod)
    for info in pkgutil.walk_packages(agentledger.__path__, "agentledger.", onerror=lambda name: None):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            try:
                importlib.import_module(info.name)
            except ImportError:  # an optional extra that is not installed
                pass
    # help and errors are rendered by typer's rich module; and typer turns the app into a click
    # command at every call (0.14 CPU-s): build it once here, every run uses its own copy
    import typer.main
    import typer.rich_utils  # noqa: F401

    built = typer.main.get_command(agentledger.cli.app)
    get_command = typer.main.get_command
    typer.main.get_command = lambda app: built if app is agentledger.cli.app else get_command(app)


def _serve(path: str) -> dict:
    """Accept runs until killed. Returns only in a run's own process, with its request."""
    import gc
    import signal

    # objects of the preload stay out of every run's garbage collections: a collection touches every
    # object it tracks, which copies the whole inherited heap into each run
    gc.freeze()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    Path(path + ".ready").touch()
    while True:
        conn, _ = srv.accept()
        while True:  # reap finished waiters
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if os.fork() != 0:
            conn.close()
            continue
        # the waiter
        srv.close()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        (n,) = struct.unpack("!I", msg[:4])
        body = msg[4:]
        while len(body) < n:
            more = conn.recv(n - len(body))
            if not more:
                os._exit(2)
            body += more
        req = json.loads(body)
        if _start_sensitive(req["env"]) != _start_sensitive(dict(os.environ)):
            conn.sendall(b"exec\n")  # the caller starts a new interpreter instead
            os._exit(0)
        pid = os.fork()
        if pid == 0:  # the run
            conn.close()
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            return req
        for fd in fds:
            os.close(fd)
        conn.sendall(b"%d\n" % pid)
        _, status, usage = os.wait4(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        try:
            conn.sendall(b"%d %.3f %.3f\n" % (code, usage.ru_utime, usage.ru_stime))
        finally:
            os._exit(0)


def _run(req: dict) -> None:
    """Be `python -m agentledger ARGV` in ``req``'s environment, directory and umask, and exit as the
    interpreter would: threads joined, atexit handlers run, streams flushed, the exit status of the
    SystemExit (or 1 after a traceback). Then `os._exit`, not the interpreter's finalisation: DuckDB
    (imported here before the fork) started a thread that the forked run does not have, and its
    destructors abort the process when they try to join it."""
    import atexit
    import runpy

    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    os.umask(req["umask"])
    # rich reads the environment when a console is built, at import: build them again
    import agentledger.output as output

    output.console.__init__()
    output.err_console.__init__(stderr=True)
    sys.argv = ["agentledger", *req["argv"]]
    code = 0
    try:
        runpy.run_module("agentledger", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def _client(path: str, argv: list[str]) -> None:
    """`forkcli.py --client SOCKET ARGS...`: an `agentledger` command for scripts (tests/test_docs.py
    puts one on PATH): this process's stdin, stdout, stderr, environment, directory and umask go to a
    run of the server at SOCKET, and it exits as the run did; started with `python -S` it costs a
    few ms instead of an interpreter with agentledger imported. No server there, or one that cannot
    honour this environment: exec `python -m agentledger` instead."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        req = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "umask": _umask()}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(req)) + req], [0, 1, 2])
        f = conn.makefile("rb")
        first = f.readline()
    except OSError:
        first = b"exec\n"
    if first == b"exec\n" or not first:
        os.execv(sys.executable, [sys.executable, "-m", "agentledger", *argv])
    status = f.readline().split()
    if not status:
        sys.exit(f"agentledger: the fork server's waiter went away (run {int(first)})")
    code = int(status[0])
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        _client(sys.argv[2], sys.argv[3:])
    _preload()
    _run(_serve(sys.argv[1]))  # returns in a run only, which ends in os._exit
