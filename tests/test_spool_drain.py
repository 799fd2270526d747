"""Spooled events left behind by ended processes: drained in order, by the next producer or the CLI;
`keys generate` makes the key producers sign with."""

from __future__ import annotations

import json

import pytest

from conftest import cli_env, free_port, run_cli
from agentledger.consumers.ingest import Ingestor
from agentledger.producers.recorder import Recorder, load_signer
from agentledger.producers.sinks import open_producer_sink
from agentledger.schemas.config import from_env
from agentledger.schemas.transport import open_source
from agentledger.schemas.warehouse import open_warehouse


def _ingest(settings, path):
    wh = open_warehouse(str(path))
    src = open_source(settings)
    try:
        Ingestor(wh, src, settings.topic).run()
    finally:
        src.close()
    return wh


@pytest.mark.kafka
def test_next_process_drains_first_so_a_session_keeps_its_order(bootstrap, topic, tmp_path):
    home = tmp_path / "home"
    down = from_env({"AGENTLEDGER_HOME": str(home), "AGENTLEDGER_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                     "AGENTLEDGER_TOPIC": topic})
    # "hook process" 1, during an outage: starts the session, records two events, exits
    sink = open_producer_sink(down, max_block_ms=100, connect_timeout_ms=500)
    rec = Recorder(sink, topic=topic)
    s = rec.session(agent="claude-code", cwd="/w")
    s.command_started(["make"], cwd="/w")
    s.file_accessed("/w/out.o", "create")
    assert rec.flush()
    seq, head = s.seq, s.head_hash
    sink.close(timeout=0.2)
    assert sink.spool.undrained() == 3

    # "hook process" 2, Kafka is back: its events must not overtake the spooled ones
    up = down.with_(bootstrap_servers=bootstrap)
    sink = open_producer_sink(up, max_block_ms=500)
    rec = Recorder(sink, topic=topic)
    s2 = rec.resume(s.session_id, seq, head)
    s2.file_accessed("/w/out.o", "read")
    s2.end()
    assert rec.flush()
    sink.close(timeout=30)
    assert sink.spool.undrained() == 0
    wh = _ingest(up, tmp_path / "wh.duckdb")
    rows = wh.con.execute("SELECT seq, kind FROM events ORDER BY source_offset").fetchall()
    assert [r[0] for r in rows] == list(range(5))
    assert wh.con.execute("SELECT status FROM chain_status").fetchone()[0] == "ok"
    assert wh.con.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
    wh.close()


@pytest.mark.kafka
def test_spool_drain_command_sends_what_ended_processes_left(bootstrap, topic, tmp_path):
    home = tmp_path / "home"
    down = from_env({"AGENTLEDGER_HOME": str(home), "AGENTLEDGER_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                     "AGENTLEDGER_TOPIC": topic})
    sink = open_producer_sink(down, max_block_ms=100, connect_timeout_ms=500)
    rec = Recorder(sink, topic=topic)
    for _ in range(3):
        s = rec.session(agent="codex", cwd="/w")
        for i in range(50):
            s.file_accessed(f"/w/{i}", "write")
        s.end()
    assert rec.flush()
    sink.close(timeout=0.2)
    env = cli_env(home, AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap, AGENTLEDGER_TOPIC=topic)
    before = json.loads(run_cli("spool", "status", "--format", "json", env=env).stdout)
    assert before["undrained_events"] == 3 * 52 and before["topics"][0]["oldest_undrained_at"]
    out = json.loads(run_cli("spool", "drain", "--format", "json", env=env).stdout)
    assert out == {"drained": 3 * 52, "remaining": 0}
    again = json.loads(run_cli("spool", "drain", "--format", "json", env=env).stdout)
    assert again["drained"] == 0, "acknowledged events are never sent twice"
    wh = _ingest(down.with_(bootstrap_servers=bootstrap), tmp_path / "wh.duckdb")
    assert wh.con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone() == (156, 156)
    assert wh.con.execute("SELECT count(*) FROM chain_status WHERE status = 'ok'").fetchone()[0] == 3
    wh.close()


def test_keys_generate_makes_the_signing_key(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home)
    out = json.loads(run_cli("keys", "generate", "--format", "json", env=env).stdout)
    kid = out["key_id"]
    assert out["active"] and (home / "keys" / f"{kid}.pub").exists()
    assert (home / "keys" / f"{kid}.key").stat().st_mode & 0o777 == 0o600
    settings = from_env({"AGENTLEDGER_HOME": str(home)})
    assert load_signer(settings, env={}).key_id == kid
    rec = Recorder.from_settings(settings, env={})
    s = rec.session(agent="codex", cwd="/w")
    sealed = s.end()
    assert rec.signer.key_id == kid
    listed = json.loads(run_cli("keys", "list", "--format", "json", env=env).stdout)
    assert listed == [{"key_id": kid, "public_key": str(home / "keys" / f"{kid}.pub"), "has_private_key": True,
                       "signing": True, "simulator": None}]
    other = tmp_path / "elsewhere"
    out2 = json.loads(run_cli("keys", "generate", "--out", str(other), "--no-activate", "--format", "json", env=env).stdout)
    assert not out2["active"] and load_signer(settings, env={}).key_id == kid
    assert sealed.record["payload"][0].endswith("SessionEnded")
