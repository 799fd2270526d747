"""Consumer kill: `agentledger ingest --follow` (the real CLI, small batches so that commits are
frequent) is SIGKILLed at random moments and restarted, while the simulator keeps appending to the
local log; then one last `ingest` catches up. Done on a DuckDB file warehouse and on a DuckLake
(SQLite catalog) warehouse.

The kills are timed from the warehouse's files, polled every 2 ms (`_Writes`): every other kill
lands at the moment a commit is seen being written (the DuckDB WAL growing; a DuckLake's catalog
journal on disk or a new Parquet file not yet committed), after letting 0-2 commits through; the
others at a random moment (kill-min-s to kill-max-s) after the run's first commit. Figures per
warehouse: ``kills_in_commit`` (a commit was being written when the SIGKILL was sent),
``kills_after_commit``, ``kills_idle`` (no commit seen within kill-wait-s), ``killed_runs_that_committed``
(the stored count grew across the run), ``stored_by_killed_runs``; produced (event ids in the log),
stored, missing, duplicated (rows beyond one per event id, and event ids stored twice), chains not
ok, unresolved dead letters; ``undetected`` sums what must be 0.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from chaos_scenarios import agentledger_cmd, scenario

REPO = Path(__file__).resolve().parents[2]


def _env(home: Path, warehouse: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "HOME": str(home.parent), "PYTHONPATH": str(REPO), "NO_COLOR": "1",
                "AGENTLEDGER_WAREHOUSE": warehouse, "AGENTLEDGER_TREE_HEAD_EVERY_S": "0"})
    return env


def _produced(home: Path) -> list[str]:
    """Every event id in the local log."""
    from agentledger.schemas.contract import load_store
    from agentledger.schemas.config import DEFAULT_TOPIC
    from agentledger.schemas.transport.local import LocalLog

    store = load_store()
    log = LocalLog(home / "log")
    ids = []
    for p in range(log.partition_count(DEFAULT_TOPIC)):
        off, end = 0, log.end_offset(DEFAULT_TOPIC, p)
        while off < end:
            msgs = log.read(DEFAULT_TOPIC, p, off, 5000)
            if not msgs:
                break
            for m in msgs:
                ids.append(str(store.decode(m.value)["event_id"]))
            off = msgs[-1].offset + 1
    return ids


class _Writes:
    """A batch commit of the consumer, seen from outside through the warehouse's files (polled every
    2 ms). A DuckDB file: ingest keeps the write-ahead log between commits (checkpoint_threshold
    512 MB), and a batch's commit appends its rows to it -- the WAL growing by 8 KB or more between
    two polls (start-up and bookkeeping writes are ~1 KB) is a commit being written. A DuckLake: a
    batch's commit first writes Parquet files (which no reader sees yet), then registers them in the
    SQLite catalog in one transaction -- a new Parquet file on disk is a commit under way, and the
    catalog's count of data and delete files growing (read every 10th poll) is a commit done."""

    MIN_WAL_GROWTH = 8192

    def __init__(self, home: Path, kind: str):
        self.home, self.kind = home, kind
        self.polls = 0
        self.catalog = self._catalog_files()
        self.last = self._state()

    def _catalog_files(self) -> int:
        if self.kind == "file":
            return 0
        import sqlite3

        try:
            con = sqlite3.connect(f"file:{self.home / 'lake' / 'meta.sqlite'}?mode=ro", uri=True, timeout=0.05)
            try:
                return con.execute("SELECT (SELECT count(*) FROM ducklake_data_file) + "
                                   "(SELECT count(*) FROM ducklake_delete_file)").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:  # no catalog yet, or locked by the commit: as before
            return self.catalog if hasattr(self, "catalog") else 0

    def _state(self) -> int:
        if self.kind == "file":
            try:
                return (self.home / "warehouse.duckdb.wal").stat().st_size
            except OSError:
                return 0
        return sum(sum(1 for f in files if f.endswith(".parquet")) for _, _, files in os.walk(self.home / "lake"))

    def poll(self) -> tuple[bool, bool]:
        """(a commit is being written now, a commit was completed) since the last poll."""
        now = self._state()
        before, self.last = self.last, now
        if self.kind == "file":
            grew = now - before >= self.MIN_WAL_GROWTH
            return grew, grew
        self.polls += 1
        done = False
        if self.polls % 10 == 0:
            cat = self._catalog_files()
            done, self.catalog = cat > self.catalog, max(cat, self.catalog)
        return now > before, done


def _stored_count(env: dict) -> int:
    import duckdb

    from agentledger.schemas.config import from_env
    from agentledger.schemas.errors import AgentLedgerError
    from agentledger.schemas.warehouse import open_for

    try:
        with open_for(from_env(env), read_only=True) as wh:
            return wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
    except (AgentLedgerError, duckdb.Error):  # no warehouse (schema) yet: the killed runs never got that far
        return 0


