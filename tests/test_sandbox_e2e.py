"""The recording sandbox's done-when, end to end with the real CLI, bubblewrap, strace and the
egress proxy (HTTP servers on 127.0.0.1 only):

a session of several commands — write files in the workspace, try to write outside it, reach an
allowed and a denied loopback server through the proxy (and an ask-rule one), one approval-gated
command approved on a terminal — yields the expected sandbox, network and approval events, checked
with SQL after ingest; re-executing it reports zero divergence; re-executing after changing one
workspace file, one environment variable or one recorded network response reports the first
divergent seq and a diff naming the change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest

from conftest import run_cli
from agentledger.producers.recorder import action_digest
from agentledger.producers.sandbox.proxy import network_digest
from sandbox_support import PY, Server, events, policy, run_in_pty, sandbox, sandbox_env

SESSION = "e2e-session-1"
MY_SETTING = "value-7c1d"  # must never appear in an event
SECRET = "tok-93b0e5a1"  # filtered out by the policy (…TOKEN…)
ALLOWED_BODY = b"allowed body v1\nsecond line\n"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Record the session once; the tests below check the record and re-execute it."""
    root = tmp_path_factory.mktemp("sandbox-e2e")
    home, ws = root / "home", root / "ws"
    home.mkdir()
    ws.mkdir()
    (ws / "input.txt").write_text("hello sandbox\n")
    allowed = Server({"/data.txt": ALLOWED_BODY})
    denied = Server({"/secret.txt": b"must not be reached\n"})
    asked = Server({"/ask.txt": b"must not be reached either\n"})
    pol = root / "policy.toml"
    pol.write_text(policy(allowed=allowed.port, denied=denied.port, asked=asked.port, gated="*release*"))
    env = sandbox_env(home, MY_SETTING=MY_SETTING, DEPLOY_TOKEN=SECRET)
    common = ["run", "--policy", str(pol), "--session", SESSION, "--"]
    outside = ["/etc/agentledger-e2e.txt", os.path.expanduser("~/agentledger-e2e.txt")]
    for p in outside:
        assert not os.path.exists(p)
    cmds = {
        "write": [PY, "-c", "import os\n"
                  "d = open('input.txt').read()\n"
                  "os.makedirs('build', exist_ok=True)\n"
                  "open('build/out.txt', 'w').write(d.upper() + os.environ['MY_SETTING'])\n"
                  "os.rename('build/out.txt', 'build/result.txt')\n"
                  "os.chmod('build/result.txt', 0o640)\n"
                  "print('wrote', sorted(os.environ))\n"],
        "outside": ["sh", "-c", f"echo x > {outside[0]}; echo x > {outside[1]}; ls build > listing.txt; echo done"],
        "allowed": [PY, "-c", "import urllib.request as u\n"
                    f"b = u.urlopen('{allowed.url('/data.txt')}').read()\n"
                    "open('fetched.txt', 'wb').write(b)\n"
                    "print(b.decode())\n"],
        "denied": [PY, "-c", "import urllib.request as u, urllib.error as e\n"
                   f"for url in ('{denied.url('/secret.txt?token=hunter2')}', '{asked.url('/ask.txt')}'):\n"
                   "    try:\n"
                   "        u.urlopen(url)\n"
                   "    except e.HTTPError as x:\n"
                   "        print('blocked', x.code, x.headers['X-Agentledger-Rule'])\n"],
    }
    procs = {}
    for name, argv in cmds.items():
        procs[name] = sandbox(*common, *argv, env=env, cwd=ws, check=False)
    gated = ["sh", "-c", "echo release > release.txt"]
    gated_code, terminal = run_in_pty([sys.executable, "-m", "agentledger", "sandbox", *common, *gated],
                                      env=env, cwd=ws, answer=b"y\n")
    sandbox("end", SESSION, env=env, cwd=ws)
    evs = events(home, SESSION)
    yield {"root": root, "home": home, "ws": ws, "env": env, "procs": procs, "cmds": cmds, "events": evs,
           "servers": (allowed, denied, asked), "outside": outside, "gated": gated, "gated_code": gated_code,
           "terminal": terminal, "policy": pol}
    for s in (allowed, denied, asked):
        s.stop()


