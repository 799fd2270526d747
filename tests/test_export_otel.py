"""`agentledger export otel`: sessions as OpenTelemetry traces (GenAI semantic conventions) over
OTLP/HTTP, received by a real OTLP/HTTP receiver on 127.0.0.1 (tests/otlp_receiver.py: http.server
+ opentelemetry-proto decoding each ExportTraceServiceRequest)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import opentelemetry
import pytest

import agentledger.api as al

from conftest import REPO, cli_env, run_cli
from otlp_receiver import Receiver, attrs


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    home = tmp_path_factory.mktemp("otel") / "home"
    s = al.settings(home=home)
    sim = al.simulate(s, sessions=8, seed=13, attack_rate=0.5)
    al.ingest(s)
    return s, sim


def _by_session(spans):
    out: dict[bytes, list] = {}
    for _res, sp in spans:
        out.setdefault(sp.trace_id, []).append(sp)
    return out


def test_sessions_become_invoke_agent_traces_with_execute_tool_children(simulated):
    s, sim = simulated
    with Receiver() as r:
        res = al.export_otel(s, r.endpoint)
    assert r.paths and set(r.paths) == {"/v1/traces"}
    spans = r.spans()
    assert res.sessions == 8 and res.spans == len(spans)
    assert {res_["service.name"] for res_, _ in spans} == {"agentledger"}
    traces = _by_session(spans)
    assert len(traces) == 8
    rows = al.sql(s, "select session_id, kind, epoch_ns(occurred_at), command_started.command_id, "
                     "command_finished.command_id, command_finished.exit_code, command_finished.status, tool_call_id, "
                     "session_started.model, producer.agent_name from events order by session_id, seq").rows
    by_sid: dict[str, list] = {}
    for row in rows:
        by_sid.setdefault(row[0], []).append(row)
    for sid, evs in by_sid.items():
        tid = hashlib.sha256(sid.encode()).digest()[:16]
        sp = traces[tid]
        roots = [x for x in sp if not x.parent_span_id]
        assert len(roots) == 1
        root = roots[0]
        ra = attrs(root)
        assert root.name == f"invoke_agent {evs[0][9]}" and ra["gen_ai.operation.name"] == "invoke_agent"
        assert ra["gen_ai.conversation.id"] == sid and ra["gen_ai.agent.name"] == evs[0][9]
        assert ra["gen_ai.request.model"] == evs[0][8]
        assert root.start_time_unix_nano == evs[0][2] and root.end_time_unix_nano == evs[-1][2]
        children = [x for x in sp if x.parent_span_id]
        assert all(x.parent_span_id == root.span_id for x in children)
        assert all(attrs(x)["gen_ai.operation.name"] == "execute_tool" and x.name.startswith("execute_tool ")
                   for x in children)
        # one execute_tool shell span per command, from its start to its finish, exit code and status
        starts = {e[3]: e for e in evs if e[1] == "command_started"}
        ends = {e[4]: e for e in evs if e[1] == "command_finished"}
        shell = {attrs(x)["agentledger.command_id"]: x for x in children if x.name == "execute_tool shell"}
        assert set(shell) == set(starts)
        for cid, x in shell.items():
            a = attrs(x)
            assert a["gen_ai.tool.name"] == "shell" and a["gen_ai.tool.call.id"] == starts[cid][7]
            assert x.start_time_unix_nano == starts[cid][2]
            if cid in ends:
                assert x.end_time_unix_nano == ends[cid][2] and a.get("process.exit.code") == ends[cid][5]
                assert (x.status.code == 2) == (ends[cid][6] != "completed")  # STATUS_CODE_ERROR
            assert root.start_time_unix_nano <= x.start_time_unix_nano <= x.end_time_unix_nano <= root.end_time_unix_nano
        # approvals and network events are span events, each once, on the root or their command's span
        names = [e.name for x in sp for e in x.events]
        for kind in ("approval_requested", "approval_decided", "network_attempted", "network_decided",
                     "network_completed", "sandbox_denied"):
            want = "agentledger." + ("sandbox.denied" if kind == "sandbox_denied" else kind.replace("_", ".", 1))
            assert names.count(want) == sum(1 for e in evs if e[1] == kind), (sid, kind)
        for x in sp:
            for e in x.events:
                assert x.start_time_unix_nano <= e.time_unix_nano <= x.end_time_unix_nano or x is root


def test_network_events_carry_server_attributes_and_no_secret_is_in_clear(simulated):
    s, sim = simulated
    with Receiver() as r:
        al.export_otel(s, r.endpoint + "/v1/traces")  # the full path is taken as it is
    evs = [attrs(e) | {"_name": e.name} for _res, x in r.spans() for e in x.events]
    attempts = [e for e in evs if e["_name"] == "agentledger.network.attempted"]
    hosts = {h for (h,) in al.sql(s, "select network_attempted.host from events where kind = 'network_attempted'").rows}
    assert attempts and {e["server.address"] for e in attempts} == hosts
    raw = b"".join(r.raw)
    secrets = {v for values in sim.secrets.values() for v in values}
    assert secrets
    leaked = sorted(v[:12] for v in secrets if v.encode() in raw or any(
        ln.encode() in raw for ln in v.splitlines()[1:-1] if len(ln) > 16))
    assert not leaked, leaked
    tokens = {t for (t,) in al.sql(s, "select distinct unnest(redactions).token from events").rows}
    assert any(t.encode() in raw for t in tokens), "redaction tokens are sent as they are"


def test_one_session_by_prefix_and_a_receiver_that_refuses_is_an_error(simulated):
    s, sim = simulated
    sid = sim.suspicious[0]
    with Receiver() as r:
        res = al.export_otel(s, r.endpoint, sessions=[sid[:13]])
    assert res.sessions == 1 and set(_by_session(r.spans())) == {hashlib.sha256(sid.encode()).digest()[:16]}
    with Receiver(status=400) as r:
        with pytest.raises(al.AgentLedgerError, match="did not accept the spans"):
            al.export_otel(s, r.endpoint, sessions=[sid])
    with pytest.raises(al.AgentLedgerError, match="http:// or https://"):
        al.export_otel(s, "127.0.0.1:4318")


def test_export_otel_cli(simulated, tmp_path):
    s, _ = simulated
    site = str(Path(opentelemetry.__path__[0]).parent)  # wherever the SDK is installed
    env = cli_env(s.home, PYTHONPATH=f"{REPO}:{site}")
    with Receiver() as r:
        doc = json.loads(run_cli("export", "otel", "--endpoint", r.endpoint, "--format", "json", env=env).stdout)
        assert doc["sessions"] == 8 and doc["spans"] == len(r.spans())
        text = run_cli("export", "otel", "--endpoint", r.endpoint, env=env).stdout
    assert f"sent 8 sessions as {doc['spans']} spans" in text


def test_mcp_tool_calls_become_execute_tool_spans_named_after_the_tool(tmp_path):
    """Issue 17: an MCP call is ``execute_tool {tool}`` with gen_ai.tool.name, mcp.method.name
    tools/call, the server and the arguments' digest; an error result sets status ERROR."""
    s = al.settings(home=tmp_path / "home")
    al.import_agent_logs(s, claude=[REPO / "tests" / "fixtures" / "claude-code" / "projects"])
    al.ingest(s)
    with Receiver() as r:
        al.export_otel(s, r.endpoint)
    spans = {attrs(sp).get("gen_ai.tool.call.id"): sp for _res, sp in r.spans()
             if attrs(sp).get("mcp.method.name") == "tools/call"}
    assert set(spans) == {"toolu_01Mcp1", "toolu_02Mcp1"}
    ok, bad = spans["toolu_01Mcp1"], spans["toolu_02Mcp1"]
    a = attrs(ok)
    assert ok.name == "execute_tool create_pull_request" and a["gen_ai.operation.name"] == "execute_tool"
    assert (a["gen_ai.tool.name"], a["agentledger.mcp.server"], a["agentledger.mcp.outcome"]) == (
        "create_pull_request", "github", "ok")
    assert a["agentledger.mcp.arguments_digest"].startswith("sha256:") and "process.command_line" not in a
    assert json.loads(a["gen_ai.tool.call.arguments"])["title"] == "Fix login lockout status"
    assert ok.status.code != 2  # not ERROR
    b = attrs(bad)
    assert bad.name == "execute_tool search_issues" and b["agentledger.mcp.outcome"] == "error"
    assert b["error.type"] == "tool_error" and bad.status.code == 2 and "401" in bad.status.message
