"""sandbox run / end / reexecute / doctor: the recording sandbox (bubblewrap + strace + egress proxy).

The CLI only wires stages: `producers.sandbox` runs and records commands; `replay.reexecute`
compares a re-run with the record, driving the sandbox's re-executor through an injected runner.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from agentledger.schemas.config import Settings

from ..output import Format, console, err_console, print_json, render_rows
from ..sessions import for_reading, in_sandbox

sandbox_app = typer.Typer(
    help="Run agent commands in a recording sandbox (bubblewrap, strace, an egress proxy, approvals) and "
         "re-execute recorded sessions to prove they are reproducible.\n\n"
         "Example:  agentledger sandbox run --policy team.toml --session s1 -- pytest -q",
    no_args_is_help=True,
)

DIVERGED_EXIT = 3


class StdinMode(str, Enum):
    auto = "auto"
    none = "none"


class Source(str, Enum):
    auto = "auto"
    warehouse = "warehouse"
    log = "log"


def _read_stdin(mode: StdinMode) -> bytes | None:
    """The command's stdin: piped or redirected data is recorded; a terminal or /dev/null is not."""
    if mode is StdinMode.none:
        return None
    try:
        st = os.fstat(0)
    except OSError:
        return None
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return sys.stdin.buffer.read()
    return None


def _pairs(values: list[str], what: str, *, allow_bare: bool = False) -> list[tuple[str, str | None]]:
    out = []
    for v in values or []:
        if "=" not in v:
            if allow_bare:
                out.append((v, None))
                continue
            raise typer.BadParameter(f"{what} takes NAME=VALUE, not {v!r}")
        k, _, val = v.partition("=")
        out.append((k, val))
    return out


def run_reexecution(s: Settings, session_id: str, *, set_files: dict[str, bytes] | None = None,
                    set_env: dict[str, str | None] | None = None, set_responses: dict[int, bytes] | None = None,
                    source: str = "auto", keep: bool = False, into: str | None = None, stop_at_first: bool = False,
                    timeout_s: float | None = None, progress=None):
    """Re-execute a recorded sandbox session and compare it with its record (see replay.reexecute).

    Shared by `agentledger sandbox reexecute` and `agentledger replay SESSION --reexecute`."""
    from agentledger.producers.sandbox.reexec import SandboxReexecutor
    from agentledger.replay.reexecute import ReexecutionError, load_session, reexecute

    session_id = for_reading(s, session_id, transport=None if source == "warehouse" else "auto",
                             warehouse_only=source == "warehouse")
    events = load_session(s, session_id, source=source)
    if set_responses:
        completed = {e.seq for e in events if e.kind.startswith("network_")}
        unknown = sorted(set(set_responses) - completed)
        if unknown:
            raise ReexecutionError(f"--set-response: seq {unknown[0]} is not a network event of session {session_id}")
    runner = SandboxReexecutor(s, session_id, set_files=set_files, set_env=set_env, set_responses=set_responses,
                               keep=keep, into=into, timeout_s=timeout_s)
    report = reexecute(events, runner, session_id=session_id, stop_at_first=stop_at_first, progress=progress)
    return report, runner


def render_report(report, fmt: Format, workspace: str | None = None) -> None:
    from agentledger.replay.reexecute import render_rows as report_rows

    if fmt is Format.json:
        d = report.as_dict()
        if workspace:
            d["workspace"] = workspace
        print_json(d)
        return
    if report.reproducible:
        console.print(f"[bold green]reproducible[/]: {report.commands_run} commands re-executed, "
                      f"{report.events_compared} recorded events compared, zero divergence")
        return
    f = report.first
    console.print(f"[bold red]diverged[/] at seq {f.seq}: {f.summary}")
    cols, rows = report_rows(report)
    render_rows(cols, rows, Format.table if fmt is Format.table else fmt, title=f"divergences ({len(rows)})")


