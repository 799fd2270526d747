"""A full disk under the embedded log (issue 20, item 5): nothing acknowledged is lost, nothing half
written stays behind, and everything works again once space is back.

Real full disks: a size-limited tmpfs mounted under the test's tmp dir (`small_disk`, unmounted
after the test; mounting needs root, which these tests have here) and filled with a filler file.
Short writes and errors at one exact write (a block, an index entry, a segment header) are
injected by wrapping ``os.write`` for files under the test's directory only (`FaultyWrites`, the
chaos scenario's fault layer, bench/chaos_disk.py), in-process."""

from __future__ import annotations

import random
from pathlib import Path

import duckdb
import pytest

from conftest import cli_env, run_cli
from agentledger.consumers.ingest import Ingestor
from agentledger.producers.recorder import Recorder
from bench.chaos_disk import FaultyWrites, SmallDisk, TrackingSink, run as chaos_disk_run
from agentledger.schemas.errors import NotDurableError
from agentledger.schemas.transport.local import AppendFailed, LocalLog, LocalSink, LocalSource
from agentledger.schemas.warehouse import open_warehouse
from test_envelope import record_session
from test_hook import hook, start_server, stop_server
from test_local_log_damage import read_all

TOPIC = "t"


@pytest.fixture
def small_disk():
    """mount(path, size) -> a size-limited tmpfs at path (unmounted after the test)."""
    mounted: list[SmallDisk] = []

    def mount(path: Path, size: str) -> SmallDisk:
        try:
            mounted.append(SmallDisk(path, size))
        except PermissionError as exc:
            pytest.fail(f"{exc} (these tests need root)", pytrace=False)
        return mounted[-1]

    yield mount
    for disk in reversed(mounted):
        disk.unmount()


def _sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.suffix in (".avro", ".idx")}


def test_short_writes_are_completed_not_indexed_half_written(tmp_path):
    log = LocalLog(tmp_path / "log", default_partitions=1)
    vals = record_session(n_commands=6, seed=1)[1]
    with FaultyWrites(tmp_path, max_chunk=7) as faults:
        log.append(TOPIC, 0, vals[:5])
        log.append(TOPIC, 0, vals[5:])
    assert faults.calls > 100, "the writes were really cut short"
    msgs = read_all(LocalLog(tmp_path / "log"), 0)
    assert [m.value for m in msgs] == vals and not any(m.damaged for m in msgs)


@pytest.mark.parametrize("where", ["block", "index", "header"])
def test_a_failed_write_leaves_nothing_behind_and_the_partition_appendable(tmp_path, where):
    log = LocalLog(tmp_path / "log", default_partitions=1)
    vals = record_session(n_commands=6, seed=2)[1]
    log.append(TOPIC, 0, vals[:4])
    pdir = log.segment_path(TOPIC, 0, 0).parent
    before = _sizes(pdir)
    when = {"block": lambda p: p.endswith(".avro"), "index": lambda p: p.endswith(".idx"),
            "header": lambda p: p.endswith(".avro")}[where]
    if where == "header":
        log.segment_bytes = 1  # the next append starts a new segment: its header write fails
    # a short write first, then ENOSPC: the call that used to leave half a block indexed
    with FaultyWrites(tmp_path, max_chunk=50, fail_at=2, when=when):
        with pytest.raises(AppendFailed) as failed:
            log.append(TOPIC, 0, vals[4:8])
    kept = failed.value.durable
    assert failed.value.undelivered == vals[4 + kept:8]
    if where == "index":
        # 50 bytes of the index write made 3 whole entries: a reader may have seen them, so they are
        # kept (fsync-ed, acknowledged as durable); the torn 4th entry and its block are cut
        assert kept == 3
    else:
        assert kept == 0
        assert _sizes(pdir) == before, "no byte of the failed append is left (no header, block or index entry)"
    log2 = LocalLog(tmp_path / "log")
    assert [m.value for m in read_all(log2, 0)] == vals[:4 + kept]
    # space is back: the same partition takes events, and the failed ones never show up
    assert log2.append(TOPIC, 0, vals[8:]) == 4 + kept
    assert [m.value for m in read_all(log2, 0)] == vals[:4 + kept] + vals[8:]
    assert not list(pdir.glob("*.quarantine-*")), "an undone append needs no repair"


