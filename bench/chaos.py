"""Chaos runner: scenarios that attack or break agentledger and count what it failed to notice.

    python bench/chaos.py                                   # all: bad_input, broker_kill, consumer_kill,
                                                            # disk_full, readonly_sql, secrets, tampering
    python bench/chaos.py --scenario tampering --mutations 1000 --seed 1

What each guarantees and its last figures: docs/reliability.md. Each scenario is a module in
bench/chaos_scenarios/ that registers itself with `scenario` (a name and a function
``run(args, workdir) -> dict`` of figures). The last line printed is JSON: {"scenario": name, **figures} per scenario run, or a list
when several ran. Figures a scenario must keep at 0 are named ``undetected`` and ``tracebacks``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # chaos_scenarios (after the repo: bench/replay.py must not shadow replay/)

from agentledger.schemas import envvars  # noqa: E402
from chaos_scenarios import SCENARIOS  # noqa: E402 -- the registry


def load_scenarios() -> None:
    import chaos_scenarios

    for m in pkgutil.iter_modules(chaos_scenarios.__path__):
        importlib.import_module(f"chaos_scenarios.{m.name}")


def main(argv=None) -> list[dict]:
    load_scenarios()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="scenario to run (repeatable; default: all)")
    ap.add_argument("--mutations", type=int, default=1000, help="tampering: mutations to try")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=6, help="tampering: sessions to record")
    ap.add_argument("--cli-runs", type=int, default=4, help="tampering: mutations also checked with the real CLI")
    ap.add_argument("--disk-runs", type=int, default=20, help="disk_full: runs, each with its own fault")
    ap.add_argument("--hostile", type=int, default=10_000, help="bad_input: hostile messages per transport")
    ap.add_argument("--bootstrap", default=envvars.raw("AGENTLEDGER_TEST_BOOTSTRAP"),
                    help="a Kafka broker for the Kafka half of bad_input and secrets (default "
                         "$AGENTLEDGER_TEST_BOOTSTRAP; unset: local log only)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before a CLI run counts as a hang")
    ap.add_argument("--sql-cli-every", type=int, default=1,
                    help="readonly_sql: run every Nth statement also through the CLI (1: all)")
    ap.add_argument("--sql-sample", type=int, default=1, help="readonly_sql: try every Nth statement (1: all)")
    ap.add_argument("--sql-warehouses", default="file,lake", help="readonly_sql: warehouse kinds (file, lake)")
    ap.add_argument("--secret-samples", type=int, default=0, help="secrets: corpus samples to use (0: all)")
    ap.add_argument("--hook-samples", type=int, default=40, help="secrets: samples also sent through the hook")
    ap.add_argument("--sim-sessions", type=int, default=20, help="secrets: simulated sessions (their own secrets)")
    ap.add_argument("--sandbox-samples", type=int, default=0, help="secrets: samples also run in the sandbox (0: all)")
    ap.add_argument("--sandbox-batch", type=int, default=10, help="secrets: samples per `sandbox run`")
    ap.add_argument("--replays", type=int, default=3, help="secrets: sessions replayed to HTML")
    ap.add_argument("--kafka-hook-samples", type=int, default=40, help="secrets: samples through the hook to Kafka")
    ap.add_argument("--kafka-sandbox-samples", type=int, default=40,
                    help="secrets: samples run in the sandbox recording to Kafka (0: all)")
    ap.add_argument("--kafka-sim-sessions", type=int, default=20, help="secrets: simulated sessions recorded to Kafka")
    ap.add_argument("--kills", type=int, default=20, help="consumer_kill: SIGKILLs of ingest --follow per warehouse")
    ap.add_argument("--kill-sessions", type=int, default=60, help="consumer_kill: simulated sessions (half more mid-way)")
    ap.add_argument("--kill-batch", type=int, default=50, help="consumer_kill: ingest --batch (small: many commits)")
    ap.add_argument("--kill-min-s", type=float, default=0.0,
                    help="consumer_kill: earliest random kill after a run's first commit (s)")
    ap.add_argument("--kill-max-s", type=float, default=2.0,
                    help="consumer_kill: latest random kill after a run's first commit (s)")
    ap.add_argument("--kill-wait-s", type=float, default=30.0,
                    help="consumer_kill: longest wait for a run's commit before killing it anyway (s)")
    ap.add_argument("--kill-warehouses", default="file,lake", help="consumer_kill: warehouse kinds (file, lake)")
    ap.add_argument("--broker-sessions", type=int, default=3300, help="broker_kill: simulated sessions (all producers)")
    ap.add_argument("--producers", type=int, default=4, help="broker_kill: concurrent `agentledger simulate` processes")
    ap.add_argument("--broker-kills", type=int, default=2, help="broker_kill: SIGKILL + restart of the broker")
    ap.add_argument("--broker-up-min-s", type=float, default=8.0, help="broker_kill: least time up between kills (s)")
    ap.add_argument("--broker-down-s", type=float, default=6.0, help="broker_kill: longest time down (s)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="agentledger-chaos-"))
    out = []
    for name in args.scenario or sorted(SCENARIOS):
        t0 = time.perf_counter()
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        figures = SCENARIOS[name](args, d)
        out.append({"scenario": name, **figures, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(out[-1]), file=sys.stderr)
    print(json.dumps(out[0] if len(out) == 1 else out))
    return out


if __name__ == "__main__":
    main()