def register(app: typer.Typer) -> None:
    from ..cli import settings

    app.add_typer(sandbox_app, name="sandbox")

    @sandbox_app.command("run")
    def run(
        ctx: typer.Context,
        command: List[str] = typer.Argument(..., help="The command and its arguments (after --)."),
        policy: Optional[Path] = typer.Option(None, "--policy", envvar="AGENTLEDGER_SANDBOX_POLICY",
                                              help="Policy file (TOML, see docs/policy.md). Default: the built-in policy."),
        session: Optional[str] = typer.Option(None, "--session",
                                              help="Session to record into (created if new, continued otherwise). "
                                                   "Without it: a one-command session, ended afterwards."),
        workspace: Optional[Path] = typer.Option(None, "--workspace", help="Writable workspace. Default: the current directory."),
        cwd: Optional[Path] = typer.Option(None, "--cwd", help="Directory to run in. Default: the current directory if inside "
                                                               "the workspace, else the workspace."),
        escalate: bool = typer.Option(False, "--escalate", help="Ask to run outside the sandbox (needs approval)."),
        justification: Optional[str] = typer.Option(None, "--justification", help="Shown to the approver."),
        non_interactive: bool = typer.Option(False, "--non-interactive",
                                             help="Never prompt; apply approvals.noninteractive."),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="Kill the command after this many seconds."),
        stdin_mode: StdinMode = typer.Option(StdinMode.auto, "--stdin",
                                             help="auto: pass (and record) piped stdin; none: /dev/null."),
        end: bool = typer.Option(False, "--end", help="End the session after this command."),
        cas_max_blob: Optional[int] = typer.Option(None, "--cas-max-blob", envvar="AGENTLEDGER_CAS_MAX_BLOB_BYTES",
                                                   help="Largest file/output/response kept for re-execution (bytes)."),
        cas_max_bytes: Optional[int] = typer.Option(None, "--cas-max-bytes", envvar="AGENTLEDGER_CAS_MAX_BYTES",
                                                    help="Size bound of the whole recording store (bytes)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary line on stderr."),
    ) -> None:
        """Run CMD in the recording sandbox; exit with its exit status (126 declined, 124 timed out).

        Everything is recorded as events of the session (to the local log or Kafka): the command,
        its sub-processes, file accesses with digests, denials, network requests through the egress
        proxy and approvals. What re-execution needs is kept in $AGENTLEDGER_HOME/cas.

        Example:  agentledger sandbox run --policy team.toml --session s1 -- python -m pytest -q
        """
        from agentledger.producers.sandbox import SandboxSession

        s = settings(ctx)
        one_shot = session is None
        data = _read_stdin(stdin_mode)
        sess = SandboxSession.open(s, session_id=session, policy_path=policy, workspace=workspace,
                                   interactive=False if non_interactive else None,
                                   max_blob_bytes=cas_max_blob, max_total_bytes=cas_max_bytes)
        try:
            try:
                result = sess.run(list(command), cwd=str(cwd) if cwd else None, stdin=data, escalate=escalate,
                                  justification=justification, timeout_s=timeout,
                                  echo_stdout=sys.stdout.buffer, echo_stderr=sys.stderr.buffer)
            except BaseException:
                if one_shot:
                    sess.end("failed", "the recorder failed")
                raise
            if one_shot or end:
                sess.end("completed")
        finally:
            sess.close()
        if not quiet:
            err_console.print(f"[dim]agentledger sandbox: session {result.session_id} · command {result.command_id} · "
                              f"{result.status} (exit {result.exit_code if result.exit_code is not None else '—'}) · "
                              f"events seq {result.first_seq}–{result.last_seq}"
                              + (f" · {len(result.gaps)} not kept for re-execution" if result.gaps else "") + "[/]",
                              highlight=False)
        raise typer.Exit(result.shell_code)

    @sandbox_app.command("end")
    def end_cmd(
        ctx: typer.Context,
        session: str = typer.Argument(..., help="The session to end (id or unique prefix)."),
        status: str = typer.Option("completed", help="completed, failed, aborted or interrupted."),
        reason: Optional[str] = typer.Option(None, help="Why (recorded)."),
    ) -> None:
        """Record the end of a sandbox session started with `sandbox run --session`.

        Example:  agentledger sandbox end s1
        """
        from agentledger.producers.sandbox.errors import SessionStateError
        from agentledger.producers.sandbox.session import SandboxSession

        if status not in ("completed", "failed", "aborted", "interrupted"):
            raise typer.BadParameter("status must be completed, failed, aborted or interrupted")
        from agentledger.producers.sandbox.cas import check_session_id

        s = settings(ctx)
        session = in_sandbox(s, check_session_id(session))
        state = s.home / "sandbox" / "sessions" / session / "state.json"
        if not state.exists():
            raise SessionStateError(f"no sandbox session {session} under {s.home}")
        st = json.loads(state.read_text())
        from agentledger.producers.sandbox.cas import ContentStore

        store = ContentStore.open(s.home)
        manifest = store.load_manifest(session) or {}
        # the policy the session was started with, from the store (the file may have moved or changed)
        sess = SandboxSession.open(s, session_id=session, workspace=st["workspace"], interactive=False,
                                   policy_text=(store.get(st["policy_digest"]), manifest.get("policy_source")))
        try:
            seq = sess.end(status, reason)
        finally:
            sess.close()
        console.print(f"session {session} ended ({status}) at seq {seq}")

    @sandbox_app.command("reexecute")
    def reexecute_cmd(
        ctx: typer.Context,
        session: str = typer.Argument(..., help="The recorded session (id or unique prefix)."),
        set_file: List[str] = typer.Option([], "--set-file", help="What if workspace file PATH had held LOCALFILE's "
                                                                  "content: PATH=LOCALFILE (repeatable)."),
        set_env: List[str] = typer.Option([], "--set-env", help="What if NAME had been VALUE: NAME=VALUE, or NAME to "
                                                                "unset it (repeatable)."),
        set_response: List[str] = typer.Option([], "--set-response", help="What if the recorded response of network "
                                                                          "event SEQ had been FILE: SEQ=FILE."),
        source: Source = typer.Option(Source.auto, "--source", help="Read the record from the warehouse, the log "
                                                                     "(local log or Kafka), or auto."),
        keep: bool = typer.Option(False, "--keep", help="Keep the re-executed workspace (its path is printed)."),
        into: Optional[Path] = typer.Option(None, "--into", help="Restore and re-execute in this (empty) directory."),
        first: bool = typer.Option(False, "--first", help="Stop after the first command that diverges."),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="Per-command timeout in seconds."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Re-run a recorded session in a fresh copy of its workspace and compare it event by event.

        Restores the recorded workspace, re-runs each command in the same sandbox with the recorded
        environment, stdin and clock, serves recorded network responses (nothing leaves the machine),
        and compares exit codes, output digests, file digests and network outcomes. Prints zero
        divergence, or the first divergent seq with an expected-vs-actual diff naming the change.
        Exit status: 0 reproducible, 3 diverged, 1 error.

        Example:  agentledger sandbox reexecute s1 --set-env LANG=C --format json
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        s = settings(ctx)
        files = {}
        for k, v in _pairs(set_file, "--set-file"):
            try:
                files[k] = Path(v).read_bytes()
            except OSError as exc:
                raise typer.BadParameter(f"--set-file {k}: {exc}") from exc
        env = dict(_pairs(set_env, "--set-env", allow_bare=True))
        responses = {}
        for k, v in _pairs(set_response, "--set-response"):
            try:
                responses[int(k)] = Path(v).read_bytes()
            except ValueError:
                raise typer.BadParameter(f"--set-response takes SEQ=FILE, not {k!r}") from None
            except OSError as exc:
                raise typer.BadParameter(f"--set-response {k}: {exc}") from exc
        with Progress(TextColumn("[bold]re-executing"), BarColumn(), MofNCompleteColumn(), console=err_console,
                      disable=fmt is Format.json, transient=True) as progress:
            task = progress.add_task("commands", total=None)
            report, runner = run_reexecution(s, session, set_files=files, set_env=env, set_responses=responses,
                                             source=source.value, keep=keep or into is not None,
                                             into=str(into) if into else None, stop_at_first=first, timeout_s=timeout,
                                             progress=lambda i, n: progress.update(task, completed=i, total=n))
        render_report(report, fmt, runner.fresh if (keep or into) else None)
        if (keep or into) and fmt is not Format.json:
            console.print(f"re-executed workspace kept at {runner.fresh}")
        raise typer.Exit(0 if report.reproducible else DIVERGED_EXIT)

    @sandbox_app.command("forget")
    def forget_cmd(
        ctx: typer.Context,
        session: str = typer.Argument(..., help="The session whose recording store data to delete (id or unique "
                                                "prefix)."),
    ) -> None:
        """Delete what the recording store keeps for a session (file contents, environments, bodies).

        Its events stay in the log and the warehouse; it can no longer be re-executed. Blobs other
        sessions still need are kept.

        Example:  agentledger sandbox forget s1
        """
        from agentledger.producers.sandbox.cas import ContentStore, check_session_id, forget

        s = settings(ctx)
        store = ContentStore.open(s.home)
        session = in_sandbox(s, check_session_id(session))
        if store.load_manifest(session) is None:
            raise typer.BadParameter(f"no recording of session {session} in {store.root}")
        n, size = forget(store, session)
        import shutil

        shutil.rmtree(s.home / "sandbox" / "sessions" / session, ignore_errors=True)
        console.print(f"forgot session {session}: {n} blobs, {size} bytes deleted")

    @sandbox_app.command("doctor")
    def doctor(
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Check that this machine can run the recording sandbox (bwrap, strace, faketime, namespaces).

        Example:  agentledger sandbox doctor --format json
        """
        checks = run_doctor()
        render_rows(["check", "ok", "detail"], [[c["check"], c["ok"], c["detail"]] for c in checks], fmt)
        raise typer.Exit(0 if all(c["ok"] or not c["required"] for c in checks) else 1)


def run_doctor() -> list[dict]:
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
