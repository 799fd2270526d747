"""Issue 20, attack 3: the last index entries of a local-log partition are cut before ingest. What is
left verifies, so the session looks merely open; under --require-signatures an open session fails
(reason ``open``), since a session still running cannot be told from one whose tail was cut."""

from __future__ import annotations

import json

from conftest import cli_env, run_cli
from agentledger.schemas import signing
from agentledger.schemas.config import from_env
from agentledger.schemas.transport.local import IDX_ENTRY, LocalLog


def test_cut_index_entries_make_an_open_session_that_fails_require_signatures(tmp_path):
    from agentledger import api

    home = tmp_path / "home"
    s = from_env({"AGENTLEDGER_HOME": str(home)})
    signer = signing.generate()  # a producer key the home trusts (the simulator's own seed key never is)
    signing.write_keypair(signer, home / "keys")
    api.simulate(s, 3, 4, signer=signer)
    log = LocalLog(s.log_dir)
    part = max(range(log.partition_count(s.topic)), key=lambda p: log.end_offset(s.topic, p))
    seg = log.segment_path(s.topic, part, log.segments(s.topic, part)[-1])
    idx = seg.with_suffix(".idx")
    data = idx.read_bytes()
    idx.write_bytes(data[: len(data) - 5 * IDX_ENTRY.size])  # the last five records: end, final checkpoint...
    env = cli_env(home)
    run_cli("ingest", env=env)
    proc = run_cli("verify", "--require-signatures", "--format", "json", env=env, check=False)
    doc = json.loads(proc.stdout)
    cut = [r for r in doc["results"] if r["status"] != "ok"]
    assert proc.returncode == 1 and cut, doc
    assert all(r["reason"] == "open" and r["first_bad_seq"] == r["events"] for r in cut), cut
    # without --require-signatures the session is open (not an error: it may still be running)
    proc = run_cli("verify", "--format", "json", env=env, check=False)
    assert proc.returncode == 0 and {r["status"] for r in json.loads(proc.stdout)["results"]} == {"ok", "open"}
    # live monitoring accepts it as open, but it still has no signature covering it
    proc = run_cli("verify", "--require-signatures", "--allow-open", "--format", "json", env=env, check=False)
    reasons = {r["reason"] for r in json.loads(proc.stdout)["results"] if r["status"] == "broken"}
    assert proc.returncode == 1 and reasons == {"unsigned"}
