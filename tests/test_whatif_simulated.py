"""What-if on simulated sessions, end to end through the CLI (embedded log + DuckDB file).

The simulator decides every network request with its own policy file (`simulate --write-policy`):
that very file re-decides nothing differently; a copy that forbids one domain a session reached
reports exactly that session's requests to it; a strict egress copy stops the network attacks and
breaks no benign work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_env, run_cli

SESSIONS, SEED = 120, 31


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("whatif-sim")
    home = root / "home"
    env = cli_env(home)
    policy = root / "sim.toml"
    out = run_cli("simulate", "--sessions", str(SESSIONS), "--seed", str(SEED), "--attack-rate", "0.4",
                  "--labels", str(root / "labels.jsonl"), "--write-policy", str(policy), "--format", "json", env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1])["policy"] == str(policy)
    run_cli("ingest", "--format", "json", env=env)
    labels = [json.loads(line) for line in (root / "labels.jsonl").read_text().splitlines()]
    return {"root": root, "env": env, "policy": policy, "labels": labels}


def _sql(fleet, query: str) -> list[dict]:
    return json.loads(run_cli("sql", query, "--format", "json", env=fleet["env"]).stdout)


def _whatif(fleet, policy: Path) -> dict:
    return json.loads(run_cli("whatif", "--policy", str(policy), "--format", "json", env=fleet["env"]).stdout)


def _with_rule(fleet, name: str, rule: str, default: str | None = None) -> Path:
    text = fleet["policy"].read_text().replace('name = "simulated-fleet"', f'name = "{name}"')
    if default:
        text = text.replace('[network]\ndefault = "allow"', f'[network]\ndefault = "{default}"')
    p = fleet["root"] / f"{name}.toml"
    p.write_text(text + "\n" + rule)
    return p


def test_the_policy_the_sessions_ran_under_reports_no_divergence(fleet):
    rep = _whatif(fleet, fleet["policy"])
    s = rep["summary"]
    assert s["sessions"] == SESSIONS and s["requests"] > 0
    assert s["divergences"] == 0, rep["divergences"][:5]
    assert all(x["same_policy"] for x in rep["sessions"])  # session_started.policy_digest is this file's
    # the simulator's policy has no [sandbox] section: file requests are counted, not re-decided
    assert s["policy_sections"] == ["approvals", "network"]
    assert set(s["not_redecided"]) == {"sandbox"} and s["not_redecided"]["sandbox"]["file_write"] > 0
    # the network decisions recorded are the policy's, rule ids included
    rules = {r["rule"] for r in _sql(fleet, "select distinct network_decided.rule as rule from events "
                                            "where kind = 'network_decided'")}
    assert rules <= {"allow-registries", "allow-loopback", "deny-paste-sites", "deny-telemetry", "default"}
    assert "allow-registries" in rules


def test_forbidding_a_domain_one_session_reached_reports_exactly_its_requests(fleet):
    # a domain reached (allowed, completed ok) by few sessions; pick one of them
    row = _sql(fleet, """
        select a.network_attempted.host as host, count(distinct a.session_id) as n, min(a.session_id) as sid
        from events a join events c on c.session_id = a.session_id and c.kind = 'network_completed'
             and c.network_completed.attempt_id = a.network_attempted.attempt_id and c.network_completed.outcome = 'ok'
        where a.kind = 'network_attempted' and a.network_attempted.host not in ('localhost', '127.0.0.1')
        group by 1 order by n, host limit 1""")[0]
    host, sid = row["host"], row["sid"]
    expected = [r["seq"] for r in _sql(fleet, f"""
        select seq from events where session_id = '{sid}' and kind = 'network_attempted'
          and network_attempted.host = '{host}' order by seq""")]
    assert expected
    forbid = _with_rule(fleet, "forbid-one", f'[[network.rules]]\nid = "forbid-{host}"\naction = "deny"\n'
                                              f'hosts = ["{host}"]\n')
    doc = json.loads(run_cli("replay", sid, "--policy", str(forbid), "--format", "json", env=fleet["env"]).stdout)
    divs = doc["whatif"]["divergences"]
    assert [d["seq"] for d in divs] == expected
    assert all(d["kind"] == "network" and d["new"] == "deny" and d["rule"] == f"forbid-{host}" for d in divs)
    assert all(d["recorded"] == "allow" and d["effect"] == "block" for d in divs)
    # across the fleet: exactly the sessions that tried that host diverge
    reached = {r["session_id"] for r in _sql(fleet, f"""select distinct session_id from events
        where kind = 'network_attempted' and network_attempted.host = '{host}'""")}
    rep = _whatif(fleet, forbid)
    assert {x["session_id"] for x in rep["sessions"] if x["divergences"]} == reached
    assert {d["target"].rsplit(":", 1)[0] for d in rep["divergences"]} == {host}


def test_a_strict_egress_policy_stops_the_network_attacks_and_breaks_no_benign_work(fleet):
    strict = _with_rule(fleet, "strict-egress", "", default="deny")
    rep = _whatif(fleet, strict)
    by_sid = {x["session_id"]: x for x in rep["sessions"]}
    network_attacks = {"credential_exfiltration", "crypto_mining", "dependency_confusion", "download_execute",
                       "persistence"}
    labels = fleet["labels"]
    attacked = [lab for lab in labels if lab["scenario"] in network_attacks]
    assert attacked, "the fleet should carry network attacks"
    assert all(by_sid[lab["session_id"]]["stopped"] for lab in attacked)
    benign = [lab for lab in labels if not lab["attack"]]
    assert benign and not any(by_sid[lab["session_id"]]["broke_work"] for lab in benign)
    assert not any(by_sid[lab["session_id"]]["stopped"] for lab in benign)
