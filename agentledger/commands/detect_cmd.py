"""detect, alerts, rules: sequence rules and the anomaly model over the warehouse."""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from agentledger.schemas import envvars
from agentledger.schemas.config import Settings
from agentledger.schemas.errors import WarehouseError

from ..output import Format, console, err_console, print_json, render_rows
from ..sessions import in_warehouse

log = logging.getLogger(__name__)

SEVERITIES = ("low", "medium", "high", "critical")
MODEL_ENV = "AGENTLEDGER_MODEL"


class Severity(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


def _model_arg(model: Optional[str], no_model: bool):
    """The model to load: a path, the shipped default (True), or none (None)."""
    if no_model:
        return None
    value = model or envvars.raw(MODEL_ENV)
    if not value:
        return True
    if value.lower() in ("none", "off", "0"):
        return None
    return Path(value)


def make_detector(s: Settings, wh, *, rules_dirs: list[Path] | None = None, model=True, publish: bool = True):
    """A Detector on ``wh``; with Kafka as the transport it publishes alerts to agentledger.alerts
    (the embedded log holds events only: there, alerts live in the warehouse)."""
    from agentledger.consumers.detect import Detector
    from agentledger.schemas.transport import open_sink

    sink = open_sink(s) if publish and s.uses_kafka else None
    try:
        return Detector(wh, rules_dirs=rules_dirs, model=model, sink=sink, alerts_topic=s.alerts_topic)
    except BaseException:
        if sink is not None:
            sink.close(timeout=5)
        raise


class IngestDetection:
    """The `ingest --detect` hook: detection of the sessions each committed batch touched.

    Before the first batch, sessions left pending (a crash between a batch's commit and its
    detection, or new rules/model) are examined too; in a consumer group only the member's own
    batches are (another member owns the other partitions' sessions; `agentledger detect` catches
    up everything)."""

    def __init__(self, s: Settings, wh, *, rules_dirs=None, model=True, publish=True, catch_up=True):
        from agentledger.consumers.detect import DetectResult

        self.detector = make_detector(s, wh, rules_dirs=rules_dirs, model=model, publish=publish)
        self.total = DetectResult()
        self.catch_up = catch_up
        self._started = False

    def start(self) -> None:
        if self.catch_up and not self._started:
            r = self.detector.detect()
            self.total.add(r)
            self._log(r, "catch-up")
        self._started = True

    def __call__(self, batch) -> None:
        if not self._started:
            self.start()
        if not batch.sessions:
            return
        r = self.detector.detect(batch.sessions)
        self.total.add(r)
        self._log(r, "batch")

    @staticmethod
    def _log(r, what: str) -> None:
        if r.sessions:
            log.info("detection (%s): %d sessions, %d events, %d new alerts, %d updated, %d published in %.2fs",
                     what, r.sessions, r.events, r.alerts_new, r.alerts_updated, r.published, r.seconds)
        for a in r.changed:
            log.info("alert %s rev %d: %s %s session %s seqs %s..%s", a["alert_id"], a["revision"], a["severity"],
                     a["rule_id"], a["session_id"], a["first_seq"], a["last_seq"])

    def close(self) -> None:
        if self.detector.sink is not None:
            try:
                self.detector.publish()
            finally:
                self.detector.sink.close(timeout=10)


_ALERT_TABLE = ["created_at", "severity", "rule_id", "session_id", "seqs", "title"]


def register(app: typer.Typer) -> None:
    from ..cli import settings

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
                                            "[default: $AGENTLEDGER_MODEL or the shipped isoforest-v1]"),
        no_model: bool = typer.Option(False, "--no-model", help="Rules only."),
        publish: bool = typer.Option(True, "--publish/--no-publish", help="With Kafka as the transport: send new "
                                                                          "alerts to agentledger.alerts."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """(Re)run the rules and the anomaly model over the warehouse; raise and publish alerts.

        Idempotent: by default only sessions that gained events (or were examined by other rules or
        another model) since their last detection are examined, and an alert found again is the same
        alert (same alert_id), updated only when it has new evidence.

        Example:  agentledger detect --all --format json
        """
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from agentledger.schemas.warehouse import open_for

        s = settings(ctx)
        with open_for(s) as wh:
            wh.lock_down()  # rules are SQL: no file or network access beyond the warehouse while they run
            det = make_detector(s, wh, rules_dirs=rule_dirs_arg(rules_dir), model=_model_arg(model, no_model),
                                publish=publish)
            try:
                if session:
                    todo = [in_warehouse(wh.con, x, s.warehouse) for x in session]
                elif all_ or rebuild:
                    todo = det.all_sessions()
                else:
                    todo = det.pending_sessions()
                with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=err_console, transient=True,
                              disable=fmt is Format.json) as progress:
                    task = progress.add_task("detecting", total=len(todo))
                    result = det.detect(todo, rebuild=rebuild, progress=lambda n: progress.advance(task, n))
            finally:
                if det.sink is not None:
                    det.sink.close(timeout=10)
        out = result.as_dict()
        out["rules"] = len(det.rules)
        out["model"] = det.model.model_id if det.model else None
        if fmt is Format.json:
            print_json({**out, "alerts": [{k: a[k] for k in ("alert_id", "revision", "session_id", "rule_id",
                                                              "severity", "first_seq", "last_seq", "title")}
                                          for a in result.changed]})
            return
        console.print(f"examined {result.sessions} sessions ({result.events} events) with {len(det.rules)} rules"
                      f"{' and model ' + det.model.model_id if det.model else ''} in {result.seconds:.2f}s: "
                      f"{result.alerts_new} new alerts, {result.alerts_updated} updated, "
                      f"{result.anomalous} anomalous sessions, {result.published} published")
        if result.changed:
            rows = sorted(result.changed, key=lambda a: (-SEVERITIES.index(a["severity"]), a["rule_id"]))
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
        snapshot: Optional[int] = typer.Option(None, "--snapshot", help="DuckLake: as of this snapshot."),
        fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    ) -> None:
        """List alerts (newest first), filtered by severity, session or rule.

        csv and json carry every column: evidence seqs, explanation citing them, MITRE techniques,
        score and threshold for model alerts.

        Example:  agentledger alerts --severity high --format json
        """
        import duckdb

        from agentledger.schemas.warehouse import open_for

        s = settings(ctx)
        with open_for(s, read_only=True, snapshot=snapshot) as wh:
            where, params = [], []
            if severity is not None:
                where.append("list_position(?, severity) >= ?")
                params += [list(SEVERITIES), SEVERITIES.index(severity.value) + 1]
            if session:
                where.append("session_id = ?")
                params.append(in_warehouse(wh.con, session, s.warehouse))
            if rule:
                where.append("rule_id IN (SELECT unnest(?))")
                params.append(list(rule))
            if since:
                where.append("created_at >= CAST(? AS TIMESTAMP)")
                params.append(since)
            sql = ("SELECT * EXCLUDE (published_at), published_at IS NOT NULL AS published FROM alerts"
                   + (" WHERE " + " AND ".join(where) if where else "")
                   + " ORDER BY created_at DESC, list_position(?, severity) DESC, session_id, first_seq LIMIT ?")
            params += [list(SEVERITIES), limit]
            has = wh.con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'alerts' "
                                 "AND table_catalog = current_database()").fetchone()[0]
            if not has:
                err_console.print("no alerts table yet: run `agentledger detect` (or `ingest --detect`)")
                rows, cols = [], ["alert_id"]
            else:
                try:
                    cur = wh.con.execute(sql, params)
                except duckdb.Error as exc:
                    raise WarehouseError(str(exc).strip()) from exc
                cols = [d[0] for d in cur.description]
                rows = cur.fetchall()
        if fmt is Format.table:
            show = _ALERT_TABLE + (["explanation"] if explain else [])
            out = []
            for r in rows:
                a = dict(zip(cols, r))
                a["seqs"] = f"{a['first_seq']}..{a['last_seq']}" if a["first_seq"] != a["last_seq"] else a["first_seq"]
                a["created_at"] = a["created_at"].strftime("%Y-%m-%d %H:%M:%S")
                out.append([a[c] for c in show])
            render_rows(show, out, fmt, title=f"{len(rows)} alerts")
        else:
            render_rows(cols, rows, fmt)

    rules_app = typer.Typer(help="Detection rules.\n\nExample:  agentledger rules list", no_args_is_help=True)
    app.add_typer(rules_app, name="rules")

    @rules_app.command("list")
    def rules_list(
        rules_dir: Optional[List[Path]] = typer.Option(None, "--rules-dir", help="More rules; repeatable."),
        fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    ) -> None:
        """List the rules detection would run (built-in, $AGENTLEDGER_RULES_DIR, --rules-dir).

        Example:  agentledger rules list --rules-dir ./my-rules --format json
        """
        from agentledger.consumers.detect import load_rules, rule_dirs

        rules = load_rules(rule_dirs(rule_dirs_arg(rules_dir)))
        cols = ["id", "severity", "escalates_to", "mitre", "title", "kind", "source"]
        render_rows(cols, [(r.id, r.severity, r.escalations, r.mitre, r.title, r.kind, r.source) for r in rules], fmt)

    @rules_app.command("check")
    def rules_check(
        rules_dir: Optional[List[Path]] = typer.Option(None, "--rules-dir", help="Rules to check; repeatable."),
    ) -> None:
        """Load, compile and run every rule on an empty warehouse: exits 1 naming the first bad file.

        Example:  agentledger rules check --rules-dir ./my-rules
        """
        from agentledger.consumers.detect import Detector
        from agentledger.schemas.warehouse import open_warehouse

        with open_warehouse(":memory:") as wh:
            wh.lock_down()
            n = Detector(wh, rules_dirs=rule_dirs_arg(rules_dir), model=None).check_rules()
        console.print(f"{n} rules compile and run")


def rule_dirs_arg(dirs: Optional[List[Path]]) -> list[Path]:
    return [Path(d) for d in dirs or []]
