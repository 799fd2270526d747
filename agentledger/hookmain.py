"""The fast path of `agentledger hook`: agents run it on every tool use, so it must start quickly.

`agentledger hook ...` (and `python -m agentledger hook ...`) land here without importing typer,
rich or the other commands; everything else goes through the typer CLI. The options mirror
`agentledger.commands.agents.hook` exactly (a test checks it).

When a warm hook server runs for this $AGENTLEDGER_HOME (producers/hookd.py), the call is a thin
client: it hands its input over a Unix socket and prints the answer, importing nothing of the
recorder. Without one, it starts one in the background and waits up to START_WAIT_S for it; if the
server cannot start (or answer), the call does the work itself. ``AGENTLEDGER_HOOK_DAEMON=0`` turns
the server off (every call in-process).
"""

from __future__ import annotations

import json
import os
import sys

PROTO = 1
_CODE_DIRS = ("agentledger", "producers", "schemas", os.path.join("schemas", "transport"))


def _env_policy() -> str | None:
    from agentledger.schemas import envvars

    return envvars.raw("AGENTLEDGER_POLICY")


def _use_server() -> bool:
    """AGENTLEDGER_HOOK_DAEMON; a value that is not a yes or no keeps the default (the hook never fails
    the agent over it)."""
    from agentledger.schemas import envvars
    from agentledger.schemas.errors import ConfigError

    try:
        return envvars.get("AGENTLEDGER_HOOK_DAEMON")
    except ConfigError:
        return envvars.declared("AGENTLEDGER_HOOK_DAEMON").default


def parser():
    import argparse

    p = argparse.ArgumentParser(prog="agentledger hook", add_help=False)
    p.add_argument("--policy", default=_env_policy())
    p.add_argument("--agent", default="auto", choices=("auto", "codex", "claude-code", "gemini-cli"))
    p.add_argument("--deny-style", default="json", choices=("json", "exit-code"))
    p.add_argument("--fail-closed", action="store_true")
    p.add_argument("--budget", type=float, default=5.0)
    p.add_argument("--drain", action="store_true")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--stop-server", action="store_true")
    return p


_FLAGS = {"--fail-closed": "fail_closed", "--drain": "drain", "--serve": "serve", "--stop-server": "stop_server"}
_VALUES = {"--policy": "policy", "--agent": "agent", "--deny-style": "deny_style", "--budget": "budget"}


class _Args:
    def __init__(self) -> None:
        self.policy = _env_policy()
        self.agent, self.deny_style, self.budget = "auto", "json", 5.0
        self.fail_closed = self.drain = self.serve = self.stop_server = False


def parse_args(argv: list[str]) -> _Args | None:
    """The options without argparse (a few ms of every tool call); None means: let argparse say what is wrong."""
    a = _Args()
    i = 0
    while i < len(argv):
        opt, _, inline = argv[i].partition("=")
        if opt in _FLAGS and not inline:
            setattr(a, _FLAGS[opt], True)
        elif opt in _VALUES:
            if not inline:
                i += 1
                if i >= len(argv):
                    return None
                inline = argv[i]
            setattr(a, _VALUES[opt], inline)
        else:
            return None
        i += 1
    try:
        a.budget = float(a.budget)
    except ValueError:
        return None
    if a.agent not in ("auto", "codex", "claude-code", "gemini-cli") or a.deny_style not in ("json", "exit-code"):
        return None
    return a


