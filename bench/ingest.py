"""Ingest benchmark: our exactly-once ingest vs raw kafka-python poll, on the same topic, same run.

    python bench/ingest.py --bootstrap 127.0.0.1:9092 --events 500000

Produces N simulated events to a fresh topic, then measures (1) a raw kafka-python poll of the
whole topic (values touched, nothing decoded or stored), (2) `agentledger ingest` into a fresh
DuckDB warehouse (committed, exactly once), (3) the embedded-log ingest of the same events, and
(4) the Kafka ingest again into a warehouse that already holds --base-rows events (20M by default),
right after the same ingest into an empty warehouse again (``ingest_again``; ``at_20m_vs_ingest_again``
compares the two, measured seconds apart rather than a quarter of an hour).

Rounds: on these shared two cores one measurement of a few seconds drifts by 20-30 % (the first
read of a topic also pays for the broker's and the page cache's warm-up), so the compared rates are
measured in --rounds rounds (5 by default) after one warm-up poll that is not counted, each round
the baseline and then ours, back to back: (1) then (2); (2) into an empty warehouse then (4) into a
fresh copy of the base. A rate is the median of its rounds, a ratio the median of the rounds'
ratios, and every round is in the JSON (``rounds``). Each ingest's CPU seconds per 100,000 events
(its process and the decoder processes it ran; ``cpu_s_per_100k``, every round in
``cpu_s_per_100k_rounds``) is its own cost, which the load of other jobs does not move:
``at_20m_cpu_vs_ingest_again`` compares it at 20M rows and at 0.

The rates count the ingest up to its last commit: every event durable (the WAL synced). DuckDB then
still owes the CHECKPOINT that writes those rows into compressed row groups (when the WAL passes
512 MB while ingesting, or on close), which a sustained ingest pays and a run of a few hundred
thousand events defers past its end. ``with_checkpoint`` holds the same rates and ratios counting a
CHECKPOINT run right after each ingest (its memory is in the peaks).

The base rows are built fast inside DuckDB: the ingested rows are copied with INSERT ... SELECT,
each copy with rewritten ids (event_id, session_id get a per-copy prefix) and timestamps moved
back by whole days, so the event_ids stay UUIDv7-ordered *older* than the new events (as in real
life: the warehouse holds the past) and chain_heads gets one row per copied session.

(2) and (3) also run once without the native decoder (``*_without_native``, the Python path), the
decoder's baseline from the same run. The raw poll also runs once with kafka-python's default fetch
sizes and with larger ones (``raw_poll_fetch``), to decide KafkaSource's settings from numbers.

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
import statistics
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
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each compared pair (the median is reported)")
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

    rounds = max(1, args.rounds)
    got, warm_s = raw_poll(args.bootstrap, topic, n)  # warm-up: the broker's first read of the topic
    assert got == n, f"raw poll saw {got} of {n}"
    print(f"warm-up raw poll (not counted): {n / warm_s:,.0f} msg/s", file=sys.stderr)

    peaks: dict[str, dict[str, int]] = {}
    kafka_rounds = []
    for r in range(rounds):
        got, raw_s = raw_poll(args.bootstrap, topic, n)
        assert got == n, f"raw poll saw {got} of {n}"
        # the first round's warehouse is kept: the base is built from it
        url = str(work / ("warehouse.duckdb" if r == 0 else f"warehouse-{r}.duckdb"))
        rate = _phase(peaks, "ingest", _kafka_ingest, s, topic, url, n, args.batch)
        if r:
            _remove_db(url)
        kafka_rounds.append({"raw_poll": round(n / raw_s), "ingest": round(rate), "ratio": round(rate / (n / raw_s), 3)})
        print(f"round {r + 1}: raw kafka-python poll {n / raw_s:,.0f} msg/s, agentledger ingest {rate:,.0f} "
              f"events/s (ratio {rate / (n / raw_s):.3f})", file=sys.stderr)
    raw_rate = _median(x["raw_poll"] for x in kafka_rounds)
    ingest_rate = _median(x["ingest"] for x in kafka_rounds)
    ratio = _median(x["ratio"] for x in kafka_rounds)
    # fetch sizes (docs/warehouse.md): kafka-python's defaults, and larger than ours
    fetch = {}
    for name, cfg in FETCH_VARIANTS.items():
        got, secs = raw_poll(args.bootstrap, topic, n, **cfg)
        assert got == n, f"raw poll ({name}) saw {got} of {n}"
        fetch[name] = round(n / secs)
        print(f"raw poll, {name} fetch sizes: {n / secs:,.0f} msg/s", file=sys.stderr)
    # the same ingest on the Python path: the baseline of the decoder
    ingest_py = _phase(peaks, "ingest_without_native", _kafka_ingest, s, topic, str(work / "warehouse-python.duckdb"),
                       n, args.batch, native_off=True)
    _remove_db(str(work / "warehouse-python.duckdb"))
    print(f"agentledger ingest without the native decoder: {ingest_py:,.0f} events/s", file=sys.stderr)

    embedded = embedded_py = None
    embedded_rounds: list[int] = []
    if not args.skip_embedded:
        local = from_env({"AGENTLEDGER_HOME": str(work / "embedded"), "AGENTLEDGER_TOPIC": topic})
        _copy_to_local(args.bootstrap, topic, local, n)
        for r in range(rounds):
            url = str(work / f"embedded-{r}.duckdb")
            embedded_rounds.append(round(_phase(peaks, "embedded", _embedded_ingest, local, topic, url, n, args.batch)))
            _remove_db(url)
            print(f"round {r + 1}: embedded-log ingest {embedded_rounds[-1]:,} events/s", file=sys.stderr)
        embedded = _median(embedded_rounds)
        embedded_py = _phase(peaks, "embedded_without_native", _embedded_ingest, local, topic,
                             str(work / "embedded-python.duckdb"), n, args.batch, native_off=True)
        _remove_db(str(work / "embedded-python.duckdb"))
        print(f"embedded-log ingest without the native decoder: {embedded_py:,.0f} events/s", file=sys.stderr)

    big = str(work / "big.duckdb")
    t0 = time.perf_counter()
    base = _phase(peaks, "base_build", _build_base, str(work / "warehouse.duckdb"), big, args.base_rows)
    _fsync(big)
    print(f"built a warehouse of {base:,} rows in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    # each round: the rate at 0, then the rate at 20M right after it (on shared cores the load drifts
    # over the minutes the base takes to build), into a fresh copy of the base
    big_rounds = []
    for r in range(rounds):
        url = str(work / "warehouse-again.duckdb")
        again = _phase(peaks, "ingest_again", _kafka_ingest, s, topic, url, n, args.batch)
        _remove_db(url)
        copy = str(work / "big-round.duckdb")
        shutil.copy(big, copy)
        _fsync(copy)  # the copy's gigabytes of dirty pages written back now, not during the measured ingest
        at = _phase(peaks, "ingest_at_20m", _kafka_ingest, s, topic, copy, n, args.batch, base=base)
        _remove_db(copy)
        big_rounds.append({"ingest_again": round(again), "ingest_at_20m": round(at), "ratio": round(at / again, 3)})
        print(f"round {r + 1}: ingest into an empty warehouse {again:,.0f} events/s, into {base:,} rows "
              f"{at:,.0f} events/s ({at / again:.3f})", file=sys.stderr)
    ingest_phases = [p for p in peaks if p != "base_build"]
    print(f"peak RSS per phase (MB): {peaks}", file=sys.stderr)

    at_base = _median(x["ingest_at_20m"] for x in big_rounds)
    result = {"events": n, "raw_poll": raw_rate, "ingest": ingest_rate, "ratio": ratio,
              "embedded": embedded,
              "ingest_at_20m": at_base, "base_rows": base,
              "at_20m_vs_ingest": round(at_base / ingest_rate, 3),
              "ingest_again": _median(x["ingest_again"] for x in big_rounds),
              "at_20m_vs_ingest_again": _median(x["ratio"] for x in big_rounds),
              "produce": round(n / produce_s),
              "decoder": "native" if native.decoder() is not None else "python",
              "ingest_without_native": round(ingest_py), "ratio_without_native": round(ingest_py / raw_rate, 3),
              "embedded_without_native": round(embedded_py) if embedded_py else None,
              "raw_poll_fetch": fetch, "warm_up_raw_poll": round(n / warm_s),
              "rounds": {"kafka": kafka_rounds, "embedded": embedded_rounds, "at_20m": big_rounds},
              "with_checkpoint": _with_checkpoint(kafka_rounds),
              "cpu_s_per_100k": {k: _median(v) for k, v in CPU_BY_PHASE.items()},
              "cpu_s_per_100k_rounds": CPU_BY_PHASE,
              "at_20m_cpu_vs_ingest_again": round(_median(CPU_BY_PHASE["ingest_at_20m"])
                                                  / _median(CPU_BY_PHASE["ingest_again"]), 3),
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


def _with_checkpoint(kafka_rounds: list[dict]) -> dict:
    """The rates counting the CHECKPOINT after each ingest (`WITH_CHECKPOINT_BY_PHASE`), medians of
    the rounds, and the Kafka ratio against each round's raw poll."""
    w = WITH_CHECKPOINT_BY_PHASE
    out = {k: _median(v) for k, v in w.items()}
    out["ratio"] = _median(round(r / k["raw_poll"], 3) for r, k in zip(w["ingest"], kafka_rounds))
    if "ingest_at_20m" in w and "ingest_again" in w:
        out["at_20m_vs_ingest_again"] = _median(round(a / b, 3) for a, b in zip(w["ingest_at_20m"], w["ingest_again"]))
    out["rounds"] = w
    return out


