"""Decision provenance (issue 24): realistic sessions imported and ingested, then the `decisions`
view, `agentledger why` (a real subprocess) and the console's "why: ..." line, for a human approval
for the session and a later identical command allowed by that grant, a config-rule allow, a hook
deny (agentledger's own, with its rule and policy file; another hook's, as Claude Code's OTel
states it), a Codex Guardian review, and actions no source decided (unknown)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, cli_env, run_cli
from test_agents_import import FIXTURES, OTEL_A, OTEL_B, ROLLOUT_A, ROLLOUT_B, ROLLOUT_C
from test_console import start_server

OTEL_CLAUDE = FIXTURES / "otel-claude-code-4c7b2e1a.json"
SID_A, SID_B, SID_C = "0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6b", "019c2d3e-4f50-7a6b-8c9d-0e1f2a3b4c5d", \
    "5973b6c0-94b8-487b-a530-2aeb6098ae0e"

# The same command again, later in session A, after the user approved `npm install left-pad` for the
# session (OTel: codex.tool_decision approved_for_session, source User): Codex does not ask again,
# and no source states a decision for it.
AGAIN = [
    {"timestamp": "2025-09-14T10:03:21.940Z", "type": "response_item",
     "payload": {"type": "function_call", "name": "shell", "call_id": "call_A6", "arguments": json.dumps(
         {"command": ["npm", "install", "left-pad"], "workdir": "/home/dev/proj-a", "timeout_ms": 300000})}},
    {"timestamp": "2025-09-14T10:03:21.960Z", "type": "response_item",
     "payload": {"type": "function_call_output", "call_id": "call_A6", "output": json.dumps(
         {"output": "\nup to date, audited 2 packages in 1s\n", "metadata": {"exit_code": 0, "duration_seconds": 1.1}})}},
]

POLICY = """name = "team"
[sandbox]
mode = "workspace_write"
writable_roots = ["$WORKSPACE", "/tmp"]
[approvals]
default = "allow"
[[approvals.rules]]
id = "no-force-delete"
decision = "forbidden"
prefix = ["rm", "-rf"]
"""


def sql(env, query: str) -> list[dict]:
    return json.loads(run_cli("sql", query, "--format", "json", env=env).stdout)


def actions(env, session: str) -> dict[str, dict]:
    """The session's decisions rows by tool call (the command's row when a call has several)."""
    rows = sql(env, f"select * from decisions where session_id = '{session}' order by seq")
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["tool_call_id"] or f"seq{r['seq']}", r)
    return out


def seq_of(env, session: str, kind: str, call: str) -> int:
    (row,) = sql(env, f"select seq from events where session_id = '{session}' and kind = '{kind}' "
                      f"and tool_call_id = '{call}'")
    return row["seq"]


def why(env, session: str, seq: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("why", session, str(seq), *args, env=env, check=check)


@pytest.fixture(scope="module")
def codex(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("decisions")
    src = d / "sessions"
    src.mkdir()
    lines = ROLLOUT_A.read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if '"task_complete"' in line)
    (src / ROLLOUT_A.name).write_text("\n".join([*lines[:end], *map(json.dumps, AGAIN), *lines[end:]]) + "\n")
    for f in (ROLLOUT_B, ROLLOUT_C):
        shutil.copy(f, src / f.name)
    otel = d / "otel"
    otel.mkdir()
    for f in (OTEL_A, OTEL_B, OTEL_CLAUDE):
        shutil.copy(f, otel / f.name)
    env = cli_env(d / "home")
    run_cli("import", "codex-rollout", str(src), "--otel", str(otel), env=env)
    run_cli("ingest", env=env)
    return {"env": env, "home": d / "home"}


def test_a_session_approval_then_the_same_command_allowed_by_that_grant(codex):
    env = codex["env"]
    a = actions(env, SID_A)
    granted = a["call_A2"]
    (step,) = granted["deciders"]
    assert (step["decided_by"], step["decision"], step["scope"], step["reported_as"], step["source"]) == (
        "user", "approved_for_session", "session", "user", "otel")
    assert step["seq"] == seq_of(env, SID_A, "approval_decided", "call_A2") and granted["outcome"] == "allowed"

    again = a["call_A6"]
    assert (again["action_kind"], again["subject"], again["outcome"]) == ("command", "npm install left-pad", "allowed")
    (step,) = again["deciders"]
    assert (step["decided_by"], step["decision"], step["grant_request_id"], step["scope"], step["source"]) == (
        "grant", "approved", "call_A2", "session", "derived")
    assert step["seq"] == seq_of(env, SID_A, "approval_decided", "call_A2") < again["seq"]

    # `why` on the command's finish resolves to the command and names the grant and the event stating it
    fin = seq_of(env, SID_A, "command_finished", "call_A6")
    out = json.loads(why(env, SID_A[:8], fin, "--format", "json").stdout)
    assert out["asked_seq"] == fin and out["action"]["seq"] == again["seq"] and out["outcome"] == "allowed"
    assert [(d["decided_by"], d["grant_request_id"]) for d in out["deciders"]] == [("grant", "call_A2")]
    text = why(env, SID_A, fin).stdout
    assert "npm install left-pad" in text and "grant" in text and "call_A2" in text
    assert f"#{step['seq']}" in text and "derived" in text and "outcome: allowed" in text


def test_a_config_rule_allow_and_a_human_denial(codex):
    env = codex["env"]
    a = actions(env, SID_A)
    (step,) = a["call_A1"]["deciders"]
    assert (step["decided_by"], step["decision"], step["decider"], step["rule"], step["scope"], step["reported_as"]) == (
        "policy", "approved", "config", "tool shell", "once", "config")
    assert a["call_A1"]["outcome"] == "allowed"
    # approved by the config, then the sandbox refused the write: both steps, in order, denied at the end
    chain = a["call_A3"]["deciders"]
    assert [(d["step"], d["decided_by"], d["decision"]) for d in chain] == [
        (1, "policy", "approved"), (2, "sandbox", "denied")] and a["call_A3"]["outcome"] == "denied"
    assert chain[0]["seq"] < chain[1]["seq"]
    (step,) = a["call_A5"]["deciders"]  # declined in the rollout, denied by the User in OTel: one decision
    assert (step["decided_by"], step["decision"], step["reported_as"]) == ("user", "denied", "user")
    assert a["call_A5"]["outcome"] == "denied"
    assert len(sql(env, f"select 1 from events where session_id = '{SID_A}' and kind = 'approval_decided' "
                        "and tool_call_id = 'call_A5'")) == 1
    # the patch no source decided: the session's approval mode, marked derived
    (step,) = a["call_A4"]["deciders"]
    assert (step["decided_by"], step["source"], step["seq"]) == ("policy", "derived", 0)
    assert "on_request" in step["rule"]


def test_a_guardian_review(codex):
    env = codex["env"]
    b = actions(env, SID_B)
    (step,) = b["call_B2"]["deciders"]
    assert (step["decided_by"], step["decision"], step["decider"], step["reported_as"], step["source"]) == (
        "reviewer", "denied", "guardian", "guardian_assessment", "codex_rollout")
    assert step["latency_ms"] == 4640 and step["rule"].startswith("guardian: ") and b["call_B2"]["outcome"] == "denied"
    text = why(env, SID_B, b["call_B2"]["seq"]).stdout
    assert "reviewer (guardian) denied" in text and "4640 ms" in text and "outcome: denied" in text


def test_actions_no_source_decided_are_unknown(codex):
    env = codex["env"]
    c = actions(env, SID_C)
    (step,) = c["call_C1"]["deciders"]
    assert (step["decided_by"], step["decision"], step["source"], step["seq"]) == ("unknown", "unknown", "derived", None)
    assert step["rule"] == "not recorded by any source" and c["call_C1"]["outcome"] == "unknown"
    assert "not recorded by any source" in why(env, SID_C, c["call_C1"]["seq"]).stdout


def test_claude_code_otel_sources_hook_and_permanent_user_approval(codex):
    env = codex["env"]
    rows = sql(env, "select seq, tool_call_id, deciders from decisions where session_id like '4c7b2e1a%'")
    by = {r["tool_call_id"]: r["deciders"] for r in rows}
    (hooked,) = by["toolu_06"]
    assert (hooked["decided_by"], hooked["reported_as"]) == ("hook", "hook")
    (temporary,) = by["toolu_03"]
    assert (temporary["decided_by"], temporary["scope"], temporary["reported_as"]) == ("user", "once", "user_temporary")
    permanent = [d for ds in by.values() for d in ds if d["reported_as"] == "user_permanent"]
    assert [(d["decided_by"], d["scope"]) for d in permanent] == [("user", "persistent")]


def test_why_refuses_an_unknown_session_or_seq(codex):
    env = codex["env"]
    for args in (("no-such-session-id", "3"), (SID_A, "9999"), (SID_A, "0")):
        proc = run_cli("why", *args, env=env, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error:" in proc.stderr, proc


def hook(env, payload, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentledger", "hook", *args], input=json.dumps(payload).encode(),
                          capture_output=True, env={"AGENTLEDGER_HOOK_DAEMON": "0", **env}, cwd=REPO, timeout=120)


def test_our_hook_denial_names_its_rule_and_policy_file(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    env = cli_env(tmp_path / "home", AGENTLEDGER_POLICY=str(policy))
    base = {"session_id": "cc-why", "cwd": "/w", "permission_mode": "default", "transcript_path": "/h/.claude/x.jsonl"}
    hook(env, {**base, "hook_event_name": "SessionStart", "source": "startup"})
    ok = {**base, "hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_use_id": "toolu_ok",
          "tool_input": {"command": "pytest -q"}}
    assert hook(env, ok).returncode == 0
    hook(env, {**ok, "hook_event_name": "PostToolUse", "tool_response": {"stdout": "1 passed", "stderr": ""}})
    denied = hook(env, {**base, "hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_use_id": "toolu_rm",
                        "tool_input": {"command": "rm -rf /var/lib/app"}})
    assert json.loads(denied.stdout)["hookSpecificOutput"]["permissionDecision"] == "deny"
    run_cli("ingest", env=env)

    rows = {r["tool_call_id"]: r for r in sql(env, "select * from decisions where session_id = 'cc-why'")}
    rm = rows["toolu_rm"]  # denied before it ran: no command event, the request is the action
    assert (rm["action_kind"], rm["subject"], rm["outcome"]) == ("command", "rm -rf /var/lib/app", "denied")
    (step,) = rm["deciders"]
    assert (step["decided_by"], step["decision"], step["rule"], step["scope"], step["source"]) == (
        "policy", "denied", "no-force-delete", "once", "hook")
    assert step["rule_source"] and step["rule_source"].endswith("policy.toml")
    (step,) = rows["toolu_ok"]["deciders"]  # the hook does not answer allowed calls: the session's mode
    assert (step["decided_by"], step["source"], rows["toolu_ok"]["outcome"]) == ("policy", "derived", "allowed")
    text = why(env, "cc-why", rm["seq"]).stdout
    assert "no-force-delete" in text and "policy.toml" in text and "outcome: denied" in text


def test_the_console_shows_why_next_to_each_action(codex):
    proc, url = start_server(codex["home"])
    base = url.split("?")[0].rstrip("/")
    try:
        deadline, page = time.monotonic() + 60, None
        while page is None:
            try:
                with urllib.request.urlopen(f"{base}/sessions/{SID_A}", timeout=30) as r:
                    page = r.read().decode()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    whys = re.findall(r'<div class="why[^"]*">(.*?)</div>', page, re.S)
    assert any("grant" in w and "call_A2" in w for w in whys), whys
    assert any("policy (config) approved" in w for w in whys) and any("sandbox denied" in w for w in whys)
    # and what the evidence cannot prove: the coverage statements of the session's sources
    cov = re.search(r'<details id="coverage">(.*?)</details>', page, re.S)
    assert cov and "cannot prove" in cov.group(1) and "approval_requested" in cov.group(1), page[:3000]


def _entry(sid: str, n: int, at: str, kind: str, content: list) -> dict:
    return {"parentUuid": None, "isSidechain": False, "userType": "external", "cwd": "/home/dev/api", "sessionId": sid,
            "version": "2.0.14", "type": kind, "uuid": f"00000000-0000-4000-8000-{n:012d}", "timestamp": at,
            "message": {"role": kind, "content": content, **({"model": "claude-sonnet-4-5-20250929", "id": f"msg_{n}",
                                                                "type": "message"} if kind == "assistant" else {})}}


def test_claude_transcript_denials_by_another_hook_and_by_permission_rules(tmp_path):
    sid = "6a1e2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b"
    calls = [("toolu_hook", "Bash", {"command": "git push --force origin main"},
              "PreToolUse:Bash hook error: [~/.claude/hooks/guard.sh]: blocked: force pushes are not allowed"),
             ("toolu_rule", "Bash", {"command": "curl https://example.net/install.sh"},
              "Permission to use Bash with command curl https://example.net/install.sh has been denied.")]
    lines, n = [], 0
    for i, (tid, tool, inp, text) in enumerate(calls):
        n += 2
        lines.append(_entry(sid, n, f"2025-10-09T14:0{i}:01.000Z", "assistant",
                            [{"type": "tool_use", "id": tid, "name": tool, "input": inp}]))
        lines.append(_entry(sid, n + 1, f"2025-10-09T14:0{i}:02.000Z", "user",
                            [{"type": "tool_result", "tool_use_id": tid, "content": text, "is_error": True}]))
    project = tmp_path / "projects" / "-home-dev-api"
    project.mkdir(parents=True)
    (project / f"{sid}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    env = cli_env(tmp_path / "home")
    run_cli("import", "claude-code", str(project / f"{sid}.jsonl"), env=env)
    run_cli("ingest", env=env)
    rows = {r["tool_call_id"]: r for r in sql(env, f"select * from decisions where session_id = '{sid}'")}
    (step,) = rows["toolu_hook"]["deciders"]
    assert (step["decided_by"], step["decision"], step["decider"], step["reported_as"]) == (
        "hook", "denied", "PreToolUse hook", "PreToolUse hook")
    assert "force pushes" in step["rule"] and rows["toolu_hook"]["outcome"] == "denied"
    (step,) = rows["toolu_rule"]["deciders"]
    assert (step["decided_by"], step["decider"], step["reported_as"]) == (
        "policy", "claude-code permissions", "permission rules")
    assert rows["toolu_rule"]["subject"] == "curl https://example.net/install.sh"


# --- which configured rule: matched against the settings the session recorded (producers/permrules.py) ---

def test_permission_rules_match_as_the_agents_match_them():
    from agentledger.producers.permrules import Call, decide, rules_from_surface

    settings = json.dumps({"permissions": {
        "allow": ["Bash(npm test:*)", "Bash(git status)", "Read(./src/**)", "Edit(/docs/*.md)", "WebFetch(domain:*.python.org)",
                  "mcp__github__get_issue", "mcp__docs"],
        "ask": ["Bash(git push:*)"],
        "deny": ["Bash(curl:*)", "Read(~/.ssh/**)", "mcp__github__delete_repo"]}})
    codex = 'prefix_rule(pattern = ["cargo", ["build", "test"]], decision = "allow")\n' \
            'prefix_rule(pattern = ["rm"], decision = "forbidden")\n'
    rules = rules_from_surface([
        {"path": "/w/.claude/settings.json", "role": "agent_config", "content": settings},
        {"path": "~/.codex/rules/default.rules", "role": "exec_rules", "content": codex},
        {"path": "/w/CLAUDE.md", "role": "instructions", "content": '{"permissions": {"allow": ["Bash"]}}'}])

    def rule(call):
        r = decide(rules, call)
        return (r.behaviour, r.text) if r else None

    bash = lambda c: Call("Bash", command=c, argv=tuple(c.split()), cwd="/w")  # noqa: E731
    assert rule(bash("npm test -- -q")) == ("allow", "Bash(npm test:*)")
    assert rule(bash("git status")) == ("allow", "Bash(git status)")
    assert rule(bash("git status --short")) is None  # exact rules match exactly
    assert rule(bash("npm test && curl http://x")) == ("deny", "Bash(curl:*)")  # any part denied: denied
    assert rule(bash("npm test && git status")) == ("allow", "Bash(npm test:*)")  # every part allowed
    assert rule(bash("npm test && make")) is None  # one part no rule allows: the agent asks
    assert rule(bash("git push origin main")) == ("ask", "Bash(git push:*)")
    assert rule(Call("Read", path="src/app/main.py", cwd="/w")) == ("allow", "Read(./src/**)")
    assert rule(Call("Read", path="/w/secrets.txt", cwd="/w")) is None
    assert rule(Call("Read", path="/home/u/.ssh/id_rsa", cwd="/w", home="/home/u")) == ("deny", "Read(~/.ssh/**)")
    assert rule(Call("Edit", path="/w/docs/guide.md", cwd="/w/src")) == ("allow", "Edit(/docs/*.md)")
    assert rule(Call("Edit", path="/w/docs/deep/guide.md", cwd="/w")) is None
    assert rule(Call("WebFetch", host="docs.python.org")) == ("allow", "WebFetch(domain:*.python.org)")
    assert rule(Call("WebFetch", host="python.org.evil.example")) is None
    assert rule(Call("mcp__github__get_issue")) == ("allow", "mcp__github__get_issue")
    assert rule(Call("mcp__github__delete_repo")) == ("deny", "mcp__github__delete_repo")
    assert rule(Call("mcp__docs__search")) == ("allow", "mcp__docs")
    assert rule(Call("mcp__other__x")) is None
    # Codex exec rules, against the argv (a [bash, -lc, cmd] wrapper is split first)
    assert rule(Call("Bash", argv=("cargo", "test"))) == ("allow", rules[-2].text)
    assert rule(Call("Bash", command="rm -rf target", argv=("bash", "-lc", "rm -rf target")))[0] == "deny"
    assert rule(Call("Bash", argv=("cargo", "publish"))) is None
    # a hostile rule costs what any rule does: a regular expression of many `.*` would backtrack for ages here
    import time as _time

    evil = rules_from_surface([{"path": "/w/.claude/settings.json", "content": json.dumps({"permissions": {
        "deny": ["Bash(" + "a*" * 15 + "b)", "Read(" + "*a" * 15 + "/b)"]}})},
        {"path": "/w/.codex/rules/x.rules", "content": "prefix_rule(" * 30000}])
    t0 = _time.monotonic()
    assert decide(evil, Call("Bash", command="a" * 5000, argv=("a" * 5000,), cwd="/w")) is None
    assert decide(evil, Call("Read", path="/" + "a" * 5000, cwd="/w")) is None
    assert _time.monotonic() - t0 < 5
    # hostile text never raises
    assert rules_from_surface([{"path": "/w/.claude/settings.json", "content": "{" * 100000},
                               {"path": "/w/.codex/rules/x.rules", "content": "prefix_rule(pattern = [[[" * 1000}]) == []


def test_why_names_the_settings_rule_that_allowed_a_call_no_source_decided(tmp_path):
    """A Claude Code session through the hook: the repository's settings allow `npm test`; Claude
    Code runs it without asking and tells nobody why. `why` finds the rule in the settings the
    session recorded at its start, and says it is an inference."""
    env = cli_env(tmp_path / "home")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".claude").mkdir()
    (repo / ".claude" / "settings.json").write_text(json.dumps(
        {"permissions": {"allow": ["Bash(npm test:*)"], "deny": ["Bash(curl:*)"]}}))
    base = {"session_id": "cc-rule", "cwd": str(repo), "permission_mode": "default",
            "transcript_path": str(tmp_path / "t.jsonl")}
    hook(env, {**base, "hook_event_name": "SessionStart", "source": "startup"})
    for tid, cmd in (("toolu_t", "npm test -- -q"), ("toolu_m", "make lint")):
        pre = {**base, "hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_use_id": tid,
               "tool_input": {"command": cmd}}
        assert hook(env, pre).returncode == 0
        hook(env, {**pre, "hook_event_name": "PostToolUse", "tool_response": {"stdout": "ok", "stderr": ""}})
    run_cli("ingest", env=env)
    rows = {r["tool_call_id"]: r for r in sql(env, "select seq, tool_call_id from decisions where session_id = 'cc-rule'")}

    got = json.loads(run_cli("why", "cc-rule", str(rows["toolu_t"]["seq"]), "--format", "json", env=env).stdout)
    (step,) = got["deciders"]
    assert (step["decided_by"], step["decision"], step["rule"], step["source"]) == (
        "policy", "approved", "Bash(npm test:*)", "derived")
    assert step["rule_source"] == f"{repo}/.claude/settings.json" and "inferred" in step["inferred"]
    assert got["outcome"] == "allowed"
    text = run_cli("why", "cc-rule", str(rows["toolu_t"]["seq"]), env=env).stdout
    assert "Bash(npm test:*)" in text and "inferred from the recorded settings" in text
    # no rule allows `make lint`: the derived step stays the mode's, with no rule named
    other = json.loads(run_cli("why", "cc-rule", str(rows["toolu_m"]["seq"]), "--format", "json", env=env).stdout)
    assert not any(d.get("inferred") for d in other["deciders"]) and "on_request" in other["deciders"][0]["rule"]


def test_a_config_decision_from_otel_gets_the_settings_rule_named():
    """OTel's `claude_code.tool_decision source=config` says only "tool Bash" of its rule: `why` names
    the settings rule behind it, from the session's recorded control surface."""
    import duckdb

    from agentledger.api.decisions import _name_config_rules

    con = duckdb.connect()
    settings = json.dumps({"permissions": {"allow": ["Bash(npm test:*)"]}})
    con.execute("""CREATE TABLE events AS SELECT * FROM (VALUES
        ('s', 0, 'session_started', {'cwd': '/w', 'control_surface': [{'path': '/w/.claude/settings.json',
            'role': 'agent_config', 'content': ?}]},
         NULL::STRUCT(argv VARCHAR[], shell VARCHAR, cwd VARCHAR, sandbox_profile VARCHAR)),
        ('s', 1, 'command_started', NULL, {'argv': ['npm', 'test'], 'shell': 'npm test', 'cwd': '/w',
            'sandbox_profile': NULL})
        ) t(session_id, seq, kind, session_started, command_started)""", [settings])
    con.execute("ALTER TABLE events ADD COLUMN file_accessed STRUCT(path VARCHAR)")
    con.execute("ALTER TABLE events ADD COLUMN network_attempted STRUCT(host VARCHAR)")
    step = {"decided_by": "policy", "decision": "approved", "rule": "tool Bash", "rule_source": None,
            "reported_as": "config", "source": "otel"}
    _name_config_rules(con, "s", {"seq": 1, "action_kind": "command", "subject": "npm test"}, [step])
    assert (step["rule"], step["rule_source"]) == ("Bash(npm test:*)", "/w/.claude/settings.json") and step["inferred"]
