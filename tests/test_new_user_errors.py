"""Errors and output a new user can act on (issue 21 items 6, 7, 9; issue 20 item 8), on the demo's
own sessions: session ids by prefix in every command, `~` in a replayed policy, ...

One demo run (module fixture) serves every test here."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import cli_env, run_cli
from agentledger.schemas.sessionids import MIN_PREFIX, AmbiguousSession, NoSuchSession, PrefixTooShort, listed_place, resolve


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo") / "home"
    env = cli_env(home, HOME=str(home.parent))
    out = run_cli("demo", env=env)
    sessions = [r["session_id"] for r in json.loads(run_cli(
        "sql", "select session_id from sessions order by started_at", "--format", "json", env=env).stdout)]
    return env, out, sessions


def _fails(*args, env) -> str:
    proc = run_cli(*args, env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    return " ".join(proc.stderr.split())  # rich folds long lines


# -- item 6: one resolver for every command that takes a session id -------------------------------

def test_the_resolver_rules():
    ids = ["s1", "019b76db-346b", "019b76dc-17d9", "019c0000-0000"]
    place = listed_place("the list", lambda: ids)
    assert resolve("s1", [place]) == "s1"  # a full id of any length
    assert resolve("019b76db", [place]) == "019b76db-346b"
    with pytest.raises(AmbiguousSession, match=r"019b76 is ambiguous \(2 sessions: 019b76db-346b, 019b76dc-17d9\)"):
        resolve("019b76", [place])
    with pytest.raises(PrefixTooShort, match=f"at least {MIN_PREFIX} characters"):
        resolve("019b", [place])
    with pytest.raises(NoSuchSession, match="no such session: deadbeef-0000 .looked in the list"):
        resolve("deadbeef-0000", [place])
    many = listed_place("many", lambda: [f"aaaaaa-{i:03d}" for i in range(80)])
    with pytest.raises(AmbiguousSession, match=r"\(50\+ sessions: aaaaaa-000, .*aaaaaa-004, …\)"):
        resolve("aaaaaa", [many])


def test_every_command_that_takes_a_session_takes_a_unique_prefix_and_says_what_is_wrong(demo):
    env, _, sessions = demo
    suspicious = sessions[0]
    prefix = suspicious[:13]  # what the demo prints
    common = next(n for n in range(13, 0, -1) if sum(s.startswith(suspicious[:n]) for s in sessions) > 1)
    shared = suspicious[:max(common, MIN_PREFIX)]
    k = sum(s.startswith(shared) for s in sessions)
    assert k > 1

    # (read-only commands: run side by side)
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(["ambiguous", "short", "none", "verify", "alerts", "reexecute", "deadletters"], pool.map(
            lambda args: run_cli(*args, env=env, check=False),
            [("replay", shared), ("replay", suspicious[:4]), ("replay", "deadbeef-0000"),
             ("verify", prefix, "--format", "json"), ("alerts", "--session", prefix, "--format", "json"),
             ("sandbox", "reexecute", prefix), ("deadletters", "list", "--session", prefix)])))
    err = {name: " ".join(p.stderr.split()) for name, p in done.items()}
    assert done["ambiguous"].returncode == 1 and f"ambiguous ({k} sessions: {suspicious}" in err["ambiguous"]
    assert done["short"].returncode == 1 and "too short" in err["short"]
    assert done["none"].returncode == 1 and "no such session: deadbeef-0000" in err["none"]
    assert not any("Traceback" in e for e in err.values()), err

    # issue 20 item 8: a prefix verifies that session (it used to report it broken: no_events)
    out = json.loads(done["verify"].stdout)
    assert out["ok"] and [r["session_id"] for r in out["results"]] == [suspicious]
    alerts = json.loads(done["alerts"].stdout)
    assert alerts and {a["session_id"] for a in alerts} == {suspicious}
    # found, and refused for what it is (a simulated session), not "not found"
    assert done["reexecute"].returncode == 1 and "recorded by `agentledger sandbox run`" in err["reexecute"]
    assert done["deadletters"].returncode == 0
    detect = json.loads(run_cli("detect", "--session", prefix, "--no-publish", "--format", "json", env=env).stdout)
    assert detect["sessions"] == 1 and detect["events"] > 0


def test_a_prefix_of_a_session_only_in_the_local_log_resolves_by_scanning_it(tmp_path):
    env = cli_env(tmp_path / "home")
    labels = tmp_path / "labels.jsonl"
    run_cli("simulate", "--sessions", "2", "--seed", "5", "--no-sign", "--labels", str(labels), env=env)  # no ingest
    sid = json.loads(labels.read_text().splitlines()[1])["session_id"]
    out = json.loads(run_cli("replay", sid[:14], "--format", "json", env=env).stdout)
    assert out["session_id"] == sid and out["source"]["kind"] == "log"


# -- item 7: `~` in a replayed policy is the recorded session's home ------------------------------

def test_the_docs_deny_read_example_catches_the_demos_credentials_read_whoever_replays(demo, tmp_path):
    env, _, sessions = demo
    policy = tmp_path / "no-cloud-creds.toml"
    policy.write_text('name = "no-cloud-creds"\n[sandbox]\ndeny_read = ["~/.aws/**"]\n')
    auditor = {**env, "HOME": str(tmp_path / "auditor")}  # replayed by another user than the recorded one
    out = json.loads(run_cli("replay", sessions[0], "--policy", str(policy), "--format", "json", env=auditor).stdout)
    divs = out["whatif"]["divergences"]
    assert [(d["kind"], d["request"], d["effect"]) for d in divs] == [
        ("file_read", "read /home/dev/.aws/credentials", "block")]
    # the simulated sessions record a user (devNN) whose home is not the /home/dev they work in: said so
    assert out["whatif"]["summary"]["sessions_home_unknown"] == 1
    text = " ".join(run_cli("replay", sessions[0], "--policy", str(policy), env=auditor).stdout.split())
    assert "did not record their home directory: ~ in the policy was taken as any home directory" in text


# -- item 9: messages that say what happened ------------------------------------------------------

def test_a_misspelt_policy_section_names_the_valid_ones_and_the_closest(demo, tmp_path):
    env, _, sessions = demo
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[netwrok]\ndefault = "deny"\n')
    err = _fails("replay", sessions[0], "--policy", str(bad), env=env)
    assert "unknown top-level key(s) netwrok (did you mean network?)" in err
    assert "a policy has name, description, [sandbox], [network], [approvals]" in err


def test_replay_at_a_seq_past_the_end_says_so(demo):
    env, _, sessions = demo
    proc = run_cli("replay", sessions[0], "--at", "999", env=env)
    assert "has 39 events (seq 0..38): --at 999 is past its end" in " ".join(proc.stderr.split())
    doc = json.loads(run_cli("replay", sessions[0], "--at", "999", "--format", "json", env=env).stdout)
    assert "past its end" in doc["notice"] and doc["state"]["as_of_seq"] == 38
    assert run_cli("replay", sessions[0], "--at", "-1", env=env, check=False).returncode == 2


def test_the_timeline_names_alerts_by_rule_and_the_demo_labels_its_alert_column(demo):
    env, out, sessions = demo
    text = run_cli("replay", sessions[0], env=env).stdout
    assert "⚑ credential-read-then-egress" in text
    assert re.search(r"⚑ [0-9a-f]{8}-[0-9a-f]{4}", text) is None  # not by alert id
    assert "alerts*" in out.stdout and "alerts*: high or critical only" in " ".join(out.stdout.split())


def test_re_running_the_demo_says_the_sessions_were_already_recorded(demo):
    env, first, _ = demo
    again = " ".join(run_cli("demo", env=env).stdout.split())
    assert "ingested 0 new events; 187 were already recorded" in again and "quarantined" not in again
    assert "quarantined" not in " ".join(first.stdout.split())
