"""Fail-closed refusals, spool overflow as a recorded gap, truncation of oversized events, checkpoints.

These run with Kafka unreachable (a port nobody listens on): the spool is the only way to durability."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import assert_no_send_waited_for_the_broker, cli_env, free_port, run_cli
from agentledger.producers.recorder import Recorder
from agentledger.producers.sinks import RecordingRefused, open_producer_sink
from agentledger.producers.spool import Spool
from agentledger.schemas import signing
from agentledger.schemas.checkpoints import verify_checkpoint
from agentledger.schemas.codec import decode, soe_split
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import ChainVerifier


def _settings(tmp_path, **extra):
    port = free_port()
    return from_env({"AGENTLEDGER_HOME": str(tmp_path / "home"), "AGENTLEDGER_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
                     "AGENTLEDGER_TOPIC": "t", **extra})


def _spooled(spool_root):
    """Every event in the spool, decoded, in spool order."""
    spool = Spool(spool_root)
    store = load_store()
    out = []
    for topic in spool.topics():
        off = 0
        while True:
            msgs = spool.log.read(topic, 0, off, 1000)
            if not msgs:
                break
            for m in msgs:
                fp, body = soe_split(m.value)
                out.append((m.value, decode(body, store.by_fingerprint(fp).parsed)))
            off = msgs[-1].offset + 1
    return out


@pytest.mark.parametrize("unavailable", ["unwritable", "full"])
def test_fail_closed_refuses_and_nothing_claims_to_be_recorded(tmp_path, unavailable):
    settings = _settings(tmp_path)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    if unavailable == "unwritable":  # root ignores mode bits, so use a path under a regular file
        options = {"spool_dir": blocker / "spool"}
    else:
        options = {"spool_dir": tmp_path / "spool", "spool_max_bytes": 1}
    rec = Recorder.from_settings(settings, mode="fail_closed", max_block_ms=200, connect_timeout_ms=500, **options)
    assert rec.mode == "fail_closed"
    ran = []
    with pytest.raises(RecordingRefused) as refused:
        s = rec.session(agent="codex", cwd="/work/repo", sandbox_mode="workspace_write")
        with s.guarded():
            s.command_started(["rm", "-rf", "/work/repo/build"], cwd="/work/repo")
        ran.append("the action ran")  # must never happen
    assert not ran
    assert "fail-closed" in str(refused.value) or "durable" in str(refused.value)
    assert refused.value.undelivered, "the refusal lists what was not recorded"
    assert rec.events_sent == 0 and rec.events_lost >= 1
    sink = rec.sink
    assert not sink._pending, "nothing is left inside the sink that could be delivered later"
    spool_root = options["spool_dir"]
    if spool_root.parent.is_dir():
        assert _spooled(spool_root) == []
    sink.close(timeout=0.5)


def test_fail_closed_with_kafka_down_but_spool_ok_records_and_allows(tmp_path):
    settings = _settings(tmp_path)
    rec = Recorder.from_settings(settings, mode="fail_closed", max_block_ms=200, connect_timeout_ms=500)
    s = rec.session(agent="codex", cwd="/work/repo")
    with s.guarded():
        s.command_started(["make"], cwd="/work/repo")
    assert rec.events_sent == 2
    events = _spooled(settings.home / "spool")
    assert [e[1]["payload"][0].rsplit(".", 1)[1] for e in events] == ["SessionStarted", "CommandStarted"]
    assert events[0][1]["payload"][1]["recording_mode"] == "fail_closed"
    rec.sink.close(timeout=0.5)


def test_spool_overflow_is_a_gap_event_and_visible_in_status(tmp_path):
    settings = _settings(tmp_path)
    signer = signing.generate()
    sink = open_producer_sink(settings, max_block_ms=100, connect_timeout_ms=500, spool_max_bytes=30_000, write_every=10)
    rec = Recorder(sink, topic="t", signer=signer, checkpoint_every=50)
    sessions = [rec.session(agent="codex", cwd="/w") for _ in range(2)]
    for i in range(400):  # ~100 KB of events: most of them cannot fit
        sessions[i % 2].file_accessed(f"/w/src/file{i}.py", "write", digest_after="ab" * 32)
    for s in sessions:
        s.end("completed")
    assert rec.flush() is True
    refused = sink.stats["refused"]
    assert refused > 100 and rec.events_lost == refused
    spooled = _spooled(settings.home / "spool")
    keyring = signing.Keyring([signer.public_key])
    gaps = 0
    for s in sessions:
        v = ChainVerifier(s.session_id)
        for value, r in (e for e in spooled if e[1]["session_id"] == s.session_id):
            name, payload = r["payload"]
            if name.endswith("Gap"):
                assert payload["gap_kind"] == "spool_overflow"
                assert payload["lost_events"] > 0 and payload["lost_bytes"] > 0
                assert payload["first_lost_at"] <= payload["last_lost_at"]
                gaps += payload["lost_events"]
            if name.endswith("Checkpoint"):
                assert verify_checkpoint(r, keyring, v.head_seq, v.head_hash).ok
            assert v.check(value, r) is None, "the chain stays intact across the loss"
        assert v.count == s.seq
        last_kinds = [e[1]["payload"][0].rsplit(".", 1)[1] for e in spooled if e[1]["session_id"] == s.session_id][-3:]
        assert last_kinds == ["Gap", "SessionEnded", "Checkpoint"]
    assert gaps == refused, "every refused event is accounted for by a gap record"
    sink.close(timeout=0.5)
    env = cli_env(settings.home, AGENTLEDGER_BOOTSTRAP_SERVERS=settings.bootstrap_servers, AGENTLEDGER_TOPIC="t")
    status = json.loads(run_cli("spool", "status", "--format", "json", env=env).stdout)
    assert status["overflow_events"] == refused
    assert status["undrained_events"] == len(spooled)


def test_oversized_output_is_cut_to_fit_with_a_truncation_gap(tmp_path):
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home")})
    rec = Recorder(open_producer_sink(settings), topic=settings.topic, max_event_bytes=50_000)
    s = rec.session(agent="codex", cwd="/w")
    cmd = s.command_started(["cat", "big.log"], cwd="/w")
    huge = {"sha256": "0" * 64, "size": 10_000_000, "excerpt": "x" * 200_000, "truncated": True}
    sealed = s.command_finished(cmd, exit_code=0, duration_ms=5, stdout=huge)
    assert len(sealed.value) <= 50_000
    s.end()
    rec.flush()
    from agentledger.schemas.transport.local import LocalLog
    log = LocalLog(settings.log_dir)
    store = load_store()
    kinds = []
    for p in range(log.partition_count(settings.topic)):
        for m in log.read(settings.topic, p, 0, 100):
            fp, body = soe_split(m.value)
            kinds.append(decode(body, store.by_fingerprint(fp).parsed)["payload"])
    gap = [p for name, p in kinds if name.endswith("Gap")]
    assert len(gap) == 1 and gap[0]["gap_kind"] == "truncated"
    assert gap[0]["field"] == "payload.stdout.excerpt" and gap[0]["lost_bytes"] > 150_000
    assert gap[0]["related_seq"] == 2


def test_send_never_blocks_longer_than_the_bound_when_kafka_is_unreachable(tmp_path):
    # a listening socket that never answers Kafka: the worst case for a client (connect succeeds)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(100)
    port = srv.getsockname()[1]
    try:
        settings = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home"),
                             "AGENTLEDGER_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "AGENTLEDGER_TOPIC": "t"})
        import time
        rec = Recorder(open_producer_sink(settings, max_block_ms=150, connect_timeout_ms=1000), topic="t")
        s = rec.session(agent="codex", cwd="/w")
        times = []
        for i in range(3000):
            t = time.perf_counter()
            s.file_accessed(f"/w/{i}", "read")
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert rec.flush() is True
        flush_s = time.perf_counter() - t
        assert_no_send_waited_for_the_broker(times, 150, 1000)
        assert flush_s < 2, flush_s
        assert rec.sink.stats["spooled"] == 3001
        rec.sink.close(timeout=0.2)
    finally:
        srv.close()


def test_crash_recovered_session_starts_with_a_gap(tmp_path):
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home")})
    rec = Recorder(open_producer_sink(settings), topic=settings.topic)
    s = rec.session(agent="codex", cwd="/w")
    s.command_started(["make"], cwd="/w")
    rec.flush()
    rec2 = Recorder(open_producer_sink(settings), topic=settings.topic)
    s2 = rec2.resume(s.session_id, s.seq, s.head_hash, crash_recovered="previous hook process was killed (SIGKILL)")
    s2.end()
    rec2.flush()
    from agentledger.schemas.transport.local import LocalLog
    log = LocalLog(settings.log_dir)
    store = load_store()
    v = ChainVerifier(s.session_id)
    names = []
    for p in range(log.partition_count(settings.topic)):
        for m in log.read(settings.topic, p, 0, 100):
            fp, body = soe_split(m.value)
            r = decode(body, store.by_fingerprint(fp).parsed)
            assert v.check(m.value, r) is None
            names.append((r["payload"][0].rsplit(".", 1)[1], r["payload"][1]))
    assert [n for n, _ in names] == ["SessionStarted", "CommandStarted", "Gap", "SessionEnded"]
    gap = names[2][1]
    assert gap["gap_kind"] == "crash_recovered" and gap["related_seq"] == 1 and "SIGKILL" in gap["reason"]


@pytest.mark.kafka
def test_unusable_spool_does_not_stop_a_healthy_kafka(bootstrap, topic, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home"), "AGENTLEDGER_BOOTSTRAP_SERVERS": bootstrap,
                         "AGENTLEDGER_TOPIC": topic})
    rec = Recorder.from_settings(settings, mode="fail_closed", spool_dir=blocker / "spool")
    s = rec.session(agent="codex", cwd="/w")
    with s.guarded():
        s.command_started(["make"], cwd="/w")
    assert rec.sink.state == "direct" and rec.events_sent == 2
    rec.close(timeout=10)
