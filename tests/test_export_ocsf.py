"""`agentledger export ocsf` and `ingest --ocsf`: every record validates against the OCSF 1.8.0
JSON Schemas vendored in tests/fixtures/ocsf (compiled from the OCSF schema repository's files, and
the OCSF server's own export: both), with jsonschema; required attributes, enums, class/type ids
consistent; no secret in clear; the ingest sink appends each event and alert revision once."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
import pytest

import agentledger.api as al
from agentledger.consumers.export.ocsf import SKIPPED_KINDS
from agentledger.schemas.warehouse import kinds

from conftest import cli_env, run_cli

FIXTURES = Path(__file__).parent / "fixtures"
OCSF = FIXTURES / "ocsf"
CLASS_FILES = {1001: "file_activity", 1007: "process_activity", 2004: "detection_finding", 4001: "network_activity"}
CATEGORY = {1001: 1, 1007: 1, 2004: 2, 4001: 4}


@functools.cache
def validators() -> dict[tuple[str, int], jsonschema.Draft202012Validator]:
    """Built when a test first needs them (checking the schemas takes ~2.5 s, which every xdist worker
    would otherwise spend collecting this file)."""
    out = {}
    for where in ("repo", "server"):
        for uid, name in CLASS_FILES.items():
            schema = json.loads((OCSF / where / f"{name}.schema.json").read_text())
            jsonschema.Draft202012Validator.check_schema(schema)
            out[(where, uid)] = jsonschema.Draft202012Validator(schema)
    return out



def validate(rec: dict) -> list[str]:
    """Every schema error of one record, against both compiled sets, plus the id arithmetic."""
    errors = []
    uid = rec.get("class_uid")
    if uid not in CLASS_FILES:
        return [f"class_uid {uid} is none of ours"]
    for where in ("repo", "server"):
        errors += [f"{where}: {e.json_path}: {e.message[:200]}" for e in validators()[(where, uid)].iter_errors(rec)]
    if rec.get("type_uid") != uid * 100 + rec.get("activity_id", -1):
        errors.append(f"type_uid {rec.get('type_uid')} != class_uid*100 + activity_id")
    if rec.get("category_uid") != CATEGORY[uid] or uid // 1000 != rec.get("category_uid"):
        errors.append(f"category_uid {rec.get('category_uid')} does not match class {uid}")
    return errors


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_vendored_schemas_are_ocsf_1_8_0_and_can_fail():
    meta = json.loads((OCSF / "VERSION.json").read_text())
    assert meta["ocsf_version"] == "1.8.0" and meta["license"].startswith("Apache-2.0")
    assert set(meta["classes"]) == {str(u) for u in CLASS_FILES}
    good = {"class_uid": 1007, "category_uid": 1, "activity_id": 1, "type_uid": 100701, "time": 1, "severity_id": 1,
            "metadata": {"version": "1.8.0", "product": {"name": "agentledger"}},
            "actor": {"app_name": "codex"}, "device": {"type_id": 0, "name": "h", "hostname": "h"},
            "process": {"uid": "c1"}}
    assert validate(good) == []
    # each of these must be caught: a missing required attribute, a value outside an enum, an
    # attribute the class does not have, a wrong type, an inconsistent type_uid
    bad = [{k: v for k, v in good.items() if k != "process"}, {**good, "severity_id": 7},
           {**good, "command": "ls"}, {**good, "time": "yesterday"}, {**good, "type_uid": 100702},
           {**good, "device": {"type_id": 0}}, {**good, "metadata": {"product": {"name": "x"}}}]
    for rec in bad:
        assert validate(rec), rec


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Simulated sessions with every attack scenario, ingested with detection (alerts)."""
    home = tmp_path_factory.mktemp("ocsf") / "home"
    s = al.settings(home=home)
    sim = al.simulate(s, sessions=24, seed=11, attack_rate=0.5)
    ing = al.ingest(s, detect=True)
    assert ing.accepted == sim.events and ing.detection.alerts_new > 0
    return s, sim


