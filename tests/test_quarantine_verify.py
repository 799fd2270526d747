"""Quarantine, healing of reordered events, dead-letter retry, chain_status and `verify` (issue 4)."""

from __future__ import annotations

import json
import random
import re


from conftest import REPO, cli_env, new_warehouse, run_cli
from agentledger.consumers.ingest import Ingestor
from agentledger.consumers.verify import verify, verify_session
from agentledger.producers.recorder import Recorder
from agentledger.schemas import signing
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import Sealer
from agentledger.schemas.config import from_env
from agentledger.schemas.signing import Keyring
from agentledger.schemas.treelog import TreeHeads
from agentledger.schemas.transport.base import Message
from agentledger.schemas.warehouse import VIEWS, open_warehouse
from agentledger.schemas.transport.base import MemorySink
from test_envelope import record_session


def _msgs(values, partition=0, start=0, topic="t"):
    return [Message(topic, partition, start + i, None, v) for i, v in enumerate(values)]


def _wh(tmp_path, name="w.duckdb"):
    return open_warehouse(new_warehouse(tmp_path / name))


def test_reordered_events_are_parked_then_healed_when_the_predecessor_arrives(warehouse_url):
    """Over a DuckDB file and a DuckLake warehouse (``warehouse_url``)."""
    sid, good = record_session(n_commands=4, seed=21)
    with open_warehouse(warehouse_url) as wh:
        ing = Ingestor(wh, None, "t")
        # batch 1: seq 0..2 and seq 5, 6 (3 and 4 are late)
        r1 = ing.ingest_batch(_msgs(good[:3] + good[5:7]))
        assert r1.accepted == 3 and r1.reasons == {"seq_gap": 2}
        st = wh.con.execute("SELECT status, first_bad_seq, reason FROM chain_status WHERE session_id = ?", [sid]).fetchone()
        assert st == ("broken", 3, "seq_gap")
        # batch 2: the late ones arrive (with 7.. which are again ahead of the chain); everything
        # parked lands in the same call, and the letters are resolved
        r2 = ing.ingest_batch(_msgs(good[3:5] + good[7:], start=5))
        assert r2.reasons == {"seq_gap": len(good) - 7} and r2.healed == 2 + len(good) - 7
        n = wh.con.execute("SELECT count(*), max(seq) FROM events WHERE session_id = ?", [sid]).fetchone()
        assert n == (len(good), len(good) - 1)
        assert wh.con.execute("SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL").fetchone()[0] == 0
        res = wh.con.execute("SELECT DISTINCT resolution FROM dead_letters").fetchall()
        assert res == [("ingested on retry",)]
        assert wh.con.execute("SELECT status FROM chain_status WHERE session_id = ?", [sid]).fetchone()[0] == "ok"
        # provenance of a healed event is the offset it was first received at
        assert wh.con.execute("SELECT source_offset FROM events WHERE session_id = ? AND seq = 5", [sid]).fetchone()[0] == 3


def test_identical_duplicates_never_break_a_chain_but_a_fork_does(warehouse_url):
    sid, good = record_session(n_commands=2, seed=22)
    store = load_store()
    with open_warehouse(warehouse_url) as wh:
        ing = Ingestor(wh, None, "t")
        ing.ingest_batch(_msgs(good))
        ing.ingest_batch(_msgs([good[1], good[2], good[1]], start=len(good)))  # replayed
        st = wh.con.execute("SELECT status, reason FROM chain_status WHERE session_id = ?", [sid]).fetchone()
        assert st == ("ok", None)
        assert set(r[0] for r in wh.con.execute("SELECT reason FROM dead_letters").fetchall()) == {"duplicate"}
        # a different, correctly sealed event claiming seq 2: a fork in the chain
        rec = store.decode(good[2])
        rec["payload"] = (rec["payload"][0], {**rec["payload"][1]})
        rec["turn_id"] = "forged-turn"
        fork = Sealer(store).seal(rec).value
        ing.ingest_batch(_msgs([fork], start=len(good) + 3))
        st = wh.con.execute("SELECT status, first_bad_seq, reason FROM chain_status WHERE session_id = ?", [sid]).fetchone()
        assert st == ("broken", 2, "conflicting_duplicate")


def test_a_session_whose_first_event_never_arrived_is_broken_at_seq_0(tmp_path):
    sid, good = record_session(n_commands=1, seed=23)
    with _wh(tmp_path) as wh:
        Ingestor(wh, None, "t").ingest_batch(_msgs(good[1:]))
        st = wh.con.execute("SELECT status, first_bad_seq, reason FROM chain_status WHERE session_id = ?", [sid]).fetchone()
        assert st == ("broken", 0, "seq_gap")


