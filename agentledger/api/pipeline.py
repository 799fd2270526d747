"""The main job: simulate sessions (or import real agents' logs), ingest them (with detection), detect,
query the warehouse."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from agentledger.schemas.config import Settings
from agentledger.schemas.errors import WarehouseError

from .common import Counter, ProgressCallback, Rows
from .models import resolve_model  # noqa: F401 (re-exported: it was defined here)
from .sessions import in_warehouse

log = logging.getLogger(__name__)

SEVERITIES = ("low", "medium", "high", "critical")


# --- simulate ----------------------------------------------------------------------------------------

@dataclass
class Simulation:
    """What `simulate` recorded: ``labels`` are the ground truth per session (never in the events);
    ``spooled`` events wait in ``spool_dir`` for Kafka (0 with the local log)."""

    sessions: int
    events: int
    labels: list[dict]
    spooled: int = 0
    spool_dir: Path | None = None
    secrets: dict[str, set] = field(default_factory=dict, repr=False)

    @property
    def attack_sessions(self) -> int:
        return sum(1 for label in self.labels if label["attack"])

    @property
    def suspicious(self) -> list[str]:
        return [label["session_id"] for label in self.labels if label["attack"]]


def simulator_policy_path() -> Path:
    """The policy (TOML) every simulated session runs under."""
    from agentledger.producers.simulate import SIMULATOR_POLICY

    return SIMULATOR_POLICY


def simulate(s: Settings, sessions: int = 10, seed: int = 0, *, attack_rate: float = 0.1,
             labels: str | Path | None = None, force_attack_first: bool = False, mix: str | None = None,
             attacks: list[str] | None = None, checkpoint_every: int = 1000, sign: bool = True, signer=None,
             progress: ProgressCallback | None = None) -> Simulation:
    """Simulate sessions into the configured transport (the same seed and options give
    byte-identical events). Checkpoints are signed with the seed's simulator key (its public key
    goes to the simulator keyring, never trusted) -- or, with ``signer``, with that real key (whose
    public key the caller puts where verifiers trust it). ``labels``: also write the ground truth
    there (JSON lines)."""
    from agentledger.producers.simulate import parse_mix, simulate as run, simulation_recorder, write_labels, \
        write_public_key
    from agentledger.producers.sinks import open_producer_sink

    # A bulk producer: the Kafka client gets its own process (see schemas/transport/kafka/process.py).
    sink = open_producer_sink(s, kafka_process=True)
    # a bulk run can afford to wait for the connection instead of spooling, not for a broker that
    # is not there (one failed attempt: CONNECT_TIMEOUT_MS)
    sink.wait_direct(15.0, until_failure=True)
    count = Counter(progress, "simulating sessions", sessions)
    try:
        result = run(lambda clock, rng: simulation_recorder(sink, s.topic, seed, clock, rng,
                                                            checkpoint_every=checkpoint_every, sign=sign,
                                                            signer=signer),
                     sessions, seed, attack_rate=attack_rate, force_attack_first=force_attack_first,
                     attacks=attacks, mix=parse_mix(mix), on_session=lambda i: count.advance())
    finally:
        sink.close(timeout=60)
    spooled, spool_dir = sink.spooled()
    if sign and signer is None:
        write_public_key(seed, s.home / "keys" / "simulator")  # recognised by verifiers, never trusted
    if labels is not None:
        write_labels(Path(labels), result, seed)
    return Simulation(result.sessions, result.events, result.labels, spooled, spool_dir, result.secrets)


# --- real agents' logs ------------------------------------------------------------------------------

def import_agent_logs(s: Settings, rollouts: Sequence[Path] = (), otel: Sequence[Path] = (), *,
                      claude: Sequence[Path] = (), end_idle_s: float | None = 3600.0, dry_run: bool = False,
                      progress: ProgressCallback | None = None):
    """Import Codex rollout files, Claude Code transcripts (``claude``) and OpenTelemetry log exports
    (files or directories) as agent sessions, incrementally and idempotently. ``end_idle_s``: end a
    session idle that long (None: never). The import report (files, sessions, totals(), as_dict())."""
    from agentledger.producers.importer import run_import

    files = Counter(progress, "reading files") if progress else None
    sessions = Counter(progress, "recording sessions") if progress else None
    return run_import(s, list(rollouts), list(otel), claude=list(claude), end_idle_s=end_idle_s, dry_run=dry_run,
                      on_file=(lambda f: files.advance()) if files else None,
                      on_session=(lambda r: sessions.advance()) if sessions else None)


# --- detection ---------------------------------------------------------------------------------------

def make_detector(s: Settings, wh, *, rules_dirs: Sequence[Path] | None = None, model=True, publish: bool = True):
    """A Detector on ``wh``; with Kafka as the transport it publishes alerts to agentledger.alerts
    (the embedded log holds events only: there, alerts live in the warehouse). ``model``: a path, None
    (rules only) or True, the default: the model `train_model` saved for this warehouse, else the
    shipped one (see `resolve_model`)."""
    from agentledger.consumers.detect import Detector
    from agentledger.schemas.transport import open_sink

    if model is True:
        model = resolve_model(s=s)

    sink = open_sink(s) if publish and s.uses_kafka else None
    try:
        return Detector(wh, rules_dirs=list(rules_dirs or []), model=model, sink=sink, alerts_topic=s.alerts_topic)
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


# --- ingest ------------------------------------------------------------------------------------------

@dataclass
class Ingested:
    """What `ingest` did: the ingestor's counts (``stats``) and, with detection, its result."""

    stats: Any  # consumers.ingest.IngestStats
    detection: Any = None  # consumers.detect.DetectResult
    ocsf: Any = None  # consumers.export.ocsf_files.OcsfExport: what `ocsf` appended

    def __getattr__(self, name: str):  # accepted, dead_letters, batches, seconds, reasons, ...
        if name.startswith("__") or name in ("stats", "detection", "ocsf"):
            raise AttributeError(name)
        return getattr(self.stats, name)

    def as_dict(self) -> dict:
        return {**self.stats.as_dict(), **({"detection": self.detection.as_dict()} if self.detection else {}),
                **({"ocsf": self.ocsf.as_dict()} if self.ocsf else {})}


