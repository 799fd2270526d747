"""MCP tool calls in Codex rollouts (issue 17): every shape the rollouts write them in becomes a
command with its `mcp` record and an outcome; malformed MCP items are skipped and counted with the
reason, never fatal; re-importing adds nothing; every chain verifies from the warehouse rows."""

from __future__ import annotations

import hashlib
import json

from conftest import cli_env, run_cli

SID = "019e0000-1111-7222-8333-444455556666"
TOKEN = "ghp_" + "Xq7Lm2Np9Rs4Tv6Wy8Za1Bc3De5Fg7Hj9Kk0"  # a made-up token of GitHub's format


def _line(ts: int, typ: str, payload: dict) -> str:
    return json.dumps({"timestamp": f"2026-11-20T09:00:{ts:02d}.000Z", "type": typ, "payload": payload})


def _digest(args) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(args, sort_keys=True, separators=(",", ":"),
                                                 ensure_ascii=False).encode()).hexdigest()


def rollout() -> str:
    item = lambda ts, p: _line(ts, "response_item", p)  # noqa: E731
    ev = lambda ts, p: _line(ts, "event_msg", p)  # noqa: E731
    lines = [
        _line(0, "session_meta", {"id": SID, "timestamp": "2026-11-20T09:00:00.000Z", "cwd": "/w", "cli_version": "0.130.0"}),
        _line(1, "turn_context", {"turn_id": "t1", "cwd": "/w", "approval_policy": "on-request",
                                  "sandbox_policy": {"type": "workspace-write"}, "model": "gpt-5.3-codex"}),
        # 1. <server>__<tool> function call, a result the server marked isError
        item(2, {"type": "function_call", "name": "github__get_issue", "call_id": "c1",
                 "arguments": json.dumps({"owner": "acme", "repo": "shop", "issue_number": 7})}),
        item(3, {"type": "function_call_output", "call_id": "c1",
                 "output": json.dumps({"content": [{"type": "text", "text": "Not Found"}], "isError": True})}),
        # 2. a function call with a namespace, refused by the user
        item(4, {"type": "function_call", "name": "delete_repository", "namespace": "mcp__github", "call_id": "c2",
                 "arguments": json.dumps({"owner": "acme", "repo": "shop"})}),
        item(5, {"type": "function_call_output", "call_id": "c2", "output": "user rejected MCP tool call"}),
        # 3. the begin/end events (extended history): an Err, then an Ok
        ev(6, {"type": "mcp_tool_call_begin", "call_id": "c3",
               "invocation": {"server": "postgres", "tool": "query", "arguments": {"sql": "select 1"}}}),
        item(6, {"type": "function_call", "name": "github__search_code", "call_id": "c10",
                 "arguments": json.dumps({"q": "deploy", "token": TOKEN})}),
        item(6, {"type": "function_call_output", "call_id": "c10",
                 "output": json.dumps({"content": [{"type": "text", "text": f"bad credentials: {TOKEN}"}], "isError": True})}),
        ev(7, {"type": "mcp_tool_call_end", "call_id": "c3", "duration": {"secs": 0, "nanos": 5000000},
               "invocation": {"server": "postgres", "tool": "query", "arguments": {"sql": "select 1"}},
               "result": {"Err": "connection refused"}}),
        ev(8, {"type": "mcp_tool_call_end", "call_id": "c4", "duration": {"secs": 1, "nanos": 0},
               "invocation": {"server": "fs", "tool": "read_file", "arguments": {"path": "/w/README.md"}},
               "result": {"Ok": {"content": [{"type": "text", "text": "# w"}], "isError": False}}}),
        ev(9, {"type": "mcp_tool_call_end", "call_id": "c5", "invocation": {"server": "fs", "tool": "write_file"},
               "result": {"Err": "user cancelled MCP tool call"}}),
        # 4. the newer response items
        item(10, {"type": "mcp_tool_call", "call_id": "c6", "server": "slack", "name": "post_message",
                  "arguments": json.dumps({"channel": "#dev", "text": "deployed"})}),
        item(11, {"type": "mcp_tool_call_output", "call_id": "c6", "output": "ok"}),
        # malformed: no call id, no server, invocation not an object, an empty tool name
        item(12, {"type": "mcp_tool_call", "name": "post_message", "server": "slack"}),
        item(13, {"type": "mcp_tool_call", "call_id": "c7", "name": "lonely"}),
        ev(14, {"type": "mcp_tool_call_begin", "call_id": "c8", "invocation": ["not", "an", "object"]}),
        ev(15, {"type": "mcp_tool_call_end", "call_id": "c9", "invocation": {"server": "fs", "tool": " "}, "result": {}}),
        item(16, {"type": "mcp_tool_call_output", "output": "no call id"}),
    ]
    return "\n".join(lines) + "\n"


