"""The embedded log under damage: repair on open, and damaged records quarantined while ingest goes on.

Issue 20, item 6: one damaged block (a segment cut mid-record, a block count of -2^63, a wrong sync
marker, a broken segment header) used to stop the ingest of EVERY partition (exit 1, nothing
ingested, no dead letter); and item 5: a 0-byte segment left by a full disk, or an index pointing
past what was written, made the partition unusable for good. Each damage here is real bytes on
disk; the warehouse is a real DuckDB file."""

from __future__ import annotations

import json
import os
import stat

import duckdb
import pytest

from conftest import cli_env, run_cli
from agentledger.consumers.ingest import Ingestor
from agentledger.schemas.codec import zigzag_varint
from agentledger.schemas.transport.local import IDX_ENTRY, LocalLog, LocalSink, LocalSource
from agentledger.schemas.warehouse import open_warehouse
from test_envelope import record_session

TOPIC = "t"


def _fill(log: LocalLog, n_sessions=9, seed=0) -> dict[int, list[bytes]]:
    """Sessions spread over the log's partitions; returns each partition's values in offset order."""
    sink = LocalSink(log)
    for i in range(n_sessions):
        sid, vals = record_session(n_commands=3, seed=seed * 100 + i)
        for v in vals:
            sink.send(TOPIC, sid.encode(), v)
    sink.flush()
    return {p: [m.value for m in read_all(log, p)] for p in range(log.partition_count(TOPIC))}


def read_all(log, p, topic=TOPIC) -> list:
    """Every message of a partition, across its segments."""
    out, off = [], 0
    while True:
        msgs = log.read(topic, p, off, 10_000)
        if not msgs:
            return out
        out += msgs
        off = msgs[-1].offset + 1


def _positions(log, p, base=0) -> list[int]:
    raw = log.segment_path(TOPIC, p, base).with_suffix(".idx").read_bytes()
    return [IDX_ENTRY.unpack_from(raw, i)[0] for i in range(0, len(raw), IDX_ENTRY.size)]


def _ingest(log, wh_path):
    wh = open_warehouse(str(wh_path))
    src = LocalSource(LocalLog(log.root))  # a fresh process's view (no cached segment headers)
    try:
        stats = Ingestor(wh, src, TOPIC).run()
    finally:
        src.close()
    return wh, stats


def _damage(log, p, kind) -> dict[int, tuple[bytes, str]]:
    """Damage partition p's segment; returns {offset: (raw bytes expected in its dead letter, reason word)}."""
    seg = log.segment_path(TOPIC, p, 0)
    pos = _positions(log, p)
    k = 2  # a record in the middle: the ones before and after it must survive
    data = bytearray(seg.read_bytes())
    if kind == "cut_mid_record":
        cut = pos[k] + 7
        seg.write_bytes(bytes(data[:cut]))
        return {k: (bytes(data[pos[k]:cut]), "truncated"),
                **{j: (b"", "truncated") for j in range(k + 1, len(pos))}}
    if kind == "count_min_int64":
        bad = zigzag_varint(-(2 ** 63))
        assert len(bad) == 10
        data[pos[k]:pos[k] + 10] = bad
    elif kind == "bad_sync":
        data[pos[k + 1] - 3] ^= 0xFF
    elif kind == "broken_header":
        data[6:40] = b"\x00" * 34  # inside the metadata map: no schema any more
        seg.write_bytes(bytes(data))
        ends = pos[1:] + [len(data)]
        return {j: (bytes(data[s:e]), "bad_segment_header") for j, (s, e) in enumerate(zip(pos, ends))}
    seg.write_bytes(bytes(data))
    return {k: (bytes(data[pos[k]:pos[k + 1]]), kind.split("_")[0] if kind == "bad_sync" else "bad_block")}


