"""detect, alerts, rules: sequence rules and the anomaly model over the warehouse."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from agentledger import api

from ..output import Format, console, err_console, print_json, progress_bar, render_rows
from .options import Snapshot, TableCsvOrJson, TableOrJson, rule_dirs, settings

app = typer.Typer()
rules_app = typer.Typer(help="Detection rules.\n\nExample:  agentledger rules list", no_args_is_help=True)


class Severity(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


_ALERT_TABLE = ["created_at", "severity", "rule_id", "session_id", "seqs", "title"]


@app.command()
def detect(
    ctx: typer.Context,
    session: Optional[List[str]] = typer.Option(None, "--session", help="Only these sessions (id or unique prefix; "
                                                                        "repeatable)."),
    all_: bool = typer.Option(False, "--all", help="Every session, not only those with new events or "
                                                   "examined by other rules/model."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Delete the sessions' alerts and recompute them "
                                                          "(implies --all unless --session)."),
    rules_dir: Optional[List[Path]] = typer.Option(None, "--rules-dir", help="More rules (*.yaml, *.sql) and "
                                                   "lists.yaml; repeatable; also $AGENTLEDGER_RULES_DIR."),
    model: Optional[str] = typer.Option(None, "--model", help="Model artifact (JSON); 'none' for rules only. "
                                        "[default: $AGENTLEDGER_MODEL, else the model `agentledger model train` "
                                        "saved for this warehouse, else the shipped isoforest-v1]"),
    no_model: bool = typer.Option(False, "--no-model", help="Rules only."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="With Kafka as the transport: send new "
                                                                      "alerts to agentledger.alerts."),
    fmt: TableOrJson = Format.table,
) -> None:
    """(Re)run the rules and the anomaly model over the warehouse; raise and publish alerts.

    Idempotent: by default only sessions that gained events (or were examined by other rules or
    another model) since their last detection are examined, and an alert found again is the same
    alert (same alert_id), updated only when it has new evidence.

    Example:  agentledger detect --all --format json
    """
    s = settings(ctx)
    with progress_bar(fmt is not Format.json) as progress:
        det = api.detect(s, sessions=session, all_sessions=all_, rebuild=rebuild,
                         rules_dirs=rule_dirs(rules_dir), model=api.resolve_model(model, no_model, s=s), publish=publish,
                         progress=progress)
    result = det.result
    if fmt is Format.json:
        print_json({**det.as_dict(), "alerts": [{k: a[k] for k in ("alert_id", "revision", "session_id", "rule_id",
                                                                   "severity", "first_seq", "last_seq", "title")}
                                               for a in result.changed]})
        return
    console.print(f"examined {result.sessions} sessions ({result.events} events) with {det.rules} rules"
                  f"{' and model ' + det.model if det.model else ''}"
                  f"{' (cold start: it raises no model alerts; see agentledger model show)' if det.model_cold_start else ''}"
                  f" in {result.seconds:.2f}s: "
                  f"{result.alerts_new} new alerts, {result.alerts_updated} updated, "
                  f"{result.anomalous} anomalous sessions, {result.published} published")
    if result.changed:
        rows = sorted(result.changed, key=lambda a: (-api.SEVERITIES.index(a["severity"]), a["rule_id"]))
        render_rows(["severity", "rule_id", "session_id", "first_seq", "last_seq", "title"],
                    [(a["severity"], a["rule_id"], a["session_id"], a["first_seq"], a["last_seq"], a["title"])
                     for a in rows[:30]], Format.table, title="alerts raised or updated")
        if len(rows) > 30:
            console.print(f"… and {len(rows) - 30} more: agentledger alerts")


@app.command()
def alerts(
    ctx: typer.Context,
    severity: Optional[Severity] = typer.Option(None, "--severity", help="Minimum severity."),
    session: Optional[str] = typer.Option(None, "--session", help="One session (id or unique prefix)."),
    rule: Optional[List[str]] = typer.Option(None, "--rule", help="Rule or model id (repeatable)."),
    since: Optional[str] = typer.Option(None, "--since", help="Raised at or after this time (UTC), "
                                                              "e.g. 2026-01-01 or '2026-01-01 12:00'."),
    limit: int = typer.Option(200, "--limit", help="At most this many (newest first)."),
    explain: bool = typer.Option(False, "--explain", help="Table: add the explanation column."),
    snapshot: Snapshot = None,
    fmt: TableCsvOrJson = Format.table,
) -> None:
    """List alerts (newest first), filtered by severity, session or rule.

    csv and json carry every column: evidence seqs, explanation citing them, MITRE techniques,
    score and threshold for model alerts.

    Example:  agentledger alerts --severity high --format json
    """
    found = api.alerts(settings(ctx), severity=severity.value if severity else None, session=session, rules=rule,
                       since=since, limit=limit, snapshot=snapshot)
    if found.table_missing:
        err_console.print("no alerts table yet: run `agentledger detect` (or `ingest --detect`)")
    if fmt is Format.table:
        show = _ALERT_TABLE + (["explanation"] if explain else [])
        out = []
        for a in found.as_dicts():
            a["seqs"] = f"{a['first_seq']}..{a['last_seq']}" if a["first_seq"] != a["last_seq"] else a["first_seq"]
            a["created_at"] = a["created_at"].strftime("%Y-%m-%d %H:%M:%S")
            out.append([a[c] for c in show])
        render_rows(show, out, fmt, title=f"{len(found)} alerts")
    else:
        render_rows(found.columns, found.rows, fmt)


@rules_app.command("list")
def rules_list(
    rules_dir: Optional[List[Path]] = typer.Option(None, "--rules-dir", help="More rules; repeatable."),
    fmt: TableCsvOrJson = Format.table,
) -> None:
    """List the rules detection would run (built-in, $AGENTLEDGER_RULES_DIR, --rules-dir).

    Example:  agentledger rules list --rules-dir ./my-rules --format json
    """
    cols = ["id", "severity", "escalates_to", "mitre", "owasp", "title", "kind", "source"]
    render_rows(cols, [(r.id, r.severity, r.escalations, r.mitre, r.owasp, r.title, r.kind, r.source)
                       for r in api.rules(rule_dirs(rules_dir))], fmt)


@rules_app.command("check")
def rules_check(
    rules_dir: Optional[List[Path]] = typer.Option(None, "--rules-dir", help="Rules to check; repeatable."),
) -> None:
    """Load, compile and run every rule on an empty warehouse: exits 1 naming the first bad file.

    Example:  agentledger rules check --rules-dir ./my-rules
    """
    console.print(f"{api.check_rules(rule_dirs(rules_dir))} rules compile and run")
