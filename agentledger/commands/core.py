"""demo, simulate, ingest, sql: the main job, end to end."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from agentledger import api

from ..invocation import prog
from ..output import Format, console, err_console, print_json, progress_bar, render_rows
from .options import SummaryFormat, TableCsvOrJson, TableOrJson, rule_dirs, settings

app = typer.Typer()


def _simulate(s: api.Settings, sessions: int, seed: int, *, show_progress: bool = True, **options) -> api.Simulation:
    with progress_bar(show_progress) as progress:
        result = api.simulate(s, sessions, seed, progress=progress, **options)
    if result.spooled:
        err_console.print(f"[yellow]Kafka unavailable: {result.spooled} events are spooled in "
                          f"{result.spool_dir}; they are sent when Kafka answers (or run: agentledger spool drain)[/]")
    return result


def _ingest(s: api.Settings, *, follow: bool = False, group: str | None = None, show_progress: bool = True,
            **options) -> api.Ingested:
    stop = threading.Event()
    if follow or group:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    with progress_bar(show_progress) as progress:
        return api.ingest(s, follow=follow, group=group, stop=stop, progress=progress, **options)


def _demo_policies(home: Path) -> str:
    """Write the simulator's policy and a strict-egress variant of it under HOME/policies; return
    the strict one's path as the user would type it."""
    d = home / "policies"
    d.mkdir(parents=True, exist_ok=True)
    text = api.simulator_policy_path().read_text()
    (d / "simulated-fleet.toml").write_text(text)
    strict = d / "strict-egress.toml"
    strict.write_text(text.replace('name = "simulated-fleet"', 'name = "strict-egress"')
                      .replace('[network]\ndefault = "allow"', '[network]\ndefault = "deny"'))
    try:
        return str(strict.relative_to(Path.cwd()))
    except ValueError:
        return str(strict)


def _ingest_line(stats) -> str:
    """What the demo's ingest did. Re-running the demo records the same events again (the same seed
    gives byte-identical sessions): ingest recognises them as duplicates, which is not a failure."""
    dup = stats.reasons.get("duplicate", 0)
    bad = stats.dead_letters - dup
    line = f"ingested {stats.accepted} new events"
    if dup:
        line += (f"; {dup} were already recorded (the demo's sessions are deterministic: re-running it records "
                 "them again, and ingest recognised the duplicates)")
    if bad:
        line += f"; {bad} quarantined (agentledger deadletters list)"
    return line + f", in {stats.seconds:.2f}s"


@app.command()
def demo(
    ctx: typer.Context,
    sessions: int = typer.Option(6, help="How many sessions to simulate (one is suspicious)."),
    seed: int = typer.Option(42, help="Simulation seed."),
) -> None:
    """Run the main job on this machine: simulate agent sessions, record them, ingest, summarise.

    Uses the embedded local log unless AGENTLEDGER_BOOTSTRAP_SERVERS is set, in the per-user home
    ($XDG_DATA_HOME/agentledger or ~/.local/share/agentledger) unless AGENTLEDGER_HOME/--home is set.

    Example:  AGENTLEDGER_HOME=/tmp/al agentledger demo
    """
    s = settings(ctx)
    console.print(f"[bold]agentledger demo[/] — home: {s.home}; transport: {s.transport_label}; "
                  f"warehouse: {s.warehouse}", highlight=False)
    result = _simulate(s, sessions, seed, attack_rate=0.0, force_attack_first=True)
    console.print(f"recorded {result.events} events in {result.sessions} sessions "
                  f"(suspicious: {', '.join(result.suspicious) or 'none'})")
    ingested = _ingest(s, detect=True)
    console.print(_ingest_line(ingested))
    console.print("checkpoints are signed with the simulator's seed key: verify reports them as "
                  "simulator-signed, never trusted (docs/keys.md)")
    detection = ingested.detection
    loud = sum(v for k, v in detection.by_severity.items() if k in ("high", "critical"))
    console.print(f"detection raised {detection.alerts_new} new alerts ({loud} high or critical)")
    overview = api.session_overview(s)
    render_rows(overview.columns, overview.rows, Format.table,
                title="sessions (alerts*: high or critical only; commands accept a unique id prefix)")
    suspicious = result.suspicious
    strict = _demo_policies(s.home)
    al = prog()  # `agentledger` is not on PATH after ./scripts/demo: `.venv/bin/agentledger` then
    hints = ""
    if suspicious:
        hints += f"  {al} replay {suspicious[0][:13]}    # timeline, state, chain and signatures\n"
    hints += (f"  {al} whatif --policy {strict}    # what a deny-by-default egress policy "
              "would have stopped\n")
    # soft_wrap: each command stays on one line, whatever the terminal's width, so it can be copied
    console.print(
        "\n[bold]Try next:[/]\n" + hints +
        f"  {al} sql \"select family, count(*) from events group by 1\"\n"
        f"  {al} sql \"select session_id, seq, kind, file_accessed.path from events "
        "where file_accessed.path like '%/.aws/%' or file_accessed.path like '%/.ssh/%'\"\n"
        f"  {al} sql \"select network_attempted.host, network_attempted.port, count(*) from events "
        "where kind = 'network_attempted' group by all order by 3 desc\"\n"
        f"  {al} sql \"select * from chain_status\" --format json\n"
        f"  {al} alerts --severity high --explain", soft_wrap=True, highlight=False
    )
    # not among the indented commands above (those return): the console runs until Ctrl-C
    console.print(f"\n[bold]Or browse it all:[/] {al} serve   (the web console on http://127.0.0.1:8765/)",
                  soft_wrap=True, highlight=False)


