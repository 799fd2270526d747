"""demo, simulate, ingest, sql: the main job, end to end."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import WarehouseError

from ..output import Format, console, err_console, print_json, render_rows


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, disable=not enabled, transient=True)


def run_simulation(s: Settings, sessions: int, seed: int, *, attack_rate: float = 0.1, labels: Path | None = None,
                   force_attack_first: bool = False, show_progress: bool = True, mix: str | None = None,
                   attacks: list[str] | None = None, checkpoint_every: int = 1000, sign: bool = True,
                   signer=None):
    """Simulate sessions into the configured transport. Checkpoints are signed with the seed's
    simulator key (its public key goes to the simulator keyring, never trusted) -- or, with
    ``signer``, with that real key (whose public key the caller puts where verifiers trust it)."""
    from agentledger.producers.simulate import parse_mix, simulate, simulation_recorder, write_labels, write_public_key
    from agentledger.producers.sinks import open_producer_sink

    # A bulk producer: the Kafka client gets its own process (see schemas/transport/kafka.py).
    sink = open_producer_sink(s, kafka_process=True)
    if hasattr(sink, "wait_direct"):
        # a bulk run can afford to wait for the connection instead of spooling, not for a broker that
        # is not there (one failed attempt: CONNECT_TIMEOUT_MS)
        sink.wait_direct(15.0, until_failure=True)
    with _progress(show_progress) as progress:
        task = progress.add_task("simulating sessions", total=sessions)
        try:
            result = simulate(lambda clock, rng: simulation_recorder(sink, s.topic, seed, clock, rng,
                                                                     checkpoint_every=checkpoint_every, sign=sign,
                                                                     signer=signer),
                              sessions, seed, attack_rate=attack_rate, force_attack_first=force_attack_first,
                              attacks=attacks, mix=parse_mix(mix), on_session=lambda i: progress.advance(task))
        finally:
            sink.close(timeout=60)
    if getattr(sink, "state", "direct") != "direct" and sink.spool.undrained():
        err_console.print(f"[yellow]Kafka unavailable: {sink.spool.undrained()} events are spooled in "
                          f"{sink.spool.root}; they are sent when Kafka answers (or run: agentledger spool drain)[/]")
    if sign and signer is None:
        write_public_key(seed, s.home / "keys" / "simulator")  # recognised by verifiers, never trusted
    if labels is not None:
        write_labels(labels, result, seed)
    return result


def run_ingest(s: Settings, *, follow: bool = False, show_progress: bool = True, batch_records: int | None = None,
               group: str | None = None, compact_every_s: float | None = None, detect: bool = False,
               detect_options: dict | None = None):
    from agentledger.consumers.ingest import DEFAULT_BATCH, Ingestor
    from agentledger.schemas.transport import open_source
    from agentledger.schemas.treelog import tree_heads_for
    from agentledger.schemas.warehouse import open_for

    stop = threading.Event()
    if follow or group:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    wh = open_for(s)
    source = open_source(s, group_id=group) if group and s.uses_kafka else open_source(s)
    detection = None
    ing = None
    try:
        if detect:  # alerts within seconds: detection runs after each committed batch (detect_cmd.py)
            from .detect_cmd import IngestDetection

            detection = IngestDetection(s, wh, catch_up=not group, **(detect_options or {}))
            detection.start()
        ing = Ingestor(wh, source, s.topic, batch_records=batch_records or DEFAULT_BATCH, group=group,
                       compact_every_s=compact_every_s, after_commit=detection,
                       tree_heads=tree_heads_for(s, wh.con))
        ing.subscribe() if group else ing.assign()
        with _progress(show_progress) as progress:
            total = None if follow or group else ing.lag()
            task = progress.add_task("ingesting events", total=total)

            def on_batch(r, stats):
                progress.update(task, advance=r.messages)

            stats = ing.run(follow=follow, stop=stop, on_batch=on_batch)
    finally:
        try:
            if detection is not None:
                detection.close()
        finally:
            if ing is not None and ing.tree_heads and ing.tree_heads.publisher:
                ing.tree_heads.publisher.close()
            source.close()
            wh.close()
    if detection is not None:
        stats.detection = detection.total
    return stats


def _demo_policies(home: Path) -> str:
    """Write the simulator's policy and a strict-egress variant of it under HOME/policies; return
    the strict one's path as the user would type it."""
    from agentledger.producers.simulate import SIMULATOR_POLICY

    d = home / "policies"
    d.mkdir(parents=True, exist_ok=True)
    text = SIMULATOR_POLICY.read_text()
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


