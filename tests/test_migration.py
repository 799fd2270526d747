"""A warehouse written before the kind tables (one wide ``events`` table) is converted in place on its
next write open, DuckDB file and DuckLake alike, and reads exactly as before (issue 18).

The fixture was written by the code before this change (tests/fixtures/legacy_warehouse/make_fixture.py
says how): 5 simulated sessions with signed checkpoints, a session whose seq 1 never arrived (two
parked seq_gap letters), an undecodable message and a tampered copy, signed tree heads."""

from __future__ import annotations

import json
import re
import sqlite3
import tarfile
from pathlib import Path

import pytest

from conftest import cli_env, run_cli
from agentledger.consumers.ingest import Ingestor
from agentledger.schemas.transport.base import Message
from agentledger.schemas.warehouse import VIEWS, Warehouse, event_table_names, open_warehouse

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_warehouse" / "warehouses.tar.gz"

# Everything an auditor reads, before and after (sessions_without_end.silent_for_s is the time since).
QUERIES = {
    "events": "SELECT * FROM events ORDER BY event_id",
    "columns": "SELECT column_name, column_type FROM (DESCRIBE events)",
    **{v: f"SELECT * FROM {v} ORDER BY ALL" for v in VIEWS if v != "sessions_without_end"},
    "sessions_without_end": "SELECT * EXCLUDE (silent_for_s) FROM sessions_without_end ORDER BY ALL",
    **{t: f"SELECT * FROM {t} ORDER BY ALL" for t in ("chain_heads", "ingest_offsets", "tree_leaves", "tree_state",
                                                     "tree_heads", "schema_versions")},
    "dead_letters": "SELECT * FROM dead_letters ORDER BY dead_letter_id",
}


def _legacy(tmp_path: Path, lake: bool) -> tuple[str, Path]:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    if not lake:
        return str(tmp_path / "warehouse.duckdb"), tmp_path
    catalog = tmp_path / "lake" / "meta.sqlite"
    con = sqlite3.connect(catalog)  # the catalog names its data directory by absolute path
    con.execute("UPDATE ducklake_metadata SET value = ? WHERE key = 'data_path'", [f"{catalog}.files/"])
    con.commit()
    con.close()
    return f"ducklake:sqlite:{catalog}", tmp_path


# What the contract added after the fixture was made: schema v3's `mcp` records of command_started /
# command_finished and v4's provenance fields (the migration adds them, NULL or empty on the old rows),
# and the views over them.
NEWER_VIEWS = {"mcp_calls", "decisions", "control_surface", "mcp_tool_definitions", "coverage"}
NEWER_FIELDS = {"mcp", "control_surface", "workspace_trusted", "observed_by", "mcp_tools", "scope", "rule_source",
                "grant_request_id", "reported_as"}
_NESTED = r"(?:[^()]|\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\))*"
_NEWER_TYPE = re.compile(r', "?(?:' + "|".join(sorted(NEWER_FIELDS)) + r')"? (?:STRUCT\(' + _NESTED + r'\)|[A-Z]+)(?:\[\])?')


def _without_newer(x):
    """A value as the warehouse read it before v3: without the (NULL or empty) fields the migration added."""
    if isinstance(x, dict):
        return {k: _without_newer(v) for k, v in x.items() if not (k in NEWER_FIELDS and v in (None, []))}
    if isinstance(x, (list, tuple)):
        return type(x)(_without_newer(v) for v in x)
    if isinstance(x, str):
        return _NEWER_TYPE.sub("", x)
    return x


def _read(url: str) -> dict:
    with Warehouse(url, read_only=True) as wh:
        have = {r[0] for r in wh.con.execute("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_catalog = current_database()").fetchall()}
        return {name: _without_newer(wh.con.execute(q).fetchall()) for name, q in QUERIES.items()
                if name not in NEWER_VIEWS or name in have}


def _relations(url: str) -> dict[str, str]:
    with Warehouse(url, read_only=True) as wh:
        return dict(wh.con.execute("""SELECT table_name, table_type FROM information_schema.tables
                                       WHERE table_catalog = current_database()""").fetchall())


def _verify(home: Path, url: str) -> dict:
    proc = run_cli("verify", "--format", "json", env=cli_env(home, AGENTLEDGER_WAREHOUSE=url), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("lake", [False, True], ids=["duckdb", "ducklake"])
def test_a_warehouse_made_before_the_kind_tables_is_migrated_in_place_and_reads_the_same(tmp_path, lake):
    url, root = _legacy(tmp_path, lake)
    assert _relations(url)["events"] == "BASE TABLE"
    before = _read(url)
    assert len(before["events"]) == 151 and len(before["dead_letters"]) == 4
    verified_before = _verify(root / "home", url)

    with open_warehouse(url):  # the first write open migrates
        pass
    rel = _relations(url)
    assert rel["events"] == "VIEW"
    assert all(rel[t] == "BASE TABLE" for t in event_table_names())
    after = _read(url)
    for name in QUERIES:
        if name in NEWER_VIEWS:
            assert name not in before, name  # made by the migration
            # no MCP call in the fixture; decisions: its actions; coverage: its sessions' sources
            assert after[name] == [] or name in ("decisions", "coverage"), name
        elif name == "schema_versions":  # the newer schema is recorded next to the older ones
            assert [r for r in after[name] if r[2] not in ("v3", "v4")] == before[name]
            assert {r[2] for r in after[name]} >= {"v3", "v4"}
        else:
            assert after[name] == before[name], name
    with Warehouse(url, read_only=True) as wh:  # the v3 fields exist, NULL on the old rows
        assert wh.con.execute("SELECT count(*), count(command_started.mcp) FROM events "
                              "WHERE kind = 'command_started'").fetchone()[1] == 0
    assert _verify(root / "home", url) == verified_before
    with open_warehouse(url):  # idempotent: nothing left to do
        pass
    assert _read(url) == after

    # ingest goes on where it was: the session whose seq 1 was missing heals from its parked letters
    missing = (root / "missing_event.bin").read_bytes()
    with open_warehouse(url) as wh:
        sid, = wh.con.execute("SELECT DISTINCT session_id FROM dead_letters WHERE reason = 'seq_gap'").fetchone()
        nxt = wh.con.execute("SELECT max(next_offset) FROM ingest_offsets WHERE \"partition\" = 0").fetchone()[0]
        r = Ingestor(wh, None, "agentledger.events").ingest_batch([Message("agentledger.events", 0, nxt, None, missing)])
        assert (r.accepted, r.healed, r.dead_letters) == (3, 2, 0)
        assert wh.con.execute("SELECT status FROM chain_status WHERE session_id = ?", [sid]).fetchone()[0] == "ok"
        assert wh.con.execute("SELECT count(*), max(seq) FROM events WHERE session_id = ?", [sid]).fetchone() == (4, 3)
        assert wh.con.execute("SELECT count(*) FROM events").fetchone()[0] == 154


def test_a_snapshot_from_before_the_migration_still_reads_the_old_table(tmp_path):
    url, _ = _legacy(tmp_path, lake=True)
    with Warehouse(url, read_only=True) as wh:
        snap = wh.current_snapshot()
        n = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
    with open_warehouse(url):
        pass
    with Warehouse(url, read_only=True, snapshot=snap) as old:
        assert old.con.execute("SELECT count(*) FROM events").fetchone()[0] == n
        assert old.con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = 'events' "
                               "AND table_catalog = current_database()").fetchone()[0] == "BASE TABLE"
