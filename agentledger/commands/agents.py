"""Real agents: `import codex-rollout`, `import claude-code`, `import otel` and `hook` (Codex and Claude Code)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from agentledger import api

from ..output import Format, console, err_console, print_json, progress_bar, render_rows
from .groups import import_app
from .options import ImportFormat, settings

app = typer.Typer()

EndIdle = Annotated[float, typer.Option(
    "--end-idle", help="End a session (session_ended at its last activity) once its sources show no activity for "
                       "this many seconds; rollouts and OTel logs have no end record.")]
KeepOpen = Annotated[bool, typer.Option("--keep-open", help="Never end sessions.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Parse and count only; record nothing, remember nothing.")]


def _run_import(ctx: typer.Context, rollouts: list[Path], otel: list[Path], end_idle: float, keep_open: bool,
                dry_run: bool, fmt: Format, strict: bool, claude: list[Path] = ()) -> None:
    s = settings(ctx)
    missing = [str(p) for p in [*rollouts, *claude, *otel] if not p.exists()]
    if missing:
        raise typer.BadParameter(f"no such file or directory: {', '.join(missing)}")
    with progress_bar(fmt is Format.table) as progress:
        report = api.import_agent_logs(s, rollouts, otel, claude=claude, end_idle_s=None if keep_open else end_idle,
                                       dry_run=dry_run, progress=progress)
    if fmt is Format.json:
        print_json(report.as_dict())
    else:
        rows = [(os.path.basename(f.path), f.kind, f.status,
                 f.to_offset - f.from_offset, f.counts.records, f.counts.mapped, f.counts.ignored, f.counts.problems,
                 (f.error or "") or _notes(f))
                for f in report.files]
        if fmt is Format.csv:
            render_rows(["file", "format", "status", "bytes", "records", "mapped", "ignored", "problems", "notes"],
                        rows, fmt)
            return
        render_rows(["file", "format", "status", "bytes", "records", "mapped", "ignored", "problems", "notes"], rows,
                    fmt, title="files")
        if report.sessions:
            render_rows(["session_id", "added", "already recorded", "seq", "ended"],
                        [(r.session_id, r.added, r.already_recorded,
                          "" if r.first_seq is None else f"{r.first_seq}..{r.last_seq}", "yes" if r.ended else "")
                         for r in report.sessions], fmt, title="sessions")
        t = report.totals()
        verb = "would read" if dry_run else "added"
        earlier = f" (and {t['problems_earlier']} found by earlier imports of these files)" if t["problems_earlier"] else ""
        c = t["counts"]
        console.print(f"{t['files']} files, {t['sessions']} sessions: {verb} "
                      f"{t['observations'] if dry_run else t['events_added']} "
                      f"{'observations' if dry_run else 'events'}; {t['already_recorded']} facts already recorded; "
                      f"{t['problems']} problems{earlier}; {report.seconds:.2f}s")
        console.print(f"read {c['lines']} lines, {c['records']} records: {c['mapped']} mapped, {t['merged']} merged "
                      f"(one fact stated twice), {c['ignored']} skipped as known but not recorded"
                      + (f", {t['files_skipped']} files of another format skipped" if t["files_skipped"] else ""))
    t = report.totals()
    nothing = report.nothing_usable()
    errors = [f for f in report.files if f.status == "error"]
    for f in errors:
        err_console.print(f"error: {f.path}: {f.error}", markup=False, highlight=False)
    if nothing:
        err_console.print(f"error: nothing imported: {nothing}", markup=False, highlight=False)
    elif strict and (t["problems"] or t["problems_earlier"]):
        err_console.print(f"error (--strict): {t['problems'] + t['problems_earlier']} problems in these files "
                          f"({t['problems']} in this run, {t['problems_earlier']} found by earlier imports)",
                          markup=False, highlight=False)
    if errors or nothing or (strict and (t["problems"] or t["problems_earlier"])):
        raise typer.Exit(1)


def _notes(f) -> str:
    """The per-file notes column: what could not be used, by kind."""
    c = f.counts
    notes = {**c.unknown_types, **{k: getattr(c, k) for k in ("invalid_json", "too_long", "too_deep", "not_object",
                                                               "non_utf8", "pending_tail_bytes") if getattr(c, k)}}
    text = ", ".join(f"{k}={v}" for k, v in notes.items())[:120]
    if not text and f.earlier.problems:
        text = f"{f.earlier.problems} problems found by earlier imports"
    return text


@import_app.command("codex-rollout")
def import_codex_rollout(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="Rollout files or directories (searched recursively for *.jsonl)."),
    otel: List[Path] = typer.Option([], "--otel", help="Also import these OTLP/JSON logs in the same run (merged by time)."),
    end_idle: EndIdle = 3600.0,
    keep_open: KeepOpen = False,
    dry_run: DryRun = False,
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any line of these files could not be used, "
                                                               "in this run or an earlier one."),
    fmt: ImportFormat = Format.table,
) -> None:
    """Import Codex rollout files ($CODEX_HOME/sessions/**/rollout-*.jsonl) as agent sessions.

    Incremental and idempotent: unchanged files are skipped, grown files are read from where the
    last import stopped, and a fact already recorded (by an earlier import, the session's OTel
    log or the live hook) is never recorded twice. The session id is the Codex session id.

    Example:  agentledger import codex-rollout ~/.codex/sessions --otel ~/otel/codex-logs --format json
    """
    _run_import(ctx, paths, otel, end_idle, keep_open, dry_run, fmt, strict)


@import_app.command("claude-code")
def import_claude_code(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="Claude Code transcripts: files or directories (searched "
                                                 "recursively for *.jsonl, sub-agents' files included)."),
    otel: List[Path] = typer.Option([], "--otel", help="Also import these OTLP/JSON logs in the same run (merged by time)."),
    end_idle: EndIdle = 3600.0,
    keep_open: KeepOpen = False,
    dry_run: DryRun = False,
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any line of these files could not be used, "
                                                               "in this run or an earlier one."),
    fmt: ImportFormat = Format.table,
) -> None:
    """Import Claude Code transcripts (~/.claude/projects/*/*.jsonl) as agent sessions.

    Tool calls become commands (Bash, MCP tools, Task), file reads and writes (Read, Write, Edit,
    MultiEdit, NotebookEdit) and network attempts (WebFetch, WebSearch), their results outcomes;
    permission denials become approval decisions; a sub-agent's transcript becomes the child
    session <session id>:agent-<agentId>. Incremental and idempotent; a call the live hook already
    recorded is the same fact and is not recorded twice.

    Example:  agentledger import claude-code ~/.claude/projects --format json
    """
    _run_import(ctx, [], otel, end_idle, keep_open, dry_run, fmt, strict, claude=paths)


@import_app.command("otel")
def import_otel(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="OTLP/JSON log exports: files or directories (*.json, *.jsonl)."),
    rollout: List[Path] = typer.Option([], "--rollout", help="Also import these Codex rollouts in the same run."),
    end_idle: EndIdle = 3600.0,
    keep_open: KeepOpen = False,
    dry_run: DryRun = False,
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any record of these files could not be "
                                                               "used, in this run or an earlier one."),
    fmt: ImportFormat = Format.table,
) -> None:
    """Import OpenTelemetry log exports (OTLP/JSON) of Codex and Claude Code.

    Maps codex.tool_decision / claude_code.tool_decision to approval decisions (linked to the
    command by call_id), codex.tool_result / claude_code.tool_result to commands and file
    changes, codex.network_proxy.policy_decision to network attempts and decisions. The same
    session's rollout, imported before, after or together (--rollout), extends the same chain.

    Example:  agentledger import otel otel-export.jsonl --rollout ~/.codex/sessions/2026/02/03
    """
    _run_import(ctx, rollout, paths, end_idle, keep_open, dry_run, fmt, strict)


@app.command()
def hook(
    ctx: typer.Context,
    policy: Optional[Path] = typer.Option(None, "--policy", envvar="AGENTLEDGER_POLICY",
                                          help="Policy (TOML, docs/policy.md) whose denials are answered to the agent."),
    agent: str = typer.Option("auto", "--agent", help="auto, codex, claude-code or gemini-cli (auto: Codex sends turn_id, Gemini CLI BeforeTool/AfterTool)."),
    deny_style: str = typer.Option("json", "--deny-style",
                                   help="json: hookSpecificOutput on stdout, exit 0; exit-code: reason on stderr, exit 2."),
    fail_closed: bool = typer.Option(False, "--fail-closed",
                                     help="Deny PreToolUse/PermissionRequest when the event cannot be recorded."),
    budget: float = typer.Option(5.0, "--budget", help="Seconds to wait at most for the session lock, Kafka, the acknowledgement."),
    drain: bool = typer.Option(False, "--drain", help="Only re-send events left in the outbox by failed or killed hooks."),
    serve: bool = typer.Option(False, "--serve", help="Run the warm hook server of this home (started automatically)."),
    stop_server: bool = typer.Option(False, "--stop-server", help="Stop the warm hook server of this home."),
) -> None:
    """Record one Codex / Claude Code / Gemini CLI hook event read as JSON from stdin; answer policy denials.

    Register it for SessionStart, UserPromptSubmit, PreToolUse, PermissionRequest, PostToolUse
    and Stop (config snippets: docs/agents.md). Never blocks the agent unless --fail-closed.
    A warm per-home server makes calls cheap; AGENTLEDGER_HOOK_DAEMON=0 does all work in-process.

    Example:  echo '{"session_id":"s1","hook_event_name":"PreToolUse","cwd":"/w","tool_name":"Bash","tool_use_id":"t1","tool_input":{"command":"rm -rf /"}}' | agentledger hook --policy team.toml
    """
    from .. import hookmain

    s = settings(ctx)
    # The global flags (--home, --bootstrap-servers, ...) reach the hook the way agents set them: as environment.
    os.environ["AGENTLEDGER_HOME"] = str(s.home)
    os.environ["AGENTLEDGER_TOPIC"] = s.topic
    os.environ["AGENTLEDGER_WAREHOUSE"] = s.warehouse
    if s.bootstrap_servers:
        os.environ["AGENTLEDGER_BOOTSTRAP_SERVERS"] = s.bootstrap_servers
    argv = ["--agent", agent, "--deny-style", deny_style, "--budget", str(budget)]
    argv += ["--policy", str(policy)] if policy else []
    argv += [flag for flag, on in (("--fail-closed", fail_closed), ("--drain", drain), ("--serve", serve),
                                   ("--stop-server", stop_server)) if on]
    raise typer.Exit(hookmain.main(argv))
