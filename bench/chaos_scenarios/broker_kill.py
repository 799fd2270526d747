"""Broker kill: producers emit through the public CLI (`agentledger simulate` processes, each its
own home, so each its own spool) to a Kafka broker of this scenario's own (scripts/kafka in a temporary
directory, random ports -- never a shared one), which is SIGKILLed and restarted ``--broker-kills``
times while they run. Then every spool is drained (`agentledger spool drain`) and `agentledger ingest`
takes the topic in.

Figures: produced (events the simulators report recorded), stored (rows), lost (produced event ids
not stored), duplicated (rows beyond one per event id), sessions out of order (chains not ok), plus
what the transport duplicated (identical re-sends, resolved as `duplicate` dead letters: at-least-once
below, exactly once in the warehouse) and what stayed spooled. ``undetected`` = lost + duplicated +
out of order.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from chaos_scenarios import agentledger_cmd, scenario

REPO = Path(__file__).resolve().parents[2]
KAFKA = REPO / "scripts" / "kafka"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnBroker:
    def __init__(self, directory: Path):
        self.dir = directory
        self.port, self.ctrl = _free_port(), _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        proc = subprocess.run([str(KAFKA), "start", "--port", str(self.port), "--controller-port", str(self.ctrl),
                               "--dir", str(self.dir), "--partitions", "6"], capture_output=True, text=True,
                              env={**os.environ, "AGENTLEDGER_PYTHON": sys.executable}, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/kafka start failed: {proc.stderr[-3000:]}")

    def pid(self) -> int | None:
        proc = subprocess.run([str(KAFKA), "status", "--port", str(self.port), "--dir", str(self.dir)],
                              capture_output=True, text=True, timeout=120)
        words = proc.stdout.split()
        return int(words[words.index("pid") + 1]) if "pid" in words else None

    def kill(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return True

    def stop(self) -> None:
        subprocess.run([str(KAFKA), "stop", "--port", str(self.port), "--dir", str(self.dir)], capture_output=True,
                       timeout=180)


def _env(home: Path, bootstrap: str, topic: str, warehouse: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "HOME": str(home.parent), "PYTHONPATH": str(REPO), "NO_COLOR": "1",
                "AGENTLEDGER_BOOTSTRAP_SERVERS": bootstrap, "AGENTLEDGER_TOPIC": topic})
    if warehouse is not None:
        env["AGENTLEDGER_WAREHOUSE"] = str(warehouse)
    return env


def _cli(env: dict, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([*agentledger_cmd(), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@scenario("broker_kill")
def run(args, workdir: Path) -> dict:
    rng = random.Random(args.seed)
    broker = OwnBroker(workdir / "kafka")
    topic = f"chaos-broker-kill-{uuid.uuid4().hex[:8]}"
    broker.start()
    try:
        procs, homes = [], []
        per = max(1, args.broker_sessions // args.producers)
        for i in range(args.producers):
            home = workdir / f"producer{i}" / "home"
            home.mkdir(parents=True)
            homes.append(home)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "agentledger", "simulate", "--sessions", str(per), "--seed",
                 str(args.seed * 1000 + i), "--format", "json"], env=_env(home, broker.bootstrap, topic), cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        kills = 0
        for _ in range(args.broker_kills):
            time.sleep(rng.uniform(args.broker_up_min_s, args.broker_up_min_s * 2))
            kills += broker.kill()
            time.sleep(rng.uniform(1.0, args.broker_down_s))
            broker.start()
        produced, errors = 0, []
        for p in procs:
            out, err = p.communicate(timeout=7200)
            if p.returncode != 0:
                errors.append(err[-800:])
                continue
            produced += json.loads(out.strip().splitlines()[-1])["events"]
        drained = remaining = 0
        for home in homes:
            d = _cli(_env(home, broker.bootstrap, topic), "spool", "drain", "--format", "json", "--timeout", "600")
            if d.returncode == 0:
                r = json.loads(d.stdout.strip().splitlines()[-1])
                drained += r.get("drained", 0)
                remaining += r.get("remaining", 0)
            else:
                errors.append(d.stderr[-800:])
        wh_home = workdir / "warehouse" / "home"
        wh_home.mkdir(parents=True)
        ing = _cli(_env(wh_home, broker.bootstrap, topic), "ingest", "--format", "json")
        if ing.returncode != 0:
            errors.append(ing.stderr[-800:])
        import duckdb

        con = duckdb.connect(str(wh_home / "warehouse.duckdb"), read_only=True)
        rows, distinct, sessions = con.execute(
            "SELECT count(*), count(DISTINCT event_id), count(DISTINCT session_id) FROM events").fetchone()
        out_of_order = con.execute("SELECT count(*) FROM chain_status WHERE status <> 'ok'").fetchone()[0]
        transport_dups = con.execute("SELECT count(*) FROM dead_letters WHERE reason = 'duplicate'").fetchone()[0]
        other_dead = con.execute("SELECT count(*) FROM dead_letters WHERE reason <> 'duplicate' AND resolved_at IS NULL"
                                 ).fetchone()[0]
        con.close()
    finally:
        broker.stop()
    lost = max(0, produced - distinct)
    duplicated = rows - distinct
    return {"producers": args.producers, "sessions": sessions, "produced": produced, "stored": rows, "lost": lost,
            "duplicated": duplicated, "sessions_out_of_order": out_of_order, "broker_kills": kills,
            "spool_drained": drained, "spool_remaining": remaining, "transport_duplicates_resolved": transport_dups,
            "other_dead_letters": other_dead, "errors": errors[:3],
            "undetected": lost + duplicated + out_of_order + len(errors), "tracebacks": sum("Traceback" in e for e in errors)}