def test_commands_ran_and_blocked_actions_did_not_happen(recorded):
    procs = recorded["procs"]
    for name, p in procs.items():
        assert p.returncode == 0, (name, p.stdout, p.stderr)
    assert "DEPLOY_TOKEN" not in procs["write"].stdout and "MY_SETTING" in procs["write"].stdout
    assert "Read-only file system" in procs["outside"].stderr
    for p in recorded["outside"]:
        assert not os.path.exists(p), f"the sandbox let {p} be written"
    assert procs["allowed"].stdout.startswith(ALLOWED_BODY.decode())
    assert procs["denied"].stdout.splitlines() == ["blocked 403 blocked-server", "blocked 403 ask-server"]
    allowed, denied, asked = recorded["servers"]
    assert allowed.hits == ["/data.txt"] and denied.hits == [] and asked.hits == []
    ws = recorded["ws"]
    assert (ws / "build" / "result.txt").read_text() == "HELLO SANDBOX\n" + MY_SETTING
    assert oct((ws / "build" / "result.txt").stat().st_mode & 0o777) == "0o640"
    assert recorded["gated_code"] == 0, recorded["terminal"]
    assert (ws / "release.txt").read_text() == "release\n"


def test_the_terminal_prompt_shows_the_exact_command_and_its_digest(recorded):
    term = recorded["terminal"]
    digest = action_digest(recorded["gated"], os.path.realpath(recorded["ws"]))
    assert "approval needed (exec, rule gated)" in term
    assert "sh -c 'echo release > release.txt'" in term
    assert f"sha256:{digest}" in term
    assert "writes a release marker" in term


@pytest.fixture(scope="module")
def warehouse(recorded):
    env = recorded["env"]
    run_cli("ingest", env=env)
    return env


def sql(env, query: str) -> list[dict]:
    return json.loads(run_cli("sql", query, "--format", "json", env=env).stdout)


def test_sql_sandbox_events(recorded, warehouse):
    env, ws = warehouse, os.path.realpath(recorded["ws"])
    denied = sql(env, f"""select sandbox_denied.operation as op, sandbox_denied.target as target,
                           sandbox_denied.rule as rule, sandbox_denied.inferred as inferred, sandbox_denied.reason as reason
                           from events where session_id = '{SESSION}' and kind = 'sandbox_denied' order by seq""")
    assert {(d["op"], d["target"], d["rule"]) for d in denied} == {
        ("file_write", recorded["outside"][0], "sandbox.writable_roots"),
        ("file_write", recorded["outside"][1], "sandbox.writable_roots")}
    assert all(d["inferred"] is False and d["reason"].startswith("EROFS") for d in denied)

    files = sql(env, f"""select file_accessed.path as path, file_accessed.operation as op,
                          file_accessed.new_path as new_path, file_accessed.digest_before as before,
                          file_accessed.digest_after as after, file_accessed.mode as mode,
                          file_accessed.inside_workspace as inside
                          from events where session_id = '{SESSION}' and kind = 'file_accessed' order by seq""")
    by = {(f["path"], f["op"]): f for f in files}
    result = ("HELLO SANDBOX\n" + MY_SETTING).encode()
    assert by[(f"{ws}/input.txt", "read")]["before"] == sha(b"hello sandbox\n")
    assert by[(f"{ws}/build", "create")]["mode"] is not None
    assert (f"{ws}/build/out.txt", "create") in by
    rename = by[(f"{ws}/build/out.txt", "rename")]
    assert rename["new_path"] == f"{ws}/build/result.txt" and rename["after"] == sha(result)
    assert by[(f"{ws}/build/result.txt", "chmod")]["mode"] == 0o640
    assert by[(f"{ws}/fetched.txt", "create")]["after"] == sha(ALLOWED_BODY)
    assert by[(f"{ws}/release.txt", "create")]["after"] == sha(b"release\n")
    assert all(f["inside"] for f in files)

    cmds = sql(env, f"""select s.command_started.argv as argv, s.command_started.env_names as env_names,
                          s.command_started.env_digest as env_digest, s.command_started.workspace_digest as wb,
                          f.command_finished.workspace_digest as wa, f.command_finished.exit_code as code,
                          f.command_finished.status as status, s.command_started.sandbox_profile as profile
                        from events s join events f on f.session_id = s.session_id and f.kind = 'command_finished'
                          and f.command_finished.command_id = s.command_started.command_id
                        where s.session_id = '{SESSION}' and s.kind = 'command_started'
                          and s.command_started.parent_command_id is null order by s.seq""")
    assert len(cmds) == 5
    assert [c["code"] for c in cmds] == [0, 0, 0, 0, 0] and {c["status"] for c in cmds} == {"completed"}
    assert all(c["profile"] == "bwrap:workspace_write:net=proxy" for c in cmds)
    assert all("MY_SETTING" in c["env_names"] and "DEPLOY_TOKEN" not in c["env_names"] for c in cmds)
    assert all(len(c["env_digest"]) == 64 and len(c["wb"]) == 64 and len(c["wa"]) == 64 for c in cmds)
    for prev, nxt in zip(cmds, cmds[1:]):
        assert prev["wa"] == nxt["wb"], "nothing changed the workspace between commands"
    # sub-processes are recorded under their command, with their exit
    subs = sql(env, f"""select s.command_started.argv as argv, s.command_started.parent_command_id as parent,
                          p.command_started.argv as parent_argv, f.command_finished.exit_code as code
                        from events s
                        join events p on p.session_id = s.session_id and p.kind = 'command_started'
                          and p.command_started.command_id = s.command_started.parent_command_id
                        join events f on f.session_id = s.session_id and f.kind = 'command_finished'
                          and f.command_finished.command_id = s.command_started.command_id
                        where s.session_id = '{SESSION}' and s.kind = 'command_started'
                          and s.command_started.parent_command_id is not null""")
    assert [(x["argv"], x["parent_argv"][0], x["code"]) for x in subs] == [(["ls", "build"], "sh", 0)]
    assert by[(f"{ws}/listing.txt", "create")]["after"] == sha(b"result.txt\n")