@app.command()
def simulate(
    ctx: typer.Context,
    sessions: int = typer.Option(10, "--sessions", "-n", help="Number of sessions."),
    seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical events."),
    attack_rate: float = typer.Option(0.1, help="Fraction of sessions carrying a labelled attack."),
    labels: Optional[Path] = typer.Option(None, help="Write ground-truth labels (JSON lines, one per session) "
                                                     "here, apart from the events."),
    mix: Optional[str] = typer.Option(None, help="Attack scenario weights, e.g. 'crypto_mining=3,persistence=1' "
                                                 "(others 0). Scenarios: see producers/simulate.py."),
    benign_only: bool = typer.Option(False, "--benign-only", help="No attacks (near-misses stay)."),
    checkpoint_every: int = typer.Option(1000, help="Signed checkpoint every N events of a session (0: only at the end)."),
    sign: bool = typer.Option(True, "--sign/--no-sign", help="Sign checkpoints with the seed's simulation key (never trusted by verify)."),
    write_policy: Optional[Path] = typer.Option(None, "--write-policy", help="Also write the policy the "
                                                "simulated sessions run under (TOML), to start what-if from."),
    fmt: TableOrJson = Format.table,
) -> None:
    """Emit deterministic, realistic coding-agent sessions (with labelled attacks) to the configured transport.

    The same --sessions/--seed/options give byte-identical events and labels. Secrets in the simulated
    sessions are fake and redacted like real ones; checkpoints are signed with a key derived from the
    seed, whose public key is written to the simulator keyring HOME/keys/simulator: anyone who knows
    the seed can sign with it, so verifiers report such sessions as signed by a simulator key and
    --require-signatures never accepts them.

    Every network decision is the simulator's policy's (--write-policy gives the file): `replay SESSION
    --policy` with it reports no divergence; a copy with one more deny rule reports exactly what it catches.

    Example:  agentledger simulate --sessions 1000 --seed 11 --labels labels.jsonl --format json
    """
    s = settings(ctx)
    if write_policy is not None:
        write_policy.parent.mkdir(parents=True, exist_ok=True)
        write_policy.write_bytes(api.simulator_policy_path().read_bytes())
    result = _simulate(s, sessions, seed, attack_rate=0.0 if benign_only else attack_rate, labels=labels,
                       show_progress=fmt is not Format.json, mix=mix, checkpoint_every=checkpoint_every or 10**12,
                       sign=sign)
    attacks = result.attack_sessions
    if fmt is Format.json:
        print_json({"sessions": result.sessions, "events": result.events, "attack_sessions": attacks,
                    "policy": str(write_policy) if write_policy else None})
    else:
        console.print(f"emitted {result.events} events in {result.sessions} sessions to {s.transport_label}"
                      f" ({attacks} labelled attack sessions)")
        if write_policy is not None:
            console.print(f"the policy they ran under: {write_policy} (try: agentledger whatif --policy {write_policy})")


