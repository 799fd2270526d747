"""The recording sandbox: run commands in it, end or forget its sessions, re-execute them, and
check that this machine can run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import AgentLedgerError

from .common import Counter, ProgressCallback
from .sessions import for_reading, in_sandbox

END_STATUSES = ("completed", "failed", "aborted", "interrupted")


class NotRecorded(AgentLedgerError):
    """The recording store has nothing for that session."""


def sandbox_run(s: Settings, command: Sequence[str], *, session: str | None = None, policy: Path | None = None,
                workspace: Path | None = None, cwd: Path | None = None, stdin: bytes | None = None,
                escalate: bool = False, justification: str | None = None, interactive: bool | None = None,
                timeout_s: float | None = None, end: bool = False, max_blob_bytes: int | None = None,
                max_total_bytes: int | None = None, echo_stdout: BinaryIO | None = None,
                echo_stderr: BinaryIO | None = None):
    """Run ``command`` in the recording sandbox, recorded as events of ``session`` (created if new;
    without one: a one-command session, ended afterwards). The run's result: session_id,
    command_id, status, exit_code, first_seq, last_seq, gaps, shell_code."""
    from agentledger.producers.sandbox import SandboxSession

    one_shot = session is None
    sess = SandboxSession.open(s, session_id=session, policy_path=policy, workspace=workspace,
                               interactive=interactive, max_blob_bytes=max_blob_bytes,
                               max_total_bytes=max_total_bytes)
    try:
        try:
            result = sess.run(list(command), cwd=str(cwd) if cwd else None, stdin=stdin, escalate=escalate,
                              justification=justification, timeout_s=timeout_s, echo_stdout=echo_stdout,
                              echo_stderr=echo_stderr)
        except BaseException:
            if one_shot:
                sess.end("failed", "the recorder failed")
            raise
        if one_shot or end:
            sess.end("completed")
    finally:
        sess.close()
    return result


def sandbox_end(s: Settings, session: str, status: str = "completed", reason: str | None = None) -> tuple[str, int]:
    """Record the end of a sandbox session (id or unique prefix): (its id, the seq of its end)."""
    from agentledger.producers.sandbox.cas import ContentStore, check_session_id
    from agentledger.producers.sandbox.errors import SessionStateError
    from agentledger.producers.sandbox.session import SandboxSession

    if status not in END_STATUSES:
        raise SessionStateError("status must be completed, failed, aborted or interrupted")
    session = in_sandbox(s, check_session_id(session))
    state = s.home / "sandbox" / "sessions" / session / "state.json"
    if not state.exists():
        raise SessionStateError(f"no sandbox session {session} under {s.home}")
    st = json.loads(state.read_text())
    store = ContentStore.open(s.home)
    manifest = store.load_manifest(session) or {}
    # the policy the session was started with, from the store (the file may have moved or changed)
    sess = SandboxSession.open(s, session_id=session, workspace=st["workspace"], interactive=False,
                               policy_text=(store.get(st["policy_digest"]), manifest.get("policy_source")))
    try:
        return session, sess.end(status, reason)
    finally:
        sess.close()


def sandbox_forget(s: Settings, session: str) -> tuple[str, int, int]:
    """Delete what the recording store keeps for a session (its events stay): (its id, blobs
    deleted, bytes deleted). Raises NotRecorded when there is nothing."""
    from agentledger.producers.sandbox.cas import ContentStore, check_session_id, forget

    store = ContentStore.open(s.home)
    session = in_sandbox(s, check_session_id(session))
    if store.load_manifest(session) is None:
        raise NotRecorded(f"no recording of session {session} in {store.root}")
    n, size = forget(store, session)
    shutil.rmtree(s.home / "sandbox" / "sessions" / session, ignore_errors=True)
    return session, n, size


@dataclass
class Reexecution:
    """A re-execution's ``report`` (reproducible, commands_run, events_compared, first divergence,
    as_dict()) and where it ran (``workspace``; kept only when asked)."""

    report: Any  # replay.reexecute.Report
    workspace: str | None

    @property
    def reproducible(self) -> bool:
        return self.report.reproducible


def reexecute(s: Settings, session: str, *, set_files: dict[str, bytes] | None = None,
              set_env: dict[str, str | None] | None = None, set_responses: dict[int, bytes] | None = None,
              source: str = "auto", keep: bool = False, into: str | None = None, stop_at_first: bool = False,
              timeout_s: float | None = None, progress: ProgressCallback | None = None) -> Reexecution:
    """Re-run a recorded sandbox session (id or unique prefix) in a fresh copy of its workspace and
    compare it event by event with its record; ``set_*``: what if a file, a variable or a network
    response had been different. ``source``: auto, warehouse or log."""
    from agentledger.producers.sandbox.reexec import SandboxReexecutor
    from agentledger.replay.reexecute import ReexecutionError, load_session, reexecute as run

    session = for_reading(s, session, transport=None if source == "warehouse" else "auto",
                          warehouse_only=source == "warehouse")
    events = load_session(s, session, source=source)
    if set_responses:
        completed = {e.seq for e in events if e.kind.startswith("network_")}
        unknown = sorted(set(set_responses) - completed)
        if unknown:
            raise ReexecutionError(f"--set-response: seq {unknown[0]} is not a network event of session {session}")
    runner = SandboxReexecutor(s, session, set_files=set_files, set_env=set_env, set_responses=set_responses,
                               keep=keep, into=into, timeout_s=timeout_s)
    count = Counter(progress, "commands", None) if progress else None
    report = run(events, runner, session_id=session, stop_at_first=stop_at_first,
                 progress=(lambda i, n: count.set(i, n)) if count else None)
    return Reexecution(report, runner.fresh)


def divergence_rows(report) -> tuple[list[str], list[list]]:
    """A re-execution's divergences as table rows (seq, command, event, field, expected, actual,
    what changed)."""
    from agentledger.replay.reexecute import render_rows

    return render_rows(report)


def sandbox_doctor() -> list[dict]:
    """Whether this machine can run the recording sandbox: one {check, ok, detail, required} per
    check (bwrap, strace, faketime, namespaces, ptrace, kernel settings)."""
    from agentledger.producers.sandbox.runner import Tools

    tools = Tools.find()
    out = []

    def check(name, ok, detail, required=True):
        out.append({"check": name, "ok": bool(ok), "detail": detail, "required": required})

    check("bwrap", tools.bwrap, f"{tools.bwrap} {'.'.join(map(str, tools.bwrap_version))}" if tools.bwrap
          else "missing: apt-get install bubblewrap")
    check("strace", tools.strace, tools.strace or "missing: apt-get install strace")
    check("faketime", tools.faketime, tools.faketime or "missing (apt-get install faketime): re-execution cannot "
          "restore the recorded clock", required=False)
    if tools.bwrap:
        p = subprocess.run([tools.bwrap, "--unshare-user", "--unshare-net", "--unshare-pid", "--ro-bind", "/", "/",
                            "--dev", "/dev", "--proc", "/proc", "true"], capture_output=True, text=True, timeout=30)
        check("namespaces", p.returncode == 0, "user, pid and network namespaces work" if p.returncode == 0 else
              (p.stderr.strip() or f"exit {p.returncode}") + " (see docs/sandbox.md: unprivileged user namespaces)")
    if tools.strace:
        p = subprocess.run([tools.strace, "-f", "--seccomp-bpf", "-e", "trace=execve", "-o", "/dev/null", "true"],
                           capture_output=True, text=True, timeout=30)
        check("ptrace", p.returncode == 0, "strace can trace (seccomp-bpf filter)" if p.returncode == 0 else
              p.stderr.strip() or f"exit {p.returncode}")
    for name, path in (("max_user_namespaces", "/proc/sys/user/max_user_namespaces"),
                       ("unprivileged_userns_clone", "/proc/sys/kernel/unprivileged_userns_clone"),
                       ("apparmor_restrict_unprivileged_userns", "/proc/sys/kernel/apparmor_restrict_unprivileged_userns")):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        ok = value != "0" if name != "apparmor_restrict_unprivileged_userns" else (value == "0" or os.geteuid() == 0)
        check(name, ok, f"{path} = {value}", required=False)
    return out