def test_undecodable_body_with_a_valid_hash_is_isolated_and_the_batch_commits(tmp_path):
    """A producer can seal garbage: the hash holds, the Avro does not. The reader fails inside DuckDB;
    the batch is bisected outside the transaction, the bad body quarantined, the rest committed."""
    from agentledger.schemas.envelope import seal

    store = load_store()
    sid, good = record_session(n_commands=3, seed=24)
    header = b"\xc3\x01" + store.current.fingerprint
    garbage, _ = seal(header, b"\x02\x02" + b"\xff" * 40 + b"\x00")  # bad lengths, sealed correctly
    trailing, _ = seal(header, good[0][10:-66] + b"\x80\x01" + good[0][-64:] + b"junk\x00")  # one record + extra bytes
    with _wh(tmp_path) as wh:
        r = Ingestor(wh, None, "t").ingest_batch(_msgs(good[:4] + [garbage, trailing] + good[4:]))
        assert r.accepted == len(good)
        rows = wh.con.execute("SELECT reason, raw FROM dead_letters ORDER BY \"offset\"").fetchall()
        assert [x[0] for x in rows] == ["undecodable", "undecodable"]
        assert rows[0][1] == garbage and rows[1][1] == trailing


def test_deadletters_retry_after_a_schema_is_added(tmp_path, home):
    """A writer with a schema the store does not know: quarantined (unknown_fingerprint), then accepted
    by `deadletters retry` once AGENTLEDGER_SCHEMA_PATH names the schema. Idempotent."""
    schema = json.loads((REPO / "schemas" / "event.avsc").read_text())
    fields = schema["fields"]
    fields.insert(len(fields) - 2, {"name": "ticket", "type": ["null", "string"], "default": None})
    extra = tmp_path / "more-schemas"
    extra.mkdir()
    (extra / "event.v99.avsc").write_text(json.dumps(schema))
    from agentledger.schemas.contract import SchemaStore

    store2 = SchemaStore("event", [extra])
    v99 = store2.by_fingerprint(next(fp for fp in store2.fingerprints if fp not in load_store().fingerprints))
    sink = MemorySink()
    rec = Recorder(sink, store=store2, rng=random.Random(5))
    rec.sealer.header = b"\xc3\x01" + v99.fingerprint  # write with the newer schema
    rec.sealer._parsed = v99.parsed
    with rec.session(agent="codex", cwd="/w") as s:
        s.command_started(["ls"], "/w")
    values = [v for _, _, v in sink.sent]
    env = cli_env(home)
    wh_path = home / "warehouse.duckdb"
    with open_warehouse(str(wh_path)) as wh:
        r = Ingestor(wh, None, "agentledger.events").ingest_batch(_msgs(values, topic="agentledger.events"))
        assert r.reasons == {"unknown_fingerprint": len(values)}
    listed = json.loads(run_cli("deadletters", "list", "--format", "json", env=env).stdout)
    assert {x["reason"] for x in listed} == {"unknown_fingerprint"} and len(listed) == len(values)
    # without the schema nothing changes
    out = json.loads(run_cli("deadletters", "retry", "--format", "json", env=env).stdout)
    assert out["accepted"] == 0 and out["still_quarantined"] == len(values)
    env2 = {**env, "AGENTLEDGER_SCHEMA_PATH": str(extra)}
    out = json.loads(run_cli("deadletters", "retry", "--format", "json", env=env2).stdout)
    assert out["accepted"] == len(values)
    again = json.loads(run_cli("deadletters", "retry", "--format", "json", env=env2).stdout)
    assert again["retried"] == 0
    rows = json.loads(run_cli("sql", "select count(*) n, count(distinct schema_fingerprint) f from events",
                              "--format", "json", env=env2).stdout)
    assert rows == [{"n": len(values), "f": 1}]
    assert json.loads(run_cli("deadletters", "list", "--format", "json", env=env).stdout) == []
    resolved = json.loads(run_cli("deadletters", "list", "--all", "--format", "json", env=env).stdout)
    assert {x["resolution"] for x in resolved} == {"ingested on retry"}


# -- verify ------------------------------------------------------------------------------------