@pytest.mark.parametrize("kind", ["cut_mid_record", "count_min_int64", "bad_sync", "broken_header"])
def test_a_damaged_record_is_a_dead_letter_with_its_bytes_and_the_rest_is_ingested(tmp_path, kind):
    log = LocalLog(tmp_path / "log", default_partitions=3, fsync=False)
    by_p = _fill(log)
    victim = max(by_p, key=lambda p: len(by_p[p]))
    expected = _damage(log, victim, kind)
    wh, stats = _ingest(log, tmp_path / "w.duckdb")
    with wh:
        total = sum(len(v) for v in by_p.values())
        letters = wh.con.execute("""SELECT "partition", "offset", raw, reason, detail FROM dead_letters
                                    WHERE reason = 'log_damaged' ORDER BY "offset" """).fetchall()
        assert [(r[0], r[1]) for r in letters] == [(victim, o) for o in sorted(expected)], letters
        for _, off, raw, _, detail in letters:
            want_raw, word = expected[off]
            assert bytes(raw) == want_raw, (off, detail)
            assert detail.startswith(word), detail
        # every other record of the partition and every record of the other partitions is an event
        good = {v for p, vals in by_p.items() for o, v in enumerate(vals) if not (p == victim and o in expected)}
        assert len(good) == total - len(expected)
        stored = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
        parked = wh.con.execute("SELECT count(*) FROM dead_letters WHERE reason = 'seq_gap'").fetchone()[0]
        assert stored + parked == len(good) and stored >= total - len(by_p[victim])
        # offsets advanced past the damage, on every partition
        offs = dict(wh.con.execute('SELECT "partition", next_offset FROM ingest_offsets').fetchall())
        assert offs == {p: len(v) for p, v in by_p.items()}
        # the damaged session's later events are parked behind the hole (seq_gap), not lost
        assert set(stats.reasons) <= {"log_damaged", "seq_gap"}
    # the partition stays appendable, and what is appended after the damage is ingested
    sid, more = record_session(n_commands=2, seed=999)
    log.append(TOPIC, victim, more)
    assert [m.value for m in log.read(TOPIC, victim, len(by_p[victim]), 100)] == more
    wh, stats = _ingest(log, tmp_path / "w.duckdb")
    with wh:
        assert stats.accepted == len(more)
        assert wh.con.execute("SELECT count(*) FROM events WHERE session_id = ?", [sid]).fetchone()[0] == len(more)


def _simulated(tmp_path, sessions: int, seed: int):
    """`agentledger simulate` into a fresh home: (env, home, log, topic, end offset per partition)."""
    home = tmp_path / "home"
    env = cli_env(home)
    run_cli("simulate", "--sessions", str(sessions), "--seed", str(seed), env=env)
    log = LocalLog(home / "log")
    topic = log.topics()[0]
    return env, home, log, topic, {p: log.end_offset(topic, p) for p in range(log.partition_count(topic))}


def _overwrite_record(log, topic, p, k, data: bytes) -> None:
    """Overwrite the first bytes of record k of partition p's first segment, in place."""
    seg = log.segment_path(topic, p, 0)
    pos = IDX_ENTRY.unpack_from(seg.with_suffix(".idx").read_bytes(), k * IDX_ENTRY.size)[0]
    with open(seg, "r+b") as f:
        f.seek(pos)
        f.write(data)


def test_the_ingest_command_exits_0_with_a_damaged_partition_and_ingests_all_others(tmp_path):
    env, home, log, topic, ends = _simulated(tmp_path, 6, 5)
    victim = max(ends, key=ends.get)
    _overwrite_record(log, topic, victim, 3, zigzag_varint(-(2 ** 63)))  # the reported attack
    out = run_cli("ingest", env=env, check=False)
    assert out.returncode == 0, out.stderr
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    offs = dict(con.execute('SELECT "partition", next_offset FROM ingest_offsets').fetchall())
    assert offs == {p: e for p, e in ends.items() if e}
    assert con.execute("SELECT \"partition\", \"offset\", reason FROM dead_letters WHERE reason = 'log_damaged'"
                       ).fetchall() == [(victim, 3, "log_damaged")]
    n = con.execute("SELECT count(*) FROM events").fetchone()[0]
    parked = con.execute("SELECT count(*) FROM dead_letters WHERE reason = 'seq_gap'").fetchone()[0]
    assert n + parked + 1 == sum(ends.values())