def q(env, sql):
    return json.loads(run_cli("sql", sql, "--format", "json", env=env).stdout)


def test_codex_mcp_calls_every_shape(tmp_path):
    path = tmp_path / "sessions" / f"rollout-2026-11-20T09-00-00-{SID}.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(rollout())
    env = cli_env(tmp_path / "home")
    rep = json.loads(run_cli("import", "codex-rollout", str(path.parent), "--format", "json", env=env).stdout)
    (f,) = rep["files"]
    reasons = f["counts"]["unknown_values"]
    assert reasons == {"mcp_tool_call without call_id or name": 1, "mcp_tool_call without a server": 1,
                       "mcp_tool_call_begin without call_id, server or tool": 1,
                       "mcp_tool_call_end with an empty server or tool name": 1,
                       "mcp_tool_call_output without call_id": 1}, reasons
    assert f["counts"]["orphans"] == 0
    run_cli("ingest", env=env)
    calls = q(env, "select command_id, server, tool, args_digest, outcome, error from mcp_calls order by seq")
    got = {c["command_id"]: (c["server"], c["tool"], c["outcome"], c["error"]) for c in calls}
    assert got.pop("c10")[:3] == ("github", "search_code", "error")
    assert got == {
        "c1": ("github", "get_issue", "error", "Not Found"),
        "c2": ("github", "delete_repository", "declined", "user rejected MCP tool call"),
        "c3": ("postgres", "query", "error", "connection refused"),
        "c4": ("fs", "read_file", "ok", None),
        "c5": ("fs", "write_file", "declined", "user cancelled MCP tool call"),
        "c6": ("slack", "post_message", "ok", None),
    }
    # a secret in the arguments or the error is a token in the warehouse, never clear text
    (leak,) = q(env, "select arguments, error from mcp_calls where command_id = 'c10'")
    assert "[SECRET:" in leak["arguments"] and "[SECRET:" in leak["error"]
    dump = json.dumps(q(env, "select * from events"), default=str)
    assert TOKEN not in dump
    digests = {c["command_id"]: c["args_digest"] for c in calls}
    assert digests["c1"] == _digest({"owner": "acme", "repo": "shop", "issue_number": 7})
    assert digests["c3"] == _digest({"sql": "select 1"}) and digests["c5"] == _digest({})
    assert digests["c6"] == _digest({"channel": "#dev", "text": "deployed"})
    # a refused MCP call is a declined command with the user's denial, as a refused shell command
    dec = q(env, "select tool_call_id, approval_decided.decided_by d from events where kind = 'approval_decided'")
    assert sorted((r["tool_call_id"], r["d"]) for r in dec) == [("c2", "user"), ("c5", "user")]
    out = json.loads(run_cli("verify", "--format", "json", env=env).stdout)  # hashes re-checked from the rows
    assert out["ok"] and out["broken"] == 0 and out["sessions"] == 1, out
    again = json.loads(run_cli("import", "codex-rollout", str(path.parent), "--format", "json", env=env).stdout)
    assert again["totals"]["events_added"] == 0


GEMINI_SID = "7d2c1b0a-9e8f-4a6b-8c5d-4e3f2a1b0c9d"