def test_sql_network_and_approval_events(recorded, warehouse):
    env = warehouse
    allowed, denied, asked = recorded["servers"]
    net = sql(env, f"""select a.network_attempted.host as host, a.network_attempted.port as port,
                         a.network_attempted.url as url, a.network_attempted.method as method,
                         d.network_decided.decision as decision, d.network_decided.rule as rule,
                         c.network_completed.outcome as outcome, c.network_completed.status as status,
                         c.network_completed.response_digest as response_digest, a.network_attempted.attempt_id as id
                       from events a
                       join events d on d.session_id = a.session_id and d.kind = 'network_decided'
                                    and d.network_decided.attempt_id = a.network_attempted.attempt_id
                       join events c on c.session_id = a.session_id and c.kind = 'network_completed'
                                    and c.network_completed.attempt_id = a.network_attempted.attempt_id
                       where a.session_id = '{SESSION}' and a.kind = 'network_attempted' order by a.seq""")
    by_port = {n["port"]: n for n in net}
    ok = by_port[allowed.port]
    assert (ok["decision"], ok["rule"], ok["outcome"], ok["status"]) == ("allow", "allowed-server", "ok", 200)
    assert ok["response_digest"] == sha(ALLOWED_BODY) and ok["url"] == allowed.url("/data.txt")
    no = by_port[denied.port]
    assert (no["decision"], no["rule"], no["outcome"], no["status"]) == ("deny", "blocked-server", "blocked", None)
    assert no["url"] == denied.url("/secret.txt?token=REDACTED")
    ask = by_port[asked.port]
    assert (ask["decision"], ask["rule"], ask["outcome"]) == ("ask", "ask-server", "blocked")

    appr = sql(env, f"""select r.approval_requested.action_kind as kind, r.approval_requested.subject as subject,
                          r.approval_requested.action_digest as digest, d.approval_decided.decision as decision,
                          d.approval_decided.decided_by as decided_by, d.approval_decided.rule as rule,
                          d.approval_decided.action_digest as decided_digest, d.approval_decided.latency_ms as latency
                        from events r join events d on d.session_id = r.session_id and d.kind = 'approval_decided'
                          and d.approval_decided.request_id = r.approval_requested.request_id
                        where r.session_id = '{SESSION}' and r.kind = 'approval_requested' order by r.seq""")
    assert len(appr) == 2
    network, gate = appr
    assert network["kind"] == "network" and network["digest"] == network_digest("http", "127.0.0.1", asked.port)
    assert (network["decision"], network["decided_by"], network["rule"]) == ("denied", "policy", "approvals.noninteractive")
    assert gate["kind"] == "exec" and gate["subject"] == "sh -c 'echo release > release.txt'"
    assert gate["digest"] == action_digest(recorded["gated"], os.path.realpath(recorded["ws"]))
    assert (gate["decision"], gate["decided_by"], gate["rule"]) == ("approved", "user", "gated")
    assert gate["decided_digest"] == gate["digest"] and gate["latency"] >= 0
    assert all(a["decided_digest"] == a["digest"] for a in appr)

    summary = sql(env, f"select * from sessions where session_id = '{SESSION}'")[0]
    assert summary["sandbox_denied"] == 2 and summary["network_denied"] == 1
    assert sql(env, f"select status from chain_status where session_id = '{SESSION}'")[0]["status"] == "ok"


def test_no_secret_or_environment_value_is_in_any_event(recorded):
    raw = b"".join(p.read_bytes() for p in (recorded["home"] / "log").rglob("*.avro"))
    assert SESSION.encode() in raw
    for secret in (SECRET, MY_SETTING):
        assert secret.encode() not in raw, f"{secret!r} leaked into the event log"
    # the query value is in the command line the agent chose (argv), but not in the network record
    net = [e for e in recorded["events"] if e.kind.startswith("network_")]
    assert net and "hunter2" not in json.dumps([e.payload for e in net])
    cas = recorded["home"] / "cas"
    assert oct(cas.stat().st_mode & 0o777) == "0o700"


