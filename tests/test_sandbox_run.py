"""`agentledger sandbox run` behaviour, for real (bwrap, strace, proxy): approvals on a terminal and
without one, escalation, hidden paths, read-only mode, timeouts, stdin, the recorded clock,
environment filtering, crash recovery, the store's bounds, and a session recorded through Kafka."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from agentledger.producers.sandbox.runner import CommandSpec, Options, Tools, execute
from sandbox_support import PY, events, of_kind, policy, run_in_pty, sandbox, sandbox_env
from agentledger.schemas.policy import Policy


@pytest.fixture
def box(tmp_path):
    home, ws = tmp_path / "home", tmp_path / "ws"
    home.mkdir()
    ws.mkdir()

    class Box:
        def __init__(self):
            self.home, self.ws, self.root = home, ws, tmp_path
            self.env = sandbox_env(home)

        def policy(self, **kw) -> Path:
            p = tmp_path / f"policy-{len(list(tmp_path.glob('policy-*')))}.toml"
            p.write_text(policy(**kw))
            return p

        def run(self, *argv, pol: Path | None = None, session: str = "s", check=False, opts=(), **kw):
            args = ["run", "--session", session, *(["--policy", str(pol)] if pol else []), *opts, "--", *argv]
            return sandbox(*args, env=self.env, cwd=self.ws, check=check, **kw)

        def events(self, session: str = "s"):
            return events(home, session)

        def cli(self, *args):
            return [sys.executable, "-m", "agentledger", "sandbox", *args]

    return Box()


def decided(evs):
    return [(e.payload["decision"], e.payload["decided_by"], e.payload["rule"]) for e in of_kind(evs, "approval_decided")]


def finished_status(evs):
    return [e.payload["status"] for e in of_kind(evs, "command_finished") if e.payload["command_id"] in
            {s.payload["command_id"] for s in of_kind(evs, "command_started") if not s.payload.get("parent_command_id")}]


def test_noninteractive_default_declines_and_nothing_runs(box):
    pol = box.policy(gated="*mark*", noninteractive="deny")
    p = box.run("sh", "-c", "echo x > mark.txt", pol=pol)
    assert p.returncode == 126 and not (box.ws / "mark.txt").exists()
    evs = box.events()
    assert decided(evs) == [("denied", "policy", "approvals.noninteractive")]
    assert finished_status(evs) == ["declined"]
    assert of_kind(evs, "approval_requested")[0].payload["command_id"] == of_kind(evs, "command_started")[0].payload["command_id"]


def test_noninteractive_default_allow_runs(box):
    pol = box.policy(gated="*mark*", noninteractive="allow")
    assert box.run("sh", "-c", "echo x > mark.txt", pol=pol).returncode == 0
    assert (box.ws / "mark.txt").exists()
    assert decided(box.events()) == [("approved", "policy", "approvals.noninteractive")]


def test_interactive_no_and_always_for_the_session(box):
    pol = box.policy(gated="*mark*", noninteractive="deny")
    argv = ["sh", "-c", "echo x > mark.txt"]
    code, term = run_in_pty(box.cli("run", "--policy", str(pol), "--session", "s", "--", *argv), env=box.env,
                            cwd=box.ws, answer=b"n\n")
    assert code == 126 and "Allow?" in term and not (box.ws / "mark.txt").exists()
    code, term = run_in_pty(box.cli("run", "--policy", str(pol), "--session", "s", "--", *argv), env=box.env,
                            cwd=box.ws, answer=b"a\n")
    assert code == 0 and (box.ws / "mark.txt").exists()
    # granted for the session: the same action is not asked again, even without a terminal
    assert box.run(*argv, pol=pol).returncode == 0
    d = decided(box.events())
    assert d[0][:2] == ("denied", "user") and d[1][:2] == ("approved_for_session", "user")
    assert d[2] == ("approved_for_session", "policy", "approvals.session_grant")


def test_interactive_prompt_times_out_and_refuses(box):
    pol = box.policy(gated="*mark*", noninteractive="deny", timeout_s=1)
    t0 = time.monotonic()
    code, term = run_in_pty(box.cli("run", "--policy", str(pol), "--session", "s", "--", "sh", "-c", "echo > mark"),
                            env=box.env, cwd=box.ws, answer=None)
    assert code == 126 and "timed out" in term and time.monotonic() - t0 < 30
    assert decided(box.events()) == [("timed_out", "policy", "approvals.timeout_s")]


def test_forbidden_and_escalation(box, tmp_path):
    pol = box.policy(noninteractive="deny", extra='[[approvals.rules]]\nid = "no-sudo"\ndecision = "forbidden"\n'
                                                   'prefix = ["sudo"]\n')
    assert box.run("sudo", "true", pol=pol).returncode == 126
    outside = tmp_path / "outside.txt"
    assert box.run("sh", "-c", f"echo x > {outside}", pol=pol, opts=("--escalate",)).returncode == 126
    assert not outside.exists()
    evs = box.events()
    assert decided(evs) == [("denied", "policy", "no-sudo"), ("denied", "policy", "approvals.noninteractive")]
    assert of_kind(evs, "approval_requested")[1].payload["risk"] == "high"

    allow = box.policy(noninteractive="allow")
    p = box.run("sh", "-c", f"echo x > {outside}", pol=allow, session="s2", opts=("--escalate",))
    assert p.returncode == 0 and outside.read_text() == "x\n"
    evs = box.events("s2")
    started = of_kind(evs, "command_started")[0].payload
    assert started["escalated"] is True and started["sandbox_profile"] == "unsandboxed:escalated"
    f = [e.payload for e in of_kind(evs, "file_accessed") if e.payload["path"] == str(outside)]
    assert f and f[0]["inside_workspace"] is False and f[0]["operation"] in ("write", "create")


def test_deny_read_paths_are_hidden_and_attempts_recorded(box, tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "key.txt").write_text("PRIVATE-KEY-123")
    pol = box.policy(deny_read=[f"{secrets}/**"])
    p = box.run("sh", "-c", f"cat {secrets}/key.txt; echo rc=$?", pol=pol)
    assert "PRIVATE-KEY-123" not in p.stdout and "rc=1" in p.stdout
    d = [e.payload for e in of_kind(box.events(), "sandbox_denied")]
    assert [(x["operation"], x["target"], x["rule"], x["inferred"]) for x in d] == [
        ("file_read", f"{secrets}/key.txt", "sandbox.deny_read", False)]


def test_recorder_home_is_invisible_inside(box):
    p = box.run("sh", "-c", f"ls -A {box.home} | wc -l")
    assert p.stdout.strip() == "0", "the sandbox must not see the log, the store or the session state"


def test_read_only_mode(box):
    pol = box.policy(mode="read_only")
    (box.ws / "f").write_text("keep")
    p = box.run("sh", "-c", "echo y > f", pol=pol)
    assert p.returncode != 0 and (box.ws / "f").read_text() == "keep"
    d = of_kind(box.events(), "sandbox_denied")[0].payload
    assert (d["operation"], d["target"], d["rule"]) == ("file_write", f"{box.ws}/f", "sandbox.mode")


def test_direct_connections_are_blocked_and_recorded(box):
    p = box.run(PY, "-c", "import socket\n"
                "print(socket.socket().connect_ex(('10.255.0.1', 80)))\n"
                "try: socket.getaddrinfo('example.com', 80)\nexcept OSError as e: print('dns failed')\n")
    assert p.returncode == 0 and "dns failed" in p.stdout
    evs = box.events()
    att = {e.payload["attempt_id"]: e.payload for e in of_kind(evs, "network_attempted")}
    dec = {e.payload["attempt_id"]: e.payload for e in of_kind(evs, "network_decided")}
    com = {e.payload["attempt_id"]: e.payload for e in of_kind(evs, "network_completed")}
    direct = [a for a in att.values() if a["host"] == "10.255.0.1"]
    assert len(direct) == 1 and direct[0]["protocol"] == "tcp"
    aid = direct[0]["attempt_id"]
    assert (dec[aid]["decision"], dec[aid]["rule"]) == ("deny", "sandbox.network")
    assert com[aid]["outcome"] == "blocked" and com[aid]["error"].startswith("ENETUNREACH")
    assert any(a["protocol"] == "dns" and a["port"] == 53 for a in att.values()) or \
        not Path("/etc/resolv.conf").read_text().strip()


def test_environment_is_filtered_and_values_stay_out_of_events(box):
    box.env.update(MY_SETTING="kept-1", API_TOKEN="tok-secret-1", AGENTLEDGER_TOPIC="agentledger.events",
                   HTTP_PROXY="http://corp-proxy:8080")
    p = box.run("sh", "-c", "env | sort", pol=box.policy())
    seen = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    assert seen["MY_SETTING"] == "kept-1" and "API_TOKEN" not in seen and "AGENTLEDGER_TOPIC" not in seen
    assert seen["HTTP_PROXY"] == seen["https_proxy"] == "http://127.0.0.1:3128"
    assert seen["AGENTLEDGER_SANDBOX"] == "bwrap"
    started = of_kind(box.events(), "command_started")[0].payload
    assert "MY_SETTING" in started["env_names"] and "API_TOKEN" not in started["env_names"]
    raw = b"".join(x.read_bytes() for x in (box.home / "log").rglob("*.avro"))
    assert b"tok-secret-1" not in raw


def test_a_secret_the_policy_lets_into_the_environment_is_redacted_where_the_command_prints_it(box):
    """A policy that lets a secret-named variable in (here DB_PASSWORD): the command prints its value
    bare, inside JSON and passes it on to a sub-process's argv -- with nothing around it that says
    secret. The sandbox knows it came from DB_PASSWORD: no event carries it (issue 14, the secrets
    scenario's sandbox half). The recording store keeps it (it re-executes the command)."""
    pw = "oOtJi098!fh-Zq8v"
    box.env.update(DB_PASSWORD=pw)
    pol = box.policy(env_allow=["PATH", "HOME", "LANG", "DB_PASSWORD"])
    p = box.run("sh", "-c", 'echo "$DB_PASSWORD"; printf \'{"config": {"v": "%s"}}\\n\' "$DB_PASSWORD"; '
                'sh -c "echo $DB_PASSWORD >/dev/null"', pol=pol)
    assert p.returncode == 0 and pw in p.stdout
    raw = b"".join(x.read_bytes() for x in (box.home / "log").rglob("*.avro"))
    assert pw.encode() not in raw and pw[:12].encode() not in raw
    evs = box.events()
    done = [e.payload for e in of_kind(evs, "command_finished") if e.payload["stdout"]["size"]]
    assert done and done[0]["stdout"]["excerpt"].count("[SECRET:password_assignment:") == 2, done
    subs = [e.payload["argv"] for e in of_kind(evs, "command_started") if e.payload.get("parent_command_id")]
    assert any(a[:2] == ["sh", "-c"] and "[SECRET:password_assignment:" in a[2] for a in subs), subs
    assert any(pw.encode() in b.read_bytes() for b in (box.home / "cas").rglob("*") if b.is_file())


def test_a_secret_in_the_command_line_that_names_a_file_is_redacted_in_the_file_events_too(box):
    """`asana>7376…` as bash reads it: a redirection that creates a file named after the secret. The
    command line is recognisably a secret (the keyword before it); the file event's path is the bare
    value. The chaos secrets scenario found it leaking in the file events (issue 14)."""
    value = "7376260573879366"
    p = box.run("bash", "-c", f"asana>{value} ")
    assert (box.ws / value).exists(), p.stderr  # bash: asana: command not found; the file is made first
    raw = b"".join(x.read_bytes() for x in (box.home / "log").rglob("*.avro"))
    assert value.encode() not in raw
    evs = box.events()
    paths = [e.payload["path"] for e in of_kind(evs, "file_accessed")]
    assert any("[SECRET:asana_client_id:" in x for x in paths), paths


def test_timeout_kills_the_whole_sandbox_and_reexecution_cuts_it_off_too(box):
    t0 = time.monotonic()
    p = box.run("sh", "-c", "sleep 60 & sleep 60", opts=("--timeout", "1"))
    assert p.returncode == 124 and time.monotonic() - t0 < 30
    assert finished_status(box.events()) == ["timed_out"]
    t0 = time.monotonic()
    rep = json.loads(sandbox("reexecute", "s", "--format", "json", env=box.env, cwd=box.root).stdout)
    assert rep["reproducible"] and time.monotonic() - t0 < 30


def test_stdin_is_passed_recorded_and_replayed(box):
    data = b"line one\nline two\n"
    p = box.run("sh", "-c", "cat > copy.txt; wc -l < copy.txt", stdin=None, input=data.decode(), session="st")
    assert p.stdout.strip() == "2"
    started = of_kind(box.events("st"), "command_started")[0].payload
    assert started["stdin_digest"] == hashlib.sha256(data).hexdigest()
    sandbox("end", "st", env=box.env, cwd=box.ws)
    shutil.rmtree(box.ws)
    rep = json.loads(sandbox("reexecute", "st", "--format", "json", env=box.env, cwd=box.root).stdout)
    assert rep["reproducible"], rep


def test_the_clock_offset_reaches_every_process(tmp_path):
    """Re-execution shifts the clock to the recorded start (libfaketime), in every sub-process."""
    tools = Tools.find()
    assert tools.faketime, "faketime is required (apt-get install faketime)"
    ws = tmp_path / "ws"
    ws.mkdir()
    from agentledger.producers.sandbox.runner import sandbox_env as make_env

    pol = Policy.from_toml(policy())
    env = make_env(pol, {"PATH": os.environ["PATH"]}, tools=tools, options=Options(), sandboxed=True)
    offset = 981173106 - time.time()  # 2001-02-03T04:05:06Z
    spec = CommandSpec(["sh", "-c", "date -u +%F; sh -c 'date -u +%Y'"], str(ws), env, None, str(ws), str(ws),
                       clock_offset_s=offset)
    ex = execute(spec, pol, tools, Options(), proxy_socket=None)
    assert bytes(ex.stdout.kept).decode().split() == ["2001-02-03", "2001"]


def test_reexecution_uses_the_recorded_clock(box):
    p = box.run("date", "-u", "+%Y", session="clk")
    assert p.returncode == 0
    sandbox("end", "clk", env=box.env, cwd=box.ws)
    manifest_path = box.home / "cas" / "sessions" / "clk.json"
    m = json.loads(manifest_path.read_text())
    for c in m["commands"].values():
        c["clock_us"] = 981173106 * 1_000_000  # pretend it was recorded in 2001
    manifest_path.write_text(json.dumps(m))
    proc = sandbox("reexecute", "clk", "--format", "json", env=box.env, cwd=box.root, check=False)
    rep = json.loads(proc.stdout)
    assert proc.returncode == 3
    f = rep["first_divergence"]
    assert f["field"] == "stdout.sha256" and f["change"]["first_difference"]["actual"] == "2001"


def test_a_killed_recorder_leaves_a_gap_and_the_chain_continues(box):
    proc = subprocess.Popen([sys.executable, "-m", "agentledger", "sandbox", "run", "--session", "k", "--", "sleep", "61.25"],
                            env=box.env, cwd=box.ws, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    state = box.home / "sandbox" / "sessions" / "k" / "state.json"
    while time.monotonic() < deadline:
        if state.exists() and json.loads(state.read_text()).get("in_flight"):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the command never started")
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    scratch = json.loads(state.read_text())["in_flight"]["scratch"]
    assert os.path.isdir(scratch)
    assert box.run("true", session="k").returncode == 0
    assert not os.path.exists(scratch), "recovery removes the dead run's scratch directory"
    evs = box.events("k")  # verified: hash chain intact across both processes
    gaps = of_kind(evs, "gap")
    assert len(gaps) == 1 and gaps[0].payload["gap_kind"] == "crash_recovered"
    assert finished_status(evs) == ["killed", "completed"]
    # the sandboxed command died with its recorder (pdeathsig on strace, --die-with-parent on bwrap)
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", "sleep 61.25"], capture_output=True).stdout.strip():
        assert time.monotonic() < deadline, "the sandboxed command outlived its killed recorder"
        time.sleep(0.1)


def test_session_rules(box):
    a, b = box.policy(), box.policy(noninteractive="allow")
    assert box.run("true", pol=a).returncode == 0
    p = box.run("true", pol=b)
    assert p.returncode == 1 and "another policy" in p.stderr
    other = box.root / "other"
    other.mkdir()
    p = sandbox("run", "--session", "s", "--policy", str(a), "--workspace", str(other), "--", "true", env=box.env,
                cwd=box.ws, check=False)
    assert p.returncode == 1 and "records workspace" in p.stderr
    sandbox("end", "s", env=box.env, cwd=box.ws)
    p = box.run("true", pol=a)
    assert p.returncode == 1 and "has ended" in p.stderr
    p = box.run("true", session="../x")
    assert p.returncode == 1 and "invalid session id" in p.stderr and "Traceback" not in p.stderr
    kinds = [e.kind for e in box.events()]
    assert kinds[0] == "session_started" and kinds[-1] == "session_ended"


def test_one_shot_session_is_started_and_ended(box):
    p = sandbox("run", "--", "sh", "-c", "exit 3", env=box.env, cwd=box.ws, check=False)
    assert p.returncode == 3
    sid = p.stderr.split("session ", 1)[1].split()[0]
    evs = box.events(sid)
    assert [e.kind for e in evs] == ["session_started", "command_started", "command_finished", "session_ended"]
    assert evs[2].payload["exit_code"] == 3 and evs[2].payload["status"] == "failed"


def test_store_bounds_are_recorded_as_a_gap(box):
    (box.ws / "big.bin").write_bytes(b"x" * 5000)
    p = box.run("cat", "big.bin", session="b", opts=("--cas-max-blob", "1000"), stdin=subprocess.DEVNULL)
    assert p.returncode == 0
    gaps = [g.payload for g in of_kind(box.events("b"), "gap")]
    assert gaps and gaps[0]["gap_kind"] == "truncated" and "big.bin (blob_too_large)" in gaps[0]["reason"]


@pytest.mark.kafka
def test_a_session_recorded_through_kafka_reexecutes_from_the_warehouse(box, bootstrap, topic):
    box.env.update(AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap, AGENTLEDGER_TOPIC=topic)
    (box.ws / "in.txt").write_text("kafka\n")
    assert box.run("sh", "-c", "tr a-z A-Z < in.txt > out.txt", session="kf").returncode == 0
    sandbox("end", "kf", env=box.env, cwd=box.ws)
    run_cli("ingest", env=box.env)
    rows = json.loads(run_cli("sql", "select count(*) n from events where session_id = 'kf'", "--format", "json",
                              env=box.env).stdout)
    assert rows[0]["n"] >= 5
    rep = json.loads(sandbox("reexecute", "kf", "--source", "warehouse", "--format", "json", env=box.env,
                             cwd=box.root).stdout)
    assert rep["reproducible"] and rep["commands_run"] == 1


def test_the_sandbox_works_for_a_non_root_user():
    """bwrap's user namespaces: the same sandbox as an unprivileged user (tested by dropping to nobody)."""
    import pwd

    assert os.geteuid() == 0, "the suite runs as root here; this test drops to nobody"
    nobody = pwd.getpwnam("nobody")
    py = os.path.realpath(sys.executable)
    probe = subprocess.run(["runuser", "-u", "nobody", "--", py, "-c", "pass"], capture_output=True)
    if probe.returncode != 0:  # the venv's interpreter lives under /root; use the system one of the same version
        py = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    site = next(p for p in sys.path if p.endswith("site-packages"))
    import tempfile

    # pytest's tmp dirs are private to root; nobody needs its own (removed below)
    root = Path(tempfile.mkdtemp(prefix="agentledger-nobody-"))
    try:
        _as_nobody(root, nobody, py, site)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _as_nobody(root: Path, nobody, py: str, site: str) -> None:
    (root / "ws").mkdir(parents=True)
    os.chmod(root, 0o755)
    shutil.chown(root, nobody.pw_uid)
    shutil.chown(root / "ws", nobody.pw_uid)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "AGENTLEDGER_HOME": str(root / "home"),
           "PYTHONPATH": f"{REPO}:{site}", "LANG": "C.UTF-8"}
    p = subprocess.run(["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()], py, "-m",
                        "agentledger", "sandbox", "run", "--session", "nb", "--workspace", str(root / "ws"), "--",
                        "sh", "-c", "id -u; echo hi > a.txt; echo x > /etc/nb-probe; true"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, cwd=str(root))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == str(nobody.pw_uid) and (root / "ws" / "a.txt").read_text() == "hi\n"
    assert not os.path.exists("/etc/nb-probe")
    evs = events(root / "home", "nb")
    assert [(d.payload["operation"], d.payload["target"]) for d in of_kind(evs, "sandbox_denied")] == [
        ("file_write", "/etc/nb-probe")]
    assert any(f.payload["path"] == f"{root}/ws/a.txt" for f in of_kind(evs, "file_accessed"))


def test_edits_between_commands_are_replayed_and_extra_actions_reported(box):
    pol = box.policy()
    (box.ws / "note.txt").write_text("first\n")
    assert box.run("sh", "-c", "cat note.txt > copy1.txt", pol=pol, session="ed").returncode == 0
    (box.ws / "note.txt").write_text("edited outside the sandbox\n")  # e.g. the agent's own patch tool
    script = 'cat note.txt > copy2.txt; if [ "$MY_SETTING" = x ]; then echo > extra.txt; fi'
    assert box.run("sh", "-c", script, pol=pol, session="ed").returncode == 0
    sandbox("end", "ed", env=box.env, cwd=box.ws)
    shutil.rmtree(box.ws)
    rep = json.loads(sandbox("reexecute", "ed", "--format", "json", env=box.env, cwd=box.root).stdout)
    assert rep["reproducible"], rep["divergences"]

    proc = sandbox("reexecute", "ed", "--format", "json", "--set-env", "MY_SETTING=x", env=box.env, cwd=box.root,
                   check=False)
    rep = json.loads(proc.stdout)
    evs = box.events("ed")
    tops = {e.payload["command_id"] for e in of_kind(evs, "command_started") if not e.payload.get("parent_command_id")}
    finished = [e.seq for e in of_kind(evs, "command_finished") if e.payload["command_id"] in tops]
    extra = [d for d in rep["divergences"] if d["field"] == "presence"]
    assert [(d["seq"], d["expected"], d["actual"], d["change"]["type"]) for d in extra] == [
        (finished[1], "absent", "happened", "file")]
    assert extra[0]["change"]["path"].endswith("/extra.txt")


def test_doctor_and_forget(box):
    rows = json.loads(sandbox("doctor", "--format", "json", env=box.env, cwd=box.ws).stdout)
    ok = {r["check"]: r["ok"] for r in rows}
    assert ok["bwrap"] and ok["strace"] and ok["faketime"] and ok["namespaces"] and ok["ptrace"]
    (box.ws / "f").write_text("content")
    assert box.run("cat", "f", session="fg").returncode == 0
    sandbox("end", "fg", env=box.env, cwd=box.ws)
    out = sandbox("forget", "fg", env=box.env, cwd=box.ws).stdout
    assert "forgot session fg" in out and not (box.home / "cas" / "sessions" / "fg.json").exists()
    assert box.events("fg"), "the events stay"
    p = sandbox("reexecute", "fg", env=box.env, cwd=box.root, check=False)
    assert p.returncode == 1 and "no recording of session fg" in p.stderr


def test_network_ask_rule_prompts_with_the_destination_and_its_digest(box):
    from agentledger.producers.sandbox.proxy import network_digest
    from sandbox_support import Server

    srv = Server({"/a.txt": b"asked and answered\n"})
    try:
        pol = box.policy(asked=srv.port, noninteractive="deny")
        code, term = run_in_pty(box.cli("run", "--policy", str(pol), "--session", "na", "--", PY, "-c",
                                        f"import urllib.request as u; print(u.urlopen('{srv.url('/a.txt')}').read())"),
                                env=box.env, cwd=box.ws, answer=b"y\n")
    finally:
        srv.stop()
    digest = network_digest("http", "127.0.0.1", srv.port)
    assert code == 0 and "asked and answered" in term, term
    assert "approval needed (network, rule ask-server)" in term and f"sha256:{digest}" in term
    assert f"GET {srv.url('/a.txt')}" in term
    assert srv.hits == ["/a.txt"]
    evs = box.events("na")
    assert decided(evs) == [("approved", "user", "ask-server")]
    assert of_kind(evs, "approval_requested")[0].payload["action_digest"] == digest


def test_a_unix_socket_the_command_reaches_is_recorded_and_an_absent_one_is_not(box):
    """Found by an audit: a host daemon's unix socket in a path the sandbox shows was reachable
    (a network namespace does not confine AF_UNIX) and its connect left no event."""
    import socket
    import threading

    path = box.ws / "daemon.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()

    def serve():
        conn, _ = srv.accept()
        conn.sendall(b"hello from the host\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    code = ("import socket\n"
            "s = socket.socket(socket.AF_UNIX); s.connect('daemon.sock'); print(s.recv(100).decode())\n"
            "try:\n    socket.socket(socket.AF_UNIX).connect('/nowhere/at/all.sock')\nexcept OSError: pass\n")
    try:
        p = box.run(PY, "-c", code, pol=box.policy(mode="read_only"))
    finally:
        srv.close()
    assert p.returncode == 0 and "hello from the host" in p.stdout
    evs = box.events()
    attempted = of_kind(evs, "network_attempted")
    assert [(a.payload["host"], a.payload["port"], a.payload["method"]) for a in attempted] == \
        [(str(path), 0, "connect(AF_UNIX)")]
    dec = of_kind(evs, "network_decided")[0].payload
    assert (dec["decision"], dec["rule"]) == ("allow", "sandbox.unix_socket")
    assert of_kind(evs, "network_completed")[0].payload["outcome"] == "ok"