def code_digest() -> str:
    """Identifies the installed code, so a server started by an older install is replaced."""
    import zlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = []
    for d in _CODE_DIRS:
        try:
            entries = sorted(os.scandir(os.path.join(root, d)), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.endswith((".py", ".avsc", ".sql")):
                st = e.stat()
                parts.append(f"{d}/{e.name}:{st.st_size}:{st.st_mtime_ns}")
    blob = ";".join(parts).encode()
    return f"{zlib.crc32(blob):08x}{zlib.adler32(blob):08x}{len(parts):04x}"


def _request(sock_path: str, header: dict, raw: bytes, timeout: float) -> dict | None:
    """The server's answer, or None when there is no (usable) server."""
    import socket
    import struct

    if len(sock_path) > 100 or not os.path.exists(sock_path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(sock_path)
        head = json.dumps(header).encode()
        s.sendall(struct.pack(">I", len(head)) + head + struct.pack(">I", len(raw)) + raw)
        buf = b""
        while len(buf) < 4:
            chunk = s.recv(4 - len(buf))
            if not chunk:
                return None
            buf += chunk
        (n,) = struct.unpack(">I", buf)
        body = b""
        while len(body) < n:
            chunk = s.recv(min(1 << 20, n - len(body)))
            if not chunk:
                return None
            body += chunk
        answer = json.loads(body)
        return answer if "exit" in answer or "stopped" in answer or "served" in answer else None
    except (OSError, ValueError):
        return None
    finally:
        s.close()


START_WAIT_S = 2.0  # how long a call waits for a server that is starting, before doing the work itself
FAILED_BACKOFF_S = 60.0


def _held(path: str) -> bool:
    """Whether some process holds the flock on ``path`` (a live server holds hookd.lock)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _start_server(home: str) -> bool:
    """Make sure a server for this home is starting; False when servers keep failing to start here."""
    import fcntl
    import subprocess
    import time

    state = os.path.join(home, "state")
    failed = os.path.join(state, "hookd.failed")
    try:
        if time.time() - os.stat(failed).st_mtime < FAILED_BACKOFF_S:
            return False
    except OSError:
        pass
    if _held(os.path.join(state, "hookd.lock")):
        return True  # one is running (binding, or retiring and about to be replaced)
    try:
        os.makedirs(state, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(state, "hookd.spawn.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return True  # another hook call is starting it right now
    try:
        with open(os.path.join(state, "hookd.log"), "ab") as log:
            subprocess.Popen([sys.executable, "-m", "agentledger", "hook", "--serve"], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, env={**os.environ, "AGENTLEDGER_HOME": home},
                             start_new_session=True, close_fds=True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _wait_for_server(home: str, sock_path: str) -> bool:
    import time

    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if os.path.exists(sock_path):
            return True
        time.sleep(0.02)
    if _held(os.path.join(home, "state", "hookd.lock")):
        return False  # alive but slow to start (a loaded machine): no reason to stop trying
    try:  # remember, so that the next calls do not wait for a server that cannot start here
        with open(os.path.join(home, "state", "hookd.failed"), "w") as f:
            f.write("no hook server socket appeared; see hookd.log\n")
    except OSError:
        pass
    return False


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args is None:
        try:
            args = parser().parse_args(argv)
        except SystemExit as exc:  # argparse already said why on stderr
            return int(exc.code or 2)
    from agentledger.schemas.homes import HOME_VARS, prepare_process, resolve_home, say

    # owner-only files from here on; an old ./.agentledger is named (never used); a loose home tightened
    say(prepare_process())
    home = resolve_home()
    sock_path = os.path.join(home, "state", "hookd.sock")
    if args.serve:
        from pathlib import Path

        from agentledger.producers.hookd import serve

        return serve(Path(home), code_digest())
    if args.stop_server:
        # "stopped" means gone: a server removes its socket when its accept loop ends, and a server
        # spawned by a racing first call may be waiting for the lock to take over: stop it too
        import time

        stopped = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not _request(sock_path, {"v": PROTO, "stop": True}, b"", 5):
                if not os.path.exists(sock_path) or stopped == 0:
                    break
                time.sleep(0.05)  # the socket of the one just stopped, not yet removed
                continue
            stopped += 1
            gone = time.monotonic() + 5
            while os.path.exists(sock_path) and time.monotonic() < gone:
                time.sleep(0.05)
            time.sleep(0.6)  # a waiting server polls the lock every 50 ms and binds at once
        sys.stderr.write("hook server stopped\n" if stopped else "no hook server running\n")
        return 0
    use_server = _use_server()
    raw = b""
    if not args.drain:
        raw = sys.stdin.buffer.read(16 * 1024 * 1024 + 1)[:16 * 1024 * 1024]
        if use_server:
            env = {k: v for k, v in os.environ.items() if k.startswith("AGENTLEDGER_") or k in HOME_VARS}
            env["AGENTLEDGER_HOME"] = home
            policy = os.path.abspath(args.policy) if args.policy else None
            header = {"v": PROTO, "code": code_digest(), "env": env,
                      "args": {"policy": policy, "agent": args.agent, "deny_style": args.deny_style,
                               "fail_closed": args.fail_closed, "budget": args.budget}}
            answer = _request(sock_path, header, raw, args.budget * 4 + 10)
            if answer is None and len(sock_path) <= 100 and _start_server(home) and _wait_for_server(home, sock_path):
                answer = _request(sock_path, header, raw, args.budget * 4 + 10)
            if answer is not None:
                if answer.get("stdout"):
                    sys.stdout.write(answer["stdout"])
                    sys.stdout.flush()
                if answer.get("stderr"):
                    sys.stderr.write(answer["stderr"])
                    sys.stderr.flush()
                return int(answer["exit"])
    return _in_process(args, raw)


def _in_process(args, raw: bytes) -> int:
    from agentledger.schemas.config import from_env
    from agentledger.schemas.errors import AgentLedgerError

    settings = from_env()
    try:
        if args.drain:
            from agentledger.producers.ledger import SessionAppender

            appender = SessionAppender(settings, lock_timeout_s=args.budget, flush_timeout_s=args.budget)
            try:
                n = appender.drain_all()
            finally:
                appender.close()
            sys.stderr.write(f"re-sent {n} events\n")
            return 0
        from agentledger.producers.hook import handle

        out = handle(raw, settings, policy_path=args.policy, agent=args.agent, deny_style=args.deny_style,
                     fail_closed=args.fail_closed, budget_s=args.budget)
    except AgentLedgerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    if out.stdout:
        sys.stdout.write(out.stdout)
        sys.stdout.flush()
    if out.stderr:
        sys.stderr.write(out.stderr)
        sys.stderr.flush()
    return out.exit_code
