"""Replay: one reader interface over four sources, verification, projection, time travel, timeline."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli
from agentledger.producers.recorder import ProducerIdentity, Recorder
from agentledger.replay.bundle import write_bundle
from agentledger.replay.session import replay
from agentledger.replay.sources import (BundleSource, KafkaSessionSource, LocalLogSessionSource, SessionNotFound,
                            WarehouseSource)
from agentledger.schemas import signing
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.transport import open_sink
from agentledger.schemas.warehouse import open_warehouse


def simulate_and_ingest(home: Path, sessions: int = 4, seed: int = 5, sign: bool = True, **env):
    from agentledger import api

    s = from_env({"AGENTLEDGER_HOME": str(home), **env})
    res = api.simulate(s, sessions, seed, force_attack_first=True, sign=sign)
    api.ingest(s)
    return s, res


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    home = tmp_path_factory.mktemp("replay") / "home"
    s, res = simulate_and_ingest(home)
    with open_warehouse(s.warehouse, read_only=True) as wh:
        ids = [r[0] for r in wh.con.execute("SELECT session_id FROM sessions ORDER BY started_at").fetchall()]
    return s, res, ids


def test_warehouse_local_log_and_bundle_give_the_same_session(simulated, tmp_path):
    s, _, ids = simulated
    store = load_store()
    with open_warehouse(s.warehouse, read_only=True) as wh:
        for sid in ids:
            ws = WarehouseSource(wh.con)
            a = ws.read(sid)
            hint = ws.hint(sid, s.topic)
            b = LocalLogSessionSource(s.log_dir, s.topic, hint).read(sid)
            c = LocalLogSessionSource(s.log_dir, s.topic, None).read(sid)  # no hint: scans the whole partition
            assert a.values == b.values == c.values and len(a.values) > 10
            assert c.scanned >= b.scanned
            out = tmp_path / f"{sid}.avro"
            write_bundle(out, session_id=sid, values=a.values, writer_schema=store.current.schema, checkpoints=[])
            d = BundleSource(out).read()
            assert d.values == a.values
            digests = set()
            for raw in (a, b, d):
                with replay(raw) as r:
                    assert r.verification.status == "ok", r.verification
                    digests.add(r.state().digest)
            assert len(digests) == 1
    with pytest.raises(SessionNotFound):
        LocalLogSessionSource(s.log_dir, s.topic).read("no-such-session")


@pytest.mark.kafka
def test_kafka_source_scans_the_key_partition_from_the_warehouse_offsets(bootstrap, topic, tmp_path):
    home = tmp_path / "home"
    s, res = simulate_and_ingest(home, sessions=5, seed=9, AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap,
                                 AGENTLEDGER_TOPIC=topic)
    with open_warehouse(s.warehouse, read_only=True) as wh:
        ids = [r[0] for r in wh.con.execute("SELECT session_id FROM sessions").fetchall()]
        assert len(ids) == 5
        for sid in ids:
            ws = WarehouseSource(wh.con)
            expected = ws.read(sid).values
            hint = ws.hint(sid, topic)
            assert hint is not None
            with_hint = KafkaSessionSource(bootstrap, topic, hint).read(sid)
            without = KafkaSessionSource(bootstrap, topic, None).read(sid)
            assert with_hint.values == expected == without.values
            assert with_hint.provenance[0].offset == hint.first_offset
            assert with_hint.scanned <= without.scanned
            with replay(with_hint) as r:
                assert r.verification.status == "ok"
    # the CLI reads from Kafka too
    env = cli_env(home, AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap, AGENTLEDGER_TOPIC=topic)
    out = json.loads(run_cli("replay", ids[0], "--source", "kafka", "--format", "json", env=env).stdout)
    assert out["source"]["kind"] == "kafka" and out["verification"]["status"] == "ok"


def _documented_fields(section: str) -> list[str]:
    doc = (REPO / "docs" / "replay.md").read_text()
    block = doc.split(f"<!-- fields:{section} -->", 1)[1].split("<!-- /fields -->", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", block, re.M)


def test_replay_done_when_at_last_seq_twice_and_json_fields(simulated):
    s, _, ids = simulated
    env = cli_env(s.home)
    top = _documented_fields("top")
    entry = _documented_fields("timeline")
    verification = _documented_fields("verification")
    state_fields = _documented_fields("state")
    assert {"format", "verification", "state", "timeline", "state_digest"} <= set(top)
    for sid in ids[:2]:  # the attack session (simulated first) and a benign one
        full = json.loads(run_cli("replay", sid, "--format", "json", env=env).stdout)
        last = full["state"]["counts"]["last_seq"]
        at_last = json.loads(run_cli("replay", sid, "--format", "json", "--at", str(last), env=env).stdout)
        assert full["state_digest"] == at_last["state_digest"]
        assert full["state"] == at_last["state"]
        if sid == ids[0]:  # done twice gives the same digest; an earlier step a different one (one session is enough)
            again = json.loads(run_cli("replay", sid, "--format", "json", env=env).stdout)
            assert again["state_digest"] == full["state_digest"]
            earlier = json.loads(run_cli("replay", sid, "--format", "json", "--at", str(last // 2), env=env).stdout)
            assert earlier["state_digest"] != full["state_digest"]
            assert earlier["state"]["as_of_seq"] == last // 2 and len(earlier["timeline"]) == last // 2 + 1
        assert set(top) <= set(full), set(top) - set(full)
        assert set(verification) <= set(full["verification"])
        assert set(state_fields) <= set(full["state"])
        for e in full["timeline"]:
            assert set(entry) <= set(e)
        assert [e["seq"] for e in full["timeline"]] == list(range(last + 1))
    table = run_cli("replay", ids[0], env=env).stdout
    assert "chain ok" in table and "state digest" in table and full["state_digest"][:12] not in ("",)


def test_projection_pairs_and_time_travel(tmp_path):
    """A hand-built session with known state: every pairing and the digest at each step."""
    sink = open_sink(from_env({"AGENTLEDGER_HOME": str(tmp_path)}))
    clock = iter(range(1_767_225_600_000_000, 1_767_225_600_000_000 + 10**9, 1000))
    rec = Recorder(sink, identity=ProducerIdentity("codex", "1.0"), clock=lambda: next(clock), rng=random.Random(1))
    s = rec.session(agent="codex", cwd="/w", sandbox_mode="workspace_write")
    req = s.approval_requested("exec", "make deploy", "d" * 64, command_id="c1")     # 1
    s.approval_decided(req, "approved", "user", decider="ann", latency_ms=700)       # 2
    c1 = s.command_started(["make", "deploy"], "/w", command_id="c1", escalated=True)  # 3
    s.file_accessed("/w/a.txt", "write", digest_after="a1", size_after=3)            # 4
    s.file_accessed("/w/a.txt", "rename", new_path="/w/b.txt", digest_after="a1")    # 5
    s.command_finished(c1, exit_code=2, duration_ms=50)                              # 6
    att = s.network_attempted("pypi.org", 443, "https", method="GET")                # 7
    s.network_decided(att, "deny", rule="default")                                   # 8
    s.gap("truncated", "stdout over 1 MiB", field="stdout", lost_bytes=5000)         # 9
    s.file_accessed("/w/b.txt", "delete")                                            # 10
    s.sandbox_denied("file_write", "/etc/hosts", "outside writable roots")           # 11
    s.network_completed(att, "blocked")                                              # 12
    s.end("completed")                                                               # 13
    sink.close()
    st = from_env({"AGENTLEDGER_HOME": str(tmp_path)})
    raw = LocalLogSessionSource(st.log_dir, st.topic).read(s.session_id)
    with replay(raw) as r:
        v = r.verification
        assert v.status == "ok" and v.gaps == 1 and v.events == 14
        full = r.state()
        assert r.state(13).digest == full.digest and r.state(10**6).digest == full.digest
        p = full.tables["processes"].dicts()
        assert p == [p[0]] and p[0]["status"] == "failed" and p[0]["exit_code"] == 2 and p[0]["escalated"]
        a = full.tables["approvals"].dicts()[0]
        assert (a["requested_seq"], a["decided_seq"], a["decision"], a["decider"]) == (1, 2, "approved", "ann")
        files = {f["path"]: f for f in full.tables["files"].dicts()}
        assert files["/w/a.txt"]["present"] is False and files["/w/a.txt"]["last_digest"] == "a1"
        assert files["/w/b.txt"]["present"] is False and files["/w/b.txt"]["last_operation"] == "delete"
        assert files["/w/b.txt"]["last_digest"] == "a1"  # the last known digest survives the delete
        n = full.tables["network"].dicts()[0]
        assert (n["decision"], n["outcome"], n["decided_seq"], n["completed_seq"]) == ("deny", "blocked", 8, 12)
        assert full.tables["gaps"].dicts()[0]["gap_kind"] == "truncated"
        # time travel: after seq 5 the command is still running and b.txt exists with a1
        mid = r.state(5)
        assert mid.tables["processes"].dicts()[0]["status"] == "running"
        assert {f["path"]: f["present"] for f in mid.tables["files"].dicts()} == {"/w/a.txt": False, "/w/b.txt": True}
        assert mid.session["status"] == "open" and full.session["status"] == "completed"
        assert len({r.state(k).digest for k in range(14)}) == 14  # every event changes the state
        tl = r.timeline()
        assert tl[9]["kind"] == "gap" and tl[9]["summary"].startswith("GAP truncated")
        assert tl[3]["related_seqs"] == [1, 6] and tl[7]["related_seqs"] == [8, 12]
        assert all(e["chain"] == "ok" for e in tl)


@pytest.mark.parametrize("rows", [0, 1, 5000])
def test_section_digest_is_sha256_of_the_rows_json_lines_in_order(rows):
    """The documented digest formula, computed by DuckDB itself, equals what projection computes
    (Arrow buffers hashed by hashlib), across Arrow chunks, NULLs and non-ASCII text."""
    import duckdb

    from agentledger.replay.projection import _digest_rows

    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT i AS _ord, 'päth/' || (i * 7919 % 1000) AS path, "
                "CASE WHEN i % 3 = 0 THEN NULL ELSE [i, i + 1] END AS argv, {'a': i % 5 = 0} AS s "
                f"FROM range(1, {rows + 1}) r(i) ORDER BY random()")
    want = con.execute("SELECT count(*), sha256(coalesce(string_agg(to_json(t)::VARCHAR, chr(10) ORDER BY _ord), '')) "
                       "FROM t").fetchone()
    assert _digest_rows(con, "t") == want
    assert _digest_rows(con, "t", batch_size=1024) == want  # several Arrow chunks
    if rows:
        want_json = "\n".join(r[0] for r in con.execute("SELECT to_json(t)::VARCHAR FROM t ORDER BY _ord").fetchall())
        assert want[1] == hashlib.sha256(want_json.encode()).hexdigest()


def test_an_edited_warehouse_row_breaks_the_chain_at_that_seq(tmp_path):
    s, _ = simulate_and_ingest(tmp_path / "home", sessions=2, seed=3)
    with open_warehouse(s.warehouse) as wh:
        sid = wh.con.execute("SELECT session_id FROM sessions LIMIT 1").fetchone()[0]
        seq = wh.con.execute("SELECT min(seq) FROM events WHERE session_id = ? AND kind = 'file_accessed'",
                             [sid]).fetchone()[0]
        wh.con.execute("UPDATE events_file_accessed SET file_accessed = struct_update(file_accessed, path := '/innocent') "
                       "WHERE session_id = ? AND seq = ?", [sid, seq])
    env = cli_env(s.home)
    out = json.loads(run_cli("replay", sid, "--format", "json", env=env).stdout)
    v = out["verification"]
    assert v["status"] == "broken" and v["first_bad_seq"] == seq and v["reason"] == "hash_mismatch"
    marks = {e["seq"]: e["chain"] for e in out["timeline"]}
    assert marks[seq - 1] == "ok" and marks[seq] == "bad" and marks[seq + 1] == "unverified"
    proc = run_cli("replay", sid, "--strict", env=env, check=False)
    assert proc.returncode == 1 and f"first bad seq {seq}" in proc.stdout


def signed_session(home: Path, signer: signing.Signer, *, every: int = 5, tamper_signature: bool = False,
                   final: bool = True):
    """A session with checkpoints every ``every`` events, signed as the recorder will (issue 3)."""
    s_env = from_env({"AGENTLEDGER_HOME": str(home)})
    sink = open_sink(s_env)
    rec = Recorder(sink, identity=ProducerIdentity("codex", "1.0"), rng=random.Random(7))
    s = rec.session(agent="codex", cwd="/w", checkpoint_key_id=signer.key_id)

    def checkpoint(final_: bool) -> None:
        head_seq, head_hash = s.seq - 1, s.head_hash
        sig = signer.sign_checkpoint(s.session_id, head_seq, head_hash, head_seq + 1, final_)
        if tamper_signature:
            sig = bytes([sig[0] ^ 1]) + sig[1:]
        s.emit("checkpoint", {"head_seq": head_seq, "head_hash": head_hash, "event_count": head_seq + 1,
                              "algorithm": "ed25519", "key_id": signer.key_id, "signature": sig, "final": final_})

    for i in range(12):
        c = s.command_started(["pytest", f"-k{i}"], "/w")
        s.command_finished(c, exit_code=0, duration_ms=i)
        if s.seq % every == 0:
            checkpoint(False)
    if final:
        checkpoint(True)
    s.end("completed")
    sink.close()
    return s_env, s.session_id


def test_checkpoint_signatures_are_verified_with_trusted_keys_only(tmp_path):
    signer = signing.generate()
    other = signing.generate()
    st, sid = signed_session(tmp_path / "h", signer)
    raw = LocalLogSessionSource(st.log_dir, st.topic).read(sid)
    with replay(raw, keyring=signing.Keyring([signer.public_key])) as r:
        v = r.verification
        assert v.status == "ok" and v.checkpoints and all(c.status == "valid" for c in v.checkpoints)
        assert v.unsigned_events == 0 and v.as_dict()["signatures"] == "valid"
        assert v.key_ids == [signer.key_id]
    with replay(raw, keyring=signing.Keyring([other.public_key])) as r:
        assert r.verification.status == "ok"  # an unknown key is not a failure ...
        assert {c.status for c in r.verification.checkpoints} == {"unknown_key"}
        assert r.verification.as_dict()["signatures"] == "unverified"  # ... but no proof either
    st2, sid2 = signed_session(tmp_path / "h2", signer, tamper_signature=True)
    raw2 = LocalLogSessionSource(st2.log_dir, st2.topic).read(sid2)
    with replay(raw2, keyring=signing.Keyring([signer.public_key])) as r:
        v = r.verification
        first_cp = min(c.seq for c in v.checkpoints)
        assert v.status == "broken" and v.first_bad_seq == first_cp and v.reason == "checkpoint_invalid"


def test_signatures_survive_a_ducklake_warehouse_written_in_small_batches(tmp_path):
    """DuckLake (1.5.5) stores small inserts inline in its catalog, and a BLOB inside a STRUCT comes
    back from there as the text "CAST('...' AS BLOB)": every checkpoint signature ingested in a
    small batch was changed, and `verify` found the event no longer hashing to its hash. The lake
    is attached with inlining off."""
    home = tmp_path / "home"
    signer = signing.generate()
    signed_session(home, signer)
    env = cli_env(home, AGENTLEDGER_WAREHOUSE=f"ducklake:sqlite:{tmp_path}/lake/meta.sqlite")
    run_cli("ingest", "--batch", "8", env=env)  # small enough to be inlined (each kind table gets < 8 rows)
    rows = json.loads(run_cli("sql", "select checkpoint.signature s from events where kind = 'checkpoint'",
                              "--format", "json", env=env).stdout)
    assert rows and all("CAST" not in str(r["s"]) for r in rows)
    out = json.loads(run_cli("verify", "--format", "json", env=env, check=False).stdout)
    assert out["ok"] and out["results"][0]["status"] == "ok", out


def test_a_small_session_replays_to_the_same_states_on_the_wide_workset_and_the_kind_tables(tmp_path, monkeypatch):
    """The console's fast path (one wide events table in the workset, one statement per section)
    gives exactly the states, digests and timeline of the kind-table workset and the temp-table
    sections, at seqs across each session and at its end."""
    import agentledger.api as al
    from agentledger.replay import projection, workset
    from agentledger.replay.session import replay as run_replay

    s = al.settings(home=tmp_path / "home", env={})
    al.simulate(s, sessions=3, seed=5)
    al.ingest(s)
    ids = [r[0] for r in al.sql(s, "select session_id from chain_heads order by 1").rows]
    assert len(ids) == 3

    def states(sid):
        rec = al.read_session(s, sid, "warehouse")
        with run_replay(rec.raw) as r:
            last = r.state().as_of_seq
            ats = sorted({0, 1, last // 3, last // 2, 2 * last // 3, last - 1, last}) + [None]
            return r.workset.con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'events'"
                                         ).fetchone()[0], [r.state(at).as_dict() for at in ats], r.timeline()

    for sid in ids:
        kind, fast, timeline = states(sid)
        assert kind == "BASE TABLE"
        with monkeypatch.context() as m:
            m.setattr(workset, "WIDE_MAX_EVENTS", -1)
            m.setattr(projection, "SMALL_STATE_EVENTS", -1)
            kind_slow, slow, timeline_slow = states(sid)
        assert kind_slow == "VIEW"
        assert fast == slow and timeline == timeline_slow