@app.command()
def ingest(
    ctx: typer.Context,
    until_caught_up: bool = typer.Option(False, "--until-caught-up", help="Exit at zero lag (the default)."),
    follow: bool = typer.Option(False, "--follow", help="Keep ingesting until interrupted (SIGINT/SIGTERM)."),
    batch: int = typer.Option(100_000, help="Max events per transaction (large is faster: see docs/warehouse.md)."),
    group: Optional[str] = typer.Option(None, "--group", help="Consumer group: several ingest processes share "
                                                              "the topic's partitions (needs a DuckLake warehouse)."),
    compact_every: float = typer.Option(600.0, help="With --follow on a DuckLake: every N seconds expire snapshots "
                                                    "older than an hour and delete unused files (0: never; merging "
                                                    "small files is `compact --merge`)."),
    fmt: SummaryFormat = Format.table,
    detect: bool = typer.Option(False, "--detect", help="Run the rules and the anomaly model on every committed "
                                                        "batch: alerts in `alerts` and on agentledger.alerts."),
    rules_dir: Optional[list[Path]] = typer.Option(None, "--rules-dir", help="With --detect: more rules "
                                                   "(repeatable; also $AGENTLEDGER_RULES_DIR)."),
    model: Optional[str] = typer.Option(None, "--model", help="With --detect: model artifact, or 'none'."),
    ocsf: Optional[Path] = typer.Option(None, "--ocsf", help="Append each committed batch's new events and (with "
                                        "--detect) new alerts to this file as OCSF JSON lines (docs/export.md)."),
    log_replaced: bool = typer.Option(False, "--log-replaced", help="The log went backwards (replaced, truncated, "
                                      "restored or recreated) and you know why: read those partitions from their "
                                      "beginning again (ingest refuses otherwise)."),
) -> None:
    """Consume events exactly once into the warehouse (rows and offsets commit together).

    With --detect, each committed batch's sessions are examined right away (whole sessions, so a
    sequence split across batches is seen whole) and alerts are published to the alerts topic.

    Example:  agentledger ingest --until-caught-up
    Example:  agentledger ingest --follow --detect
    Example:  agentledger ingest --follow --detect --ocsf /var/log/agentledger/ocsf.jsonl
    """
    if until_caught_up and follow:
        raise typer.BadParameter("choose one of --until-caught-up and --follow")
    s = settings(ctx)
    if group and s.uses_kafka and not s.warehouse.startswith("ducklake:"):
        raise typer.BadParameter("--group needs a warehouse several processes can write: "
                                 "AGENTLEDGER_WAREHOUSE=ducklake:sqlite:/path/meta.sqlite (or Postgres)")
    detect_options = {"rules_dirs": list(rule_dirs(rules_dir)), "model": api.resolve_model(model, s=s)} if detect else {}
    stats = _ingest(s, follow=follow, batch_records=batch, show_progress=fmt is not Format.json, group=group,
                    compact_every_s=compact_every or None, detect=detect, ocsf=ocsf, log_replaced=log_replaced,
                    **detect_options)
    detection = stats.detection
    if fmt is Format.json:
        print_json(stats.as_dict())
    else:
        console.print(f"ingested {stats.accepted} events ({stats.dead_letters} quarantined) "
                      f"in {stats.batches} batches, {stats.seconds:.2f}s")
        if detection:
            console.print(f"detection: {detection.sessions} session passes, {detection.alerts_new} new alerts, "
                          f"{detection.alerts_updated} updated, {detection.published} published")
        if stats.ocsf:
            console.print(f"ocsf: appended {stats.ocsf.events} events and {stats.ocsf.alerts} alerts to {ocsf}")


@app.command()
def sql(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="SQL to run (read-only)."),
    fmt: TableCsvOrJson = Format.table,
    snapshot: Optional[int] = typer.Option(None, "--snapshot", help="DuckLake: query this snapshot (see "
                                                                    "`agentledger snapshots`), for reproducible findings."),
) -> None:
    """Run read-only SQL on the warehouse (on a DuckLake: the latest committed snapshot, or --snapshot N).

    Example:  agentledger sql "select family, count(*) from events group by 1" --format json
    """
    rows = api.sql(settings(ctx), query, snapshot=snapshot)
    if rows is not None:
        render_rows(rows.columns, rows.rows, fmt)