def ingest(s: Settings, *, follow: bool = False, batch_records: int | None = None, group: str | None = None,
           compact_every_s: float | None = None, detect: bool = False, rules_dirs: Sequence[Path] | None = None,
           model: Path | bool | None = True, stop: threading.Event | None = None, ocsf: str | Path | None = None,
           progress: ProgressCallback | None = None, log_replaced: bool = False) -> Ingested:
    """Consume the transport exactly once into the warehouse: until caught up, or with ``follow``
    until ``stop`` is set. ``group``: a Kafka consumer group (several ingest processes share the
    topic's partitions; needs a DuckLake warehouse). ``detect``: run the rules (more in
    ``rules_dirs``) and the anomaly ``model`` (see `resolve_model`) on every committed batch. ``ocsf``:
    append each committed batch's new events and (after detection) new alert revisions to this file as
    OCSF JSON lines (what the warehouse holds beyond the file is appended first; see `ocsf_sink`).
    A log that went backwards (a partition ending below what was ingested) is refused
    (`LogWentBackwards`) unless ``log_replaced``, which reads those partitions from their beginning."""
    from agentledger.consumers.ingest import DEFAULT_BATCH, Ingestor
    from agentledger.schemas.transport import open_source
    from agentledger.schemas.treelog import tree_heads_for
    from agentledger.schemas.warehouse import open_for

    if group and s.uses_kafka and not s.warehouse.startswith("ducklake:"):
        raise WarehouseError("a consumer group needs a warehouse several processes can write: "
                             "AGENTLEDGER_WAREHOUSE=ducklake:sqlite:/path/meta.sqlite (or Postgres)")
    stop = stop or threading.Event()
    wh = open_for(s)
    source = open_source(s, group_id=group) if group and s.uses_kafka else open_source(s)
    detection = None
    ing = None
    sink = None
    try:
        if detect:  # alerts within seconds: detection runs after each committed batch
            detection = IngestDetection(s, wh, catch_up=not group, rules_dirs=rules_dirs, model=model)
            detection.start()
        if ocsf is not None:
            from .export import ocsf_sink

            sink = ocsf_sink(wh, ocsf)
            sink.start()
        hooks = [h for h in (detection, sink) if h is not None]
        after_commit = (lambda batch: [h(batch) for h in hooks]) if hooks else None
        ing = Ingestor(wh, source, s.topic, batch_records=batch_records or DEFAULT_BATCH, group=group,
                       compact_every_s=compact_every_s, after_commit=after_commit,
                       tree_heads=tree_heads_for(s, wh.con))
        ing.subscribe(log_replaced=log_replaced) if group else ing.assign(log_replaced=log_replaced)
        count = Counter(progress, "ingesting events", None if follow or group else ing.lag())
        stats = ing.run(follow=follow, stop=stop, on_batch=lambda r, _stats: count.advance(r.messages))
    finally:
        try:
            if sink is not None:
                sink.close()
            if detection is not None:
                detection.close()
        finally:
            if ing is not None and ing.tree_heads and ing.tree_heads.publisher:
                ing.tree_heads.publisher.close()
            source.close()
            wh.close()
    return Ingested(stats, detection.total if detection is not None else None, sink.written if sink else None)


# --- detect, alerts, rules ---------------------------------------------------------------------------

@dataclass
class Detection:
    """What `detect` did: the detector's ``result`` (sessions, events, alerts_new, alerts_updated,
    anomalous, published, seconds, changed alerts), how many ``rules`` ran and which ``model``."""

    result: Any  # consumers.detect.DetectResult
    rules: int
    model: str | None
    model_digest: str | None = None
    model_cold_start: bool = False  # a deployment model trained on too little history: no model alerts

    def as_dict(self) -> dict:
        return {**self.result.as_dict(), "rules": self.rules, "model": self.model, "model_digest": self.model_digest,
                "model_cold_start": self.model_cold_start}


