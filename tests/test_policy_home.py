"""`~` in a policy is the home of the session's user (issue 21 item 7): the recorded session's in
what-if and replay, the agent's (its HOME) in the live hook -- also when the warm hook server was
started by another client -- and, when a recorded session does not tell, any home (conservatively)."""

from __future__ import annotations

import json

from conftest import REPO, cli_env, run_cli
from agentledger.replay.whatif import recorded_home
from agentledger.schemas.policy import ANY_HOME, Policy
from test_hook import hook, start_server, stop_server

ROLLOUT_A = next((REPO / "tests" / "fixtures" / "codex").glob("rollout-*0199a1b2*.jsonl"))  # cwd /home/dev/proj-a
POLICY = """name = "home-rules"
[sandbox]
mode = "workspace_write"
writable_roots = ["~/proj-a", "~/cache"]
deny_read = ["~/.aws/**"]
"""


def test_tilde_is_the_home_given_and_an_unknown_home_is_decided_conservatively():
    p = Policy.from_toml(POLICY)
    assert p.evaluate_read("/home/dev/.aws/credentials", home="/home/dev").action == "deny"
    assert p.evaluate_read("/home/dev/.aws/credentials", home="/home/auditor").action == "allow"
    for path in ("/home/dev/.aws/credentials", "/Users/dev/.aws/config", "/root/.aws/x", "~/.aws/credentials"):
        d = p.evaluate_read(path, home=ANY_HOME)
        assert d.action == "deny" and "home unknown" in d.reason, path
    assert p.evaluate_read("/srv/app/.aws-not/x", home=ANY_HOME).action == "allow"
    assert p.evaluate_write("/home/dev/cache/x", "/w", home="/home/dev").allowed
    assert p.evaluate_write("~/cache/x", "/w", home="/home/dev").allowed
    assert not p.evaluate_write("/home/dev/cache/x", "/w", home=ANY_HOME).allowed  # grants nothing unknown
    assert p.roots("/w", "/home/dev") == ["/home/dev/proj-a", "/home/dev/cache"] and p.roots("/w", ANY_HOME) == []


def test_the_recorded_home_comes_from_the_working_directory_and_the_agents_user():
    assert recorded_home("/home/dev/src/x", None, "codex_rollout") == "/home/dev"
    assert recorded_home("/home/dev/src/x", "root", "codex_rollout") == "/home/dev"  # the importer's user
    assert recorded_home("/home/dev/src/x", "dev", "hook") == "/home/dev"
    assert recorded_home("/home/dev/src/x", "alice", "hook") is None  # someone else's home: not known
    assert recorded_home("/Users/ann/w", "ann", "sandbox") == "/Users/ann"
    assert recorded_home("/root/w", "root", "hook") == "/root"
    assert recorded_home("/work/repo", "dev", "hook") is None
    assert recorded_home(None, "dev", "hook") is None


def test_whatif_takes_tilde_as_the_recorded_sessions_home_not_the_replaying_users(tmp_path):
    env = cli_env(tmp_path / "home", HOME=str(tmp_path / "auditor"))
    run_cli("import", "codex-rollout", str(ROLLOUT_A), env=env)
    run_cli("ingest", env=env)
    policy = tmp_path / "p.toml"
    policy.write_text(POLICY)
    rep = json.loads(run_cli("whatif", "--policy", str(policy), "--format", "json", env=env).stdout)
    (session,) = rep["sessions"]
    # the session's writes in /home/dev/proj-a are inside ~/proj-a: nothing would have been blocked
    writes = [d for d in rep["divergences"] if d["kind"] == "file_write"]
    assert session["requests"] > 0 and writes == []
    assert session["home"] == "/home/dev" and not session["home_unknown"]


def test_the_warm_hook_server_takes_tilde_as_each_clients_home(tmp_path):
    home = tmp_path / "home"
    policy = tmp_path / "p.toml"
    policy.write_text(POLICY)
    client_home = tmp_path / "client"
    env = cli_env(home, AGENTLEDGER_HOOK_DAEMON="1", AGENTLEDGER_HOOK_DAEMON_IDLE="30",
                  AGENTLEDGER_POLICY=str(policy), HOME=str(client_home))
    start_server({**env, "HOME": str(tmp_path / "server")}, home)  # started by another client
    base = {"session_id": "h-1", "cwd": str(client_home / "proj-a"), "hook_event_name": "PreToolUse",
            "tool_name": "Read"}
    try:
        answers = [hook(env, {**base, "tool_use_id": f"t{i}", "tool_input": {"file_path": path}}, check_exit=0)
                   for i, path in enumerate((str(client_home / ".aws" / "credentials"), "~/.aws/config",
                                             str(tmp_path / "server" / ".aws" / "credentials")))]
    finally:
        stop_server(env, home)
    decisions = [json.loads(a.stdout)["hookSpecificOutput"]["permissionDecision"] if a.stdout else None
                 for a in answers]
    assert decisions == ["deny", "deny", None]
