"""Ingest benchmark: our exactly-once ingest vs raw kafka-python poll, on the same topic, same run.

    python bench/ingest.py --bootstrap 127.0.0.1:9092 --events 500000

Produces N simulated events to a fresh topic, then measures (1) a raw kafka-python poll of the
whole topic (values touched, nothing decoded or stored), (2) `agentledger ingest` into a fresh
DuckDB warehouse (committed, exactly once), (3) the embedded-log ingest of the same events, and
(4) the Kafka ingest again into a warehouse that already holds --base-rows events (20M by default),
right after the same ingest into an empty warehouse again (``ingest_again``; ``at_20m_vs_ingest_again``
compares the two, measured minutes apart rather than a quarter of an hour).

The base rows are built fast inside DuckDB: the ingested rows are copied with INSERT ... SELECT,
each copy with rewritten ids (event_id, session_id get a per-copy prefix) and timestamps moved
back by whole days, so the event_ids stay UUIDv7-ordered *older* than the new events (as in real
life: the warehouse holds the past) and chain_heads gets one row per copied session.

(2) and (3) run twice: with the native decoder (agentledger-avro2arrow, when installed) and without
it (``*_without_native``, the Python path), the baseline from the same run. The raw poll also runs
with kafka-python's default fetch sizes and with larger ones (``raw_poll_fetch``), to decide
KafkaSource's settings from numbers.

Peak memory: each ingest and the base building run in a child process of their own, so that each
phase's peak is its own: ``peak_ingest_rss_mb`` (the largest ingest process, the committing one),
``peak_decoder_rss_mb`` (the largest decoder process, sampled from /proc),
``peak_base_build_rss_mb`` (building the base warehouse, not ingest), per phase in
``peak_rss_by_phase_mb``; ``peak_rss_mb`` is the largest of all. The temporary work directory is removed at the end unless --workdir was given.

The last line is JSON: {"raw_poll", "ingest", "ratio", "embedded", "ingest_at_20m", ...} in events/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentledger.consumers.ingest import Ingestor  # noqa: E402
from agentledger.producers.recorder import Recorder  # noqa: E402
from agentledger.producers.simulate import simulate  # noqa: E402
from agentledger.schemas import envvars, native  # noqa: E402
from agentledger.schemas.config import from_env  # noqa: E402
from agentledger.schemas.sql import ident  # noqa: E402
from agentledger.schemas.transport import open_sink, open_source  # noqa: E402
from rawkafka import raw_poll  # noqa: E402
from agentledger.schemas.warehouse import event_table_names, open_warehouse, transaction  # noqa: E402


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
    ap.add_argument("--bootstrap", default=envvars.raw("AGENTLEDGER_BOOTSTRAP_SERVERS") or "127.0.0.1:9092")
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--base-rows", type=int, default=20_000_000, help="rows already in the warehouse for ingest_at_20m")
    ap.add_argument("--skip-embedded", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="agentledger-bench-"))
    try:
        return _run(args, work)
    finally:
        if args.workdir is None:  # a 20M-row warehouse is gigabytes: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path) -> dict:
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
    # fetch sizes (docs/warehouse.md): kafka-python's defaults, and larger than ours
    fetch = {}
    for name, cfg in FETCH_VARIANTS.items():
        got, secs = raw_poll(args.bootstrap, topic, n, **cfg)
        assert got == n, f"raw poll ({name}) saw {got} of {n}"
        fetch[name] = round(n / secs)
        print(f"raw poll, {name} fetch sizes: {n / secs:,.0f} msg/s", file=sys.stderr)

    peaks: dict[str, dict[str, int]] = {}
    ingest_rate = _phase(peaks, "ingest", _kafka_ingest, s, topic, str(work / "warehouse.duckdb"), n, args.batch)
    print(f"agentledger ingest: {ingest_rate:,.0f} events/s", file=sys.stderr)
    # the same ingest on the Python path: the baseline of the decoder
    ingest_py = _phase(peaks, "ingest_without_native", _kafka_ingest, s, topic, str(work / "warehouse-python.duckdb"),
                       n, args.batch, native_off=True)
    print(f"agentledger ingest without the native decoder: {ingest_py:,.0f} events/s", file=sys.stderr)

    embedded = embedded_py = None
    if not args.skip_embedded:
        local = from_env({"AGENTLEDGER_HOME": str(work / "embedded"), "AGENTLEDGER_TOPIC": topic})
        _copy_to_local(args.bootstrap, topic, local, n)
        embedded = _phase(peaks, "embedded", _embedded_ingest, local, topic, str(work / "embedded.duckdb"), n, args.batch)
        print(f"embedded-log ingest: {embedded:,.0f} events/s", file=sys.stderr)
        embedded_py = _phase(peaks, "embedded_without_native", _embedded_ingest, local, topic,
                             str(work / "embedded-python.duckdb"), n, args.batch, native_off=True)
        print(f"embedded-log ingest without the native decoder: {embedded_py:,.0f} events/s", file=sys.stderr)

    big = str(work / "big.duckdb")
    t0 = time.perf_counter()
    base = _phase(peaks, "base_build", _build_base, str(work / "warehouse.duckdb"), big, args.base_rows)
    print(f"built a warehouse of {base:,} rows in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    # the rate at 0 again, next to the rate at 20M: on shared cores the load drifts over the
    # minutes the base takes to build, and the first rate was measured before it
    ingest_again = _phase(peaks, "ingest_again", _kafka_ingest, s, topic, str(work / "warehouse-again.duckdb"), n,
                          args.batch)
    print(f"agentledger ingest again, just before the big warehouse: {ingest_again:,.0f} events/s", file=sys.stderr)
    at_base = _phase(peaks, "ingest_at_20m", _kafka_ingest, s, topic, big, n, args.batch, base=base)
    print(f"ingest into {base:,} rows: {at_base:,.0f} events/s", file=sys.stderr)
    ingest_phases = [p for p in peaks if p != "base_build"]
    print(f"peak RSS per phase (MB): {peaks}", file=sys.stderr)

    result = {"events": n, "raw_poll": round(n / raw_s), "ingest": round(ingest_rate),
              "ratio": round(ingest_rate / (n / raw_s), 3),
              "embedded": round(embedded) if embedded else None,
              "ingest_at_20m": round(at_base), "base_rows": base,
              "at_20m_vs_ingest": round(at_base / ingest_rate, 3),
              "ingest_again": round(ingest_again), "at_20m_vs_ingest_again": round(at_base / ingest_again, 3),
              "produce": round(n / produce_s),
              "decoder": "native" if native.decoder() is not None else "python",
              "ingest_without_native": round(ingest_py), "ratio_without_native": round(ingest_py / (n / raw_s), 3),
              "embedded_without_native": round(embedded_py) if embedded_py else None,
              "raw_poll_fetch": fetch,
              "peak_rss_mb": max(_rss_mb(resource.RUSAGE_SELF), *(v["self"] for v in peaks.values())),
              "peak_decoder_rss_mb": max(peaks[p]["children"] for p in ingest_phases),
              "peak_ingest_rss_mb": max(peaks[p]["self"] for p in ingest_phases),
              "peak_base_build_rss_mb": peaks["base_build"]["self"],
              "peak_rss_by_phase_mb": peaks}
    print(json.dumps(result))
    return result


# raw_poll's consumer settings besides ours (CONSUMER_DEFAULTS): kafka-python's own defaults, and larger fetches
FETCH_VARIANTS = {
    "kafka_python_defaults": {"fetch_max_bytes": 50 * 1024 * 1024, "max_partition_fetch_bytes": 1024 * 1024,
                              "max_poll_records": 500},
    "larger": {"fetch_max_bytes": 128 * 1024 * 1024, "max_partition_fetch_bytes": 64 * 1024 * 1024},
}


def _rss_mb(who: int) -> int:
    return round(resource.getrusage(who).ru_maxrss / 1024)


class _ChildPeak:
    """The largest VmHWM (peak resident set) of this process's child processes (the decoder),
    sampled from /proc while ``fn`` runs. Not RUSAGE_CHILDREN: on Linux a child's ru_maxrss starts
    at its parent's resident set when it forks, so it reports the parent's size, not the decoder's."""

    def __init__(self, every_s: float = 0.05):
        self.peak_kb = 0
        self._stop = threading.Event()
        self._every = every_s
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "_ChildPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(self._every):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
                    self.peak_kb = max(self.peak_kb, int(fields["VmHWM"].split()[0]))