def test_a_flush_that_fails_on_one_partition_hands_back_only_that_partitions_events(tmp_path):
    """undelivered must be exactly what is not durable: the recorder rolls those seqs back and uses
    them again, so a durable event reported undelivered would make two events with one seq."""
    log = LocalLog(tmp_path / "log", default_partitions=4)
    sink = LocalSink(log)
    sessions = [record_session(n_commands=2, seed=10 + i) for i in range(8)]
    for sid, vals in sessions:
        for v in vals:
            sink.send(TOPIC, sid.encode(), v)
    victim = log.partition_for(TOPIC, sessions[0][0].encode())
    with FaultyWrites(tmp_path, fail_at=1, when=lambda p: f"/{TOPIC}/{victim}/" in p):
        with pytest.raises(NotDurableError) as failed:
            sink.flush()
    lost = [m.value for m in failed.value.undelivered]
    expect = [v for sid, vals in sessions for v in vals if log.partition_for(TOPIC, sid.encode()) == victim]
    assert lost == expect
    durable = [m.value for p in range(4) for m in read_all(LocalLog(tmp_path / "log"), p)]
    assert sorted(durable) == sorted(v for _, vals in sessions for v in vals if v not in set(expect))


# -- real full disks --------------------------------------------------------------------------------


def _through_a_full_disk(rec, disk, n_sessions, rounds, full: tuple[int, int], step) -> int:
    """Record ``rounds`` rounds of ``step(session, r)`` for each session, flushing after each round;
    the disk is full from round full[0] until round full[1]. A session starting while it is full
    needs a new segment (its header cannot be written). Returns the flushes that failed."""
    sessions = [rec.session(agent="codex", cwd="/w", sandbox_mode="workspace_write") for _ in range(n_sessions)]
    failed = 0
    for r in range(rounds):
        if r == full[0]:
            disk.fill()
            sessions.append(rec.session(agent="codex", cwd="/w"))
        if r == full[1]:
            disk.free()
        for s in sessions:
            step(s, r)
        failed += not rec.flush()
    for s in sessions:
        s.end()
    assert rec.flush(), "once space is back, everything is durable again"
    return failed


def _ingest_local(log_dir: Path, wh_path: Path):
    wh = open_warehouse(str(wh_path))
    src = LocalSource(LocalLog(log_dir))
    try:
        stats = Ingestor(wh, src, TOPIC).run()
    finally:
        src.close()
    return wh, stats


def test_a_recorder_writing_through_a_full_disk_loses_no_acknowledged_event(tmp_path, small_disk):
    disk = small_disk(tmp_path / "disk", "192k")
    log = LocalLog(disk.path / "log", default_partitions=3)
    sink = TrackingSink(LocalSink(log))
    t = [1_700_000_000_000_000]

    def clock():
        t[0] += 1000
        return t[0]

    rec = Recorder(sink, topic=TOPIC, clock=clock, rng=random.Random(7), mode="spool")

    def step(s, r):
        c = s.command_started(["make", f"step-{r}"], "/w")
        s.command_finished(c, exit_code=0, duration_ms=5, stdout="x" * random.Random(r).randrange(10, 3000))

    failed_flushes = _through_a_full_disk(rec, disk, 5, 14, (3, 9), step)
    assert failed_flushes >= 3 and sink.refused, "the disk was really full for a while"
    wh, stats = _ingest_local(disk.path / "log", tmp_path / "w.duckdb")
    with wh:
        got = [r[0] for r in wh.con.execute("SELECT hash FROM events").fetchall()]
        acked = [v[-64:].decode() for v in sink.acked]
        assert len(got) == len(set(got)) and sorted(got) == sorted(acked), "every acknowledged event exactly once"
        assert stats.dead_letters == 0, stats.reasons
        # what could not be written is a `dropped` gap in its session's chain, never a hole or a fork
        assert wh.con.execute("SELECT count(*) FROM events WHERE kind = 'gap'").fetchone()[0] >= 1
        assert {r[0] for r in wh.con.execute("SELECT status FROM chain_status").fetchall()} == {"ok"}


