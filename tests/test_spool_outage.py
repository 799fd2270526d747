"""Done-when of the producers issue: a broker outage loses, blocks and duplicates nothing.

The test owns a private broker whose port is chosen before it exists, so the producer is configured
with an address that refuses connections; the broker is started part-way through the run."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import FULL_SCALE, assert_no_send_waited_for_the_broker, free_port, new_warehouse, start_broker, stop_broker
from agentledger.consumers.ingest import Ingestor
from agentledger.producers.recorder import Recorder
from agentledger.producers.redact import Redactor
from agentledger.producers.sinks import open_producer_sink
from agentledger.schemas import envvars, signing
from agentledger.schemas.checkpoints import verify_checkpoint
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import ChainVerifier
from agentledger.schemas.rows import iter_session_values
from agentledger.schemas.transport import open_source
from agentledger.schemas.warehouse import open_warehouse

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# The full size of the issue (100,000 events; 20,000 when the broker dies) runs with
# AGENTLEDGER_TEST_SCALE=full (or AGENTLEDGER_OUTAGE_EVENTS=N); the default proves the same
# behaviour on fewer events (the broker start takes as long either way).
EVENTS = envvars.get("AGENTLEDGER_OUTAGE_EVENTS") if (FULL_SCALE or envvars.raw("AGENTLEDGER_OUTAGE_EVENTS")) else 20_000
SESSIONS = 50
BOUND_MS = 250


@pytest.mark.parametrize("kafka_process", [False, True], ids=["client-in-process", "client-in-child-process"])
def test_broker_down_then_up_every_event_exactly_once_in_order(tmp_path, kafka, kafka_process):
    kafka.require()  # the jars and Java must work; this test starts its own broker
    port = free_port()
    broker_dir = tmp_path / "broker"
    env = {"AGENTLEDGER_HOME": str(tmp_path / "home"), "AGENTLEDGER_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
           "AGENTLEDGER_TOPIC": "outage.events"}
    settings = from_env(env)
    signer = signing.generate()
    sink = open_producer_sink(settings, max_block_ms=BOUND_MS, connect_timeout_ms=2000, kafka_process=kafka_process)
    rec = Recorder(sink, topic=settings.topic, transforms=[Redactor(b"test-key")], signer=signer, checkpoint_every=500)
    sessions = [rec.session(agent="codex", cwd=f"/work/repo{i}") for i in range(SESSIONS)]

    started = threading.Event()
    failure: list[BaseException] = []

    def start():
        try:
            start_broker(broker_dir, port)
            started.set()
        except BaseException as exc:  # noqa: BLE001 -- reported below
            failure.append(exc)

    starter = threading.Thread(target=start)
    times: list[float] = []
    spooled_before_start = None
    try:
        t0 = time.perf_counter()
        went_direct_at = None
        i = 0
        # EVENTS events, and more while the broker starts and the backlog drains (then 1000 direct)
        while i < EVENTS or went_direct_at is None or i < went_direct_at + 1000:
            if i == int(EVENTS * 0.3):
                spooled_before_start = sink.stats["spooled"] + len(sink._pending)
                starter.start()  # the broker comes up while we keep emitting
            elif i > EVENTS * 0.3 and (starter.is_alive() or (started.is_set() and went_direct_at is None)):
                # Pace the middle part, like an agent does, so that the broker start and the drain of
                # the backlog happen while events keep coming.
                if i % 100 == 0:
                    time.sleep(0.05)
                if went_direct_at is None and sink.state == "direct":
                    went_direct_at = i
                if failure or time.perf_counter() - t0 > 600:
                    break  # reported below
            s = sessions[i % SESSIONS]
            t = time.perf_counter()
            if i % 3 == 0:
                cmd = s.command_started(["pytest", "-q", f"--token=ghp_{'a1B2' * 9}"], cwd=f"/work/repo{i % SESSIONS}")
            elif i % 3 == 1:
                s.file_accessed(f"/work/repo/src/m{i}.py", "write")
            else:
                s.command_finished(cmd, exit_code=0, duration_ms=12, stdout=b"ok")
            times.append(time.perf_counter() - t)
            i += 1
        for s in sessions:
            t = time.perf_counter()
            s.end("completed")
            times.append(time.perf_counter() - t)
        emit_s = time.perf_counter() - t0
        assert rec.flush() is True, "spool mode: flush makes everything durable (Kafka or spool)"
        starter.join(300)
        assert not failure, f"broker did not start: {failure[0]}"
        assert started.is_set()
        assert sink.wait_direct(240), f"the spool did not drain: {sink.spool.status()} {sink.last_error}"
        total = rec.events_sent
        stats = dict(sink.stats)
        sink.close(timeout=30)
        print(f"emitted {total} events in {emit_s:.1f}s; worst send {max(times) * 1000:.1f} ms; {stats}")

        assert spooled_before_start and spooled_before_start > 0, "events were spooled while the broker was down"
        assert went_direct_at is not None and stats["direct"] > 0, "after the drain, events went straight to Kafka"
        assert stats["drained"] >= spooled_before_start
        assert_no_send_waited_for_the_broker(times, BOUND_MS, 2000)
        assert rec.events_lost == 0 and stats["refused"] == 0
        assert total >= EVENTS + 2 * SESSIONS  # + session end + final checkpoints (+ periodic checkpoints)

        wh = open_warehouse(new_warehouse(tmp_path / "warehouse.duckdb"))
        source = open_source(settings)
        try:
            ingest = Ingestor(wh, source, settings.topic, batch_records=50_000).run()
        finally:
            source.close()
        con = wh.con
        n, distinct = con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        assert n == distinct == total, (n, distinct, total, ingest.as_dict())
        assert con.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0, ingest.reasons
        assert con.execute("SELECT count(*) FROM chain_status WHERE status = 'ok'").fetchone()[0] == SESSIONS
        # In order: within each session, Kafka offsets grow with seq, and every chain verifies from bytes.
        bad_order = con.execute("""SELECT count(*) FROM (SELECT session_id, seq,
                 lag(source_offset) OVER (PARTITION BY session_id ORDER BY seq) AS prev_off, source_offset
                 FROM events) WHERE prev_off >= source_offset""").fetchone()[0]
        assert bad_order == 0
        store = load_store()
        keyring = signing.Keyring([signer.public_key])
        checkpoints = 0
        for s in sessions:
            v = ChainVerifier(s.session_id)
            for value, rec_, _row in iter_session_values(con, store, s.session_id):
                if rec_["payload"][0].endswith("Checkpoint"):
                    assert verify_checkpoint(rec_, keyring, v.head_seq, v.head_hash).ok
                    checkpoints += 1
                assert v.check(value, rec_) is None
            assert v.count == s.seq
        assert checkpoints >= SESSIONS
        # the secret in argv never reached the warehouse in clear
        assert con.execute("SELECT count(*) FROM events WHERE CAST(command_started AS VARCHAR) LIKE '%ghp_%'").fetchone()[0] == 0
        wh.close()
    finally:
        if starter.is_alive():
            starter.join(300)
        stop_broker(broker_dir)


DIES_EVENTS, DIES_STOP, DIES_RESTART = (20_000, 8_000, 14_000) if FULL_SCALE else (5_000, 2_000, 3_500)


@pytest.mark.parametrize("kafka_process", [False, True], ids=["client-in-process", "client-in-child-process"])
def test_broker_dies_while_direct_then_returns_nothing_lost(tmp_path, kafka, kafka_process):
    """Direct to Kafka, the broker stops mid-stream (unacknowledged events are in the client), comes back."""
    kafka.require()
    port = free_port()
    broker_dir = tmp_path / "broker"
    start_broker(broker_dir, port)
    try:
        settings = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home"), "AGENTLEDGER_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
                             "AGENTLEDGER_TOPIC": "dies.events"})
        sink = open_producer_sink(settings, max_block_ms=BOUND_MS, connect_timeout_ms=2000, flush_timeout_ms=2000,
                                  kafka_process=kafka_process)
        rec = Recorder(sink, topic=settings.topic)
        sessions = [rec.session(agent="codex", cwd="/w") for _ in range(10)]
        assert sink.wait_direct(60)
        times = []
        for i in range(DIES_EVENTS):
            if i == DIES_STOP:
                rec.flush()
                stop_broker(broker_dir)  # events DIES_STOP.. go to a dead broker
            if i == DIES_RESTART:
                deadline = time.monotonic() + 15
                while sink.state != "spooling" and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert sink.state == "spooling", ("the dead broker was noticed", sink.last_error, sink.stats, sink._kafka and sink._kafka.in_flight(), sink._thread.is_alive())
                start_broker(broker_dir, port)
            t = time.perf_counter()
            sessions[i % 10].file_accessed(f"/w/f{i}", "write")
            times.append(time.perf_counter() - t)
            if DIES_STOP <= i < DIES_RESTART and i % ((DIES_RESTART - DIES_STOP) // 60) == 0:
                time.sleep(0.05)  # ~3 s of events while the broker is down
        for s in sessions:
            s.end()
        assert rec.flush()
        assert sink.wait_direct(180), sink.last_error
        total = rec.events_sent
        stats = dict(sink.stats)
        sink.close(timeout=30)
        assert stats["switches"] >= 1 and stats["spooled"] > 0 and stats["drained"] == stats["spooled"]
        assert_no_send_waited_for_the_broker(times, BOUND_MS, 2000)
        wh = open_warehouse(new_warehouse(tmp_path / "wh.duckdb"))
        source = open_source(settings)
        try:
            Ingestor(wh, source, settings.topic).run()
        finally:
            source.close()
        n, distinct = wh.con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        assert n == distinct == total == DIES_EVENTS + 2 * 10  # + start and end of each session
        reasons = dict(wh.con.execute("SELECT reason, count(*) FROM dead_letters GROUP BY 1").fetchall())
        # Events the dead broker may have written without acknowledging are re-sent from the spool:
        # at most those show up as exact duplicates, quarantined, never as a gap or a conflict.
        assert set(reasons) <= {"duplicate"}, reasons
        assert wh.con.execute("SELECT count(*) FROM chain_status WHERE status = 'ok'").fetchone()[0] == 10
        print(f"switches {stats['switches']}, spooled {stats['spooled']}, duplicates quarantined {reasons}")
        wh.close()
    finally:
        stop_broker(broker_dir)
