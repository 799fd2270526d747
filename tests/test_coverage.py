"""Issue 24, part 4: coverage statements (what each source cannot contain, `gap` events of kind
`not_observable`), the `coverage` view, coverage in the signed header of evidence bundles, and the
OCSF AI Agent Activity (6009) records of permission requests and tool uses.

Everything runs through the real CLI (importers, hook, ingest, export, verify-bundle) into a real
DuckDB warehouse in a temporary home."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, run_cli
from agentledger.replay.bundle import COVERAGE_KEY, HEADER_DIGEST_KEY, header_digest, parse_bundle
from agentledger.schemas import codec

CODEX = REPO / "tests" / "fixtures" / "codex"
LIMITED = next(CODEX.glob("rollout-*0199a1b2*.jsonl"))  # no exec_command_end / *_begin lines
EXTENDED = next(CODEX.glob("rollout-*019c2d3e*.jsonl"))  # extended history
OTEL_CLAUDE = next(CODEX.glob("otel-claude-code-*"))
LIMITED_SID = "0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6b"
EXTENDED_SID = "019c2d3e-4f50-7a6b-8c9d-0e1f2a3b4c5d"
CLAUDE = REPO / "tests" / "fixtures" / "claude-code" / "projects"
CLAUDE_SID = "7f3c9a2e-5b1d-4e8a-9c6f-2d4b8e1a3c5f"
CLAUDE_CHILD = f"{CLAUDE_SID}:agent-a3f9c2d1"
BUNDLE_V1 = REPO / "tests" / "fixtures" / "bundle-v1"


def imp(env, kind, *paths) -> dict:
    proc = run_cli("import", kind, *map(str, paths), "--format", "json", env=env)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def q(env, sql) -> list[dict]:
    return json.loads(run_cli("sql", sql, "--format", "json", env=env).stdout)


def statements(env) -> dict[tuple[str, str], list[str]]:
    """(session, producer source) -> the fields of its not_observable statements, from the events."""
    out: dict = {}
    for r in q(env, "select session_id s, producer.source src, gap.field f from events "
                    "where kind = 'gap' and gap.gap_kind = 'not_observable' order by 1, 2, 3"):
        out.setdefault((r["s"], r["src"]), []).append(r["f"])
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    home = tmp_path_factory.mktemp("coverage") / "home"
    env = cli_env(home)
    imp(env, "codex-rollout", LIMITED, EXTENDED)
    imp(env, "claude-code", CLAUDE)
    run_cli("ingest", env=env)
    return home, env


def test_each_source_states_what_it_cannot_contain_once_per_session(imported):
    _, env = imported
    st = statements(env)
    # a limited-mode rollout: no approval requests ever, and no user approvals or sure outcomes
    assert st[(LIMITED_SID, "codex_rollout")] == ["approval_decided:user", "approval_requested", "command_finished"]
    # extended history: only the approval requests are missing
    assert st[(EXTENDED_SID, "codex_rollout")] == ["approval_requested"]
    # Claude Code transcripts (recorded with producer source "unknown"), the sub-agent's session too
    for sid in (CLAUDE_SID, CLAUDE_CHILD):
        assert st[(sid, "unknown")] == ["approval_decided:user", "network_destination:web_search"]
    reasons = {r["f"]: r["r"] for r in q(env, "select gap.field f, gap.reason r from events where "
                                              f"session_id = '{LIMITED_SID}' and gap.gap_kind = 'not_observable'")}
    assert "limited" in reasons["command_finished"].lower() and "never writes approval requests" in reasons["approval_requested"]
    # statements are no losses: the sessions view counts only the other gaps
    gaps = {r["session_id"]: r["gaps"] for r in q(env, "select session_id, gaps from sessions")}
    assert gaps[LIMITED_SID] == 0 and gaps[EXTENDED_SID] == 0


def test_the_coverage_view_has_one_row_per_session_and_source(imported):
    _, env = imported
    rows = {(r["session_id"], r["source"]): r for r in q(env, "select * from coverage")}
    lim = rows[(LIMITED_SID, "codex_rollout")]
    assert lim["agent"] == "codex" and lim["cannot_show"] == ["approval_decided:user", "approval_requested",
                                                              "command_finished"]
    assert [s["field"] for s in lim["not_observable"]] == lim["cannot_show"]
    assert all(s["reason"] for s in lim["not_observable"])
    n = q(env, f"select count(*) n from events where session_id = '{LIMITED_SID}'")[0]["n"]
    assert lim["events"] == n and sum(lim["kinds"].values()) == n
    assert lim["kinds"]["command_started"] == lim["commands"] > 0 and lim["kinds"]["gap"] == 3
    assert lim["losses"] == 0 and lim["gaps"] == []
    claude = rows[(CLAUDE_SID, "unknown")]
    assert claude["agent"] == "claude-code" and claude["network_events"] > 0
    assert claude["cannot_show"] == ["approval_decided:user", "network_destination:web_search"]
    cols = [r["column_name"] for r in q(env, "select column_name from (describe coverage)")]
    doc = (REPO / "docs" / "warehouse.md").read_text()
    bullet = doc[doc.index("- `coverage` — "):].split("\n- ", 1)[0]
    assert cols and [c for c in cols if f"`{c}`" not in bullet] == [], cols  # every column documented


def test_a_losses_column_counts_the_unreadable_lines_of_a_source(tmp_path):
    env = cli_env(tmp_path / "home")
    broken = tmp_path / LIMITED.name
    lines = LIMITED.read_bytes().splitlines(keepends=True)
    broken.write_bytes(b"".join(lines[:3] + [b"{not json\n"] + lines[3:]))
    imp(env, "codex-rollout", broken)
    run_cli("ingest", env=env)
    row = q(env, f"select * from coverage where session_id = '{LIMITED_SID}'")[0]
    assert row["losses"] == 1 and row["gaps"][0]["gap_kind"] == "source_incomplete"
    assert "approval_requested" in row["cannot_show"]


def test_a_reimport_from_another_file_adds_no_statement_twice(imported, tmp_path):
    home, env = imported
    before = q(env, "select count(*) n from events where kind = 'gap'")[0]["n"]
    copy = tmp_path / "again"
    copy.mkdir()
    shutil.copy(LIMITED, copy / LIMITED.name)  # another file: read from the start, its facts known already
    shutil.copytree(CLAUDE, copy / "projects")
    assert imp(env, "codex-rollout", copy / LIMITED.name)["totals"]["events_added"] == 0
    assert imp(env, "claude-code", copy / "projects")["totals"]["events_added"] == 0
    run_cli("ingest", env=env)
    assert q(env, "select count(*) n from events where kind = 'gap'")[0]["n"] == before
    dup = q(env, "select session_id, producer.source s, gap.field f, count(*) n from events "
                 "where gap.gap_kind = 'not_observable' group by all having count(*) > 1")
    assert dup == []


def test_otel_and_the_hook_state_theirs(tmp_path):
    env = cli_env(tmp_path / "home")
    imp(env, "otel", OTEL_CLAUDE, next(CODEX.glob("otel-codex-0.98-*")))
    sid = "hook-coverage-1"
    env_hook = {**env, "AGENTLEDGER_HOOK_DAEMON": "0"}
    base = {"session_id": sid, "cwd": str(tmp_path), "transcript_path": str(tmp_path / "t.jsonl"),
            "permission_mode": "default"}
    for event in ({"hook_event_name": "SessionStart"},
                  {"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_use_id": "toolu_1",
                   "tool_input": {"command": "ls"}},
                  {"hook_event_name": "SessionStart", "source": "resume"}):
        proc = subprocess.run([sys.executable, "-m", "agentledger", "hook"], input=json.dumps({**base, **event}).encode(),
                              capture_output=True, env=env_hook, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr
    run_cli("ingest", env=env)
    st = statements(env)
    agents = {r["session_id"]: r["agent"] for r in q(env, "select session_id, agent from coverage where source = 'otel'")}
    want = {"claude-code": ["command_input:truncated_512"], "codex": ["approval_decided:command"]}
    assert sorted(set(agents.values())) == ["claude-code", "codex"]
    assert all(st[(s, "otel")] == want[a] for s, a in agents.items())
    assert st[(sid, "hook")] == ["subagents", "user_rejections"]  # once, though SessionStart came twice


@pytest.fixture(scope="module")
def bundle(imported, tmp_path_factory):
    home, env = imported
    out = tmp_path_factory.mktemp("bundle") / "limited.avro"
    run_cli("export", LIMITED_SID, "--out", str(out), "--source", "warehouse", env=env)
    return out, env


def verify(path, env, *extra) -> tuple[int, dict]:
    proc = run_cli("verify-bundle", str(path), "--format", "json", *extra, env=env, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _with_metadata(path, changes: dict, drop: tuple = ()) -> None:
    """Rewrite the header's metadata and recompute its digest (which needs no key)."""
    data = path.read_bytes()
    b = parse_bundle(data)
    meta = {k: v for k, v in b.header.metadata.items() if k not in ("avro.schema", "avro.codec") and k not in drop}
    meta.update(changes)
    full = {"avro.schema": b.header.schema_json, "avro.codec": b"null", **meta}
    meta[HEADER_DIGEST_KEY] = header_digest(full, b.header.sync).encode()
    path.write_bytes(codec.ocf_header(b.header.schema, b.header.sync, meta) + data[b.header.length:])