def test_every_exported_record_of_every_kind_and_every_alert_validates(simulated, tmp_path):
    s, sim = simulated
    out = tmp_path / "all.jsonl"
    res = al.export_ocsf(s, out)
    recs = records(out)
    assert len(recs) == res.events + res.alerts and res.alerts > 0
    errors = {i: e for i, r in enumerate(recs) if (e := validate(r))}
    assert not errors, {i: (recs[i].get("unmapped", {}).get("agentledger", {}).get("kind"), e[:3])
                        for i, e in list(errors.items())[:5]}
    # every event kind the simulator wrote is there, except the ones OCSF has no activity for
    wh_kinds = {r[0]: r[1] for r in al.sql(s, "select kind, count(*) from events group by 1").rows}
    got: dict[str, int] = {}
    for r in recs:
        if r["class_uid"] != 2004:
            k = r["unmapped"]["agentledger"]["kind"]
            got[k] = got.get(k, 0) + 1
    assert got == {k: n for k, n in wh_kinds.items() if k not in SKIPPED_KINDS}
    assert res.skipped == {k: n for k, n in wh_kinds.items() if k in SKIPPED_KINDS}
    # the kinds of the simulation cover every family and every kind but gap (nothing lost here)
    assert set(wh_kinds) >= {k.kind for k in kinds()} - {"gap"}
    # classes as documented
    by_kind = {}
    for r in recs:
        by_kind.setdefault(r.get("unmapped", {}).get("agentledger", {}).get("kind", "alert"), set()).add(r["class_uid"])
    assert by_kind["command_started"] == by_kind["command_finished"] == {1007}
    assert by_kind["file_accessed"] == {1001}
    assert by_kind["network_attempted"] == by_kind["network_completed"] == by_kind["network_decided"] == {4001}
    assert by_kind["alert"] == {2004}
    assert by_kind["sandbox_denied"] <= {1001, 1007, 4001} and by_kind["approval_decided"] <= {1001, 1007, 4001}


def test_metadata_time_chain_hash_and_alert_links_match_the_warehouse(simulated, tmp_path):
    s, _ = simulated
    out = tmp_path / "all.jsonl"
    al.export_ocsf(s, out)
    recs = records(out)
    rows = {r[0]: r for r in al.sql(s, "select event_id, session_id, seq, hash, epoch_ms(occurred_at), "
                                       "producer.host, producer.user from events").rows}
    events = [r for r in recs if r["class_uid"] != 2004]
    for r in events:
        eid, sid, seq, h, t, host, user = rows[r["metadata"]["uid"]]
        assert r["metadata"]["correlation_uid"] == sid and r["metadata"]["sequence"] == seq
        assert r["metadata"]["product"] == {"name": "agentledger", "vendor_name": "agentledger", "version": "0.1.0"}
        assert r["time"] == t and r["device"]["hostname"] == host and r["actor"]["session"]["uid"] == sid
        assert r["unmapped"]["agentledger"]["hash"] == h
        assert {"name": "unmapped.agentledger.hash", "type_id": 8, "type": "Hash", "value": h} in r["observables"]
        if user:
            assert r["actor"]["user"]["name"] == user or r["activity_name"] == "Approval Decided"
    # event ids are unique: one record per event
    assert len({r["metadata"]["uid"] for r in events}) == len(events)
    alerts = {a["alert_id"]: a for a in al.alerts(s, limit=10_000).as_dicts()}
    findings = [r for r in recs if r["class_uid"] == 2004]
    assert len(findings) == len(alerts)
    sev = {"low": 2, "medium": 3, "high": 4, "critical": 5}
    for f in findings:
        a = alerts[f["finding_info"]["uid"]]
        assert f["severity_id"] == sev[a["severity"]] and f["metadata"]["uid"] == f"{a['alert_id']}/{a['revision']}"
        assert f["finding_info"]["analytic"]["uid"] == a["rule_id"]
        assert [x["technique"]["uid"] for x in f["finding_info"].get("attacks", [])] == list(a["mitre"])
        # related events are the evidence events, by event id
        ev = {rows[e["uid"]][2] for e in f["finding_info"]["related_events"]}
        assert ev == set(a["evidence_seqs"]) and all(rows[e["uid"]][1] == a["session_id"]
                                                     for e in f["finding_info"]["related_events"])