def detect(s: Settings, *, sessions: Sequence[str] | None = None, all_sessions: bool = False, rebuild: bool = False,
           rules_dirs: Sequence[Path] | None = None, model: Path | bool | None = True, publish: bool = True,
           progress: ProgressCallback | None = None) -> Detection:
    """(Re)run the rules and the anomaly model over the warehouse; raise (and with Kafka publish)
    alerts. By default only sessions pending detection; ``sessions`` (ids or unique prefixes),
    ``all_sessions``, or ``rebuild`` (recompute those sessions' alerts; all unless ``sessions``)."""
    from agentledger.schemas.warehouse import open_for

    with open_for(s) as wh:
        wh.lock_down()  # rules are SQL: no file or network access beyond the warehouse while they run
        det = make_detector(s, wh, rules_dirs=rules_dirs, model=model, publish=publish)
        try:
            if sessions:
                todo = [in_warehouse(wh.con, x, s.warehouse) for x in sessions]
            elif all_sessions or rebuild:
                todo = det.all_sessions()
            else:
                todo = det.pending_sessions()
            count = Counter(progress, "detecting", len(todo))
            result = det.detect(todo, rebuild=rebuild, progress=count.advance)
        finally:
            if det.sink is not None:
                det.sink.close(timeout=10)
    m = det.model
    return Detection(result, len(det.rules), m.model_id if m else None, m.digest if m else None,
                     bool(m and (m.artifact.get("training") or {}).get("cold_start")))


@dataclass
class Alerts(Rows):
    """Alerts (every column of the `alerts` table, ``published`` instead of ``published_at``);
    ``table_missing``: the warehouse has no alerts table yet (detection never ran)."""

    table_missing: bool = False


def alerts(s: Settings, *, severity: str | None = None, session: str | None = None,
           rules: Sequence[str] | None = None, since: str | None = None, limit: int = 200,
           snapshot: int | None = None) -> Alerts:
    """Alerts, newest first: at least ``severity``, of one ``session`` (id or unique prefix), of
    these ``rules`` (rule or model ids), raised at or after ``since`` (UTC)."""
    import duckdb

    from agentledger.schemas.warehouse import open_for

    with open_for(s, read_only=True, snapshot=snapshot) as wh:
        where, params = [], []
        if severity is not None:
            where.append("list_position(?, severity) >= ?")
            params += [list(SEVERITIES), SEVERITIES.index(severity) + 1]
        if session:
            where.append("session_id = ?")
            params.append(in_warehouse(wh.con, session, s.warehouse))
        if rules:
            where.append("rule_id IN (SELECT unnest(?))")
            params.append(list(rules))
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
            return Alerts(["alert_id"], [], table_missing=True)
        try:
            cur = wh.con.execute(sql, params)
        except duckdb.Error as exc:
            raise WarehouseError(str(exc).strip()) from exc
        return Alerts([d[0] for d in cur.description], cur.fetchall())


def rules(rules_dirs: Sequence[Path] | None = None) -> list:
    """The rules detection would run: built-in, $AGENTLEDGER_RULES_DIR, ``rules_dirs``."""
    from agentledger.consumers.detect import load_rules, rule_dirs

    return load_rules(rule_dirs([Path(d) for d in rules_dirs or []]))


def check_rules(rules_dirs: Sequence[Path] | None = None) -> int:
    """Load, compile and run every rule on an empty warehouse; the number of rules (raises naming
    the first bad file)."""
    from agentledger.consumers.detect import Detector
    from agentledger.schemas.warehouse import open_warehouse

    with open_warehouse(":memory:") as wh:
        wh.lock_down()
        return Detector(wh, rules_dirs=[Path(d) for d in rules_dirs or []], model=None).check_rules()


# --- sql ---------------------------------------------------------------------------------------------

def sql(s: Settings, query: str, *, snapshot: int | None = None) -> Rows | None:
    """Run read-only SQL on the warehouse (on a DuckLake: the latest committed snapshot, or
    ``snapshot``); its rows, or None for a statement that returns none."""
    import duckdb

    from agentledger.schemas.warehouse import open_for_query

    with open_for_query(s, snapshot=snapshot) as wh:
        try:
            cur = wh.query(query)
        except duckdb.Error as exc:
            raise WarehouseError(str(exc).strip()) from exc
        if cur.description is None:
            return None
        return Rows([d[0] for d in cur.description], cur.fetchall())


def session_overview(s: Settings) -> Rows:
    """One row per session (oldest first): its id prefix, agent, events, commands, network
    attempts, denials, high or critical alerts, and chain status (the demo's table)."""
    from agentledger.schemas.warehouse import open_for

    with open_for(s, read_only=True) as wh:
        cur = wh.con.execute("""
            SELECT left(s.session_id, 13) AS session, s.agent, s.event_count AS events, s.commands AS cmds,
                   s.network_attempts AS net, s.sandbox_denied + s.approvals_denied + s.network_denied AS denied,
                   (SELECT count(*) FROM alerts a WHERE a.session_id = s.session_id
                      AND a.severity IN ('high', 'critical')) AS "alerts*",
                   c.status AS chain
            FROM sessions s JOIN chain_status c USING (session_id) ORDER BY s.started_at""")
        return Rows([d[0] for d in cur.description], cur.fetchall())
