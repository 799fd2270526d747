"""Run one command under bubblewrap, traced by strace, and turn what was observed into events.

The sandbox (``bwrap``), by default:

- a new user, PID, IPC, UTS, cgroup and network namespace; all capabilities dropped; no nested
  user namespaces (bwrap >= 0.8); ``--new-session`` (no terminal injection); dies with us;
- ``/`` read-only; a fresh ``/dev`` and ``/proc``; private tmpfs on ``/tmp``, ``/var/tmp`` and
  ``/run`` (host sockets such as the Docker or D-Bus ones are not reachable);
- the workspace (and other writable roots of the policy) bound read-write, or read-only in
  ``read_only`` mode; ``deny_read`` paths and ``$AGENTLEDGER_HOME`` hidden (empty tmpfs, or
  ``/dev/null`` over a file);
- no network but its own loopback: the egress proxy is reachable through the launcher's relay at
  127.0.0.1:PORT, named by HTTP(S)_PROXY / ALL_PROXY;
- exactly the environment given (``--clearenv``), which the caller built from the policy;
- libfaketime preloaded with a clock offset read from a file, so a recorded command and its
  re-execution see the same environment and the re-execution sees the recorded clock.

Escalated commands (approved to run outside the sandbox) and ``danger_full_access`` sessions run
without bwrap, still traced, so their files, processes and network attempts are still recorded.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, BinaryIO

from agentledger.producers.recorder import EXCERPT_BYTES
from agentledger.schemas import envvars
from agentledger.schemas.canonical import canonical_json
from agentledger.schemas.homes import user_umask
from agentledger.schemas.netaddr import HostError, is_loopback, parse_address
from agentledger.schemas.policy import Policy

from . import strace as st
from .errors import SandboxError, SandboxUnavailable
from .tree import Snapshot

LAUNCHER = str(Path(__file__).with_name("launcher.py"))
RUN_DIR_IN_SANDBOX = "/run/agentledger"
PROXY_SOCKET_IN_SANDBOX = f"{RUN_DIR_IN_SANDBOX}/proxy.sock"
CLOCK_FILE_IN_SANDBOX = f"{RUN_DIR_IN_SANDBOX}/clock"
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
DROPPED_ENV = {*(v.upper() for v in PROXY_ENV), "NO_PROXY", "FTP_PROXY", "LD_PRELOAD", "LD_LIBRARY_PATH",
               "FAKETIME", "FAKETIME_TIMESTAMP_FILE", "FAKETIME_DONT_FAKE_MONOTONIC"}
NOT_CAPTURED = {"sha256": "", "size": 0, "excerpt": "", "truncated": False}
_PR_SET_PDEATHSIG = 1


# -- tools ---------------------------------------------------------------------------------------

@dataclass
class Tools:
    bwrap: str | None
    strace: str | None
    faketime: str | None
    bwrap_version: tuple[int, ...] = ()

    @classmethod
    def find(cls, env: dict | None = None) -> "Tools":
        env = os.environ if env is None else env
        bwrap = envvars.raw("AGENTLEDGER_BWRAP", env) or shutil.which("bwrap")
        strace = envvars.raw("AGENTLEDGER_STRACE", env) or shutil.which("strace")
        fake = envvars.raw("AGENTLEDGER_FAKETIME_LIB", env)
        if not fake:
            hits = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") +
                          glob.glob("/usr/lib/faketime/libfaketimeMT.so.1") +
                          glob.glob("/usr/local/lib/faketime/libfaketimeMT.so.1"))
            fake = hits[0] if hits else None
        version: tuple[int, ...] = ()
        if bwrap:
            try:
                out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
                version = tuple(int(x) for x in out.split()[-1].split("."))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                version = ()
        return cls(bwrap, strace, fake, version)

    def require(self, sandboxed: bool = True) -> None:
        if sandboxed and not self.bwrap:
            raise SandboxUnavailable("bwrap not found: install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)")
        if not self.strace:
            raise SandboxUnavailable("strace not found: install strace (Debian/Ubuntu: apt-get install strace)")


# -- what to run -----------------------------------------------------------------------------------

@dataclass
class CommandSpec:
    argv: list[str]
    cwd: str  # as the command sees it
    env: dict[str, str]  # exactly the environment the command sees
    stdin: bytes | None
    workspace: str  # the workspace path the command sees
    workspace_source: str  # the host directory mounted there (differs on re-execution)
    sandboxed: bool = True
    clock_offset_s: float = 0.0
    timeout_s: float | None = None
    hide: tuple[str, ...] = ()  # host paths the command must not see (the recorder's home)


@dataclass
class Options:
    proxy_port: int = 3128
    hostname: str = "agentledger-sandbox"
    seccomp_bpf: bool = True
    max_capture_bytes: int = 16 * 1024 * 1024
    keep_trace: str | None = None  # copy the raw strace output here
    python: str = sys.executable


def sandbox_env(policy: Policy, host_env: dict[str, str], *, tools: Tools, options: Options, sandboxed: bool,
                clock_file: str = CLOCK_FILE_IN_SANDBOX) -> dict[str, str]:
    """The environment a sandboxed command sees: the policy's filter over ours, proxy variables,
    and the clock preload. Our own AGENTLEDGER_* settings and host proxy settings never pass."""
    base = {k: v for k, v in host_env.items() if not k.startswith("AGENTLEDGER_") and k.upper() not in DROPPED_ENV}
    env = policy.filter_env(base)
    if sandboxed:
        proxy = f"http://127.0.0.1:{options.proxy_port}"
        for name in PROXY_ENV:
            env[name] = proxy
    env["AGENTLEDGER_SANDBOX"] = "bwrap" if sandboxed else "none"
    if tools.faketime and sandboxed:  # outside the sandbox there is no private /run for the clock file
        env["LD_PRELOAD"] = tools.faketime
        env["FAKETIME_TIMESTAMP_FILE"] = clock_file
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return env


def env_digest(env: dict[str, str]) -> str:
    return hashlib.sha256(canonical_json(env)).hexdigest()


def sandbox_profile(policy: Policy, sandboxed: bool, escalated: bool) -> str:
    if not sandboxed:
        return "unsandboxed:" + ("escalated" if escalated else policy.sandbox_mode)
    return f"bwrap:{policy.sandbox_mode}:net=proxy"


def deny_read_paths(policy: Policy) -> list[str]:
    """Existing host paths matched by the policy's deny_read patterns (to hide in the sandbox)."""
    out: list[str] = []
    for pat in policy.deny_read:
        p = os.path.expanduser(pat)
        if p.endswith("/**"):
            base = p[:-3]
            hits = glob.glob(base) if glob.has_magic(base) else ([base] if os.path.lexists(base) else [])
        else:
            hits = glob.glob(p, recursive=True) if glob.has_magic(p) else ([p] if os.path.lexists(p) else [])
        out.extend(os.path.normpath(h) for h in hits)
    return sorted(set(out))


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"


PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/run")


def runtime_dirs(python: str) -> list[str]:
    """What the launcher needs to run inside the sandbox that the private tmpfs mounts would hide:
    the launcher's directory and the interpreter's installation (a clone or a virtualenv under /tmp
    is common). Bound read-only, after the tmpfs mounts."""
    dirs = {os.path.dirname(LAUNCHER)}
    exe = os.path.abspath(python)
    for _ in range(40):  # every hop of the symlink chain (venv python -> base python ...): its install
        dirs.add(os.path.dirname(os.path.dirname(exe)))
        if not os.path.islink(exe):
            break
        exe = os.path.normpath(os.path.join(os.path.dirname(exe), os.readlink(exe)))
    return sorted(d for d in dirs if os.path.isdir(d) and any(_under(d, t) for t in PRIVATE_TMPFS))


def bwrap_argv(tools: Tools, policy: Policy, spec: CommandSpec, options: Options, *, proxy_socket: str | None,
               clock_file: str) -> list[str]:
    a = [tools.bwrap, "--unshare-user"]
    if tools.bwrap_version >= (0, 8):
        a.append("--disable-userns")
    a += ["--cap-drop", "ALL", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
          "--unshare-uts", "--hostname", options.hostname, "--unshare-cgroup-try", "--unshare-net",
          "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
          "--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", "/run", "--dir", RUN_DIR_IN_SANDBOX]
    for need in runtime_dirs(options.python):
        a += ["--ro-bind", need, need]
    if proxy_socket:
        a += ["--bind", proxy_socket, PROXY_SOCKET_IN_SANDBOX]
    a += ["--ro-bind", clock_file, CLOCK_FILE_IN_SANDBOX]
    mode = "--ro-bind" if policy.sandbox_mode == "read_only" else "--bind"
    a += [mode, spec.workspace_source, spec.workspace]
    if policy.sandbox_mode != "read_only":
        for root in policy.roots(spec.workspace):
            if _under(root, spec.workspace) or any(_under(root, t) for t in ("/tmp", "/var/tmp", "/run")):
                continue
            if os.path.isdir(root):
                a += ["--bind", root, root]
    for hidden in (*spec.hide, *deny_read_paths(policy)):
        if _under(spec.workspace, hidden):
            continue  # never hide the workspace itself
        if os.path.isdir(hidden) and not os.path.islink(hidden):
            a += ["--tmpfs", hidden]
        elif os.path.lexists(hidden):
            a += ["--ro-bind", "/dev/null", hidden]
    a += ["--chdir", spec.cwd, "--clearenv"]
    for k, v in sorted(spec.env.items()):
        a += ["--setenv", k, v]
    return a


