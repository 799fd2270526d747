"""Issue 20, attacks 1 and 2 (warehouse side): an attacker with write access to the warehouse removes
a session's tail, removes whole sessions, or rewrites history consistently in every table. Each must
make `agentledger verify` exit 1 and name what is wrong (they all passed before the Merkle tree)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from conftest import cli_env, run_cli
from agentledger.schemas import signing
from agentledger.schemas.config import from_env
from agentledger.schemas.warehouse import event_table_names


def _build(home: Path, sessions: int = 4, seed: int = 5, **env) -> list[str]:
    from agentledger import api

    s = from_env({"AGENTLEDGER_HOME": str(home), **env})
    signer = signing.generate()  # a producer key the home trusts (the simulator's own seed key never is)
    signing.write_keypair(signer, home / "keys")
    api.simulate(s, sessions, seed, force_attack_first=True, signer=signer)
    api.ingest(s)
    con = duckdb.connect(s.warehouse, read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT session_id FROM chain_heads ORDER BY event_count DESC").fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    home = tmp_path_factory.mktemp("tamper") / "home"
    return home, _build(home)


def _copy(pristine, tmp_path) -> tuple[Path, list[str]]:
    home, ids = pristine
    dst = tmp_path / "home"
    shutil.copytree(home, dst)
    return dst, ids


def _sql(home: Path, *statements: tuple) -> None:
    con = duckdb.connect(str(home / "warehouse.duckdb"))
    try:
        for st in statements:
            con.execute(*st) if isinstance(st, tuple) else con.execute(st)
    finally:
        con.close()


def _verify(home: Path, *args: str, **env) -> tuple[int, dict]:
    proc = run_cli("verify", *args, "--format", "json", env=cli_env(home, **env), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _result(doc: dict, sid: str) -> dict:
    return next(r for r in doc["results"] if r["session_id"] == sid)


def test_an_intact_warehouse_verifies_with_signatures_and_published_heads(pristine, tmp_path):
    home, ids = _copy(pristine, tmp_path)
    rc, doc = _verify(home, "--require-signatures")
    assert rc == 0 and doc["ok"], doc
    tree = doc["tree"]
    assert tree["ok"] and tree["size"] >= len(ids) and tree["heads_valid"] >= 1
    assert tree["published_valid"] >= 1 and tree["coverage_from"] == "published"
    assert all(r["tree_covered"] and r["final_signed"] for r in doc["results"])
    # the operator key was made once, private 0600 in a 0700 directory, and is not a producer key
    op = home / "keys" / "operator"
    assert (op.stat().st_mode & 0o777) == 0o700
    assert all((f.stat().st_mode & 0o777) == 0o600 for f in op.glob("*.key"))
    heads = list((home / "heads").glob("*.jsonl"))
    assert len(heads) == 1 and (heads[0].stat().st_mode & 0o777) == 0o600


def test_tail_truncation_is_broken_at_the_first_missing_seq(pristine, tmp_path):
    home, ids = _copy(pristine, tmp_path)
    sid = ids[0]
    _sql(home, *[(f"DELETE FROM {t} WHERE session_id = ? AND seq >= 20", [sid]) for t in event_table_names()])
    for args in (["--require-signatures"], []):
        rc, doc = _verify(home, *args)
        r = _result(doc, sid)
        assert rc == 1 and r["status"] == "broken", r
        assert (r["reason"], r["first_bad_seq"]) == ("tail_truncated", 20), r
    # ... and when chain_heads is "fixed" to match, the tree still says where the tail was
    _sql(home, ("UPDATE chain_heads SET head_seq = 19, event_count = 20, ended = false, head_hash = "
                "(SELECT hash FROM events WHERE session_id = ? AND seq = 19) WHERE session_id = ?", [sid, sid]))
    rc, doc = _verify(home, "--require-signatures")
    r = _result(doc, sid)
    assert rc == 1 and (r["reason"], r["first_bad_seq"]) == ("tail_truncated", 20), r


def test_a_session_without_its_heads_row_and_with_edited_events_is_found(pristine, tmp_path):
    home, ids = _copy(pristine, tmp_path)
    sid = ids[1]
    _sql(home, ("DELETE FROM chain_heads WHERE session_id = ?", [sid]),
         *[(f"UPDATE {t} SET occurred_at = occurred_at + INTERVAL 1 SECOND WHERE session_id = ? AND seq = 7", [sid])
           for t in event_table_names()])
    rc, doc = _verify(home)
    r = _result(doc, sid)
    assert rc == 1 and (r["reason"], r["first_bad_seq"]) == ("hash_mismatch", 7), r
    # without the edit: the missing heads row alone is a disagreement
    home2, _ = _copy(pristine, tmp_path / "b")
    _sql(home2, ("DELETE FROM chain_heads WHERE session_id = ?", [sid]))
    rc, doc = _verify(home2)
    assert rc == 1 and _result(doc, sid)["reason"] == "heads_disagree"


def test_a_deleted_session_is_found_from_the_tree_and_the_published_heads(pristine, tmp_path):
    home, ids = _copy(pristine, tmp_path)
    sid = ids[2]
    _sql(home, *[(f"DELETE FROM {t} WHERE session_id = ?", [sid]) for t in (*event_table_names(), "chain_heads", "dead_letters")])
    rc, doc = _verify(home)
    r = _result(doc, sid)
    assert rc == 1 and (r["reason"], r["first_bad_seq"]) == ("session_deleted", 0), r
    # removing its leaves too breaks the tree: its root no longer matches the state, the signed
    # heads or the published heads
    _sql(home, ("DELETE FROM tree_leaves WHERE session_id = ?", [sid]))
    rc, doc = _verify(home)
    codes = {p["code"] for p in doc["tree"]["problems"]}
    assert rc == 1 and not doc["tree"]["ok"] and codes & {"leaf_index", "root_mismatch", "history_rewritten"}, doc["tree"]


def _operator_key(home: Path) -> signing.Signer:
    return signing.load_operator_signer(from_env({"AGENTLEDGER_HOME": str(home)}), {})


def _rewrite_history(home: Path, sid: str, signer: signing.Signer) -> None:
    """Remove session ``sid`` everywhere and rebuild the tree, its state and a signed head over what
    is left, consistently, as an attacker holding ``signer`` would."""
    from agentledger.schemas import merkle, treelog

    con = duckdb.connect(str(home / "warehouse.duckdb"))
    try:
        for t in (*event_table_names(), "chain_heads", "dead_letters", "tree_leaves"):
            con.execute(f"DELETE FROM {t} WHERE session_id = ?", [sid])
        rows = con.execute("SELECT session_id, head_seq, head_hash, event_count FROM tree_leaves "
                           "ORDER BY leaf_index").fetchall()
        log_id = con.execute("SELECT log_id FROM tree_state").fetchone()[0]
        con.execute("DELETE FROM tree_leaves")
        con.execute("DELETE FROM tree_heads")
        con.execute("UPDATE tree_state SET tree_size = 0, root_hash = ?, frontier = []", [merkle.EMPTY_ROOT.hex()])
        treelog.append_leaves(con, rows)
        assert treelog.sign_head(con, signer) is not None
        assert treelog.read_state(con).log_id == log_id
    finally:
        con.close()


def test_history_rewritten_in_every_table_is_caught_by_the_published_heads(pristine, tmp_path):
    home, ids = _copy(pristine, tmp_path)
    sid = ids[3]
    auditor_copy = tmp_path / "auditor-heads.jsonl"
    shutil.copy(next((home / "heads").glob("*.jsonl")), auditor_copy)
    # the attacker even holds the operator key: every stored head verifies
    operator = _operator_key(home)
    _rewrite_history(home, sid, operator)
    rc, doc = _verify(home, "--heads", str(auditor_copy))
    assert sid not in {r["session_id"] for r in doc["results"]}  # gone from every table
    codes = {p["code"] for p in doc["tree"]["problems"]}
    assert rc == 1 and codes & {"history_rewritten", "history_rewound"}, doc["tree"]
    assert doc["tree"]["heads_valid"] == doc["tree"]["heads"] == 1  # the stored head alone looks fine
    # the home's own heads file is checked by default
    rc, doc = _verify(home)
    assert rc == 1 and {p["code"] for p in doc["tree"]["problems"]} & {"history_rewritten", "history_rewound"}
    # an attacker without the operator key who also rewrites the home's heads file: the auditor's
    # copy still catches it, and the forged heads do not verify
    attacker = signing.generate()
    home2, _ = _copy(pristine, tmp_path / "b")
    _rewrite_history(home2, sid, attacker)
    (next((home2 / "heads").glob("*.jsonl"))).write_text("")
    rc, doc = _verify(home2, "--heads", str(auditor_copy), "--require-signatures")
    assert rc == 1 and {p["code"] for p in doc["tree"]["problems"]} & {"history_rewritten", "history_rewound"}
    assert all(r["status"] == "broken" and r["reason"] == "not_in_signed_tree" for r in doc["results"]), doc


def test_dropping_and_remaking_the_tree_is_noticed(pristine, tmp_path):
    home, ids = _copy(pristine, tmp_path)
    _sql(home, "DROP TABLE tree_leaves", "DROP TABLE tree_heads", "DROP TABLE tree_state")
    rc, doc = _verify(home)
    assert rc == 1 and "no_tree" in {p["code"] for p in doc["tree"]["problems"]}
    run_cli("ingest", env=cli_env(home))  # a write open makes a new tree with a new log id
    rc, doc = _verify(home)
    assert rc == 1 and "log_replaced" in {p["code"] for p in doc["tree"]["problems"]}, doc["tree"]


@pytest.mark.kafka
def test_heads_published_to_kafka_catch_a_rewrite_even_when_the_heads_file_is_gone(bootstrap, topic, tmp_path):
    home = tmp_path / "home"
    env = {"AGENTLEDGER_BOOTSTRAP_SERVERS": bootstrap, "AGENTLEDGER_TOPIC": topic}
    ids = _build(home, sessions=3, seed=9, **env)
    rc, doc = _verify(home, **env)
    assert rc == 0 and f"kafka:{topic}.heads" in doc["tree"]["sources"] and doc["tree"]["published_valid"] >= 2
    shutil.rmtree(home / "heads")
    operator = _operator_key(home)
    _rewrite_history(home, ids[0], operator)
    rc, doc = _verify(home, **env)
    assert rc == 1 and {p["code"] for p in doc["tree"]["problems"]} & {"history_rewritten", "history_rewound"}
    rc, doc = _verify(home, "--heads", f"kafka:{topic}.heads", **env)
    assert rc == 1 and doc["tree"]["published"] >= 1