def test_a_bundle_carries_the_coverage_in_its_signed_header(bundle):
    out, env = bundle
    b = parse_bundle(out.read_bytes())
    assert b.header.meta("bundle") == "3"
    cov = json.loads(b.header.metadata[COVERAGE_KEY])
    src = {s["source"]: s for s in cov["sources"]}
    assert [s["field"] for s in src["codex_rollout"]["not_observable"]] == ["approval_decided:user",
                                                                          "approval_requested", "command_finished"]
    assert src["codex_rollout"]["losses"] == 0 and src["codex_rollout"]["events"] == len(b.spans)
    assert any(line.startswith("codex_rollout (codex): approval_requested -- ") for line in cov["cannot_prove"])
    rc, doc = verify(out, env, "--require-signature")
    # no signing key in this home: the events are unsigned, but the header is signed by the operator
    assert doc["provenance"]["status"] == "valid" and doc["coverage_in_header"] and doc["coverage"] == cov
    rc, doc = verify(out, env)
    assert rc == 0 and doc["ok"]
    text = run_cli("verify-bundle", str(out), env=env).stdout
    assert "this evidence cannot prove (from the header, signed by the log operator):" in text
    assert "approval_requested" in " ".join(text.split())
    # replay and import show it too
    html = out.parent / "session.html"
    assert "this evidence cannot prove" in run_cli("replay", str(out), "--source", "bundle", "--html", str(html),
                                                   env=env).stdout
    section = html.read_text().split("id='coverage'>", 1)[1].split("</section>", 1)[0]  # the static page too
    assert "This evidence cannot prove" in section and "approval_requested" in section
    other = cli_env(out.parent / "other-home")
    imported = run_cli("import", "bundle", str(out), env=other).stdout
    assert "this evidence cannot prove" in imported


