"""Redaction end to end through the hook and the Codex importer (issues 20 and 21): secrets in
commands, and ids that carry a secret (call ids, turn ids), reach neither the log, nor the
warehouse, nor the producer state in clear; a call's hook and rollout records still merge."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import REPO, cli_env, run_cli
from test_hook import hook, q

FIXTURES = REPO / "tests" / "fixtures" / "codex"
SID = "019c2d3e-4f50-7a6b-8c9d-0e1f2a3b4c5d"
GHP = "ghp_" + "Zq81mN0aB7cD4eF6gH2iJ9kL3mN5oP1qR7sT"
GLPAT = "glpat-" + "xq3Zr8TbW2mK9pL4vN7c"
AIZA = "AIza" + "SyD4kE8rT2mW6qZ1bN5xC9vH3jL7pQ0sU2y"
COMMANDS = {  # the commands of issue 21 that were stored in clear, and their secret
    "export PGPASSWORD=Pg5ecr3t!x && psql -h db app": "Pg5ecr3t!x",
    "curl -u admin:Adm1nPa55 https://ci.example.com/api/json": "Adm1nPa55",
    "mysql -h db -u root -pMy5qlRootPw app": "My5qlRootPw",
    f"git push https://oauth2:{GLPAT}@gitlab.com/acme/app.git": GLPAT,
    f"curl 'https://maps.googleapis.com/maps/api/geocode/json?key={AIZA}'": AIZA,
}


def codex_rollout(sid: str, commands: list[str]) -> str:
    """A Codex rollout whose only turn runs ``commands`` (shell_command calls, their exec end and output)."""
    t = "2026-02-03T14:20:{:02d}.000Z"
    lines = [{"timestamp": t.format(0), "type": "session_meta",
              "payload": {"id": sid, "timestamp": t.format(0), "cwd": "/w", "originator": "codex_cli_rs", "cli_version": "0.98.0"}},
             {"timestamp": t.format(1), "type": "turn_context",
              "payload": {"turn_id": "turn-1", "cwd": "/w", "approval_policy": "never", "sandbox_policy": {"type": "read-only"},
                          "model": "gpt-5.2-codex"}}]
    for i, cmd in enumerate(commands):
        call = f"call_R{i}"
        lines += [
            {"timestamp": t.format(2 + 3 * i), "type": "response_item",
             "payload": {"type": "function_call", "name": "shell_command", "call_id": call,
                         "arguments": json.dumps({"command": cmd, "workdir": "/w"})}},
            {"timestamp": t.format(3 + 3 * i), "type": "event_msg",
             "payload": {"type": "exec_command_end", "call_id": call, "turn_id": "turn-1", "command": ["/bin/bash", "-lc", cmd],
                         "cwd": "/w", "stdout": f"+ {cmd}\n", "stderr": "", "aggregated_output": f"+ {cmd}\n", "exit_code": 0,
                         "duration": {"secs": 0, "nanos": 5000000}, "status": "completed"}},
            {"timestamp": t.format(4 + 3 * i), "type": "response_item",
             "payload": {"type": "function_call_output", "call_id": call, "output": f"Exit code: 0\nOutput:\n+ {cmd}\n"}}]
    return "".join(json.dumps(x) + "\n" for x in lines)


def leaks(home: Path, env, secrets) -> dict[str, list[str]]:
    """Where any of ``secrets`` is in clear: log segments, warehouse rows, producer state."""
    found: dict[str, list[str]] = {}
    for seg in (home / "log").rglob("*"):
        if seg.is_file():
            data = seg.read_bytes()
            found.setdefault("log", []).extend(s for s in secrets if s.encode() in data)
    dump = run_cli("sql", "select * from events", "--format", "json", env=env).stdout
    found["warehouse"] = [s for s in secrets if s in dump]
    con = sqlite3.connect(home / "state" / "producers.db")
    try:
        state = "\n".join(con.iterdump())
    finally:
        con.close()
    found["state"] = [s for s in secrets if s in state]
    return {k: v for k, v in found.items() if v}


def test_secrets_in_commands_reach_no_log_warehouse_or_state_via_the_hook_or_the_importer(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home)
    base = {"session_id": "cc-redact", "cwd": "/w", "permission_mode": "default", "transcript_path": "/h/.claude/x.jsonl"}
    hook(env, {**base, "hook_event_name": "SessionStart", "source": "startup"}, check_exit=0)
    for i, cmd in enumerate(COMMANDS):
        call = {**base, "tool_name": "Bash", "tool_use_id": f"toolu_{i}", "tool_input": {"command": cmd}}
        hook(env, {**call, "hook_event_name": "PreToolUse"}, check_exit=0)
        hook(env, {**call, "hook_event_name": "PostToolUse",
                   "tool_response": {"stdout": f"ran: {cmd}", "stderr": "", "interrupted": False}}, check_exit=0)
    # the same commands in a Codex rollout (another session), as exec calls and in their output
    rollout = tmp_path / "rollout-2026-02-03T14-20-05-019c2d3e-0000-7000-8000-000000000001.jsonl"
    rollout.write_text(codex_rollout("019c2d3e-0000-7000-8000-000000000001", list(COMMANDS)))
    assert all(s in rollout.read_text() for s in COMMANDS.values())
    run_cli("import", "codex-rollout", str(rollout), env=env)
    run_cli("ingest", env=env)
    assert leaks(home, env, list(COMMANDS.values())) == {}
    rows = q(env, "select kind, redactions from events where kind = 'command_started'")
    detectors = {r["detector"] for row in rows for r in row["redactions"]}
    assert {"gitlab_pat", "gcp_api_key", "basic_auth", "password_flag", "password_assignment"} <= detectors, detectors


def test_ids_carrying_a_secret_are_tokens_everywhere_and_the_hook_and_rollout_records_of_a_call_merge(tmp_path):
    """Issue 20 item 7: a secret in call_id / tool_use_id / turn_id stays out of the envelope, the
    payload ids, the producer state (facts, open calls, files' context) and the log; the hook's and
    the importer's records of the call are still one fact."""
    home = tmp_path / "home"
    env = cli_env(home)
    call, turn = f"call_{GHP}", f"turn-{GLPAT}"
    src = next(FIXTURES.glob(f"rollout-*{SID}.jsonl")).read_text()
    src = src.replace('"call_B1"', json.dumps(call)).replace('"turn-1"', json.dumps(turn))
    rollout = tmp_path / f"rollout-2026-02-03T14-20-05-{SID}.jsonl"
    rollout.write_text(src)
    base = {"session_id": SID, "cwd": "/home/dev/proj-b", "permission_mode": "default", "model": "gpt-5.2-codex",
            "transcript_path": None, "turn_id": turn}
    cmd = {"command": "pytest -q tests/test_api.py"}
    hook(env, {**base, "hook_event_name": "SessionStart", "source": "startup"}, check_exit=0)
    hook(env, {**base, "hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_use_id": call, "tool_input": cmd},
         check_exit=0)
    # an open call is producer state: it must not hold the id in clear either
    assert "state" not in leaks_state_only(home, [GHP, GLPAT])
    hook(env, {**base, "hook_event_name": "PostToolUse", "tool_name": "Bash", "tool_use_id": call, "tool_input": cmd,
               "tool_response": "Exit code: 0\nWall time: 1.4 seconds\nOutput:\n12 passed in 1.31s\n"}, check_exit=0)
    rep = json.loads(run_cli("import", "codex-rollout", str(rollout), "--keep-open", "--format", "json", env=env).stdout)
    assert rep["totals"]["already_recorded"] >= 3  # session start, command start and finish of the call
    run_cli("ingest", env=env)
    assert leaks(home, env, [GHP, GLPAT]) == {}
    rows = q(env, f"select seq, kind, tool_call_id, turn_id, producer.source src, command_started.command_id cid, "
                  f"redactions from events where session_id = '{SID}' order by seq")
    started = [r for r in rows if r["kind"] == "command_started" and r["tool_call_id"] and "github_pat" in r["tool_call_id"]]
    assert len(started) == 1, [(r["kind"], r["tool_call_id"], r["src"]) for r in rows]
    token = started[0]["tool_call_id"]
    assert token.startswith("call_[SECRET:github_pat:") and started[0]["cid"] == token and started[0]["src"] == "hook"
    assert started[0]["turn_id"].startswith("turn-[SECRET:gitlab_pat:")
    assert {"tool_call_id", "turn_id", "payload.command_id"} <= {r["field"] for r in started[0]["redactions"]}
    # the rollout's events of the same call carry the same token
    assert {r["tool_call_id"] for r in rows if r["src"] == "codex_rollout" and r["tool_call_id"]
            and "github_pat" in r["tool_call_id"]} <= {token}
    assert [r["seq"] for r in rows] == list(range(len(rows)))


def leaks_state_only(home: Path, secrets) -> dict:
    con = sqlite3.connect(home / "state" / "producers.db")
    try:
        state = "\n".join(con.iterdump())
    finally:
        con.close()
    return {"state": [s for s in secrets if s in state]} if any(s in state for s in secrets) else {}