def test_no_secret_is_in_clear_and_tokens_stay_tokens(simulated, tmp_path):
    s, sim = simulated
    out = tmp_path / "all.jsonl"
    al.export_ocsf(s, out)
    text = out.read_text()
    secrets = {v for values in sim.secrets.values() for v in values}
    assert secrets, "the simulation seeded secrets"
    needles = secrets | {ln for v in secrets if "PRIVATE KEY" in v for ln in v.splitlines()[1:-1] if len(ln) > 16}
    leaked = sorted(n[:12] for n in needles if n in text)
    assert not leaked, f"secrets in clear in the OCSF export: {leaked}"
    tokens = {r[0] for r in al.sql(s, "select distinct unnest(redactions).token from events").rows}
    assert tokens and any(t in text for t in tokens), "redaction tokens are exported as they are"


def test_a_directory_gets_one_file_per_class_and_session_and_since_filter(simulated, tmp_path):
    s, sim = simulated
    d = tmp_path / "lake"
    d.mkdir()
    res = al.export_ocsf(s, d)
    files = sorted(p.name for p in d.iterdir())
    assert files == sorted(f"{n}.jsonl" for n in CLASS_FILES.values())
    for uid, name in CLASS_FILES.items():
        assert {r["class_uid"] for r in records(d / f"{name}.jsonl")} == {uid}
    assert sum(len(records(d / f)) for f in files) == res.events + res.alerts
    # one session, by prefix
    sid = sim.suspicious[0]
    one = tmp_path / "one.jsonl"
    r1 = al.export_ocsf(s, one, sessions=[sid[:13]])
    assert r1.sessions == 1 and {r["metadata"]["correlation_uid"] for r in records(one)} == {sid}
    n = al.sql(s, f"select count(*) from events where session_id = '{sid}' and kind not in ('checkpoint', 'gap')").rows
    assert r1.events == n[0][0] and r1.alerts > 0
    # since: only events at or after the time
    mid = al.sql(s, "select strftime(quantile_disc(occurred_at, 0.5), '%Y-%m-%dT%H:%M:%S.%f') from events").rows[0][0]
    later = tmp_path / "later.jsonl"
    r2 = al.export_ocsf(s, later, since=mid)
    want = al.sql(s, f"select count(*) from events where occurred_at >= TIMESTAMP '{mid}' "
                     "and kind not in ('checkpoint', 'gap')").rows[0][0]
    assert 0 < r2.events == want < res.events


def test_an_imported_codex_session_exports_valid_records(tmp_path):
    s = al.settings(home=tmp_path / "home")
    codex = FIXTURES / "codex"
    al.import_agent_logs(s, rollouts=[codex], otel=[codex])
    al.ingest(s, detect=True)
    out = tmp_path / "codex.jsonl"
    res = al.export_ocsf(s, out)
    recs = records(out)
    assert res.sessions == 5 and res.events > 20
    errors = [e for r in recs for e in validate(r)]
    assert not errors, errors[:5]
    kinds_seen = {r["unmapped"]["agentledger"]["kind"] for r in recs if r["class_uid"] != 2004}
    assert {"command_started", "command_finished", "file_accessed", "approval_decided"} <= kinds_seen
    sources = {r["unmapped"]["agentledger"]["source"] for r in recs if r["class_uid"] != 2004}
    assert sources <= {"codex_rollout", "otel"} and "codex_rollout" in sources


