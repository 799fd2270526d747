"""Consumer kill: `agentledger ingest --follow` (the real CLI, small batches so that commits are
frequent) is SIGKILLed at random moments and restarted, while the simulator keeps appending to the
local log; then one last `ingest` catches up. Done on a DuckDB file warehouse and on a DuckLake
(SQLite catalog) warehouse.

``kills_with_wal`` counts kills while the DuckDB write-ahead log (a DuckLake: its SQLite catalog's
journal or a non-empty WAL) was on disk -- a transaction written but not yet checkpointed, an upper
bound on the kills that hit a commit; ``stored_by_killed_runs`` shows the killed runs did real work. Figures per warehouse: produced (event ids in the log), stored, missing,
duplicated (rows beyond one per event id, and event ids stored twice), chains not ok, unresolved
dead letters; ``undetected`` sums what must be 0.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from chaos_scenarios import scenario

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


def _in_commit(home: Path, kind: str) -> bool:
    if kind == "file":
        return (home / "warehouse.duckdb.wal").exists()
    lake = home / "lake"
    return any(lake.glob("meta.sqlite-journal")) or ((lake / "meta.sqlite-wal").exists()
                                                    and (lake / "meta.sqlite-wal").stat().st_size > 0)


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
    kills = in_commit = 0
    later = None
    errors = []
    for k in range(args.kills):
        if k == args.kills // 2:  # more events arrive while the consumer is being killed
            later = cli("simulate", "--sessions", str(max(1, args.kill_sessions // 2)), "--seed", str(args.seed + 1))
        proc = cli("ingest", "--follow", "--batch", str(args.kill_batch), "--compact-every", "0")
        time.sleep(rng.uniform(args.kill_min_s, args.kill_max_s))
        if proc.poll() is None:
            inside = _in_commit(home, kind)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            in_commit += inside
        else:
            errors.append(proc.stderr.read().decode()[-500:])
        proc.stderr.close()
    if later is not None:
        later.wait(timeout=900)
    before_final = _stored_count(env)
    final = subprocess.run([sys.executable, "-m", "agentledger", "ingest"], env=env, cwd=REPO, capture_output=True,
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
            "kills_with_wal": in_commit, "stored_by_killed_runs": before_final, "errors": errors[:3]}


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
