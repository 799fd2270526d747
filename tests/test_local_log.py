"""The embedded transport: a crash-safe append-only log of standard Avro container files."""

from __future__ import annotations

import multiprocessing as mp

import duckdb

from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import hash_ok
from agentledger.schemas.transport.local import IDX_ENTRY, LocalLog, LocalSink, LocalSource
from agentledger.schemas.warehouse import load_extension
from test_envelope import record_session


def values(n_sessions=3, seed=0):
    out = []
    for i in range(n_sessions):
        out.extend(record_session(n_commands=4, seed=seed * 1000 + i)[1])
    return out


def test_append_and_read_back_with_offsets(tmp_path):
    log = LocalLog(tmp_path, default_partitions=2)
    vals = values()
    assert log.append("t", 0, vals[:10]) == 0
    assert log.append("t", 0, vals[10:]) == 10
    assert log.end_offset("t", 0) == len(vals)
    got = log.read("t", 0, 0, 1000)
    assert [m.value for m in got] == vals
    assert [m.offset for m in got] == list(range(len(vals)))
    assert [m.value for m in log.read("t", 0, 7, 3)] == vals[7:10]
    assert log.read("t", 0, len(vals), 10) == []


def test_segments_are_standard_ocf_that_duckdb_reads(tmp_path):
    log = LocalLog(tmp_path, default_partitions=1, segment_bytes=4096)
    vals = values(4)
    for v in vals:
        log.append("t", 0, [v])
    segs = log.segments("t", 0)
    assert len(segs) > 1, "small segment_bytes must roll segments"
    got = LocalSource(log)
    got.assign("t", {})
    msgs = got.poll(10_000, 0.1)
    assert [m.value for m in msgs] == vals
    con = duckdb.connect()
    load_extension(con, "avro")
    files = [str(log.segment_path("t", 0, b)) for b in segs]
    n = con.execute(f"SELECT count(*) FROM read_avro({files!r})").fetchone()[0]
    assert n == len(vals)


def test_torn_tail_is_cut_and_unindexed_blocks_are_recovered(tmp_path):
    log = LocalLog(tmp_path, default_partitions=1)
    vals = values(2)
    log.append("t", 0, vals[:5])
    seg = log.segment_path("t", 0, 0)
    idx = seg.with_suffix(".idx")
    # crash after the segment write, before the index write: the block is complete but unindexed
    good_size = seg.stat().st_size
    log.append("t", 0, vals[5:6])
    with open(idx, "r+b") as f:
        f.truncate(5 * IDX_ENTRY.size + 3)  # a torn index entry too
    # and a torn block at the very end
    with open(seg, "ab") as f:
        f.write(b"\x02\xff\x01garbage")
    assert log.end_offset("t", 0) == 5  # readers trust only whole index entries
    log.append("t", 0, vals[6:8])
    assert [m.value for m in log.read("t", 0, 0, 100)] == vals[:8]
    assert seg.stat().st_size > good_size


def _append_worker(root, worker, n):
    log = LocalLog(root, default_partitions=1)
    vals = values(1, seed=worker)
    for i in range(n):
        log.append("t", 0, [vals[i % len(vals)]])


def test_concurrent_appenders_never_interleave_bytes(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_worker, args=(tmp_path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    log = LocalLog(tmp_path)
    msgs = log.read("t", 0, 0, 10_000)
    assert len(msgs) == 160
    assert all(hash_ok(m.value) for m in msgs)


def test_sink_partitions_by_session_and_keeps_order(tmp_path):
    log = LocalLog(tmp_path, default_partitions=4)
    sink = LocalSink(log)
    sessions = [record_session(n_commands=3, seed=s) for s in range(8)]
    for sid, vals in sessions:
        for v in vals:
            sink.send("t", sid.encode(), v)
    sink.flush()
    src = LocalSource(log)
    src.assign("t", {})
    msgs = src.poll(10_000, 0.1)
    store = load_store()
    by_session = {}
    for m in msgs:
        rec = store.decode(m.value)
        by_session.setdefault(rec["session_id"], set()).add(m.partition)
        assert m.partition == log.partition_for("t", rec["session_id"].encode())
    assert all(len(p) == 1 for p in by_session.values())
    for sid, vals in sessions:
        got = [m.value for m in msgs if store.decode(m.value)["session_id"] == sid]
        assert got == vals
