"""agentledger.api, the application layer under the CLI: plain functions that return objects,
report progress through a callback, print nothing, and keep the home private."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

from conftest import REPO, cli_env

from agentledger import api


def test_simulate_ingest_sql_report_progress_and_print_nothing(tmp_path, capfd):
    s = api.settings(home=tmp_path / "home", env={}, private=False)
    updates: list[api.ProgressUpdate] = []
    sim = api.simulate(s, 4, 3, attack_rate=0.5, progress=updates.append)
    ingested = api.ingest(s, detect=True, model=None, progress=updates.append)
    rows = api.sql(s, "select count(*) as n, count(distinct session_id) as sessions from events")
    out, err = capfd.readouterr()
    assert out == "" and err == ""

    sim_steps = [u for u in updates if u.task == "simulating sessions"]
    assert [u.completed for u in sim_steps] == [0, 1, 2, 3, 4] and {u.total for u in sim_steps} == {4}
    ing_steps = [u for u in updates if u.task == "ingesting events"]
    assert ing_steps[0].completed == 0 and ing_steps[-1].completed == ingested.stats.messages == sim.events
    assert ing_steps[0].total == sim.events  # the lag, known before the first batch

    assert isinstance(sim, api.Simulation) and sim.sessions == 4 and len(sim.labels) == 4
    assert ingested.accepted == sim.events and ingested.dead_letters == 0
    assert ingested.as_dict()["detection"]["sessions"] == 4
    assert rows.as_dicts() == [{"n": sim.events, "sessions": 4}]


def test_verify_replay_and_bundles_return_objects(tmp_path):
    s = api.settings(home=tmp_path / "home", env={}, private=False)
    sim = api.simulate(s, 3, 5, force_attack_first=True)
    api.ingest(s)
    v = api.verify(s)
    assert v.ok and len(v.verdicts) == 3 and v.as_dict()["sessions"] == 3
    suspect = sim.suspicious[0]
    r = api.replay(s, suspect[:13], at=2)  # a unique prefix, as on the command line
    assert r.session_id == suspect and r.verifies and r.state["as_of_seq"] == 2
    assert [e["seq"] for e in r.timeline] == [0, 1, 2] and r.as_dict(limit=1)["timeline"] == r.timeline[:1]
    assert "<html" in r.html().lower()
    exported = api.export_bundle(s, suspect, tmp_path / "b.avro")
    assert exported.doc["sha256"] == api.file_sha256(tmp_path / "b.avro")
    assert api.verify_bundle(s, tmp_path / "b.avro").ok
    other = api.settings(home=tmp_path / "other", env={}, private=False)
    imported = api.import_bundle(other, tmp_path / "b.avro")
    assert (imported.imported, imported.quarantined) == (exported.doc["events"], 0)
    assert api.import_bundle(other, tmp_path / "b.avro").already_present == exported.doc["events"]


def test_settings_keep_the_home_private_like_the_cli(tmp_path):
    """Files agentledger.api makes are owner-only, as the CLI's (a library call sets the umask the
    CLI sets at start-up; private=False leaves it alone)."""
    code = ("import agentledger.api as al, os, json\n"
            "s = al.settings()\n"
            "al.simulate(s, 1, 1); al.ingest(s)\n"
            "print(json.dumps([os.stat(s.warehouse).st_mode, os.stat(s.home).st_mode]))\n")
    env = cli_env(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    warehouse_mode, home_mode = json.loads(proc.stdout)
    assert stat.S_IMODE(warehouse_mode) & 0o077 == 0 and stat.S_IMODE(home_mode) & 0o077 == 0