def test_a_log_that_went_backwards_is_refused_not_skipped_and_can_be_read_again_on_purpose(tmp_path):
    """Found by an audit: after the embedded log was deleted (or restored from an older copy), new
    records started at offset 0 again, below the stored offsets, and ingest skipped them without a
    word (exit 0, verify ok): whole sessions never reached the warehouse."""
    import shutil

    env, home, log, topic, ends = _simulated(tmp_path, 6, 5)
    run_cli("ingest", env=env)
    shutil.rmtree(home / "log")
    run_cli("simulate", "--sessions", "2", "--seed", "9", "--benign-only", env=env)
    new = LocalLog(home / "log")
    now = {p: new.end_offset(topic, p) for p in range(new.partition_count(topic))}
    assert any(now[p] < e for p, e in ends.items() if e)  # the case: records sit below the stored offsets
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    before = con.execute("SELECT count(*) FROM events").fetchone()[0]
    con.close()
    out = run_cli("ingest", env=env, check=False)
    assert out.returncode == 1 and "the log went backwards" in out.stderr and "--log-replaced" in out.stderr
    assert "Traceback" not in out.stderr
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == before  # nothing ingested, nothing lost
    con.close()
    out = json.loads(run_cli("ingest", "--log-replaced", "--format", "json", env=env).stdout)
    assert out["events"] == sum(now.values()) and out["dead_letters"] == 0
    out = json.loads(run_cli("ingest", "--format", "json", env=env).stdout)  # and from then on as usual
    assert out["messages"] == 0
    assert run_cli("verify", env=env, check=False).returncode == 0


# -- repair on open --------------------------------------------------------------------------------


def _quarantined(directory) -> list[tuple[bytes, dict]]:
    out = []
    for q in sorted(directory.glob("*.quarantine-*")):
        if q.suffix == ".json":
            continue
        meta = json.loads(q.with_name(q.name + ".json").read_text())
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
        out.append((q.read_bytes(), meta))
    return out


@pytest.mark.parametrize("left", ["empty", "partial_header"])
def test_a_segment_whose_creation_never_finished_is_repaired_and_stops_nothing(tmp_path, left):
    """What ENOSPC (or a crash) during segment creation left: a 0-byte segment, or half a header."""
    log = LocalLog(tmp_path / "log", default_partitions=2, fsync=False)
    by_p = _fill(log, n_sessions=4)
    p = 0
    end = len(by_p[p])
    header = log.segment_path(TOPIC, p, 0).read_bytes()[:300]
    broken = log.segment_path(TOPIC, p, end)
    broken.write_bytes(b"" if left == "empty" else header[:100])
    # readers are not disturbed: every partition reads and ingests completely
    wh, stats = _ingest(log, tmp_path / "w.duckdb")
    with wh:
        assert stats.accepted == sum(len(v) for v in by_p.values()) and stats.dead_letters == 0
    # the next appender repairs it: the partition takes events again, at the same offsets
    sid, more = record_session(n_commands=1, seed=77)
    assert log.append(TOPIC, p, more) == end
    assert [m.value for m in read_all(log, p)] == by_p[p] + more
    kept = _quarantined(broken.parent)
    if left == "empty":
        assert kept == []  # nothing to keep
    else:
        assert len(kept) == 1 and kept[0][0] == header[:100]
        assert "header" in kept[0][1]["reason"] and kept[0][1]["source"] == broken.name


def test_a_torn_tail_is_cut_into_a_quarantine_file_never_dropped(tmp_path):
    log = LocalLog(tmp_path / "log", default_partitions=1, fsync=False)
    vals = record_session(n_commands=3, seed=3)[1]
    log.append(TOPIC, 0, vals[:4])
    seg = log.segment_path(TOPIC, 0, 0)
    good = seg.stat().st_size
    torn = b"\x02\xff\x01half a record"
    with open(seg, "ab") as f:
        f.write(torn)
    with open(seg.with_suffix(".idx"), "ab") as f:
        f.write(b"\x01\x02\x03")  # a torn index entry too
    log.append(TOPIC, 0, vals[4:])
    assert [m.value for m in read_all(log, 0)] == vals
    kept = {m["source"]: (b, m) for b, m in _quarantined(seg.parent)}
    assert kept[seg.name][0] == torn and kept[seg.name][1]["first_byte"] == good
    assert kept[seg.with_suffix(".idx").name][0] == b"\x01\x02\x03"
    assert "torn" in kept[seg.name][1]["reason"]


