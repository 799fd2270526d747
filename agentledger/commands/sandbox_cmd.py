"""sandbox run / end / reexecute / doctor: the recording sandbox (bubblewrap + strace + egress proxy).

The CLI only wires stages: `producers.sandbox` runs and records commands; `replay.reexecute`
compares a re-run with the record, driving the sandbox's re-executor through an injected runner.
"""

from __future__ import annotations

import os
import stat
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from agentledger import api

from ..output import Format, console, err_console, print_json, progress_bar, render_rows
from .options import TableOrJson, settings

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


def render_report(report, fmt: Format, workspace: str | None = None) -> None:
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
    cols, rows = api.divergence_rows(report)
    render_rows(cols, rows, Format.table if fmt is Format.table else fmt, title=f"divergences ({len(rows)})")


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
    s = settings(ctx)
    data = _read_stdin(stdin_mode)
    result = api.sandbox_run(s, command, session=session, policy=policy, workspace=workspace, cwd=cwd, stdin=data,
                             escalate=escalate, justification=justification,
                             interactive=False if non_interactive else None, timeout_s=timeout, end=end,
                             max_blob_bytes=cas_max_blob, max_total_bytes=cas_max_bytes,
                             echo_stdout=sys.stdout.buffer, echo_stderr=sys.stderr.buffer)
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
    if status not in api.END_STATUSES:
        raise typer.BadParameter("status must be completed, failed, aborted or interrupted")
    session, seq = api.sandbox_end(settings(ctx), session, status, reason)
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
    fmt: TableOrJson = Format.table,
) -> None:
    """Re-run a recorded session in a fresh copy of its workspace and compare it event by event.

    Restores the recorded workspace, re-runs each command in the same sandbox with the recorded
    environment, stdin and clock, serves recorded network responses (nothing leaves the machine),
    and compares exit codes, output digests, file digests and network outcomes. Prints zero
    divergence, or the first divergent seq with an expected-vs-actual diff naming the change.
    Exit status: 0 reproducible, 3 diverged, 1 error.

    Example:  agentledger sandbox reexecute s1 --set-env LANG=C --format json
    """
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
    with progress_bar(fmt is not Format.json, text="[bold]re-executing", elapsed=False) as progress:
        run = api.reexecute(s, session, set_files=files, set_env=env, set_responses=responses, source=source.value,
                            keep=keep or into is not None, into=str(into) if into else None, stop_at_first=first,
                            timeout_s=timeout, progress=progress)
    render_report(run.report, fmt, run.workspace if (keep or into) else None)
    if (keep or into) and fmt is not Format.json:
        console.print(f"re-executed workspace kept at {run.workspace}")
    raise typer.Exit(0 if run.reproducible else DIVERGED_EXIT)


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
    try:
        session, n, size = api.sandbox_forget(settings(ctx), session)
    except api.NotRecorded as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(f"forgot session {session}: {n} blobs, {size} bytes deleted")


@sandbox_app.command("doctor")
def doctor(
    fmt: TableOrJson = Format.table,
) -> None:
    """Check that this machine can run the recording sandbox (bwrap, strace, faketime, namespaces).

    Example:  agentledger sandbox doctor --format json
    """
    checks = api.sandbox_doctor()
    render_rows(["check", "ok", "detail"], [[c["check"], c["ok"], c["detail"]] for c in checks], fmt)
    raise typer.Exit(0 if all(c["ok"] or not c["required"] for c in checks) else 1)