def test_changing_the_coverage_in_the_header_fails_verification(bundle, tmp_path):
    out, env = bundle
    cov = json.loads(parse_bundle(out.read_bytes()).header.metadata[COVERAGE_KEY])
    fewer = json.loads(json.dumps(cov))
    fewer["sources"][0]["not_observable"] = fewer["sources"][0]["not_observable"][1:]
    fewer["cannot_prove"] = fewer["cannot_prove"][1:]
    raw = json.dumps(fewer, sort_keys=True, separators=(",", ":")).encode()

    t1 = tmp_path / "edited.avro"  # the summary edited, the digest recomputed: the operator's signature fails
    t1.write_bytes(out.read_bytes())
    _with_metadata(t1, {COVERAGE_KEY: raw})
    rc, doc = verify(t1, env)
    assert rc == 1 and not doc["ok"] and doc["provenance"]["status"] == "bad_header_signature", doc
    assert "coverage" in doc["problem"]

    t2 = tmp_path / "unsigned.avro"  # also without the signed provenance: the chained events disagree
    t2.write_bytes(out.read_bytes())
    _with_metadata(t2, {COVERAGE_KEY: raw}, drop=("agentledger.tree_head", "agentledger.inclusion",
                                                  "agentledger.header_signature", "agentledger.log_id"))
    rc, doc = verify(t2, env)
    assert rc == 1 and doc["verification"]["reason"] == "header_coverage", doc

    t3 = tmp_path / "removed.avro"  # the summary removed: the signed v2 header message no longer matches
    t3.write_bytes(out.read_bytes())
    _with_metadata(t3, {"agentledger.bundle": b"2"}, drop=(COVERAGE_KEY,))
    rc, doc = verify(t3, env)
    assert rc == 1 and doc["provenance"]["status"] == "bad_header_signature", doc

    t4 = tmp_path / "untouched.avro"  # (and an untouched copy verifies)
    t4.write_bytes(out.read_bytes())
    assert verify(t4, env)[0] == 0


