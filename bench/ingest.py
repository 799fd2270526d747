"""Ingest benchmark: our exactly-once ingest vs raw kafka-python poll, on the same topic, same run.

    python bench/ingest.py --bootstrap 127.0.0.1:9092 --events 500000

Produces N simulated events to a fresh topic, then measures (1) a raw kafka-python poll of the
whole topic (values touched, nothing decoded or stored) and (2) `agentledger ingest` into a fresh
DuckDB warehouse. The last line is JSON: {"raw_poll": ev/s, "ingest": ev/s, "ratio": ingest/raw_poll, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.ingest import Ingestor  # noqa: E402
from producers.recorder import Recorder  # noqa: E402
from producers.simulate import simulate  # noqa: E402
from schemas.config import from_env  # noqa: E402
from schemas.transport import open_sink, open_source  # noqa: E402
from schemas.transport.kafka import raw_poll  # noqa: E402
from schemas.warehouse import open_warehouse  # noqa: E402


def produce(settings, events: int, seed: int) -> int:
    """Simulate whole sessions until at least ``events`` events are sent."""
    sink = open_sink(settings)
    sent = 0
    batch_seed = seed
    try:
        while sent < events:
            sessions = max(1, (events - sent) // 26 + 1)
            res = simulate(lambda clock, rng: Recorder(sink, topic=settings.topic, clock=clock, rng=rng),
                           sessions, batch_seed)
            sent += res.events
            batch_seed += 1
    finally:
        sink.close()
    return sent


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=os.environ.get("AGENTLEDGER_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=50_000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="agentledger-bench-"))
    topic = f"bench.ingest.{uuid.uuid4().hex[:8]}"
    s = from_env({"AGENTLEDGER_HOME": str(work), "AGENTLEDGER_BOOTSTRAP_SERVERS": args.bootstrap,
                  "AGENTLEDGER_TOPIC": topic})
    t0 = time.perf_counter()
    n = produce(s, args.events, args.seed)
    produce_s = time.perf_counter() - t0
    print(f"produced {n} events to {topic} in {produce_s:.1f}s", file=sys.stderr)

    got, raw_s = raw_poll(args.bootstrap, topic, n)
    assert got == n, f"raw poll saw {got} of {n}"
    print(f"raw kafka-python poll: {n / raw_s:,.0f} msg/s", file=sys.stderr)

    with open_warehouse(str(work / "warehouse.duckdb")) as wh:
        src = open_source(s)
        t0 = time.perf_counter()
        stats = Ingestor(wh, src, topic, batch_records=args.batch).run()
        ingest_s = time.perf_counter() - t0
        src.close()
        stored = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
    assert stats.accepted == stored == n, (stats.as_dict(), stored, n)
    print(f"agentledger ingest: {n / ingest_s:,.0f} events/s", file=sys.stderr)
    result = {"events": n, "raw_poll": round(n / raw_s), "ingest": round(n / ingest_s),
              "ratio": round((n / ingest_s) / (n / raw_s), 3), "produce": round(n / produce_s)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