def _gemini_record(ms: int, **attrs) -> dict:
    kv = [{"key": k, "value": ({"boolValue": v} if isinstance(v, bool) else {"intValue": str(v)} if isinstance(v, int)
                               else {"stringValue": v})} for k, v in attrs.items()]
    return {"timeUnixNano": str(ms * 1_000_000), "attributes": kv}


def test_gemini_cli_tool_calls_from_its_otel_logs(tmp_path):
    """Gemini CLI's telemetry (docs/cli/telemetry.md: gemini_cli.tool_call with function_name,
    function_args, success, decision, tool_type, mcp_server_name) through `import otel`: MCP calls
    with their mcp record and outcome, shell commands, a rejection as a declined call."""
    t0 = 1_764_000_000_000
    common = {"session.id": GEMINI_SID, "event.name": "gemini_cli.tool_call", "prompt_id": "p1"}
    recs = [
        _gemini_record(t0, **common, function_name="mcp_github_get_issue", tool_type="mcp", mcp_server_name="github",
                       function_args=json.dumps({"owner": "acme", "issue_number": 7}), duration_ms=120, success=True,
                       decision="auto_accept"),
        _gemini_record(t0 + 1000, **common, function_name="delete_repository", tool_type="mcp", mcp_server_name="github",
                       function_args=json.dumps({"repo": "shop"}), duration_ms=0, success=False, decision="reject"),
        _gemini_record(t0 + 2000, **common, function_name="query", tool_type="mcp", mcp_server_name="postgres",
                       function_args=json.dumps({"sql": "select 1"}), duration_ms=30, success=False,
                       error="connection refused", decision="accept"),
        _gemini_record(t0 + 3000, **common, function_name="run_shell_command", tool_type="native",
                       function_args=json.dumps({"command": "pytest -q", "directory": "/w"}), duration_ms=900,
                       success=True, decision="accept"),
        _gemini_record(t0 + 4000, **common, function_name="read_file", tool_type="native",
                       function_args=json.dumps({"absolute_path": "/w/README.md"}), duration_ms=3, success=True),
        _gemini_record(t0 + 5000, **common, tool_type="mcp", mcp_server_name="github"),  # no function_name
        _gemini_record(t0 + 6000, **{**common, "event.name": "gemini_cli.user_prompt"}, prompt_length=12),
    ]
    doc = {"resourceLogs": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "gemini-cli"}}]},
                             "scopeLogs": [{"scope": {"name": "gemini-cli"}, "logRecords": recs}]}]}
    path = tmp_path / "gemini-otel.json"
    path.write_text(json.dumps(doc))
    env = cli_env(tmp_path / "home")
    rep = json.loads(run_cli("import", "otel", str(path), "--format", "json", env=env).stdout)
    (f,) = rep["files"]
    assert f["counts"]["unknown_values"] == {"gemini_cli.tool_call without function_name": 1}, f["counts"]
    assert f["counts"]["unknown_types"] == {} and f["counts"]["ignored"] == 2  # read_file, the prompt
    run_cli("ingest", env=env)
    calls = q(env, "select session_id, server, tool, args_digest, outcome, error, agent from mcp_calls order by ts")
    assert [(c["server"], c["tool"], c["outcome"], c["error"]) for c in calls] == [
        ("github", "get_issue", "ok", None), ("github", "delete_repository", "declined", "rejected by the user"),
        ("postgres", "query", "error", "connection refused")]
    assert {c["session_id"] for c in calls} == {GEMINI_SID} and {c["agent"] for c in calls} == {"gemini-cli"}
    assert calls[0]["args_digest"] == _digest({"owner": "acme", "issue_number": 7})
    shell = q(env, "select command_started.argv a, command_started.cwd c from events where kind = 'command_started' "
                   "and command_started.mcp is null")
    assert shell == [{"a": ["pytest", "-q"], "c": "/w"}]
    dec = q(env, "select approval_decided.decision d, approval_decided.decided_by b from events where kind = 'approval_decided'")
    assert dec == [{"d": "denied", "b": "user"}]
    again = json.loads(run_cli("import", "otel", str(path), "--format", "json", env=env).stdout)
    assert again["totals"]["events_added"] == 0
