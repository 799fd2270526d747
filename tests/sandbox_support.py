"""Helpers for the recording-sandbox tests: real HTTP servers on 127.0.0.1, policies, event reading."""

from __future__ import annotations

import http.server
import os
import sys
import threading
from pathlib import Path

from conftest import cli_env, run_cli

# the interpreter the sandboxed test commands run (a real binary, not a pyenv shim)
PY = os.path.realpath(sys.executable)


class Server:
    """A real HTTP server on 127.0.0.1 (a thread), answering GET PATH with ``pages[PATH]``."""

    def __init__(self, pages: dict[str, bytes]):
        self.pages = dict(pages)
        self.hits: list[str] = []
        self.hosts: list[str | None] = []  # the Host header of each hit
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits.append(self.path)
                outer.hosts.append(self.headers.get("Host"))
                body = outer.pages.get(self.path.split("?")[0])
                if body is None:
                    self.send_response(404)
                    body = b"not found\n"
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def policy(*, allowed: int | None = None, denied: int | None = None, asked: int | None = None,
           noninteractive: str = "deny", timeout_s: float = 60, gated: str | None = None, extra: str = "",
           mode: str = "workspace_write", deny_read: list[str] | None = None,
           env_allow: list[str] | None = None) -> str:
    rules = []
    if allowed:
        rules.append(f'[[network.rules]]\nid = "allowed-server"\naction = "allow"\nhosts = ["127.0.0.1"]\nports = [{allowed}]\n')
    if denied:
        rules.append(f'[[network.rules]]\nid = "blocked-server"\naction = "deny"\nhosts = ["127.0.0.1"]\nports = [{denied}]\n')
    if asked:
        rules.append(f'[[network.rules]]\nid = "ask-server"\naction = "ask"\nhosts = ["127.0.0.1"]\nports = [{asked}]\n')
    gate = ""
    if gated:
        gate = f'[[approvals.rules]]\nid = "gated"\ndecision = "prompt"\nprefix = ["sh", "-c", "{gated}"]\n' \
               f'justification = "writes a release marker"\n'
    allow = env_allow if env_allow is not None else ["PATH", "HOME", "LANG", "MY_SETTING"]
    return f"""name = "test-policy"
[sandbox]
mode = "{mode}"
writable_roots = ["$WORKSPACE"]
deny_read = {deny_read or []!r}
[sandbox.env]
allow = {allow!r}
deny = ["*TOKEN*", "*SECRET*"]
[network]
default = "deny"
{''.join(rules)}
[approvals]
default = "allow"
escalation = "prompt"
noninteractive = "{noninteractive}"
timeout_s = {timeout_s}
{gate}
{extra}
""".replace("'", '"')


# issue 21's policy: everything allowed but the local host, link-local IPv6 and the cloud metadata address
NO_LOCAL = """name = "no-local"
[network]
default = "allow"
[[network.rules]]
id = "no-local"
action = "deny"
cidrs = ["127.0.0.0/8", "::1/128", "169.254.169.254/32", "fe80::/10"]
[approvals]
default = "allow"
"""


def sandbox_env(home: Path, **extra: str) -> dict[str, str]:
    env = cli_env(home)
    env.pop("MY_SETTING", None)
    env.update(extra)
    return env


def sandbox(*args: str, env: dict, cwd: Path, check: bool = True, **kw):
    """`agentledger sandbox ...` as a subprocess with stdin from /dev/null (no terminal)."""
    import subprocess

    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("start_new_session", True)  # no controlling terminal: never prompts
    return run_cli("sandbox", *args, env=env, cwd=cwd, check=check, **kw)


def events(home: Path, session_id: str, **env_extra: str) -> list:
    """The session's events from the embedded log, verified (hash + chain)."""
    from agentledger.replay.reexecute import load_from_transport
    from agentledger.schemas.config import from_env

    return load_from_transport(from_env({"AGENTLEDGER_HOME": str(home), **env_extra}), session_id)


def of_kind(evs: list, kind: str) -> list:
    return [e for e in evs if e.kind == kind]


def run_in_pty(argv: list[str], *, env: dict, cwd: Path, answer: bytes | None, wait_for: bytes = b"Allow?",
               timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` on a new pseudo-terminal (its controlling tty); type ``answer`` once ``wait_for``
    shows up. Returns (exit status, everything it wrote to the terminal)."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    out = b""
    sent = answer is None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and wait_for in out:
                os.write(fd, answer)
                sent = True
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                try:
                    while True:
                        r, _, _ = select.select([fd], [], [], 0.1)
                        if not r:
                            break
                        chunk = os.read(fd, 65536)
                        if not chunk:
                            break
                        out += chunk
                except OSError:
                    pass
                return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")
        else:
            os.kill(pid, 9)
            raise AssertionError(f"{argv} did not finish in {timeout}s; terminal so far:\n{out.decode('utf-8', 'replace')}")
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")
    finally:
        os.close(fd)