def test_a_bundle_from_before_coverage_still_verifies(tmp_path):
    fx = tmp_path / "fx"
    shutil.copytree(BUNDLE_V1, fx)
    for d in ("keys", "operator"):
        (fx / d).chmod(0o700)
        for f in (fx / d).iterdir():
            f.chmod(0o600)
    rc, doc = verify(fx / "session.avro", cli_env(tmp_path / "home"), "--public-key", str(fx / "keys"),
                     "--operator-key", str(fx / "operator"), "--require-signature")
    assert rc == 0 and doc["ok"] and doc["provenance"]["status"] == "valid", doc
    assert doc["coverage_in_header"] is False and doc["coverage"]["sources"]  # from the events, unsigned


def test_ocsf_ai_agent_activity_permission_requests_and_tool_uses(imported, tmp_path):
    _, env = imported
    plain = tmp_path / "plain.jsonl"
    run_cli("export", "ocsf", "--out", str(plain), env=env)
    assert not [ln for ln in plain.read_text().splitlines() if json.loads(ln)["class_uid"] == 6009]
    out = tmp_path / "ai.jsonl"
    res = json.loads(run_cli("export", "ocsf", "--out", str(out), "--ai-agent-activity", "--format", "json",
                             env=env).stdout)
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    ai = [r for r in recs if r["class_uid"] == 6009]
    assert res["ai_records"] == len(ai) > 0 and res["events"] == len(recs) - len(ai)
    for r in ai:
        assert r["category_uid"] == 6 and r["type_uid"] == 600900 + r["activity_id"]
        assert r["metadata"]["uid"].endswith("/ai") and r["metadata"]["correlation_uid"]
    perm = [r for r in ai if r["type_uid"] == 600906]
    tools = [r for r in ai if r["type_uid"] == 600907]
    n_req = q(env, "select count(*) n from events where kind in ('approval_requested', 'approval_decided')")[0]["n"]
    n_cmd = q(env, "select count(*) n from events where kind in ('command_started', 'command_finished')")[0]["n"]
    assert len(perm) == n_req and len(tools) == n_cmd
    assert {r["activity_name"] for r in perm} == {"Permission Request"}
    assert {r["activity_name"] for r in tools} == {"Tool Use"}
    # a decision: what, who decided, and the v4 fields
    denied = [r for r in perm if r["ai_agent_permission_request_info"].get("decision") == "denied"]
    assert denied and all(r["action"] == "Denied" and r["disposition"] == "Rejected" for r in denied)
    dec = q(env, "select tool_call_id t, approval_decided d from events where kind = 'approval_decided' "
                 "and approval_decided.scope is not null limit 1")[0]
    rec = next(r for r in perm if r.get("unmapped", {}).get("agentledger", {}).get("tool_call_id") == dec["t"]
               and r["ai_agent_permission_request_info"]["is_decided"])
    info = rec["ai_agent_permission_request_info"]
    assert info["decided_by"] == dec["d"]["decided_by"] and info["scope"] == dec["d"]["scope"]
    assert info["decision"] == dec["d"]["decision"] and info["subject"]
    # an MCP call: tool name, server, arguments digest, outcome
    mcp = q(env, "select command_id, server, tool, args_digest, outcome from mcp_calls where outcome <> 'pending' "
                 "and args_digest is not null limit 1")[0]
    started = next(r for r in tools if r["ai_agent_tool_use_info"]["ai_tool_input"].get("uid") == mcp["command_id"]
                   and r["ai_agent_tool_use_info"]["is_pre_occurrence"])
    finished = next(r for r in tools if r["ai_agent_tool_use_info"]["ai_tool_input"].get("uid") == mcp["command_id"]
                    and not r["ai_agent_tool_use_info"]["is_pre_occurrence"])
    s_info, f_info = started["ai_agent_tool_use_info"], finished["ai_agent_tool_use_info"]
    assert s_info["name"] == f"mcp__{mcp['server']}__{mcp['tool']}" and s_info["mcp_server"] == mcp["server"]
    assert s_info["ai_tool_input"]["arguments_digest"] == mcp["args_digest"]
    assert f_info["name"] == s_info["name"] and f_info["ai_tool_response"]["outcome"] == mcp["outcome"]
    shells = [r for r in tools if r["ai_agent_tool_use_info"]["name"] == "shell"
              and r["ai_agent_tool_use_info"]["is_pre_occurrence"]]
    assert shells and all(r["ai_agent_tool_use_info"]["ai_tool_input"].get("cmd_line") for r in shells)