def register(app: typer.Typer) -> None:
    from ..cli import settings

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
        result = run_simulation(s, sessions, seed, attack_rate=0.0, force_attack_first=True)
        console.print(f"recorded {result.events} events in {result.sessions} sessions "
                      f"(suspicious: {', '.join(l['session_id'] for l in result.labels if l['attack']) or 'none'})")
        stats = run_ingest(s, detect=True)
        console.print(_ingest_line(stats))
        console.print("checkpoints are signed with the simulator's seed key: verify reports them as "
                      "simulator-signed, never trusted (docs/keys.md)")
        loud = sum(v for k, v in stats.detection.by_severity.items() if k in ("high", "critical"))
        console.print(f"detection raised {stats.detection.alerts_new} new alerts ({loud} high or critical)")
        from agentledger.schemas.warehouse import open_for

        with open_for(s, read_only=True) as wh:
            cur = wh.con.execute("""
                SELECT left(s.session_id, 13) AS session, s.agent, s.event_count AS events, s.commands AS cmds,
                       s.network_attempts AS net, s.sandbox_denied + s.approvals_denied + s.network_denied AS denied,
                       (SELECT count(*) FROM alerts a WHERE a.session_id = s.session_id
                          AND a.severity IN ('high', 'critical')) AS "alerts*",
                       c.status AS chain
                FROM sessions s JOIN chain_status c USING (session_id) ORDER BY s.started_at""")
            render_rows([d[0] for d in cur.description], cur.fetchall(), Format.table,
                        title="sessions (alerts*: high or critical only; commands accept a unique id prefix)")
        suspicious = [l["session_id"] for l in result.labels if l["attack"]]
        strict = _demo_policies(s.home)
        from ..invocation import prog

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
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
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
            from agentledger.producers.simulate import SIMULATOR_POLICY

            write_policy.parent.mkdir(parents=True, exist_ok=True)
            write_policy.write_bytes(SIMULATOR_POLICY.read_bytes())
        result = run_simulation(s, sessions, seed, attack_rate=0.0 if benign_only else attack_rate, labels=labels,
                                show_progress=fmt is not Format.json, mix=mix,
                                checkpoint_every=checkpoint_every or 10**12, sign=sign)
        attacks = sum(1 for l in result.labels if l["attack"])
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
        compact_every: float = typer.Option(600.0, help="With --follow on a DuckLake: compact every N seconds (0: never)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json (summary)."),
        detect: bool = typer.Option(False, "--detect", help="Run the rules and the anomaly model on every committed "
                                                            "batch: alerts in `alerts` and on agentledger.alerts."),
        rules_dir: Optional[list[Path]] = typer.Option(None, "--rules-dir", help="With --detect: more rules "
                                                       "(repeatable; also $AGENTLEDGER_RULES_DIR)."),
        model: Optional[str] = typer.Option(None, "--model", help="With --detect: model artifact, or 'none'."),
    ) -> None:
        """Consume events exactly once into the warehouse (rows and offsets commit together).

        With --detect, each committed batch's sessions are examined right away (whole sessions, so a
        sequence split across batches is seen whole) and alerts are published to the alerts topic.

        Example:  agentledger ingest --until-caught-up
        Example:  agentledger ingest --follow --detect
        """
        if until_caught_up and follow:
            raise typer.BadParameter("choose one of --until-caught-up and --follow")
        s = settings(ctx)
        if group and s.uses_kafka and not s.warehouse.startswith("ducklake:"):
            raise typer.BadParameter("--group needs a warehouse several processes can write: "
                                     "AGENTLEDGER_WAREHOUSE=ducklake:sqlite:/path/meta.sqlite (or Postgres)")
        detect_options = None
        if detect:
            from .detect_cmd import _model_arg

            detect_options = {"rules_dirs": list(rules_dir or []), "model": _model_arg(model, False)}
        stats = run_ingest(s, follow=follow, batch_records=batch, show_progress=fmt is not Format.json,
                           group=group, compact_every_s=compact_every or None, detect=detect,
                           detect_options=detect_options)
        detection = getattr(stats, "detection", None)
        if fmt is Format.json:
            print_json({**stats.as_dict(), **({"detection": detection.as_dict()} if detection else {})})
        else:
            console.print(f"ingested {stats.accepted} events ({stats.dead_letters} quarantined) "
                          f"in {stats.batches} batches, {stats.seconds:.2f}s")
            if detection:
                console.print(f"detection: {detection.sessions} session passes, {detection.alerts_new} new alerts, "
                              f"{detection.alerts_updated} updated, {detection.published} published")

    @app.command()
    def sql(
        ctx: typer.Context,
        query: str = typer.Argument(..., help="SQL to run (read-only)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
        snapshot: Optional[int] = typer.Option(None, "--snapshot", help="DuckLake: query this snapshot (see "
                                                                        "`agentledger snapshots`), for reproducible findings."),
    ) -> None:
        """Run read-only SQL on the warehouse (on a DuckLake: the latest committed snapshot, or --snapshot N).

        Example:  agentledger sql "select family, count(*) from events group by 1" --format json
        """
        import duckdb

        from agentledger.schemas.warehouse import open_for

        s = settings(ctx)
        with open_for(s, read_only=True, snapshot=snapshot) as wh:
            wh.lock_down()
            try:
                cur = wh.con.execute(query)
            except duckdb.Error as exc:
                raise WarehouseError(str(exc).strip()) from exc
            if cur.description is None:
                return
            render_rows([d[0] for d in cur.description], cur.fetchall(), fmt)