def _median(values) -> float:
    return statistics.median(list(values))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_db(url: str) -> None:
    """A phase's warehouse file (and its WAL), once measured: rounds of 20M-row copies add up."""
    for p in (url, url + ".wal"):
        if os.path.exists(p):
            os.remove(p)


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
_CPU_S: list[float] = []
_WITH_CHECKPOINT: list[float] = []
# per phase, each round's rate counting the CHECKPOINT that follows the ingest: DuckDB writes the
# committed rows (held in the WAL) into compressed row groups when the WAL passes checkpoint_threshold
# (512 MB while ingesting) or on close -- work a sustained ingest pays, which a run of a few hundred
# thousand events defers past its end
WITH_CHECKPOINT_BY_PHASE: dict[str, list[float]] = {}
# per phase, each round's CPU seconds per 100,000 events (the ingest process and the decoder
# processes it ran): the ingest's own cost, which the load of other jobs on shared cores does not change
CPU_BY_PHASE: dict[str, list[float]] = {}


def _mark_peak() -> None:
    """The phase's peak so far is the one reported: what the bench checks afterwards is not ingest."""
    _PEAK_MB.append(_rss_mb(resource.RUSAGE_SELF))


def _cpu_s() -> float:
    """CPU seconds of this process and of the child processes it has waited for (the decoder's)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _in_child(fn, args, kwargs, native_off: bool):
    if native_off:
        os.environ[native.ENV] = "off"
    with _ChildPeak() as children:
        result = fn(*args, **kwargs)
    # this process's peak, and that of the largest process it ran (the decoder's)
    return (result, (_PEAK_MB or [_rss_mb(resource.RUSAGE_SELF)])[0], round(children.peak_kb / 1024),
            _CPU_S[0] if _CPU_S else None, _WITH_CHECKPOINT[0] if _WITH_CHECKPOINT else None)


def _phase(peaks: dict, name: str, fn, *args, native_off: bool = False, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh child process (spawned: nothing inherited but the
    arguments), so that its peak memory is its own; ``peaks[name]`` gets it (``self``) and the
    largest process it ran (``children``: the decoder, sampled), in MB; a phase run in several
    rounds keeps its largest."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result, rss_self, rss_children, cpu, with_checkpoint = pool.apply(_in_child, (fn, args, kwargs, native_off))
    if cpu is not None:
        CPU_BY_PHASE.setdefault(name, []).append(round(cpu, 3))
    if with_checkpoint is not None:
        WITH_CHECKPOINT_BY_PHASE.setdefault(name, []).append(round(with_checkpoint))
    old = peaks.get(name, {"self": 0, "children": 0})
    peaks[name] = {"self": max(old["self"], rss_self), "children": max(old["children"], rss_children)}
    return result


def _measured_run(wh, run, n: int):
    """Times ``run()``, an ingest that makes its Ingestor inside (its set-up is timed, as before).
    Returns its stats and wall seconds; records for `_in_child` its CPU per 100,000 events (with the
    decoder processes it ran), its rate counting the CHECKPOINT that writes what it committed (on
    the ingest's settings), and the peak memory so far."""
    t0, c0 = time.perf_counter(), _cpu_s()
    stats = run()
    secs = time.perf_counter() - t0
    _CPU_S.append((_cpu_s() - c0) / n * 100_000)
    wh.con.execute("CHECKPOINT")
    _WITH_CHECKPOINT.append(n / (time.perf_counter() - t0))
    _mark_peak()
    return stats, secs


def _embedded_ingest(local, topic, url, n, batch) -> float:
    with open_warehouse(url) as wh:
        src = open_source(local)
        st, secs = _measured_run(wh, lambda: Ingestor(wh, src, topic, batch_records=batch).run(), n)
        rate = n / secs
        src.close()
        assert st.accepted == n, st.as_dict()
    return rate


def _kafka_ingest(s, topic, url, n, batch, base=0) -> float:
    with open_warehouse(url) as wh:
        wh.con.execute("DELETE FROM ingest_offsets WHERE topic = ?", [topic])
        src = open_source(s)
        stats, secs = _measured_run(wh, lambda: Ingestor(wh, src, topic, batch_records=batch).run(), n)
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
