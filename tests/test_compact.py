"""`agentledger compact` on a DuckLake: expiring snapshots and deleting unused files is the default
(safe while ingest and readers run); merging small files only with `--merge` (DuckLake 1.5.5 shows
readers in other processes the merged tables as empty while a merge commits, so `ingest --follow`
never merges: tests/test_ingest_kafka_scale.py's reader that must never see a count go back runs
against a follow with compaction every 3 s)."""

from __future__ import annotations

import json

from conftest import cli_env, run_cli
from agentledger.schemas.warehouse import open_warehouse

Q = ("select count(*) n, count(distinct event_id) ids, sum(seq) seqs, "
     "(select count(*) from chain_status where status <> 'ok') not_ok from events")


def test_compact_expires_by_default_and_merges_only_when_asked(home, tmp_path):
    url = f"ducklake:sqlite:{tmp_path / 'lake' / 'meta.sqlite'}"
    env = cli_env(home, AGENTLEDGER_WAREHOUSE=url)
    run_cli("simulate", "--sessions", "6", "--seed", "3", env=env)
    run_cli("ingest", "--batch", "60", env=env)  # four small commits: a small file per kind table each
    before = json.loads(run_cli("sql", Q, "--format", "json", env=env).stdout)

    def files() -> int:
        with open_warehouse(url, read_only=True) as wh:
            return wh._file_count()

    n0 = files()
    out = json.loads(run_cli("compact", "--expire-older-than", "1 hour", "--format", "json", env=env).stdout)
    assert out["files_before"] == n0 and "files_after_merge" not in out and out["snapshots_expired"] == 0
    assert files() == n0  # nothing merged
    out = json.loads(run_cli("compact", "--merge", "--expire-older-than", "0 seconds", "--format", "json",
                             env=env).stdout)
    assert out["files_before"] == n0 and out["files_after_merge"] < n0 // 2, out
    assert out["snapshots_expired"] > 0 and out["files_deleted"] > 0
    assert json.loads(run_cli("sql", Q, "--format", "json", env=env).stdout) == before  # the same data
    assert json.loads(run_cli("verify", "--format", "json", env=env).stdout)["ok"]
    help_text = run_cli("compact", "--help", env=env).stdout
    assert "--merge" in help_text and "empty" in help_text