def test_ingest_ocsf_appends_each_event_and_alert_revision_once(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home)
    out = tmp_path / "sink.jsonl"
    run_cli("simulate", "--sessions", "6", "--seed", "5", "--attack-rate", "0.5", env=env)
    first = json.loads(run_cli("ingest", "--detect", "--ocsf", str(out), "--format", "json", env=env).stdout)
    recs = records(out)
    assert first["ocsf"]["events"] > 0 and len(recs) == first["ocsf"]["events"] + first["ocsf"]["alerts"]
    assert not [e for r in recs for e in validate(r)]
    # more sessions, a second ingest: only the new ones are appended
    run_cli("simulate", "--sessions", "6", "--seed", "6", "--attack-rate", "0.5", env=env)
    second = json.loads(run_cli("ingest", "--detect", "--ocsf", str(out), "--format", "json", env=env).stdout)
    assert second["ocsf"]["events"] > 0
    recs = records(out)
    uids = [r["metadata"]["uid"] for r in recs]
    assert len(uids) == len(set(uids)), "an event or alert revision twice"
    s = al.settings(home=home)
    n_events = al.sql(s, "select count(*) from events where kind not in ('checkpoint', 'gap')").rows[0][0]
    n_alerts = al.sql(s, "select count(*) from alerts").rows[0][0]
    assert sum(r["class_uid"] != 2004 for r in recs) == n_events and sum(r["class_uid"] == 2004 for r in recs) == n_alerts
    # a torn last line (a crash mid-write) is moved aside, and what it held is written again whole
    last = out.read_bytes().splitlines(keepends=True)[-1]
    with open(out, "r+b") as f:
        f.truncate(out.stat().st_size - len(last) // 2)
    third = json.loads(run_cli("ingest", "--ocsf", str(out), "--format", "json", env=env).stdout)
    assert third["ocsf"]["events"] + third["ocsf"]["alerts"] == 1
    assert (tmp_path / "sink.jsonl.torn-1").read_bytes() == last[: len(last) - len(last) // 2]
    assert [r["metadata"]["uid"] for r in records(out)] == uids
    # nothing new: nothing appended
    fourth = json.loads(run_cli("ingest", "--ocsf", str(out), "--format", "json", env=env).stdout)
    assert fourth["ocsf"]["events"] == fourth["ocsf"]["alerts"] == 0
    # a file that is not ours is refused, not appended to
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    bad = run_cli("ingest", "--ocsf", str(other), env=env, check=False)
    assert bad.returncode == 1 and "not an OCSF record agentledger wrote" in bad.stderr
    assert other.read_text() == '{"hello": 1}\n'


def test_export_ocsf_cli_prints_counts_and_writes_the_file(tmp_path):
    env = cli_env(tmp_path / "home")
    run_cli("simulate", "--sessions", "3", "--seed", "2", env=env)
    run_cli("ingest", env=env)
    out = tmp_path / "x.jsonl"
    doc = json.loads(run_cli("export", "ocsf", "--out", str(out), "--format", "json", env=env).stdout)
    assert doc["paths"] == [str(out)] and doc["events"] == len(records(out)) and doc["alerts"] == 0
    text = run_cli("export", "ocsf", "--out", str(out), env=env).stdout
    assert f"wrote {doc['events']} events and 0 alerts of 3 sessions as OCSF" in text
    missing = run_cli("export", "ocsf", "--out", str(tmp_path / "no" / "x.jsonl"), env=env, check=False)
    assert missing.returncode == 1 and "is not a directory" in missing.stderr


def test_mcp_tool_calls_export_as_process_activity_with_their_mcp_details(tmp_path):
    """Issue 17: an MCP call is Process Activity (OCSF 1.8 has no tool-call class), its server,
    tool, arguments digest, outcome and error in unmapped.agentledger.mcp; every record validates."""
    s = al.settings(home=tmp_path / "home")
    al.import_agent_logs(s, claude=[FIXTURES / "claude-code" / "projects"])
    al.ingest(s)
    out = tmp_path / "claude.jsonl"
    al.export_ocsf(s, out)
    recs = records(out)
    errors = [e for r in recs for e in validate(r)]
    assert not errors, errors[:5]
    mcp = [r for r in recs if "mcp" in r["unmapped"]["agentledger"]]
    started = {r["unmapped"]["agentledger"]["tool_call_id"]: r for r in mcp if r["activity_id"] == 1}
    finished = {r["unmapped"]["agentledger"]["tool_call_id"]: r for r in mcp if r["activity_id"] == 2}
    assert set(started) == set(finished) == {"toolu_01Mcp1", "toolu_02Mcp1"}
    assert all(r["class_uid"] == 1007 for r in mcp)
    m = started["toolu_01Mcp1"]["unmapped"]["agentledger"]["mcp"]
    assert (m["server"], m["tool"]) == ("github", "create_pull_request") and m["arguments_digest"].startswith("sha256:")
    assert started["toolu_01Mcp1"]["message"] == "called MCP tool create_pull_request of server github"
    err = finished["toolu_02Mcp1"]["unmapped"]["agentledger"]["mcp"]
    assert (err["outcome"], err["error"]) == ("error", "Sentry API error: 401 Unauthorized")
    assert finished["toolu_01Mcp1"]["unmapped"]["agentledger"]["mcp"]["outcome"] == "ok"
