"""Importing Codex rollouts and OTel logs: counts equal the sources, idempotent, one chain per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from agent_sources import count_sources
from conftest import REPO, cli_env, run_cli
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import ChainVerifier
from agentledger.schemas.rows import iter_session_values

FIXTURES = REPO / "tests" / "fixtures" / "codex"
ROLLOUT_A = next(FIXTURES.glob("rollout-*0199a1b2*.jsonl"))
ROLLOUT_B = next(FIXTURES.glob("rollout-*019c2d3e*.jsonl"))
ROLLOUT_C = next(FIXTURES.glob("rollout-*5973b6c0*.jsonl"))
OTEL_A = next(FIXTURES.glob("otel-codex-0.46-*"))
OTEL_B = next(FIXTURES.glob("otel-codex-0.98-*"))
SESSION_B = "019c2d3e-4f50-7a6b-8c9d-0e1f2a3b4c5d"
KINDS = {"commands": "command_started", "files": "file_accessed", "decisions": "approval_decided",
         "network": "network_decided"}


def import_json(env, *args) -> dict:
    return json.loads(run_cli("import", *args, "--format", "json", env=env).stdout)


def warehouse_counts(env) -> dict[str, dict[str, int]]:
    rows = json.loads(run_cli("sql", "select session_id, kind, count(*) n from events group by all", "--format", "json",
                              env=env).stdout)
    out: dict = {}
    for r in rows:
        out.setdefault(r["session_id"], {})[r["kind"]] = r["n"]
    return out


def as_source_counts(wh: dict) -> dict:
    return {sid: {k: kinds.get(kind, 0) for k, kind in KINDS.items()} for sid, kinds in wh.items()}


def reverify_from_warehouse(warehouse: str) -> dict[str, int]:
    """Every session re-checked from warehouse rows alone (re-encoded to the sealed bytes)."""
    store = load_store()
    con = duckdb.connect(warehouse, read_only=True)
    try:
        out = {}
        for (sid,) in con.execute("SELECT DISTINCT session_id FROM events").fetchall():
            v = ChainVerifier(sid)
            for value, rec, _ in iter_session_values(con, store, sid):
                problem = v.check(value, rec)
                assert problem is None, (sid, problem)
            out[sid] = v.count
        return out
    finally:
        con.close()


def verify(env, expect_sessions: int) -> dict:
    """`agentledger verify` (issue 4): every hash and the chain, re-checked from the warehouse."""
    out = json.loads(run_cli("verify", "--format", "json", env=env).stdout)
    assert out["ok"] and out["broken"] == 0 and out["sessions"] == expect_sessions, out
    return out


def chain_status(env) -> dict[str, str]:
    rows = json.loads(run_cli("sql", "select session_id, status from chain_status", "--format", "json", env=env).stdout)
    return {r["session_id"]: r["status"] for r in rows}


def test_fixtures_import_with_counts_equal_to_the_sources_and_reimport_adds_nothing(tmp_path):
    env = cli_env(tmp_path / "home")
    expected = count_sources(sorted(FIXTURES.iterdir()))
    assert len(expected) == 5 and sum(c["commands"] for c in expected.values()) == 19  # 15 shell + 4 apply_patch
    first = import_json(env, "codex-rollout", str(FIXTURES), "--otel", str(FIXTURES))
    assert first["totals"]["files"] == 7 and first["totals"]["events_added"] > 0
    run_cli("ingest", env=env)
    assert as_source_counts(warehouse_counts(env)) == expected
    # the same files again, by either command: nothing new reaches the transport
    again = import_json(env, "otel", str(FIXTURES), "--rollout", str(FIXTURES))
    assert again["totals"]["events_added"] == 0
    assert {f["status"] for f in again["files"]} == {"unchanged"}
    run_cli("ingest", env=env)
    assert as_source_counts(warehouse_counts(env)) == expected
    assert set(chain_status(env).values()) == {"ok"}  # ended (idle), every event chained
    dead = json.loads(run_cli("sql", "select count(*) n from dead_letters", "--format", "json", env=env).stdout)
    assert dead[0]["n"] == 0
    counts = reverify_from_warehouse(str(tmp_path / "home" / "warehouse.duckdb"))
    assert counts == {sid: sum(k.values()) for sid, k in warehouse_counts(env).items()}
    results = verify(env, 5)["results"]
    assert {r["status"] for r in results} == {"ok"} and sum(r["events"] for r in results) == sum(counts.values())


def test_session_started_carries_policies_git_and_the_codex_session_id(tmp_path):
    env = cli_env(tmp_path / "home")
    import_json(env, "codex-rollout", str(ROLLOUT_A), str(ROLLOUT_B), str(ROLLOUT_C))
    run_cli("ingest", env=env)
    rows = json.loads(run_cli("sql", "select session_id, session_started from events where kind = 'session_started' "
                              "order by 1", "--format", "json", env=env).stdout)
    st = {r["session_id"]: r["session_started"] for r in rows}
    a = st["0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6b"]
    assert (a["agent"], a["agent_version"], a["cwd"], a["sandbox_mode"], a["approval_policy"], a["model"],
            a["originator"]) == ("codex", "0.46.0", "/home/dev/proj-a", "workspace_write", "on_request", "gpt-5-codex", "cli")
    assert a["writable_roots"] == ["/home/dev/proj-a"] and a["network_policy"]["mode"] == "disabled"
    assert a["git"] == {"commit": "3f9c2a1d7e5b4c6a8d0e2f4a6c8e0b2d4f6a8c0e", "branch": "main",
                        "repository_url": "git@github.com:acme/proj-a.git"}
    b = st[SESSION_B]
    assert (b["sandbox_mode"], b["approval_policy"], b["originator"]) == ("read_only", "untrusted", "vscode")
    assert b["network_policy"] == {"mode": "allowlist", "allowed_domains": ["pypi.org", "files.pythonhosted.org"],
                                   "denied_domains": ["pastebin.com"]}
    c = st["5973b6c0-94b8-487b-a530-2aeb6098ae0e"]  # legacy layout: no turn context, git from the first line
    assert c["git"]["branch"] == "feature/x" and c["sandbox_mode"] == "unknown"


def test_commands_escalations_denials_and_links(tmp_path):
    env = cli_env(tmp_path / "home")
    import_json(env, "codex-rollout", str(ROLLOUT_A), str(ROLLOUT_B))
    run_cli("ingest", env=env)

    def q(sql):
        return json.loads(run_cli("sql", sql, "--format", "json", env=env).stdout)

    fin = {r["tool_call_id"]: r for r in q("select tool_call_id, turn_id, command_finished from events "
                                           "where kind = 'command_finished'")}
    assert fin["call_A1"]["command_finished"]["exit_code"] == 0
    assert fin["call_A1"]["command_finished"]["duration_ms"] == 30
    assert fin["call_A5"]["command_finished"]["status"] == "declined"
    assert fin["call_B2"]["command_finished"]["status"] == "declined"
    assert fin["call_B1"]["command_finished"]["duration_ms"] == 1420  # exec_command_end wins over the text output
    assert fin["call_B1"]["command_finished"]["stdout"]["excerpt"].endswith("12 passed in 1.31s\n")
    assert fin["call_B1"]["turn_id"] == "turn-1" and fin["call_B6"]["turn_id"] == "turn-2"
    started = {r["tool_call_id"]: r["command_started"] for r in q("select tool_call_id, command_started from events "
                                                                   "where kind = 'command_started'")}
    assert started["call_A1"]["argv"] == ["bash", "-lc", "ls -la"] and started["call_A1"]["shell"] == "ls -la"
    assert started["call_B1"]["argv"] == ["pytest", "-q", "tests/test_api.py"]
    assert started["call_A2"]["escalated"] is True and started["call_A1"]["escalated"] is False
    req = {r["tool_call_id"]: r["approval_requested"] for r in q("select tool_call_id, approval_requested from events "
                                                                  "where kind = 'approval_requested'")}
    assert req["call_A2"]["justification"].startswith("Need network access")
    assert req["call_B2"]["risk"] == "medium" and req["net-appr-1"]["action_kind"] == "network"
    dec = {r["tool_call_id"]: r["approval_decided"] for r in q("select tool_call_id, approval_decided from events "
                                                                "where kind = 'approval_decided'")}
    assert (dec["call_A5"]["decision"], dec["call_A5"]["decided_by"]) == ("denied", "user")
    assert (dec["call_B2"]["decision"], dec["call_B2"]["decided_by"]) == ("denied", "reviewer")  # guardian
    assert dec["call_B2"]["latency_ms"] == 4640
    assert dec["call_B10"]["decision"] == "denied"  # declined patch: a decision, and no file event
    denied = q("select tool_call_id, sandbox_denied from events where kind = 'sandbox_denied' order by 1")
    assert [(r["tool_call_id"], r["sandbox_denied"]["operation"], r["sandbox_denied"]["inferred"]) for r in denied] == [
        ("call_A3", "file_write", True), ("call_B3", "network", True)]
    assert denied[0]["sandbox_denied"]["target"] == "/etc/hosts"
    files = q("select file_accessed.path p, file_accessed.operation o, file_accessed.new_path n from events "
              "where kind = 'file_accessed' and session_id like '0199%' order by 1")
    assert [(r["p"], r["o"], r["n"]) for r in files] == [
        ("/home/dev/proj-a/old/legacy.js", "delete", None), ("/home/dev/proj-a/src/a.js", "rename", "/home/dev/proj-a/src/b.js"),
        ("/home/dev/proj-a/src/index.js", "write", None), ("/home/dev/proj-a/src/util.js", "create", None)]
    assert not q("select 1 from events where tool_call_id in ('call_OLD', 'call_B10') and kind = 'file_accessed'")


@pytest.mark.parametrize("order", ["rollout-first", "otel-first", "together"])
def test_rollout_and_otel_of_one_session_make_one_chain_in_any_order(tmp_path, order):
    env = cli_env(tmp_path / "home")
    if order == "rollout-first":
        import_json(env, "codex-rollout", str(ROLLOUT_B))
        import_json(env, "otel", str(OTEL_B))
    elif order == "otel-first":
        import_json(env, "otel", str(OTEL_B))
        import_json(env, "codex-rollout", str(ROLLOUT_B))
    else:
        import_json(env, "codex-rollout", str(ROLLOUT_B), "--otel", str(OTEL_B))
    run_cli("ingest", env=env)
    expected = count_sources([ROLLOUT_B, OTEL_B])
    assert as_source_counts(warehouse_counts(env)) == expected
    rows = json.loads(run_cli("sql", f"select seq, kind, tool_call_id, occurred_at from events "
                              f"where session_id = '{SESSION_B}' order by seq", "--format", "json", env=env).stdout)
    assert [r["seq"] for r in rows] == list(range(len(rows)))  # gapless
    assert rows[0]["kind"] == "session_started" and sum(r["kind"] == "session_started" for r in rows) == 1
    # the declined command and its OTel denial for call_B2: one decision
    assert sum(1 for r in rows if r["kind"] == "approval_decided" and r["tool_call_id"] == "call_B2") == 1
    assert chain_status(env) == {SESSION_B: "ok"}
    if order == "together":  # merged by time: seq order is time order
        times = [r["occurred_at"] for r in rows]
        assert times == sorted(times)
    reverify_from_warehouse(str(tmp_path / "home" / "warehouse.duckdb"))
    verify(env, 1)


def _lines(p: Path) -> list[bytes]:
    return p.read_bytes().splitlines(keepends=True)


def test_a_growing_rollout_adds_only_the_new_part_and_waits_for_an_unterminated_line(tmp_path):
    lines = _lines(ROLLOUT_B)
    live = tmp_path / "sessions" / ROLLOUT_B.name
    live.parent.mkdir()
    live.write_bytes(b"".join(lines[:12]) + lines[12][:40])  # a line still being written
    env = cli_env(tmp_path / "home")
    r1 = import_json(env, "codex-rollout", str(live), "--keep-open")
    f1 = r1["files"][0]
    assert f1["counts"]["pending_tail_bytes"] == 40 and f1["to_offset"] == len(b"".join(lines[:12]))
    live.write_bytes(b"".join(lines[:25]))
    r2 = import_json(env, "codex-rollout", str(live), "--keep-open")
    assert r2["files"][0]["status"] == "grown" and r2["files"][0]["from_offset"] == f1["to_offset"]
    live.write_bytes(b"".join(lines))
    r3 = import_json(env, "codex-rollout", str(live), "--keep-open")
    assert r3["totals"]["events_added"] > 0
    r4 = import_json(env, "codex-rollout", str(live))  # nothing new; the idle session is ended
    assert r4["totals"]["kinds"] == {"session_ended": 1}
    # the same events, with the same ids, as a one-shot import of the finished file
    one = cli_env(tmp_path / "one")
    import_json(one, "codex-rollout", str(ROLLOUT_B))
    for e in (env, one):
        run_cli("ingest", env=e)
    ids = [json.loads(run_cli("sql", "select event_id, kind from events where kind <> 'session_ended' order by 1",
                              "--format", "json", env=e).stdout) for e in (env, one)]
    # 20 events + the two apply_patch calls as commands (started, finished) + the policy change of turn 2
    # + the rollout's coverage statement (extended history: no approval requests; issue 24)
    assert ids[0] == ids[1] and len(ids[0]) == 27
    assert set(chain_status(env).values()) == {"ok"}


def test_a_replaced_file_is_read_again_without_duplicating_facts(tmp_path):
    live = tmp_path / ROLLOUT_A.name
    shutil.copy(ROLLOUT_A, live)
    env = cli_env(tmp_path / "home")
    import_json(env, "codex-rollout", str(live))
    fresh = tmp_path / "restored.tmp"
    shutil.copy(ROLLOUT_A, fresh)
    fresh.replace(live)  # another file (new inode), same content: log rotation, restore from backup
    again = import_json(env, "codex-rollout", str(live))
    assert again["files"][0]["status"] == "rewritten" and again["totals"]["events_added"] == 0
    assert again["totals"]["already_recorded"] > 0


def messy_rollout(tmp_path: Path) -> tuple[Path, dict]:
    """Rollout A with garbage injected; returns the file and what was injected."""
    lines = _lines(ROLLOUT_A)
    bad = [
        b"this is not json at all\n",
        b'{"timestamp":"2025-09-14T10:02:30.000Z","type":"event_msg","payload":{"type":"agent_message","message":"caf\xe9 \xff"}}\n',
        b"[1, 2, 3]\n",
        b"\n",
        b'{"timestamp":"2025-09-14T10:02:40.000Z","type":"brand_new_record","payload":{"x":1}}\n',
        b'{"timestamp":"2025-09-14T10:02:41.000Z","type":"turn_context","payload":{"cwd":"/home/dev/proj-a","approval_policy":"on-request","sandbox_policy":{"type":"workspace-write"},"shiny_new_field":true}}\n',
        b'{"timestamp": "2025-09-14T10:02:42.0\n',  # a line cut short, then more lines
    ]
    out = lines[:6] + bad + lines[6:] + [b'{"timestamp":"2025-09-14T10:03:30.000Z","type":"event_msg","payl']
    p = tmp_path / ROLLOUT_A.name
    p.write_bytes(b"".join(out))
    return p, {"invalid_json": 2, "not_object": 1, "non_utf8": 1, "blank": 1, "unknown": {"brand_new_record": 1},
               "unknown_field": "turn_context.shiny_new_field", "tail": len(b'{"timestamp":"2025-09-14T10:03:30.000Z","type":"event_msg","payl')}


def test_garbage_is_counted_per_file_kept_with_line_numbers_and_shows_as_gaps(tmp_path):
    messy, injected = messy_rollout(tmp_path)
    env = cli_env(tmp_path / "home")
    rep = import_json(env, "codex-rollout", str(messy))
    c = rep["files"][0]["counts"]
    assert (c["invalid_json"], c["not_object"], c["non_utf8"], c["blank"]) == (
        injected["invalid_json"], injected["not_object"], injected["non_utf8"], injected["blank"])
    assert c["unknown_types"] == {"event_msg/collab_telepathy_update": 1, **injected["unknown"]}
    assert c["unknown_fields"] == {injected["unknown_field"]: 1}
    assert c["pending_tail_bytes"] == injected["tail"]
    assert sorted(r["line"] for r in rep["rejects"]) == [7, 9, 13]
    assert {r["reason"].split(":")[0] for r in rep["rejects"]} == {"invalid JSON", "JSON list, not an object"}
    run_cli("ingest", env=env)
    # the facts of the file are all there, and the unreadable lines are gaps in the session's timeline
    expected = count_sources([ROLLOUT_A])
    assert as_source_counts(warehouse_counts(env)) == expected
    gaps = json.loads(run_cli("sql", "select gap.gap_kind k, gap.reason r from events where kind = 'gap' "
                              "and gap.gap_kind <> 'not_observable' order by seq", "--format", "json", env=env).stdout)
    assert [g["k"] for g in gaps] == ["source_incomplete", "source_incomplete"]
    assert "line 7" in gaps[0]["r"] and "line 13" in gaps[1]["r"]
    assert set(chain_status(env).values()) == {"ok"}
    verify(env, 1)


def test_dry_run_records_and_remembers_nothing(tmp_path):
    env = cli_env(tmp_path / "home")
    rep = import_json(env, "codex-rollout", str(FIXTURES), "--dry-run")
    assert rep["dry_run"] and rep["totals"]["observations"] > 50 and rep["totals"]["events_added"] == 0
    assert not (tmp_path / "home" / "log").exists()
    assert import_json(env, "codex-rollout", str(FIXTURES))["totals"]["events_added"] > 0


def test_missing_paths_are_a_clear_error(tmp_path):
    proc = run_cli("import", "codex-rollout", str(tmp_path / "nope"), env=cli_env(tmp_path / "h"), check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr.lower() and "Traceback" not in proc.stderr


@pytest.mark.kafka
def test_import_through_kafka(tmp_path, bootstrap, topic):
    env = cli_env(tmp_path / "home", AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap, AGENTLEDGER_TOPIC=topic)
    import_json(env, "codex-rollout", str(FIXTURES), "--otel", str(FIXTURES))
    assert import_json(env, "otel", str(FIXTURES))["totals"]["events_added"] == 0
    run_cli("ingest", env=env)
    assert as_source_counts(warehouse_counts(env)) == count_sources(sorted(FIXTURES.iterdir()))
    assert set(chain_status(env).values()) == {"ok"}
    reverify_from_warehouse(str(tmp_path / "home" / "warehouse.duckdb"))
    verify(env, 5)


def test_settings_home_holds_the_state(tmp_path):
    env = cli_env(tmp_path / "home")
    import_json(env, "codex-rollout", str(ROLLOUT_C))
    s = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home")})
    assert (s.home / "state" / "producers.db").exists()


def test_imported_sessions_carry_signed_checkpoints_and_no_secret_in_clear(tmp_path):
    """Issue 3's producer guarantees hold for imports: redaction before encoding, signed checkpoints
    every N events (counted across runs) and at the end; `verify --require-signatures` accepts them."""
    secret = "ghp_" + "Ab3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5"
    live = tmp_path / ROLLOUT_B.name
    live.write_bytes(ROLLOUT_B.read_bytes().replace(b"pytest -q tests/test_api.py",
                                                    f"GITHUB_TOKEN={secret} pytest -q tests/test_api.py".encode()))
    env = cli_env(tmp_path / "home", AGENTLEDGER_CHECKPOINT_EVERY="7")
    run_cli("keys", "generate", env=env)
    lines = _lines(live)
    part = tmp_path / "part" / live.name
    part.parent.mkdir()
    part.write_bytes(b"".join(lines[:15]))
    import_json(env, "codex-rollout", str(part), "--keep-open")
    part.write_bytes(b"".join(lines))
    import_json(env, "codex-rollout", str(part))
    run_cli("ingest", env=env)
    out = json.loads(run_cli("verify", "--require-signatures", "--format", "json", env=env).stdout)
    assert out["ok"] and out["results"][0]["signed"] and out["results"][0]["status"] == "ok"
    rows = q_all(env, "select seq, kind, checkpoint from events order by seq")
    ckpts = [r for r in rows if r["kind"] == "checkpoint"]
    assert ckpts[-1]["checkpoint"]["final"] and rows[-1]["kind"] == "checkpoint" and rows[-2]["kind"] == "session_ended"
    # every 7 events, across the two imports (gaps -- here the coverage statements -- are not counted)
    between = [sum(1 for r in rows if a["seq"] < r["seq"] < b["seq"] and r["kind"] != "gap")
               for a, b in zip([{"seq": -1}] + ckpts[:-1], ckpts[:-1])]
    assert between and all(n == 7 for n in between)
    st = q_all(env, "select session_started from events where kind = 'session_started'")[0]["session_started"]
    assert st["checkpoint_key_id"] and st["recording_mode"] == "spool"
    dump = run_cli("sql", "select * from events", "--format", "json", env=env).stdout
    assert secret not in dump and "[SECRET:" in dump
    for seg in (tmp_path / "home" / "log").rglob("*.avro"):
        assert secret.encode() not in seg.read_bytes()


def q_all(env, sql):
    return json.loads(run_cli("sql", sql, "--format", "json", env=env).stdout)