_PEAK_MB: list[int] = []


def _mark_peak() -> None:
    """The phase's peak so far is the one reported: what the bench checks afterwards is not ingest."""
    _PEAK_MB.append(_rss_mb(resource.RUSAGE_SELF))


def _in_child(fn, args, kwargs, native_off: bool):
    if native_off:
        os.environ[native.ENV] = "off"
    with _ChildPeak() as children:
        result = fn(*args, **kwargs)
    # this process's peak, and that of the largest process it ran (the decoder's)
    return result, (_PEAK_MB or [_rss_mb(resource.RUSAGE_SELF)])[0], round(children.peak_kb / 1024)


def _phase(peaks: dict, name: str, fn, *args, native_off: bool = False, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh child process (spawned: nothing inherited but the
    arguments), so that its peak memory is its own; ``peaks[name]`` gets it (``self``) and the
    largest process it ran (``children``: the decoder, sampled), in MB."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result, rss_self, rss_children = pool.apply(_in_child, (fn, args, kwargs, native_off))
    peaks[name] = {"self": rss_self, "children": rss_children}
    return result


def _embedded_ingest(local, topic, url, n, batch) -> float:
    with open_warehouse(url) as wh:
        src = open_source(local)
        t0 = time.perf_counter()
        st = Ingestor(wh, src, topic, batch_records=batch).run()
        rate = n / (time.perf_counter() - t0)
        _mark_peak()
        src.close()
        assert st.accepted == n, st.as_dict()
    return rate


def _kafka_ingest(s, topic, url, n, batch, base=0) -> float:
    with open_warehouse(url) as wh:
        wh.con.execute("DELETE FROM ingest_offsets WHERE topic = ?", [topic])
        src = open_source(s)
        t0 = time.perf_counter()
        stats = Ingestor(wh, src, topic, batch_records=batch).run()
        secs = time.perf_counter() - t0
        _mark_peak()
        src.close()
        # (counting the events view of a 20M-row warehouse costs ~400 MB more than the ingest did)
        stored = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
    assert stats.accepted == n and stored == n + base, (stats.as_dict(), stored, n, base)
    return n / secs


def _copy_to_local(bootstrap, topic, local, n) -> None:
    """The same events in the embedded log (same partitions), for the embedded-log rate."""
    from agentledger.schemas.transport import kafka_source
    from agentledger.schemas.transport.local import LocalLog

    src = kafka_source(bootstrap)
    src.assign(topic, {})
    log = LocalLog(local.log_dir)
    log.ensure_topic(topic, len(src.partitions(topic)))
    got = 0
    while got < n:
        msgs = src.poll(50_000, 1.0)
        by_p: dict[int, list[bytes]] = {}
        for m in msgs:
            by_p.setdefault(m.partition, []).append(m.value)
        for p, vals in by_p.items():
            log.append(topic, p, vals)
        got += len(msgs)
    src.close()


def _build_base(seed_db: str, url: str, rows: int) -> int:
    """A warehouse of about ``rows`` events (copies of the ingested ones with rewritten ids), no offsets."""
    import shutil

    shutil.copy(seed_db, url)
    with open_warehouse(url) as wh:
        con = wh.con
        # a checkpoint every 16 MB of WAL (the default) rewrote the last row group each time: the
        # build took ~3x longer
        con.execute("SET checkpoint_threshold = '1GB'")
        con.execute("DELETE FROM ingest_offsets")
        n0 = con.execute("SELECT count(*) FROM events").fetchone()[0]
        copies = max(1, rows // max(1, n0))
        for t in event_table_names(wh.store):  # each kind's table (``events`` is a view over them)
            con.execute(f"CREATE TEMP TABLE seed AS SELECT * FROM {t}")
            con.execute(f"DELETE FROM {t}")
            cols = [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                              "WHERE table_name = ? ORDER BY ordinal_position", [t]).fetchall()]
            for k in range(copies, 0, -1):  # oldest first, so the table is in time order
                sel = []
                for c in cols:
                    if c == "event_id":
                        sel.append(f"printf('%08x', epoch_ms(occurred_at - INTERVAL {k * 30} DAY) // 65536) || "
                                   f"substr(event_id, 9, 5) || '{k:04x}' || substr(event_id, 18) AS event_id")
                    elif c == "session_id":
                        sel.append(f"'{k:06x}' || substr(session_id, 7) AS session_id")
                    elif c == "occurred_at":
                        sel.append(f"occurred_at - INTERVAL {k * 30} DAY AS occurred_at")
                    else:
                        sel.append(ident(c))
                with transaction(con):
                    con.execute(f"INSERT INTO {t} SELECT {', '.join(sel)} FROM seed")
            con.execute("DROP TABLE seed")
        con.execute("DELETE FROM chain_heads")
        con.execute("""INSERT INTO chain_heads SELECT session_id, max(seq), arg_max(hash, seq), count(*),
                       min(occurred_at), max(occurred_at), true, now()::TIMESTAMP FROM events GROUP BY 1""")
        con.execute("CHECKPOINT")
        return con.execute("SELECT count(*) FROM events").fetchone()[0]


if __name__ == "__main__":
    main()