def test_an_index_that_points_past_the_written_bytes_does_not_stop_the_partition(tmp_path):
    """What an unchecked short os.write left on main: index entries for blocks never fully written."""
    log = LocalLog(tmp_path / "log", default_partitions=1, fsync=False)
    vals = record_session(n_commands=4, seed=4)[1]
    log.append(TOPIC, 0, vals[:6])
    seg = log.segment_path(TOPIC, 0, 0)
    pos = _positions(log, 0)
    with open(seg, "r+b") as f:
        f.truncate(pos[4] + 10)  # records 4 and 5 are indexed but only partly there
    log.append(TOPIC, 0, vals[6:])
    msgs = read_all(log, 0)
    assert [m.offset for m in msgs] == list(range(len(vals)))
    assert [m.damaged is not None for m in msgs] == [False] * 4 + [True, True] + [False] * (len(vals) - 6)
    assert [m.value for m in msgs[6:]] == vals[6:]
    assert log.segments(TOPIC, 0) == [0, 6]  # the damaged segment is left as it is; appends go on after it


def test_offsets_whose_segment_is_gone_are_dead_letters_not_a_stop(tmp_path):
    log = LocalLog(tmp_path / "log", default_partitions=1, fsync=False, segment_bytes=1)
    vals = record_session(n_commands=2, seed=5)[1]
    for v in vals:
        log.append(TOPIC, 0, [v])
    assert len(log.segments(TOPIC, 0)) == len(vals)
    os.unlink(log.segment_path(TOPIC, 0, 2))
    os.unlink(log.segment_path(TOPIC, 0, 2).with_suffix(".idx"))
    wh, stats = _ingest(log, tmp_path / "w.duckdb")
    with wh:
        assert wh.con.execute("""SELECT "offset", detail LIKE 'offsets_missing%' FROM dead_letters
                                 WHERE reason = 'log_damaged'""").fetchall() == [(2, True)]
        assert stats.accepted == 2 and stats.reasons.get("seq_gap") == len(vals) - 3
        assert wh.con.execute("SELECT next_offset FROM ingest_offsets").fetchone()[0] == len(vals)


def test_deadletters_retry_keeps_a_damaged_record_a_log_damaged_letter(tmp_path):
    env, home, log, topic, ends = _simulated(tmp_path, 2, 6)
    p = next(p for p, e in ends.items() if e)
    _overwrite_record(log, topic, p, 1, b"\x05")  # block count 5 -> -3 (zigzag), not a one-record block
    run_cli("ingest", env=env)
    run_cli("deadletters", "retry", "--reason", "log_damaged", env=env)
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    rows = con.execute("SELECT reason, detail FROM dead_letters WHERE \"offset\" = 1 AND \"partition\" = ?",
                       [p]).fetchall()
    assert len(rows) == 1 and rows[0][0] == "log_damaged" and rows[0][1].startswith("bad_block"), rows


@pytest.mark.kafka
def test_a_damaged_spooled_record_is_quarantined_and_draining_goes_on(tmp_path, bootstrap, topic):
    from agentledger.producers.spool import Spool, drain
    from agentledger.schemas.transport.kafka import KafkaSink, KafkaSource

    spool = Spool(tmp_path / "spool")
    sessions = [record_session(n_commands=2, seed=40 + i) for i in range(3)]
    values = [v for _, vals in sessions for v in vals]
    spool.append(topic, values[:5])
    spool.append(topic, values[5:])
    seg = spool.log.segment_path(topic, 0, 0)
    pos = [IDX_ENTRY.unpack_from(seg.with_suffix(".idx").read_bytes(), i * IDX_ENTRY.size)[0] for i in (7, 8)]
    data = bytearray(seg.read_bytes())
    data[pos[0]:pos[0] + 10] = zigzag_varint(-(2 ** 63))
    seg.write_bytes(bytes(data))
    out = drain(Spool(tmp_path / "spool"), lambda: KafkaSink(bootstrap), timeout_s=60)
    assert out["remaining"] == 0 and out["drained"] == len(values)  # 1 of them into quarantine
    kept = _quarantined(seg.parent)
    assert len(kept) == 1 and kept[0][0] == bytes(data[pos[0]:pos[1]])
    assert "offset 7" in kept[0][1]["reason"] and "bad_block" in kept[0][1]["reason"]
    src = KafkaSource(bootstrap)
    src.assign(topic, {})
    got = []
    while len(got) < len(values) - 1:
        batch = src.poll(1000, 5.0)
        assert batch, f"only {len(got)} of {len(values) - 1} records reached Kafka"
        got += [m.value for m in batch]
    src.close()
    assert sorted(got) == sorted(values[:7] + values[8:])