# -- running -----------------------------------------------------------------------------------------

class Capture:
    """A command output stream: echoed live, digested in full, kept up to a bound."""

    def __init__(self, limit: int):
        self.limit = limit
        self.h = hashlib.sha256()
        self.size = 0
        self.head = bytearray()
        self.kept = bytearray()
        self.complete = True

    def feed(self, data: bytes) -> None:
        self.h.update(data)
        self.size += len(data)
        if len(self.head) <= EXCERPT_BYTES:
            self.head += data[: EXCERPT_BYTES + 1 - len(self.head)]
        if self.complete:
            if len(self.kept) + len(data) <= self.limit:
                self.kept += data
            else:
                self.complete = False
                self.kept = bytearray()

    def digest(self) -> dict:
        return {"sha256": self.h.hexdigest(), "size": self.size,
                "excerpt": bytes(self.head[:EXCERPT_BYTES]).decode("utf-8", "replace"),
                "truncated": self.size > EXCERPT_BYTES}


@dataclass
class Execution:
    exit_code: int | None
    signal: str | None
    status: str  # completed | failed | timed_out | killed
    started_us: int
    duration_ms: int
    stdout: Capture
    stderr: Capture
    trace: st.TraceAnalysis
    returncode: int  # what the tracer returned (the launcher's code when the command never started)


def _pdeathsig() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _pump(src: BinaryIO, cap: Capture, echo: BinaryIO | None) -> None:
    while True:
        data = src.read1(65536) if hasattr(src, "read1") else src.read(65536)
        if not data:
            break
        cap.feed(data)
        if echo is not None:
            try:
                echo.write(data)
                echo.flush()
            except (OSError, ValueError):
                echo = None