def reexecute(recorded, *args: str):
    proc = sandbox("reexecute", SESSION, "--format", "json", *args, env=recorded["env"], cwd=recorded["root"],
                   check=False)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def replayable(recorded):
    """The allowed server is gone and so is the original workspace: re-execution must use the record."""
    recorded["servers"][0].stop()
    shutil.rmtree(recorded["ws"])
    return recorded


def seq_of(recorded, kind: str, pred=lambda p: True) -> int:
    return next(e.seq for e in recorded["events"] if e.kind == kind and pred(e.payload))


def test_reexecution_reports_zero_divergence(replayable):
    code, report = reexecute(replayable)
    assert code == 0, report
    assert report["reproducible"] is True and report["first_divergent_seq"] is None and report["divergences"] == []
    assert report["commands_run"] == 5 and report["events_compared"] >= 30
    assert not replayable["ws"].exists(), "re-execution must not recreate the original workspace"


def test_reexecution_from_the_warehouse_and_readable_table(replayable, warehouse):
    code, report = reexecute(replayable, "--source", "warehouse")
    assert code == 0 and report["reproducible"]
    proc = sandbox("reexecute", SESSION, "--source", "log", env=replayable["env"], cwd=replayable["root"])
    assert "reproducible" in proc.stdout and "zero divergence" in proc.stdout


def test_changed_workspace_file_is_named_at_the_first_divergent_seq(replayable, tmp_path):
    alt = tmp_path / "alt.txt"
    alt.write_text("HELLO other\n")
    code, report = reexecute(replayable, "--set-file", f"input.txt={alt}")
    assert code == 3 and not report["reproducible"]
    first_started = seq_of(replayable, "command_started", lambda p: p.get("parent_command_id") is None)
    assert report["first_divergent_seq"] == first_started
    f = report["first_divergence"]
    assert (f["event"], f["field"], f["change"]["type"]) == ("command_started", "workspace_digest", "workspace")
    assert [x["path"] for x in f["change"]["files"]] == ["input.txt"]
    assert f["change"]["files"][0]["expected"]["digest"] == sha(b"hello sandbox\n")
    assert f["change"]["files"][0]["actual"]["digest"] == sha(b"HELLO other\n")
    assert "input.txt" in f["summary"]
    # and the consequence: the command's read and the file it wrote differ too
    fields = {(d["event"], d["field"]) for d in report["divergences"]}
    assert ("file", "digest_before") in fields and ("file", "digest_after") in fields


def test_changed_environment_variable_is_named_without_its_value(replayable):
    code, report = reexecute(replayable, "--set-env", "MY_SETTING=changed-value-x")
    assert code == 3
    first_started = seq_of(replayable, "command_started", lambda p: p.get("parent_command_id") is None)
    assert report["first_divergent_seq"] == first_started
    f = report["first_divergence"]
    assert (f["field"], f["change"]["type"]) == ("env_digest", "environment")
    assert [v["name"] for v in f["change"]["variables"]] == ["MY_SETTING"]
    text = json.dumps(report)
    assert "changed-value-x" not in text and MY_SETTING not in text


def test_changed_network_response_is_named_at_its_seq(replayable, tmp_path):
    completed = seq_of(replayable, "network_completed", lambda p: p.get("status") == 200)
    other = tmp_path / "other.txt"
    other.write_bytes(b"another body\n")
    code, report = reexecute(replayable, "--set-response", f"{completed}={other}")
    assert code == 3
    assert report["first_divergent_seq"] == completed
    f = report["first_divergence"]
    assert (f["event"], f["field"]) == ("network", "response_digest")
    assert f["expected"] == sha(ALLOWED_BODY) and f["actual"] == sha(b"another body\n")
    assert f["change"]["type"] == "network_response" and f["change"]["url"].endswith("/data.txt")
    assert f["change"]["first_difference"] == {"line": 1, "expected": "allowed body v1", "actual": "another body"}
    later = [d for d in report["divergences"] if d["seq"] > completed]
    assert any(d["field"] == "stdout.sha256" for d in later), "the command printed what it received"
    proc = sandbox("reexecute", SESSION, "--set-response", f"{completed}={other}", env=replayable["env"],
                   cwd=replayable["root"], check=False)
    assert proc.returncode == 3
    assert f"diverged at seq {completed}" in proc.stdout and "/data.txt" in proc.stdout


def test_replay_reexecute_is_the_same_reexecution(replayable):
    proc = run_cli("replay", SESSION, "--reexecute", "--format", "json", env=replayable["env"],
                   cwd=replayable["root"], check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["reproducible"] is True and report["commands_run"] == 5