PRE = {"hook_event_name": "PreToolUse", "cwd": "/w", "tool_name": "Bash", "tool_input": {"command": "make"}}


def _calls(env, session, ids, mode, size=10):
    """PreToolUse hook calls (commands of about ``size`` bytes: big ones need new pages on the disk);
    returns {tool_use_id: (exit code, denied?, 'not recorded' said?)}."""
    out = {}
    for i in ids:
        call = {**PRE, "session_id": session, "tool_use_id": i, "tool_input": {"command": "make " + "x" * size}}
        proc = hook({**env, "AGENTLEDGER_RECORDING_MODE": mode}, call, "--budget", "2")
        denied = b'"deny"' in proc.stdout
        out[i] = (proc.returncode, denied, b"not recorded durably" in proc.stderr)
    return out


@pytest.mark.parametrize("server", [False, True], ids=["in-process", "server"])
def test_simulate_hooks_and_ingest_work_again_once_the_disk_has_space(tmp_path, small_disk, server):
    """The reported run: the embedded log on a tiny filesystem. While it is full, a spool-mode hook
    never blocks the agent (exit 1, a non-blocking error, only when the event is not durable) and a
    fail-closed hook denies what it cannot record; once space is back, simulate, every hook call (both
    modes) and ingest of every partition work, and each event acknowledged is in the warehouse once."""
    home = tmp_path / "home"
    disk = small_disk(home / "log", "384k")
    env = cli_env(home, AGENTLEDGER_PARTITIONS="4", AGENTLEDGER_HOOK_DAEMON="1" if server else "0",
                  AGENTLEDGER_HOOK_DAEMON_IDLE="60")
    run_cli("simulate", "--sessions", "1", "--seed", "1", env=env)  # partitions left empty: new segments later
    if server:  # the warm hook server: one long-lived process keeps its log open across the full disk
        start_server(env, home)
    try:
        _hooks_through_a_full_disk(env, home, disk)
    finally:
        if server:
            stop_server(env, home)


def _hooks_through_a_full_disk(env, home, disk):
    ok_before = _calls(env, "s-spool", ["a1", "a2"], "spool")
    assert all(r == (0, False, False) for r in ok_before.values()), ok_before
    disk.fill()
    assert disk.free_bytes() == 0
    run_cli("simulate", "--sessions", "4", "--seed", "2", env=env, check=False)  # loses what it cannot write
    spool_full = _calls(env, "s-spool", ["b1", "b2"], "spool", 9000) | _calls(env, "s-spool", ["b3"], "spool")
    closed_full = _calls(env, "s-closed", ["c1", "c2"], "fail_closed", 9000) | _calls(env, "s-closed", ["c3"], "fail_closed")
    # spool mode never denies; whatever it could not make durable, it says so (exit 1)
    assert not any(d for _, d, _ in spool_full.values()), spool_full
    assert all((rc == 0) != said for rc, _, said in spool_full.values()), spool_full
    # fail-closed denies every action it could not record
    assert all(d == said for _, d, said in closed_full.values()), closed_full
    assert any(r[2] for r in spool_full.values()) and any(r[1] for r in closed_full.values()), \
        "with the disk full, big events cannot be written: the calls must say so (spool) or deny (fail-closed)"
    disk.free()
    run_cli("simulate", "--sessions", "2", "--seed", "3", env=env)
    after = {**_calls(env, "s-spool", ["d1", "d2"], "spool"), **_calls(env, "s-closed", ["e1", "e2"], "fail_closed"),
             **_calls(env, "s-new", ["f1"], "fail_closed")}
    assert all(r == (0, False, False) for r in after.values()), after
    out = run_cli("ingest", env=env, check=False)
    assert out.returncode == 0, out.stderr
    log = LocalLog(home / "log")
    topic = log.topics()[0]
    ends = {p: log.end_offset(topic, p) for p in range(log.partition_count(topic))}
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    assert dict(con.execute('SELECT "partition", next_offset FROM ingest_offsets').fetchall()) == \
        {p: e for p, e in ends.items() if e}, "every partition was ingested to its end"
    reasons = dict(con.execute("SELECT reason, count(*) FROM dead_letters GROUP BY 1").fetchall())
    assert set(reasons) <= {"duplicate"}, reasons  # an outbox re-send of an event that had arrived
    counts = dict(con.execute("SELECT tool_call_id, count(*) FROM events WHERE kind = 'command_started' "
                              "AND session_id IN ('s-spool', 's-closed', 's-new') GROUP BY 1").fetchall())
    acked = [i for calls in (ok_before, spool_full, closed_full, after) for i, r in calls.items() if r[0] == 0
             and not r[1]]
    assert all(counts.get(i) == 1 for i in acked), (acked, counts)
    assert all(n == 1 for n in counts.values()), counts
    # what the outbox kept while the disk was full went out first on the next call of its session
    kept = [i for calls in (spool_full, closed_full) for i, r in calls.items() if r[2]]
    assert all(counts.get(i) == 1 for i in kept), (kept, counts)
    status = dict(con.execute("SELECT status, count(*) FROM chain_status GROUP BY 1").fetchall())
    assert "broken" not in status, status