def _one(args, work: Path, kind: str, rng: random.Random) -> dict:
    home = work / kind / "home"
    home.mkdir(parents=True)
    warehouse = str(home / "warehouse.duckdb") if kind == "file" else f"ducklake:sqlite:{home / 'lake' / 'meta.sqlite'}"
    env = _env(home, warehouse)

    def cli(*a, **kw):
        return subprocess.Popen([sys.executable, "-m", "agentledger", *a], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)

    sim = cli("simulate", "--sessions", str(args.kill_sessions), "--seed", str(args.seed), "--checkpoint-every", "50")
    sim.wait(timeout=900)
    kills = in_commit = after_commit = idle = committed_runs = 0
    later = None
    errors = []
    stored_before = 0
    for k in range(args.kills):
        if k == args.kills // 2:  # more events arrive while the consumer is being killed
            later = cli("simulate", "--sessions", str(max(1, args.kill_sessions // 2)), "--seed", str(args.seed + 1))
        writes = _Writes(home, kind)
        proc = cli("ingest", "--follow", "--batch", str(args.kill_batch), "--compact-every", "0")
        # Every other kill lands inside a commit: at a batch commit seen as it is written, after
        # `skip` commits (0-3) were let through. The others land at a random moment once the run has
        # written a commit (so each killed run did commit work), between kill-min-s and kill-max-s.
        in_commit_kill = k % 2 == 0
        skip = rng.randint(0, 3) if in_commit_kill else 0
        delay = rng.uniform(args.kill_min_s, args.kill_max_s)
        deadline = time.monotonic() + args.kill_wait_s
        seen = done = 0
        kill_at = None
        inside = False
        while proc.poll() is None and time.monotonic() < deadline:
            underway, committed = writes.poll()
            seen += underway
            done += committed
            if in_commit_kill and underway and seen > skip:
                inside = True
                break
            if not in_commit_kill and done and kill_at is None:
                kill_at = time.monotonic() + delay
            if kill_at is not None and time.monotonic() >= kill_at:
                inside = underway
                break
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            in_commit += inside
            if not seen and not done:
                idle += 1  # no commit seen before the deadline (nothing left to ingest, or a slow start)
            elif not inside:
                after_commit += 1
        else:
            errors.append(proc.stderr.read().decode()[-500:])
        proc.stderr.close()
        stored = _stored_count(env)
        committed_runs += stored > stored_before
        stored_before = max(stored_before, stored)
    if later is not None:
        later.wait(timeout=900)
    before_final = _stored_count(env)
    final = subprocess.run([*agentledger_cmd(), "ingest"], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=1800)
    if final.returncode != 0:
        errors.append(final.stderr[-1000:])
    produced = _produced(home)
    from agentledger.schemas.config import from_env
    from agentledger.schemas.warehouse import open_for

    with open_for(from_env(env), read_only=True) as wh:
        rows, distinct = wh.con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        stored = {r[0] for r in wh.con.execute("SELECT DISTINCT CAST(event_id AS VARCHAR) FROM events").fetchall()}
        twice = wh.con.execute("SELECT count(*) FROM (SELECT session_id, seq FROM events GROUP BY 1, 2 "
                               "HAVING count(*) > 1)").fetchone()[0]
        not_ok = wh.con.execute("SELECT count(*) FROM chain_status WHERE status <> 'ok'").fetchone()[0]
        unresolved = wh.con.execute("SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL").fetchone()[0]
    want = set(produced)
    return {"produced": len(produced), "produced_distinct": len(want), "stored": rows,
            "missing": len(want - stored), "unexpected": len(stored - want), "duplicated": rows - distinct + twice,
            "chains_not_ok": not_ok, "unresolved_dead_letters": unresolved, "kills": kills,
            "kills_in_commit": in_commit, "kills_after_commit": after_commit, "kills_idle": idle,
            "killed_runs_that_committed": committed_runs, "stored_by_killed_runs": before_final, "errors": errors[:3]}


@scenario("consumer_kill")
def run(args, workdir: Path) -> dict:
    rng = random.Random(args.seed)
    out: dict = {}
    undetected = 0
    for kind in args.kill_warehouses.split(","):
        f = _one(args, workdir, kind, rng)
        out[kind] = f
        undetected += f["missing"] + f["unexpected"] + f["duplicated"] + f["chains_not_ok"] + len(f["errors"])
    out["undetected"] = undetected
    out["tracebacks"] = sum(1 for f in out.values() if isinstance(f, dict) for e in f["errors"] if "Traceback" in e)
    return out
