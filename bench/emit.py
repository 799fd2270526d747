"""Emit benchmark: our full emit path vs raw kafka-python sends of the same bytes, same broker, same run.

    python bench/emit.py --bootstrap 127.0.0.1:9092 --events 200000

Workload: the calls a simulated agent fleet makes (captured once from the simulator, so the timed
part measures the recorder, not the simulator's random choices): commands, file events, approvals,
network events, with secrets in some of them.

- ours: `Recorder` (envelope, UUIDv7 ids, per-session seq and hash chain, secret redaction, signed
  checkpoints every 1000 events, Avro encoding, SHA-256 seal) -> `open_producer_sink` (Kafka,
  acks=all, idempotence, spooling on failure), then flush until every event is acknowledged. The
  headline runs the Kafka client in a child process (``kafka_process=True``, what bulk producers
  use); ``ours_in_process`` is the same path with the client in the producing process (hooks).
- baseline: `bench/rawkafka.raw_send`: plain kafka-python `send()` of the very same
  pre-encoded values and keys, same producer settings, then flush.

Each side runs twice, alternating, on fresh topics; the best run of each counts. The last line is
JSON: {"ours": ev/s, "baseline": msg/s, "ratio": ours/baseline, ...}. Target: ratio >= 0.75.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentledger.producers.recorder import Recorder, SessionRecorder  # noqa: E402
from agentledger.producers.redact import Redactor  # noqa: E402
from agentledger.producers.simulate import simulate  # noqa: E402
from agentledger.producers.sinks import open_producer_sink  # noqa: E402
from agentledger.schemas import envvars, signing  # noqa: E402
from agentledger.schemas.config import from_env  # noqa: E402
from agentledger.schemas.transport.base import MemorySink  # noqa: E402
from agentledger.schemas.transport.kafka import ensure_topic  # noqa: E402
from rawkafka import raw_send  # noqa: E402


class _NullSink(MemorySink):
    @property
    def keys(self) -> list[bytes]:
        return [k for _, k, _ in self.sent]


def capture_workload(events: int, seed: int) -> list[tuple[int, str, dict, dict]]:
    """(session number, kind, payload, step) of every event the simulator records, in order."""
    calls: list[tuple[int, str, dict, dict]] = []
    numbers: dict[str, int] = {}
    original = SessionRecorder.emit

    def capture(self, kind, payload, **step):
        n = numbers.setdefault(self.session_id, len(numbers))
        calls.append((n, kind, payload, dict(step)))
        return original(self, kind, payload, **step)

    SessionRecorder.emit = capture
    try:
        sink = _NullSink()
        s = 0
        while len(calls) < events:
            simulate(lambda clock, rng: Recorder(sink, clock=clock, rng=rng), max(1, (events - len(calls)) // 30 + 1),
                     seed + s, attack_rate=0.1)
            s += 1
    finally:
        SessionRecorder.emit = original
    return calls[:events]


def run_ours(settings, calls, signer, kafka_process: bool) -> tuple[float, int]:
    sink = open_producer_sink(settings, kafka_process=kafka_process, connect_timeout_ms=30_000)
    rec = Recorder(sink, topic=settings.topic, transforms=[Redactor(b"bench-key")], signer=signer, checkpoint_every=1000)
    if not sink.wait_direct(60):
        raise SystemExit(f"our sink did not connect to Kafka: {sink.last_error}")
    sessions: dict[int, SessionRecorder] = {}
    ids = [str(uuid.UUID(int=(0x0190 << 112) | (i + 1))) for i in range(len({c[0] for c in calls}))]
    t0 = time.perf_counter()
    for n, kind, payload, step in calls:
        s = sessions.get(n)
        if s is None:
            s = sessions[n] = SessionRecorder(rec, ids[n])
        s.emit(kind, payload, **step)
    rec.flush()
    elapsed = time.perf_counter() - t0
    stats = dict(sink.stats)
    sink.close()
    if stats["spooled"]:
        print(f"warning: {stats['spooled']} events went through the spool during the run", file=sys.stderr)
    return elapsed, rec.events_sent


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=envvars.raw("AGENTLEDGER_BOOTSTRAP_SERVERS") or "127.0.0.1:9092")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure our path with the Kafka client in the producing process (hooks use that)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="agentledger-bench-emit-"))

    t = time.perf_counter()
    calls = capture_workload(args.events, args.seed)
    print(f"captured {len(calls)} emit calls in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    signer = signing.generate()

    # The exact bytes our path sends (same ids, same chain), for the baseline.
    null = _NullSink()
    rec = Recorder(null, transforms=[Redactor(b"bench-key")], signer=signer, checkpoint_every=1000)
    sessions: dict[int, SessionRecorder] = {}
    ids = [str(uuid.UUID(int=(0x0190 << 112) | (i + 1))) for i in range(len({c[0] for c in calls}))]
    for n, kind, payload, step in calls:
        s = sessions.get(n) or sessions.setdefault(n, SessionRecorder(rec, ids[n]))
        s.emit(kind, payload, **step)
    values, keys = null.values, null.keys
    size = sum(map(len, values)) / len(values)
    print(f"{len(values)} messages, mean {size:.0f} bytes", file=sys.stderr)

    ours_best = base_best = inproc_best = 0.0
    for r in range(args.rounds):
        topic = f"bench.emit.raw.{uuid.uuid4().hex[:8]}"
        ensure_topic(args.bootstrap, topic, 6)
        secs = raw_send(args.bootstrap, topic, values, keys)
        base = len(values) / secs
        base_best = max(base_best, base)
        print(f"round {r}: raw kafka-python send {base:,.0f} msg/s", file=sys.stderr)

        topic = f"bench.emit.ours.{uuid.uuid4().hex[:8]}"
        ensure_topic(args.bootstrap, topic, 6)
        settings = from_env({"AGENTLEDGER_HOME": str(work / f"home{r}"), "AGENTLEDGER_BOOTSTRAP_SERVERS": args.bootstrap,
                             "AGENTLEDGER_TOPIC": topic})
        secs, sent = run_ours(settings, calls, signer, kafka_process=True)
        ours = sent / secs
        ours_best = max(ours_best, ours)
        print(f"round {r}: agentledger emit {ours:,.0f} events/s ({sent} events)", file=sys.stderr)

        if args.in_process:
            topic = f"bench.emit.inproc.{uuid.uuid4().hex[:8]}"
            ensure_topic(args.bootstrap, topic, 6)
            settings = settings.with_(topic=topic, home=work / f"home-inproc{r}")
            secs, sent = run_ours(settings, calls, signer, kafka_process=False)
            inproc_best = max(inproc_best, sent / secs)
            print(f"round {r}: agentledger emit, Kafka client in-process {sent / secs:,.0f} events/s", file=sys.stderr)

    result = {"ours": round(ours_best), "baseline": round(base_best), "ratio": round(ours_best / base_best, 3),
              "events": len(values), "mean_bytes": round(size), "rounds": args.rounds}
    if args.in_process:
        result["ours_in_process"] = round(inproc_best)
        result["ratio_in_process"] = round(inproc_best / base_best, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