@pytest.mark.kafka
def test_kafka_down_and_the_spool_disk_full_then_every_acknowledged_event_reaches_the_warehouse_once(
        tmp_path, small_disk, bootstrap, topic):
    """The spool is the same log: with Kafka unreachable and the spool's disk full, the producer's
    acknowledgements stay true; once space is back the spool takes events again, drains to Kafka,
    and ingest finds each acknowledged event exactly once."""
    from agentledger.producers.sinks import open_producer_sink
    from agentledger.producers.spool import Spool, drain
    from agentledger.schemas.config import from_env
    from agentledger.schemas.transport import open_source
    from agentledger.schemas.transport.kafka import KafkaSink
    from conftest import free_port

    disk = small_disk(tmp_path / "spooldisk", "192k")
    down = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home"), "AGENTLEDGER_TOPIC": topic,
                     "AGENTLEDGER_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    inner = open_producer_sink(down, spool_dir=disk.path / "spool", max_block_ms=100, connect_timeout_ms=300)
    sink = TrackingSink(inner)
    rec = Recorder(sink, topic=topic, rng=random.Random(3), mode="spool")

    def step(s, r):
        s.file_accessed(f"/w/{r}.txt", "write")
        s.command_started(["echo", "y" * random.Random(r).randrange(10, 4000)], "/w")

    failed = _through_a_full_disk(rec, disk, 4, 12, (2, 7), step)
    inner.close(timeout=0.2)
    assert failed >= 2 and sink.refused, "the spool's disk was really full"
    spool = Spool(disk.path / "spool")
    out = drain(spool, lambda: KafkaSink(bootstrap), timeout_s=60)
    assert out["remaining"] == 0 and out["drained"] == len(sink.acked)
    up = down.with_(bootstrap_servers=bootstrap)
    wh = open_warehouse(str(tmp_path / "w.duckdb"))
    src = open_source(up)
    try:
        stats = Ingestor(wh, src, topic).run()
    finally:
        src.close()
    with wh:
        got = [r[0] for r in wh.con.execute("SELECT hash FROM events").fetchall()]
        assert sorted(got) == sorted(v[-64:].decode() for v in sink.acked) and len(got) == len(set(got))
        assert stats.dead_letters == 0, stats.reasons
        assert {r[0] for r in wh.con.execute("SELECT status FROM chain_status").fetchall()} == {"ok"}


def test_the_disk_full_chaos_scenario_loses_nothing_acknowledged(tmp_path):
    """A short run of bench/chaos_disk.py (the chaos runner's `disk_full` scenario)."""
    out = chaos_disk_run(seed=4, size=5, workdir=tmp_path)
    assert out["runs"] == 5 and out["events_acknowledged"] > 100 and out["flushes_failed"] > 0
    must_be_0 = ("acknowledged_lost", "acknowledged_duplicated", "unacknowledged_in_log", "partitions_unusable",
                 "sessions_broken", "undetected", "tracebacks")
    assert {k: out[k] for k in must_be_0} == dict.fromkeys(must_be_0, 0), out