def _signed_session(signer, *, tamper_signature=False, wrong_head=False, n=3, seed=31):
    sink = MemorySink()
    t = [1_700_000_000_000_000]

    def clock():
        t[0] += 1000
        return t[0]

    rec = Recorder(sink, clock=clock, rng=random.Random(seed))
    s = rec.session(agent="codex", cwd="/w", checkpoint_key_id=signer.key_id if signer else None)
    for i in range(n):
        c = s.command_started(["echo", str(i)], "/w")
        s.command_finished(c, exit_code=0, duration_ms=1)
        if signer and i == 1:
            _checkpoint(s, signer, final=False, tamper=tamper_signature, wrong_head=wrong_head)
    s.end("completed")
    if signer:
        _checkpoint(s, signer, final=True)
    return s.session_id, [v for _, _, v in sink.sent]


def _checkpoint(s, signer, final, tamper=False, wrong_head=False):
    head_seq, head_hash = s.seq - 1, s.head_hash
    if wrong_head:
        head_hash = "f" * 64
    sig = signer.sign_checkpoint(s.session_id, head_seq, head_hash, head_seq + 1, final)
    if tamper:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    s.emit("checkpoint", {"head_seq": head_seq, "head_hash": head_hash, "event_count": head_seq + 1,
                          "algorithm": "ed25519", "key_id": signer.key_id, "signature": sig, "final": final})


def test_verify_signed_unsigned_tampered_and_edited_rows(tmp_path, home):
    signer = signing.generate()
    other = signing.generate()
    keys = home / "keys"
    signing.write_keypair(signer, keys)
    ok_sid, ok_vals = _signed_session(signer, seed=31)
    uns_sid, uns_vals = _signed_session(None, seed=32)
    bad_sid, bad_vals = _signed_session(signer, tamper_signature=True, seed=33)
    wrong_sid, wrong_vals = _signed_session(signer, wrong_head=True, seed=34)
    unk_sid, unk_vals = _signed_session(other, seed=35)
    edit_sid, edit_vals = _signed_session(signer, seed=36)
    with open_warehouse(str(home / "warehouse.duckdb")) as wh:
        # as `agentledger ingest` does: the home's log operator key signs the tree heads
        operator = signing.load_operator_signer(from_env({"AGENTLEDGER_HOME": str(home)}), {}, create=True)
        ing = Ingestor(wh, None, "agentledger.events", tree_heads=TreeHeads(operator))
        allv = ok_vals + uns_vals + bad_vals + wrong_vals + unk_vals + edit_vals
        r = ing.ingest_batch(_msgs(allv, topic="agentledger.events"))
        assert r.accepted == len(allv)
        # an auditor-side edit of one row: the exit code of a command
        wh.con.execute("UPDATE events_command_finished SET command_finished = struct_update(command_finished, exit_code := 7) "
                       "WHERE session_id = ? AND seq = 2", [edit_sid])
        kr = Keyring.from_paths(keys)
        got = {sid: verify_session(wh, sid, kr) for sid in (ok_sid, uns_sid, bad_sid, wrong_sid, unk_sid, edit_sid)}
        # verify of the whole warehouse reads it in bulk (one scan, one query per table): the same verdicts
        bulk = {v.session_id: v for v in verify(wh, None, kr)}
        assert {sid: v.as_dict() for sid, v in bulk.items()} == {sid: v.as_dict() for sid, v in got.items()}
    assert got[ok_sid].label == "ok" and got[ok_sid].signed_checkpoints == 2
    assert got[uns_sid].label == "ok (unsigned)"
    assert (got[bad_sid].status, got[bad_sid].reason) == ("broken", "bad_signature")
    assert (got[wrong_sid].status, got[wrong_sid].reason) == ("broken", "checkpoint_mismatch")
    # a key we do not hold proves nothing either way: unsigned, and it says which key it would need
    assert got[unk_sid].status == "ok" and not got[unk_sid].signed
    assert got[unk_sid].unknown_key_ids == [other.key_id] and other.key_id in got[unk_sid].label
    assert (got[edit_sid].status, got[edit_sid].first_bad_seq, got[edit_sid].reason) == ("broken", 2, "hash_mismatch")

    env = cli_env(home)
    proc = run_cli("verify", "--format", "json", env=env, check=False)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["broken"] == 3 and out["sessions"] == 6
    strict = json.loads(run_cli("verify", unk_sid, "--require-signatures", "--format", "json", env=env,
                                check=False).stdout)
    assert strict["broken"] == 1 and "unknown key" in json.dumps(strict)
    pub = tmp_path / "other.pub"
    pub.write_bytes(signing.public_pem(other.public_key))
    assert run_cli("verify", unk_sid, "--require-signatures", "--public-key", str(pub), env=env).returncode == 0
    proc = run_cli("verify", ok_sid, uns_sid, env=env)
    assert "2 of 2 sessions verify" in proc.stdout
    proc = run_cli("verify", ok_sid, uns_sid, "--require-signatures", "--format", "json", env=env, check=False)
    assert proc.returncode == 1
    res = {x["session_id"]: x for x in json.loads(proc.stdout)["results"]}
    assert res[ok_sid]["ok"] and res[uns_sid]["reason"] == "unsigned"
    # the other key given explicitly makes its session verify
    other_dir = tmp_path / "other"
    signing.write_keypair(other, other_dir)
    proc = run_cli("verify", unk_sid, "--public-key", str(other_dir / f"{other.key_id}.pub"), env=env)
    assert "1 of 1 sessions verify" in proc.stdout


