"""End to end on a real Apache Kafka broker (started by the test session; never mocked, never skipped)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from conftest import REPO, cli_env, run_cli
from agentledger.schemas.transport.kafka import KafkaSink, KafkaSource

pytestmark = pytest.mark.kafka


def test_kafka_sink_is_idempotent_acks_all_and_keyed_by_session(bootstrap, topic):
    sink = KafkaSink(bootstrap)
    cfg = sink._producer.config
    assert cfg["acks"] == -1 or cfg["acks"] == "all"
    assert cfg["enable_idempotence"] is True
    sink.ensure_topic(topic, 3)
    for i in range(30):
        sink.send(topic, f"s{i % 5}".encode(), f"v{i}".encode())
    sink.close()
    src = KafkaSource(bootstrap)
    src.assign(topic, {})
    got = []
    deadline = time.time() + 20
    while len(got) < 30 and time.time() < deadline:
        got.extend(src.poll(1000, 0.5))
    src.close()
    assert len(got) == 30
    parts = {}
    for m in got:
        parts.setdefault(m.key, set()).add(m.partition)
    assert all(len(p) == 1 for p in parts.values()), "one session, one partition"
    for key in parts:  # order within a key is the send order
        vals = [int(m.value[1:]) for m in sorted(got, key=lambda m: m.offset) if m.key == key]
        assert vals == sorted(vals)


def _count(warehouse):
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        con.close()


def test_simulate_sigkill_ingest_restart_exactly_once(bootstrap, topic, home):
    """The foundation's done-when, verbatim: simulate 200 sessions with seed 7 to Kafka, kill
    `ingest --follow` with SIGKILL part-way, run `ingest --until-caught-up`: exact counts."""
    env = cli_env(home, AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap, AGENTLEDGER_TOPIC=topic)
    out = run_cli("simulate", "--sessions", "200", "--seed", "7", "--format", "json", env=env)
    reported = json.loads(out.stdout.strip().splitlines()[-1])
    assert reported["sessions"] == 200 and reported["events"] > 2000

    proc = subprocess.Popen([sys.executable, "-m", "agentledger", "-v", "ingest", "--follow", "--batch", "150"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    committed = 0
    deadline = time.time() + 120
    try:
        for line in proc.stderr:
            if "committed batch" in line:
                committed += 1
                if committed == 3:
                    break
            assert time.time() < deadline, "ingest --follow produced no commits"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    warehouse = home / "warehouse.duckdb"
    partway = _count(warehouse)
    assert 0 < partway < reported["events"], "killed part-way"

    run_cli("ingest", "--until-caught-up", env=env)
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        assert n == distinct == reported["events"]
        gaps = con.execute("""SELECT count(*) FROM (SELECT session_id, count(*) c, min(seq) lo, max(seq) hi
                              FROM events GROUP BY 1) WHERE lo <> 0 OR hi <> c - 1""").fetchone()[0]
        assert gaps == 0
        assert con.execute("SELECT count(DISTINCT session_id) FROM events").fetchone()[0] == 200
        assert con.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM chain_status WHERE status = 'ok'").fetchone()[0] == 200
    finally:
        con.close()


def test_garbage_on_the_topic_is_quarantined_and_ingest_continues(bootstrap, topic, home):
    env = cli_env(home, AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap, AGENTLEDGER_TOPIC=topic)
    out = run_cli("simulate", "--sessions", "5", "--seed", "1", "--format", "json", env=env)
    events = json.loads(out.stdout)["events"]
    sink = KafkaSink(bootstrap)
    sink.send(topic, b"junk", b"\x00not avro at all")
    sink.send(topic, b"junk", b"\xc3\x01" + b"\x99" * 8 + b"x" * 100)
    sink.close()
    out = run_cli("ingest", "--until-caught-up", "--format", "json", env=env)
    stats = json.loads(out.stdout)
    assert stats["events"] == events and stats["dead_letters"] == 2
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    rows = con.execute("SELECT reason, raw, topic FROM dead_letters ORDER BY reason").fetchall()
    con.close()
    assert [r[0] for r in rows] == ["undecodable", "unknown_fingerprint"]
    assert rows[0][1] == b"\x00not avro at all" and rows[0][2] == topic
