"""export ocsf, export otel: events and alerts to the security ecosystem (docs/export.md). The
evidence bundle (`export bundle`, the group's default) is in replay_cmd.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from agentledger import api

from ..output import Format, console, print_json
from .groups import export_app
from .options import TableOrJson, settings


@export_app.command("ocsf")
def ocsf_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="JSON-lines file to write, or a directory (existing, or ending "
                                                      "in /): one file per OCSF class."),
    session: Optional[list[str]] = typer.Option(None, "--session", help="Only this session (id or unique prefix; "
                                                                        "repeatable). Default: every session."),
    since: Optional[str] = typer.Option(None, "--since", help="Only events and alert revisions at or after this "
                                                              "UTC time (e.g. 2026-01-01 or 2026-01-01T12:00)."),
    ai_agent_activity: bool = typer.Option(False, "--ai-agent-activity",
                                           help="Also write AI Agent Activity (6009, an OCSF draft class) records: "
                                                "permission requests (600906) and tool uses (600907), in addition "
                                                "to their 1.8.0 records."),
    fmt: TableOrJson = Format.table,
) -> None:
    """Write events and alerts as OCSF 1.8.0 records (JSON lines) for SIEMs and security lakes.

    Process Activity (commands), File System Activity (files), Network Activity (network attempts,
    decisions, outcomes), Detection Finding (alerts); approvals and sandbox denials on the class of
    the action they are about. Mapping: docs/export.md.

    Example:  agentledger export ocsf --out agentledger.ocsf.jsonl
    Example:  agentledger export ocsf --session 019b76db-346b --since 2026-01-01 --out ocsf/
    """
    res = api.export_ocsf(settings(ctx), out, sessions=session or None, since=since,
                          ai_agent_activity=ai_agent_activity)
    if fmt is Format.json:
        print_json(res.as_dict())
        return
    classes = ", ".join(f"{n} {k}" for k, n in sorted(res.classes.items())) or "nothing"
    skipped = ", ".join(f"{n} {k}" for k, n in sorted(res.skipped.items()))
    ai = f" (+ {res.ai_records} AI Agent Activity records)" if ai_agent_activity else ""
    console.print(f"wrote {res.events} events{ai} and {res.alerts} alerts of {res.sessions} sessions as OCSF "
                  f"({classes}) to {', '.join(res.paths)}" + (f"; not exported: {skipped}" if skipped else ""),
                  highlight=False, soft_wrap=True)


@export_app.command("otel")
def otel_cmd(
    ctx: typer.Context,
    endpoint: str = typer.Option(..., "--endpoint", help="OTLP/HTTP receiver, e.g. http://127.0.0.1:4318 "
                                                         "(/v1/traces is added)."),
    session: Optional[list[str]] = typer.Option(None, "--session", help="Only this session (id or unique prefix; "
                                                                        "repeatable). Default: every session."),
    since: Optional[str] = typer.Option(None, "--since", help="Only sessions that started at or after this UTC time."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for the receiver per request."),
    fmt: TableOrJson = Format.table,
) -> None:
    """Send sessions as OpenTelemetry traces (GenAI semantic conventions) over OTLP/HTTP.

    One trace per session: an `invoke_agent` root span, an `execute_tool` span per command or tool
    call, approvals, network events and denials as span events. Needs the `otel` extra.

    Example:  agentledger export otel --endpoint http://127.0.0.1:4318
    """
    res = api.export_otel(settings(ctx), endpoint, sessions=session or None, since=since, timeout_s=timeout)
    if fmt is Format.json:
        print_json(res.as_dict())
        return
    console.print(f"sent {res.sessions} sessions as {res.spans} spans ({res.span_events} span events) to "
                  f"{res.endpoint}", highlight=False, soft_wrap=True)