# -- what a same-user agent can plant in the log: refused, never waited for or followed ---------------


def _one_partition(tmp_path, **kw) -> tuple[LocalLog, list[bytes]]:
    log = LocalLog(tmp_path / "log", default_partitions=1, fsync=False, **kw)
    _, vals = record_session(n_commands=2, seed=3)
    log.ensure_topic(TOPIC)
    log.append(TOPIC, 0, vals[:3])
    return log, vals


def test_a_lock_held_by_another_process_fails_the_append_in_time_never_hangs_it(tmp_path):
    """Found by an audit: the partition lock was waited for without end, so a process holding it
    (stopped, hung, hostile) hung every hook of that partition, and fail-closed never denied."""
    import subprocess
    import sys
    import time

    from agentledger.schemas.transport.local import AppendFailed

    log, vals = _one_partition(tmp_path, lock_timeout_s=0.5)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(log.segment_path(TOPIC, 0, 0).parent / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(AppendFailed, match="locked by another process"):
            log.append(TOPIC, 0, vals[3:4])
        assert time.monotonic() - t0 < 5
        with pytest.raises(AppendFailed):
            log.append(TOPIC, 0, vals[3:4], lock_timeout_s=0.1)  # (a sink's flush timeout bounds it too)
    finally:
        holder.kill()
        holder.wait()
    assert log.append(TOPIC, 0, vals[3:4]) == 3  # the lock free again: appended as usual


@pytest.mark.parametrize("planted", ["segment FIFO", "index FIFO", "index link", "partition link"])
def test_what_is_planted_in_the_log_is_refused_never_opened_or_followed(tmp_path, planted):
    """Found by an audit: a FIFO in place of the last segment or its index blocked every later
    append at open(); a link made the appender's repair truncate a file outside the log, or its
    writes land outside it."""
    import shutil
    import threading

    from agentledger.schemas.transport.local import AppendFailed

    log, vals = _one_partition(tmp_path)
    seg = log.segment_path(TOPIC, 0, 0)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"x" * 38)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if planted == "segment FIFO":
        seg.unlink()
        os.mkfifo(seg)
    elif planted == "index FIFO":
        seg.with_suffix(".idx").unlink()
        os.mkfifo(seg.with_suffix(".idx"))
    elif planted == "index link":
        seg.with_suffix(".idx").unlink()
        seg.with_suffix(".idx").symlink_to(victim)
    else:
        shutil.rmtree(seg.parent)
        seg.parent.symlink_to(elsewhere, target_is_directory=True)
    fresh = LocalLog(log.root, fsync=False)  # (a new process: no cached headers)
    got: list = []
    t = threading.Thread(target=lambda: got.append(_try_append(fresh, vals[3:4])), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the append hangs"
    assert isinstance(got[0], AppendFailed) and "never followed" in str(got[0])
    assert victim.read_bytes() == b"x" * 38 and list(elsewhere.iterdir()) == []


def _try_append(log, values):
    try:
        return log.append(TOPIC, 0, values)
    except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
        return exc


def test_an_index_entry_pointing_outside_the_segment_starts_a_new_segment(tmp_path):
    """Found by an audit: a last index entry with position 2**64-1 made every later append fail
    (seek: EINVAL; pread: ValueError escaping as no transport error) instead of being damage."""
    log, vals = _one_partition(tmp_path)
    idx = log.segment_path(TOPIC, 0, 0).with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[-IDX_ENTRY.size:-IDX_ENTRY.size + 8] = b"\xff" * 8
    idx.write_bytes(bytes(raw))
    fresh = LocalLog(log.root, fsync=False)
    assert fresh.append(TOPIC, 0, vals[3:5]) == 3
    assert fresh.segments(TOPIC, 0) == [0, 3]
    msgs = read_all(fresh, 0)
    assert [m.offset for m in msgs] == [0, 1, 2, 3, 4] and msgs[2].damaged and not msgs[3].damaged