def execute(spec: CommandSpec, policy: Policy, tools: Tools, options: Options, *, proxy_socket: str | None,
            echo_stdout: BinaryIO | None = None, echo_stderr: BinaryIO | None = None,
            on_interrupt: Callable[[], None] | None = None, run_dir: str | None = None) -> Execution:
    """Run ``spec`` traced (and sandboxed unless ``spec.sandboxed`` is false); block until it ends.

    ``run_dir``: a private scratch directory for the trace and clock file (removed by the caller);
    by default one is made and removed here."""
    tools.require(spec.sandboxed)
    own = run_dir is None
    run_dir = run_dir or tempfile.mkdtemp(prefix="agentledger-sbx-")
    os.chmod(run_dir, 0o700)
    try:
        trace_path = os.path.join(run_dir, "trace")
        clock_file = os.path.join(run_dir, "clock")
        with open(clock_file, "w") as f:
            f.write(f"{spec.clock_offset_s:+.6f}\n")
        os.chmod(clock_file, 0o644)
        marker = f"/.agentledger-exec-{uuid.uuid4().hex}"
        config = {"marker": marker, "proxy_socket": PROXY_SOCKET_IN_SANDBOX if (spec.sandboxed and proxy_socket) else None,
                  "proxy_port": options.proxy_port}
        launcher = [options.python, "-I", "-S", LAUNCHER, json.dumps(config), "--", *spec.argv]
        argv = st.strace_argv(tools.strace, trace_path, seccomp_bpf=options.seccomp_bpf)
        if spec.sandboxed:
            argv += bwrap_argv(tools, policy, spec, options, proxy_socket=proxy_socket, clock_file=clock_file)
            argv += ["--", *launcher]
            popen_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
            cwd = "/"
        else:
            argv += ["--", *launcher]
            popen_env = dict(spec.env)
            cwd = spec.cwd
        started_us = time.time_ns() // 1000
        t0 = time.monotonic()
        try:
            # the command runs with the user's own umask, not agentledger's owner-only one (schemas/homes.py)
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if spec.stdin else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=popen_env, cwd=cwd,
                                    start_new_session=True, preexec_fn=_pdeathsig, umask=user_umask())
        except OSError as exc:
            raise SandboxError(f"cannot start the tracer: {exc}") from exc
        out, err = Capture(options.max_capture_bytes), Capture(options.max_capture_bytes)
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, out, echo_stdout), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr, err, echo_stderr), daemon=True)]
        for t in pumps:
            t.start()
        if spec.stdin:
            def feed():
                try:
                    proc.stdin.write(spec.stdin)
                except (BrokenPipeError, OSError):
                    pass
                finally:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
            threading.Thread(target=feed, daemon=True).start()
        timed_out = False
        interrupted = False
        try:
            proc.wait(timeout=spec.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        except KeyboardInterrupt:
            interrupted = True
        if timed_out or interrupted:
            _kill_group(proc)
            if interrupted and on_interrupt:
                on_interrupt()
        for t in pumps:
            t.join(timeout=10)
        duration_ms = int((time.monotonic() - t0) * 1000)
        if options.keep_trace:
            shutil.copyfile(trace_path, options.keep_trace)
        try:
            with open(trace_path, errors="surrogateescape") as f:
                analysis = st.analyse(f, marker)
        except FileNotFoundError:
            analysis = st.TraceAnalysis()
        if analysis.calls == 0 and proc.returncode != 0:
            raise SandboxError("the tracer produced no trace (is ptrace allowed here? see `agentledger sandbox "
                               f"doctor`): {bytes(err.head).decode('utf-8', 'replace').strip()[:500]}")
        if analysis.top is not None:
            code, sig = analysis.top_exit_code, analysis.top_signal
        else:
            code, sig = (proc.returncode if proc.returncode >= 0 else None), None
        if timed_out:
            status = "timed_out"
        elif interrupted or sig:
            status = "killed"
        else:
            status = "completed" if code == 0 else "failed"
        if timed_out or interrupted:
            code = None
        return Execution(code, sig, status, started_us, duration_ms, out, err, analysis, proc.returncode)
    finally:
        if own:
            shutil.rmtree(run_dir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# -- from observations to events --------------------------------------------------------------

@dataclass
class Observation:
    kind: str
    payload: dict
    at_us: int


@dataclass
class Observed:
    """Everything one command produced, as event payloads, in time order."""
    events: list[Observation] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)


_IGNORED_PREFIXES = ("/dev/", "/proc/", "/sys/", RUN_DIR_IN_SANDBOX + "/")
_ERRNO_TEXT = {"EROFS": "read-only file system", "EACCES": "permission denied", "EPERM": "operation not permitted",
               "EAFNOSUPPORT": "address family not supported", "EPROTONOSUPPORT": "protocol not supported",
               "ENETUNREACH": "network unreachable", "ECONNREFUSED": "connection refused",
               "EHOSTUNREACH": "host unreachable", "ETIMEDOUT": "timed out"}


def _us(ts: float) -> int:
    return int(round(ts * 1_000_000))


def _outcome(errno: str | None) -> str:
    if errno is None:
        return "ok"
    return {"ECONNREFUSED": "refused", "ENETUNREACH": "blocked", "EHOSTUNREACH": "blocked", "EACCES": "blocked",
            "EPERM": "blocked", "ETIMEDOUT": "timeout", "EINPROGRESS": "unknown", "EALREADY": "unknown"}.get(errno, "error")


def build_observations(spec: CommandSpec, ex: Execution, before: Snapshot, after: Snapshot, policy: Policy, *,
                       command_id: str, new_id: Callable[[], str], profile: str, proxy_port: int | None,
                       escalated: bool = False) -> Observed:
    """The events the trace and the two snapshots support (file, process, network, denials)."""
    ws = spec.workspace.rstrip("/")
    obs = Observed()
    emit = (lambda kind, payload, ts: obs.events.append(Observation(kind, payload, _us(ts) if isinstance(ts, float) else ts)))
    tr = ex.trace

    # processes the command started
    image_cmd: dict[int, str] = {}
    if tr.top is not None:
        image_cmd[tr.top.index] = command_id
    for img in tr.images:
        if tr.top is not None and img.index == tr.top.index:
            continue
        cid = new_id()
        image_cmd[img.index] = cid
        parent = image_cmd.get(img.parent, command_id) if img.parent is not None else command_id
        emit("command_started", {"command_id": cid, "argv": img.argv or [img.path], "cwd": img.cwd or spec.cwd,
                                 "env_names": [], "sandbox_profile": profile, "escalated": escalated, "pid": img.pid,
                                 "parent_command_id": parent}, img.ts)
        end = img.ts_end if img.ts_end is not None else img.ts
        status = "killed" if img.signal else ("completed" if img.exit_code == 0 else "failed")
        emit("command_finished", {"command_id": cid, "exit_code": img.exit_code,
                                  "duration_ms": max(0, int((end - img.ts) * 1000)), "status": status,
                                  "stdout": dict(NOT_CAPTURED), "stderr": dict(NOT_CAPTURED)}, end)

    def owner(image: int | None) -> str:
        return image_cmd.get(image, command_id) if image is not None else command_id

    def inside(path: str) -> bool:
        return path == ws or path.startswith(ws + "/")

    def rel(path: str) -> str:
        return os.path.relpath(path, ws)

    read_denied: dict[str, bool] = {}

    def hidden(path: str) -> bool:
        if not policy.deny_read:
            return False
        if path not in read_denied:
            read_denied[path] = policy.evaluate_read(path).action == "deny"
        return read_denied[path]

    # files: one event per (path, operation, new_path), at its first occurrence
    seen: dict[tuple, Observation] = {}
    denied: set[tuple] = set()
    touched: set[str] = set()
    for op in tr.file_ops:
        path = op.path
        if path.startswith(_IGNORED_PREFIXES) or path in ("/dev/null", "/dev/tty"):
            continue
        if op.errno is not None:
            if op.write and op.errno in ("EROFS", "EACCES", "EPERM"):
                d = policy.evaluate_write(path, ws)
                if d.action == "deny" or op.errno == "EROFS":
                    key = ("file_write", path)
                    if key not in denied:
                        denied.add(key)
                        emit("sandbox_denied", {"operation": "file_write", "target": path,
                                                "rule": d.rule if d.action == "deny" else "sandbox.mount",
                                                "reason": f"{op.errno} ({_ERRNO_TEXT.get(op.errno, op.errno)}): "
                                                          f"{d.reason if d.action == 'deny' else 'the mount is read-only'}",
                                                "command_id": owner(op.image), "inferred": False}, op.ts)
            elif not op.write and hidden(path):
                _deny_read(emit, denied, policy, path, op, owner(op.image))
            continue
        if not op.write and hidden(path):
            _deny_read(emit, denied, policy, path, op, owner(op.image))
            continue
        if op.op == "open" and not op.write:
            if not inside(path):
                continue
            e = before.entries.get(rel(path)) or after.entries.get(rel(path))
            if e is None or e.type != "f":
                continue
            kind = "read"
        elif op.op in ("open", "truncate"):
            kind = "write"
        elif op.op in ("unlink", "rmdir"):
            kind = "delete"
        elif op.op == "rename":
            kind = "rename"
        elif op.op == "chmod":
            kind = "chmod"
        else:  # mkdir, link, symlink, mknod
            kind = "create"
        touched.add(path)
        if op.new_path:
            touched.add(op.new_path)
        key = (path, kind, op.new_path)
        if key in seen:
            if kind == "chmod" and op.mode is not None:
                seen[key].payload["mode"] = op.mode
            continue
        payload = {"path": path, "operation": kind, "new_path": op.new_path, "command_id": owner(op.image),
                   "inside_workspace": inside(path), "mode": op.mode if kind in ("chmod", "create") else None}
        seen[key] = Observation("file_accessed", payload, _us(op.ts))
        obs.events.append(seen[key])

    for o in seen.values():
        p = o.payload
        path, kind = p["path"], p["operation"]
        if not p["inside_workspace"]:
            continue
        b = before.entries.get(rel(path))
        if kind == "rename":
            a = after.entries.get(rel(p["new_path"])) if p["new_path"] and inside(p["new_path"]) else None
        else:
            a = after.entries.get(rel(path))
        if kind == "write" and b is None:
            p["operation"] = kind = "create"
        p["digest_before"] = b.digest if b is not None and b.type == "f" else None
        if kind == "read":
            p["digest_after"] = p["digest_before"] or (a.digest if a is not None and a.type == "f" else None)
        elif kind == "delete":
            p["digest_after"] = None
        else:
            p["digest_after"] = a.digest if a is not None and a.type == "f" else None
            p["size_after"] = a.size if a is not None and a.type == "f" else None
            if kind in ("create", "write") and a is not None:
                p["mode"] = a.mode

    # workspace changes no traced syscall explains
    from .tree import changes
    for path in changes(before, after):
        absolute = os.path.join(ws, path)
        if not any(absolute == t or absolute.startswith(t.rstrip("/") + "/") for t in touched):
            obs.unexplained.append(path)

    # every other way out: connects, datagrams sent to an address, raw and packet sockets (the proxy
    # records the requests that went through it)
    net_seen: set[tuple] = set()
    for c in tr.network:
        if c.family == "unix":
            _unix_socket(emit, new_id, owner, spec, escalated, c, net_seen)
            continue
        address = _address(c.host)
        loopback = address is not None and is_loopback(address)
        if spec.sandboxed and loopback and c.port == proxy_port and c.call == "connect":
            continue
        kind = c.sock or ("TCP" if c.call == "connect" else "UDP")  # (a socket made before the trace)
        if c.call == "socket":
            protocol = "unknown"
        elif c.port == 53:
            protocol = "dns"
        else:
            protocol = "udp" if kind.startswith("UDP") else "tcp" if kind.startswith("TCP") else "unknown"
        outcome = _outcome(c.errno)
        key = (c.host, c.port, protocol, c.call, c.detail, outcome, c.image)
        if key in net_seen:
            continue
        net_seen.add(key)
        if not spec.sandboxed:
            decision, rule = "allow", ("escalation" if escalated else "sandbox.mode")
            reason = "ran outside the sandbox"
        elif c.call == "socket" and c.errno is not None:
            decision, rule = "deny", "sandbox.network"
            reason = "the sandbox allows no raw or packet sockets (no capabilities, no network)"
        elif c.call == "socket":
            decision, rule = "allow", "sandbox.loopback"
            reason = "a raw socket in the sandbox's network namespace reaches only its own loopback"
        elif loopback:
            decision, rule, reason = "allow", "sandbox.loopback", "the sandbox's own loopback, not the host's"
        else:
            decision, rule = "deny", "sandbox.network"
            reason = "the sandbox has no network; only the egress proxy is reachable"
        attempt_id = new_id()
        method = c.detail if c.call == "socket" else (None if c.call == "connect" else c.call)
        emit("network_attempted", {"attempt_id": attempt_id, "host": c.host, "port": c.port, "protocol": protocol,
                                   "method": method, "url": None, "command_id": owner(c.image)}, c.ts)
        emit("network_decided", {"attempt_id": attempt_id, "decision": decision, "rule": rule, "reason": reason,
                                 "policy_source": "sandbox", "addresses": [str(address)] if address else []}, c.ts)
        emit("network_completed", {"attempt_id": attempt_id, "outcome": outcome, "status": None, "bytes_in": 0,
                                   "bytes_out": 0, "duration_ms": 0, "response_digest": None,
                                   "error": None if c.errno is None else f"{c.errno} ({_ERRNO_TEXT.get(c.errno, c.errno)})"},
             c.ts)
    obs.events.sort(key=lambda o: o.at_us)
    return obs


def _unix_socket(emit, new_id, owner, spec: CommandSpec, escalated: bool, c: st.NetAttempt, seen: set) -> None:
    """A connect (or datagram) to a unix socket: IPC that no network namespace confines. The sandbox
    hides /run, /tmp and /var/tmp (the usual daemons' sockets), so what a command reaches is a
    socket in a path it can see (in its workspace, its home, ...): recorded as a network attempt to
    that path (port 0), allowed (the sandbox has no means to refuse it), with what became of it. A
    socket that is not there (ENOENT: the name service's probes) reached nothing and is left out;
    the launcher's own connection to the egress proxy is the proxy's to record."""
    if c.errno == "ENOENT" or (spec.sandboxed and c.host == PROXY_SOCKET_IN_SANDBOX):
        return
    outcome = _outcome(c.errno)
    key = (c.host, c.call, outcome, c.image)
    if key in seen:
        return
    seen.add(key)
    if not spec.sandboxed:
        rule, reason = ("escalation" if escalated else "sandbox.mode"), "ran outside the sandbox"
    elif c.host.startswith("@"):
        rule, reason = "sandbox.loopback", "an abstract unix socket: the sandbox's own network namespace"
    else:
        rule, reason = "sandbox.unix_socket", ("a unix socket the sandbox's filesystem shows: a network "
                                               "namespace does not confine it")
    attempt_id = new_id()
    emit("network_attempted", {"attempt_id": attempt_id, "host": c.host, "port": 0, "protocol": "unknown",
                               "method": f"{c.call}(AF_UNIX)", "url": None, "command_id": owner(c.image)}, c.ts)
    emit("network_decided", {"attempt_id": attempt_id, "decision": "allow", "rule": rule, "reason": reason,
                             "policy_source": "sandbox", "addresses": []}, c.ts)
    emit("network_completed", {"attempt_id": attempt_id, "outcome": outcome, "status": None, "bytes_in": 0,
                               "bytes_out": 0, "duration_ms": 0, "response_digest": None,
                               "error": None if c.errno is None else f"{c.errno} ({_ERRNO_TEXT.get(c.errno, c.errno)})"},
         c.ts)


def _address(host: str):
    try:
        return parse_address(host)
    except HostError:
        return None


def _deny_read(emit, denied: set, policy: Policy, path: str, op: st.FileOp, command_id: str) -> None:
    key = ("file_read", path)
    if key in denied:
        return
    denied.add(key)
    d = policy.evaluate_read(path)
    what = f"{op.errno} ({_ERRNO_TEXT.get(op.errno, op.errno)})" if op.errno else "opened an emptied stand-in"
    emit("sandbox_denied", {"operation": "file_read", "target": path, "rule": d.rule,
                            "reason": f"{what}: {d.reason}; the sandbox hides it", "command_id": command_id,
                            "inferred": False}, op.ts)