def test_verify_names_the_first_bad_seq_of_a_quarantined_chain(home):
    sid, good = record_session(n_commands=3, seed=41)
    with open_warehouse(str(home / "warehouse.duckdb")) as wh:
        Ingestor(wh, None, "agentledger.events").ingest_batch(_msgs(good[:3] + good[4:], topic="agentledger.events"))
    proc = run_cli("verify", sid, "--format", "json", env=cli_env(home), check=False)
    assert proc.returncode == 1
    res = json.loads(proc.stdout)["results"][0]
    assert (res["first_bad_seq"], res["reason"]) == (3, "seq_gap")


# -- auditor views -----------------------------------------------------------------------------

def test_every_view_in_the_warehouse_doc_exists_and_runs(home):
    doc = (REPO / "docs" / "warehouse.md").read_text()
    documented = set(re.findall(r"^- `([a-z_]+)` —", doc.split("## Views", 1)[1].split("\n## ", 1)[0], re.M))
    assert documented >= set(VIEWS), f"undocumented views: {set(VIEWS) - documented}"
    env = cli_env(home)
    run_cli("simulate", "--sessions", "12", "--seed", "4", env=env)
    run_cli("ingest", env=env)
    with open_warehouse(str(home / "warehouse.duckdb"), read_only=True) as wh:
        have = {r[0] for r in wh.con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert documented <= have, documented - have
        for v in documented:
            wh.con.execute(f"SELECT * FROM {v} LIMIT 5").fetchall()
        # and the example queries of the doc run
        examples = doc.split("## Example queries", 1)[1]
        for block in re.findall(r"```sql\n(.*?)```", examples, re.S):
            for stmt in [s.strip() for s in block.split(";") if s.strip() and not s.strip().startswith("--")]:
                sql = "\n".join(l for l in stmt.splitlines() if not l.strip().startswith("--"))
                if "$session" in sql:
                    sql = sql.replace("$session", "(select min(session_id) from events)")
                wh.con.execute(sql).fetchall()
        approvals = wh.con.execute("SELECT count(*), count(decided_at) FROM approvals").fetchone()
        assert approvals[0] > 0 and approvals[1] > 0
        assert wh.con.execute("SELECT count(*) FROM network_egress WHERE decision = 'deny'").fetchone()[0] > 0


def test_absurd_but_sealed_values_are_quarantined_and_never_stall_the_batch(tmp_path):
    """bench/chaos.py bad_input found both: seq 2**63-1 after a stored event overflowed the chain
    guard's ``p_seq + 1`` (the whole batch failed, every time: a poison pill), and an event_id that is
    no UUID was stored when it extended the chain."""
    sid, good = record_session(n_commands=2, seed=31)
    store = load_store()
    sealer = Sealer(store)

    def forged(value, **changes):
        rec = store.decode(value)
        rec.update(changes)
        return sealer.seal(rec).value

    head = store.decode(good[1])
    huge = forged(good[2], seq=2**63 - 1, prev_hash=head["hash"], event_id="0190f0f0-0000-7000-8000-000000000001")
    not_uuid = forged(good[2], event_id="not-a-uuid")
    never = forged(good[2], occurred_at=2**63 - 1)
    nul = forged(good[0], session_id="\x00" * 36, event_id="0190f0f0-0000-7000-8000-000000000002")
    with _wh(tmp_path) as wh:
        ing = Ingestor(wh, None, "t")
        r = ing.ingest_batch(_msgs(good[:2] + [huge, not_uuid, never, nul] + good[2:]))
        assert r.accepted == len(good), r
        rows = dict(wh.con.execute("SELECT \"offset\", reason FROM dead_letters").fetchall())
        assert rows == {2: "seq_gap", 3: "invalid_value", 4: "invalid_value", 5: "invalid_value"}, rows
        assert wh.con.execute("SELECT count(*) FROM events WHERE session_id = ?", [sid]).fetchone()[0] == len(good)
