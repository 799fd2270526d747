"""Codex / Claude Code sources written as a reviewer would from the format notes, exercising variants
the first fixtures do not (tests/fixtures/codex-unseen/make_fixtures.py writes them).

The expected counts are counted BY HAND from the fixture files (comments say how), not by a
helper: they are what an auditor would count reading the files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from conftest import REPO, cli_env, run_cli

UNSEEN = REPO / "tests" / "fixtures" / "codex-unseen"
CODEX_HOME = UNSEEN / "codex-home"
OTEL = UNSEEN / "otel"
U1 = "019d5e6f-7a8b-7c9d-8e0f-1a2b3c4d5e6f"  # recent Codex: BOM + CRLF, every new variant
U2 = "5e1f0c2a-8b3d-4e6f-9a7b-c1d2e3f4a5b6"  # older Codex: tag "mode", escalation flag, no final newline
U3 = "019da000-1111-7222-8333-444455556666"  # {meta, git} line, unknown future sandbox, odd shapes
U4 = "019dbbbb-2222-7333-8444-555566667777"  # only in the Codex OTel export (network + one decision)
CC = "7d3c2b1a-0f9e-4d8c-b7a6-95847362a1b0"  # Claude Code, collector file exporter

ROLLOUT_ONLY = {
    # U1 commands: function_call shell c1 c4 c5 c10 c11 c13 c15 c16, shell_command c2 c14, local_shell_call
    #   c3 and lsh_2 (no call_id: its id), exec_command_end without a call c6 = 13, + the apply_patch
    #   calls c7 and c9 (a patch is also a command: its text is what detection judges) = 15 (c_old is inside
    #   `compacted` and not a command of this import). Files: apply_patch c7 (Add, Update+Move,
    #   Delete, Update = 4, confirmed by its patch_apply_end), patch_apply_end c8 (3, externally
    #   tagged); c9 was declined = 0 -> 7. Decisions: declined c5, declined patch c9, guardian c10
    #   approved, c11 denied, c12 timed_out, g-net-1 aborted, g-mcp-1 approved (g-pending never
    #   decided) = 7, + turn t2 running under approval never / danger-full-access after t1's
    #   granular / external sandbox (a policy change: one granted permission request) = 8.
    U1: {"commands": 15, "files": 7, "decisions": 8, "network": 0},
    # U2 commands: shell c1 c2 c4 c5 c8 c9, exec_command c6 = 7 (c9's output is the last line, with
    #   no newline), + the apply_patch function call c3 = 8. Files: apply_patch function c3 (2) + shell ["apply_patch", …] c4 (1) = 3.
    #   Decisions: c2 "rejected by user" = 1.
    U2: {"commands": 8, "files": 3, "decisions": 1, "network": 0},
    # U3 commands: shell c1 (object arguments), c2 (arguments not JSON), exec_command_end c5 c6, apply_patch c4 = 5
    #   (web_fetch c3 is no shell tool). Files: c4 Update+Move = 1. Decisions: guardian c7 = 1.
    U3: {"commands": 5, "files": 1, "decisions": 1, "network": 0},
}
OTEL_ONLY = {
    # codex-otlp: tool_decision for c1 c5 c10 c14 c15 c17..c24 = 13 distinct calls; tool_result shell
    #   c1 and shell_command c25 = 2 commands, apply_patch c26 = 1 file; 6 policy decisions + the
    #   same one twice in one instant = 8.
    U1: {"commands": 2, "files": 1, "decisions": 13, "network": 8},
    U4: {"commands": 0, "files": 0, "decisions": 1, "network": 2},
    # claude-code: tool_decision toolu_A1 A2 A3 A4 A6 + one without tool_use_id = 6; tool_result
    #   Bash A1 A7 = 2 commands; Write A3 (success) = 1 file (Edit A6 failed, Read is no change).
    CC: {"commands": 2, "files": 1, "decisions": 6, "network": 0},
}
# Both together: U1's rollout and OTel share c1 (command + decision) and c5, c10 (decisions):
# commands 15 + c25 = 16, files 7 + c26 = 8, decisions 8 + 13 - {c5, c10} = 19, network 8.
TOGETHER = {**ROLLOUT_ONLY, **OTEL_ONLY, U1: {"commands": 16, "files": 8, "decisions": 19, "network": 8}}
KINDS = {"commands": "command_started", "files": "file_accessed", "decisions": "approval_decided",
         "network": "network_decided"}


def import_json(env, *args) -> dict:
    return json.loads(run_cli("import", *args, "--format", "json", env=env).stdout)


def q(env, sql):
    return json.loads(run_cli("sql", sql, "--format", "json", env=env).stdout)


def counts(env) -> dict:
    out: dict = {}
    for r in q(env, "select session_id, kind, count(*) n from events group by all"):
        out.setdefault(r["session_id"], {k: 0 for k in KINDS})
        for k, kind in KINDS.items():
            if r["kind"] == kind:
                out[r["session_id"]][k] = r["n"]
    return out


def verify(env, sessions: int) -> None:
    out = json.loads(run_cli("verify", "--format", "json", env=env).stdout)
    assert out["ok"] and out["broken"] == 0 and out["sessions"] == sessions, out
    assert {r["status"] for r in out["results"]} == {"ok"}


def test_unseen_codex_home_and_otel_load_with_hand_counted_facts(tmp_path):
    env = cli_env(tmp_path / "home")
    rep = import_json(env, "codex-rollout", str(CODEX_HOME), "--otel", str(OTEL))
    assert rep["totals"]["files"] == 5 and rep["totals"]["sessions"] == 5
    files = {Path(f["path"]).name: f["counts"] for f in rep["files"]}
    r1 = files[f"rollout-2026-03-14T08-00-00-{U1}.jsonl"]
    # the BOM line is read, the unknown is counted, the unterminated last line waits (not valid JSON)
    assert r1["invalid_json"] == 0 and r1["blank"] == 1 and r1["pending_tail_bytes"] == 83
    assert r1["unknown_types"] == {"event_msg/collab_quantum_update": 1, "telemetry_blob": 1,
                                   "response_item/hologram_call": 1}
    assert r1["unknown_fields"] == {"session_meta.future_meta_field": 1, "turn_context.new_turn_knob": 1}
    assert files[f"rollout-2025-11-02T17-45-10-{U2}.jsonl"]["pending_tail_bytes"] == 0  # a whole object
    r3 = files[f"rollout-2026-03-15T23-59-59-{U3}.jsonl"]
    assert r3["orphans"] == 1 and list(r3["unknown_values"]) == ["sandbox_policy={'type': 'quantum-isolation', 'level': 3}"]
    o1 = files["codex-otlp-0.121.json"]
    assert o1["records"] == 30 and o1["invalid_json"] == 0 and o1["unknown_types"] == {"codex.brand_new_event": 1}
    cc = files["claude-code-otlp.jsonl"]
    assert cc["records"] == 13 and cc["unknown_types"] == {} and cc["ignored"] == 4  # prompt, api, Read, failed Edit
    assert rep["rejects"] == []
    run_cli("ingest", env=env)
    assert counts(env) == TOGETHER
    # a re-import, by either command, adds nothing
    assert import_json(env, "otel", str(OTEL), "--rollout", str(CODEX_HOME))["totals"]["events_added"] == 0
    assert import_json(env, "codex-rollout", str(CODEX_HOME))["totals"]["events_added"] == 0
    run_cli("ingest", env=env)
    assert counts(env) == TOGETHER
    assert q(env, "select count(*) n from dead_letters")[0]["n"] == 0
    # no loss; only the coverage statements of the sources (what each cannot contain, issue 24)
    assert q(env, "select count(*) n from events where kind = 'gap' and gap.gap_kind <> 'not_observable'")[0]["n"] == 0
    verify(env, 5)


def test_each_source_alone_and_then_the_other(tmp_path):
    env = cli_env(tmp_path / "rollouts")
    import_json(env, "codex-rollout", str(CODEX_HOME))
    run_cli("ingest", env=env)
    assert counts(env) == ROLLOUT_ONLY
    verify(env, 3)
    import_json(env, "otel", str(OTEL))  # later, the OTel exports: the same sessions grow
    run_cli("ingest", env=env)
    assert counts(env) == TOGETHER
    verify(env, 5)
    seqs = q(env, f"select seq from events where session_id = '{U1}' order by seq")
    assert [r["seq"] for r in seqs] == list(range(len(seqs)))

    env = cli_env(tmp_path / "otel")
    import_json(env, "otel", str(OTEL))
    run_cli("ingest", env=env)
    assert counts(env) == OTEL_ONLY
    verify(env, 3)


def test_unseen_variants_map_to_the_right_values(tmp_path):
    env = cli_env(tmp_path / "home")
    import_json(env, "codex-rollout", str(CODEX_HOME), "--otel", str(OTEL))
    run_cli("ingest", env=env)
    st = {r["session_id"]: r["s"] for r in q(env, "select session_id, session_started s from events "
                                                  "where kind = 'session_started'")}
    # the first line came after a BOM: its meta (subagent source, git) is the session's
    assert (st[U1]["originator"], st[U1]["sandbox_mode"], st[U1]["approval_policy"], st[U1]["agent_version"]) == (
        "subagent", "external_sandbox", "granular", "0.121.0")
    assert st[U1]["git"]["branch"] == "fonctionnalité/ü" and st[U1]["cwd"] == "/home/dév/projet-ü"
    assert (st[U2]["sandbox_mode"], st[U2]["approval_policy"], st[U2]["network_policy"]["mode"]) == (
        "workspace_write", "on_failure", "enabled")
    assert st[U2]["writable_roots"] == ["/srv/app", "/tmp"] and "[SECRET:github_app_token:" in st[U2]["git"]["repository_url"]
    assert (st[U3]["originator"], st[U3]["sandbox_mode"], st[U3]["git"]["branch"]) == ("mcp", "unknown", "dev")
    assert st[CC]["agent"] == "claude-code"

    fin = {(r["session_id"], r["tool_call_id"]): r["f"] for r in q(env, "select session_id, tool_call_id, "
                                                                    "command_finished f from events where kind = 'command_finished'")}
    # exec_command_end durations: a number (ms), "0.5s", {secs, nanos}, a fractional string (s)
    assert fin[(U1, "c4")]["duration_ms"] == 1250 and fin[(U1, "c5")]["duration_ms"] == 500
    assert fin[(U1, "c6")]["duration_ms"] == 4 and fin[(U3, "c5")]["duration_ms"] == 1500
    assert (fin[(U1, "c5")]["status"], fin[(U1, "c5")]["exit_code"]) == ("declined", None)
    assert (fin[(U3, "c6")]["status"], fin[(U3, "c6")]["exit_code"]) == ("failed", None)
    assert fin[(U1, "c13")]["stdout"]["size"] > 100_000 and len(fin[(U1, "c13")]["stdout"]["excerpt"]) <= 2048
    assert fin[(U1, "c15")]["status"] == "completed"  # output without metadata
    assert fin[(U2, "c9")]["exit_code"] == 0  # the last line, without its newline
    assert fin[(U2, "c5")]["status"] == "failed" and fin[(U2, "c6")]["exit_code"] == 2
    assert fin[(CC, "toolu_A7")]["exit_code"] == 1
    assert (U1, "c16") not in fin  # interrupted: started, never finished

    started = {(r["session_id"], r["tool_call_id"]): r["s"] for r in q(env, "select session_id, tool_call_id, "
                                                                        "command_started s from events where kind = 'command_started'")}
    assert started[(U1, "c3")]["env_names"] == ["AWS_SECRET_ACCESS_KEY", "LANG"]  # names of local_shell_call env
    assert started[(U1, "lsh_2")]["argv"] == ["ls", "-la", "répertoire"]
    assert started[(U1, "c2")]["cwd"] == "/home/dév/projet-ü/données"  # relative workdir
    assert started[(U1, "c5")]["escalated"] and started[(U2, "c1")]["escalated"]

    files = {(r["tool_call_id"], r["p"]): (r["o"], r["n"]) for r in q(
        env, "select tool_call_id, file_accessed.path p, file_accessed.operation o, file_accessed.new_path n "
             "from events where kind = 'file_accessed'")}
    assert files[("c7", "/home/dév/projet-ü/src/ü.py")] == ("rename", "/home/dév/projet-ü/src/u.py")
    assert files[("c8", "/home/dév/projet-ü/docs/a.md")] == ("rename", "/home/dév/projet-ü/docs/b.md")
    assert files[("c4", "/srv/app/tmp/junk.txt")] == ("delete", None)  # apply_patch through the shell tool
    assert not [k for k in files if k[0] == "c9"]  # declined patch

    dec = {(r["session_id"], r["tool_call_id"]): (r["d"], r["b"]) for r in q(
        env, "select session_id, tool_call_id, approval_decided.decision d, approval_decided.decided_by b "
             "from events where kind = 'approval_decided'")}
    assert dec[(U1, "c10")] == ("approved", "reviewer") and dec[(U1, "c11")] == ("denied", "reviewer")
    assert dec[(U1, "c12")] == ("timed_out", "reviewer") and dec[(U1, "g-net-1")] == ("aborted", "reviewer")
    assert dec[(U1, "c15")] == ("approved_for_session", "user")  # acceptForSession
    assert dec[(U1, "c18")] == ("approved_for_session", "user") and dec[(U1, "c21")] == ("timed_out", "user")
    assert dec[(U1, "c22")] == ("aborted", "user") and dec[(U1, "c23")] == ("approved_for_session", "reviewer")
    assert dec[(U1, "c24")] == ("denied", "policy") and dec[(U4, "k1")] == ("denied", "policy")
    assert dec[(CC, "toolu_A2")] == ("denied", "user") and dec[(CC, "toolu_A4")] == ("aborted", "user")
    assert dec[(CC, "toolu_A3")] == ("approved", "user") and dec[(CC, "toolu_A6")] == ("approved", "hook")  # v4: a hook is its own decider
    net = q(env, f"select a.network_attempted.protocol p, a.network_attempted.port port, d.network_decided.decision d "
                 f"from events a join events d on d.kind = 'network_decided' and d.session_id = a.session_id "
                 f"and d.network_decided.attempt_id = a.network_attempted.attempt_id "
                 f"where a.kind = 'network_attempted' and a.session_id = '{U1}' order by a.occurred_at, a.seq")
    assert [(n["p"], n["port"], n["d"]) for n in net] == [
        ("https", 443, "allow"), ("http", 80, "deny"), ("socks5_tcp", 5432, "ask"), ("socks5_udp", 53, "deny"),
        ("https", 443, "deny"), ("http", 8080, "allow"), ("https", 443, "deny"), ("https", 443, "deny")]
    denied = {(r["session_id"], r["tool_call_id"]) for r in q(env, "select session_id, tool_call_id from events "
                                                                   "where kind = 'sandbox_denied'")}
    assert denied == {(U1, "c4"), (U2, "c8"), (U3, "c6"), (CC, "toolu_A7")}


def test_no_secret_of_the_sources_is_in_clear_anywhere(tmp_path):
    sys.path.insert(0, str(UNSEEN))
    try:
        import make_fixtures as fx
    finally:
        sys.path.remove(str(UNSEEN))
    secrets = [fx.GH, fx.AWS_ID, fx.AWS_SECRET, fx.OPENAI, fx.GHS, "Zq8Xw7Cv6Bn5Mm4Ll3Kk2Jj1"]
    sources = b"".join(p.read_bytes() for p in UNSEEN.rglob("*") if p.is_file() and p.suffix != ".py")
    assert all(s.encode() in sources for s in secrets)  # the fixtures do carry them
    env = cli_env(tmp_path / "home")
    import_json(env, "codex-rollout", str(CODEX_HOME), "--otel", str(OTEL))
    run_cli("ingest", env=env)
    dump = run_cli("sql", "select * from events", "--format", "json", env=env).stdout
    assert "[SECRET:" in dump
    for s in secrets:
        assert s not in dump
        for f in (tmp_path / "home").rglob("*"):
            if f.is_file():
                assert s.encode() not in f.read_bytes(), (s, f)


def test_a_complete_last_line_without_newline_is_read_now_a_cut_one_waits(tmp_path):
    src = next(CODEX_HOME.rglob(f"*{U2}.jsonl"))
    live = tmp_path / src.name
    data = src.read_bytes()
    assert not data.endswith(b"\n")
    cut = data[:data.rindex(b"\n") + 1] + data[data.rindex(b"\n") + 1:][:-5]
    live.write_bytes(cut)
    env = cli_env(tmp_path / "home")
    r1 = import_json(env, "codex-rollout", str(live), "--keep-open")
    assert r1["files"][0]["counts"]["pending_tail_bytes"] > 0
    live.write_bytes(data)
    r2 = import_json(env, "codex-rollout", str(live), "--keep-open")
    assert r2["files"][0]["counts"]["pending_tail_bytes"] == 0 and r2["totals"]["kinds"].get("command_finished") == 1
    live.write_bytes(data + b"\n")  # the writer finishes the line later: nothing new, nothing twice
    assert import_json(env, "codex-rollout", str(live), "--keep-open")["totals"]["events_added"] == 0
    run_cli("ingest", env=env)
    assert counts(env) == {U2: ROLLOUT_ONLY[U2]}


def test_a_codex_home_copied_elsewhere_is_the_same_sessions(tmp_path):
    """Importing the tree from another place (a backup) records nothing new: facts, not paths."""
    env = cli_env(tmp_path / "home")
    import_json(env, "codex-rollout", str(CODEX_HOME))
    copy = tmp_path / "backup"
    shutil.copytree(CODEX_HOME, copy)
    again = import_json(env, "codex-rollout", str(copy))
    assert again["totals"]["files"] == 3 and again["totals"]["events_added"] == 0


def test_a_secret_in_an_unusable_line_is_not_kept_in_clear(tmp_path):
    """Unusable lines are kept as excerpts (the import report, the producer state): redacted first."""
    sys.path.insert(0, str(UNSEEN))
    try:
        import make_fixtures as fx
    finally:
        sys.path.remove(str(UNSEEN))
    src = next(CODEX_HOME.rglob(f"*{U2}.jsonl"))
    broken = tmp_path / src.name
    lines = src.read_bytes().rstrip(b"\n").split(b"\n")
    junk = ('{"type": "event_msg", "payload": {"type": "agent_message", "message": "export GITHUB_TOKEN='
            + fx.GH + '"').encode()  # cut short: not JSON
    broken.write_bytes(b"\n".join([*lines[:3], junk, *lines[3:]]) + b"\n")
    env = cli_env(tmp_path / "home")
    report = import_json(env, "codex-rollout", str(broken))
    assert any("invalid JSON" in r["reason"] and "[SECRET:" in r["excerpt"] for r in report["rejects"])
    assert fx.GH not in json.dumps(report)
    for f in (tmp_path / "home").rglob("*"):
        if f.is_file():
            assert fx.GH.encode() not in f.read_bytes(), f
