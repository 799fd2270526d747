"""An attacker who can write only warehouse.duckdb (no key, no heads file) against `agentledger verify`:

1. redefines the ``events`` view (or a derived view, a kind table, a built-in function) so that
   verify's own queries see the sealed rows and every other query forged ones (DuckDB's
   current_query()): verify reads the kind tables itself and fails with ``schema_tampered`` naming
   the relation; `agentledger sql` refuses the warehouse;
2. fills in a column the row's older writer schema lacks (outside the hash: re-encoding under that
   schema drops it): the session is broken, ``field_not_in_writer_schema``;
3. writes a value the writer schema cannot encode (NULL into a non-nullable field): that session is
   broken (``unreadable_row``), the others verify, and nothing prints a traceback."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import duckdb
import pytest

from conftest import cli_env, run_cli
from agentledger.schemas import codec
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import GENESIS_HASH, seal
from agentledger.schemas.rows import writer_gaps
from agentledger.schemas.transport.local import LocalLog

TOPIC = "agentledger.events"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from agentledger import api

    home = tmp_path_factory.mktemp("hostile") / "home"
    s = from_env({"AGENTLEDGER_HOME": str(home)})
    api.simulate(s, 3, 11, force_attack_first=True)
    api.ingest(s)
    return home


def _copy(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "home"
    shutil.copytree(pristine, dst)
    return dst


def _sql(home: Path, *statements: str | tuple) -> list:
    con = duckdb.connect(str(home / "warehouse.duckdb"))
    try:
        out = []
        for st in statements:
            out.append((con.execute(*st) if isinstance(st, tuple) else con.execute(st)).fetchall())
        return out
    finally:
        con.close()


def _verify(home: Path) -> tuple[int, dict]:
    proc = run_cli("verify", "--format", "json", env=cli_env(home), check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _tampered(doc: dict) -> list[str]:
    return [p["detail"] for p in doc["tree"]["problems"] if p["code"] == "schema_tampered"]


def test_a_pristine_warehouse_has_the_code_s_schema(pristine, tmp_path):
    home = _copy(pristine, tmp_path)
    rc, doc = _verify(home)
    assert rc == 0 and doc["ok"] and not _tampered(doc), doc["tree"]
    proc = run_cli("sql", "SELECT count(*) AS n FROM denied_actions", env=cli_env(home), check=False)
    assert proc.returncode == 0, proc.stderr


# the view verify used to read shows verify's queries the sealed rows and everyone else forged ones
_VERIFIER = ("(current_query() LIKE '%ORDER BY session_id, seq%' OR current_query() LIKE '%ORDER BY seq%')")


def _redefine_events(home: Path) -> None:
    orig = _sql(home, "SELECT sql FROM duckdb_views() WHERE view_name = 'events'")[0][0][0]
    _sql(home, orig.replace("CREATE VIEW events AS", "CREATE VIEW _ev AS", 1),
         f"""CREATE OR REPLACE VIEW events AS SELECT * FROM _ev
             WHERE {_VERIFIER} OR kind NOT IN ('network_attempted', 'sandbox_denied')""")


def _redefine_denied_actions(home: Path) -> None:
    orig = _sql(home, "SELECT sql FROM duckdb_views() WHERE view_name = 'denied_actions'")[0][0][0]
    _sql(home, orig.replace("CREATE VIEW denied_actions AS", "CREATE VIEW _d AS", 1),
         "CREATE OR REPLACE VIEW denied_actions AS SELECT * FROM _d WHERE false")


def _kind_table_as_view(home: Path) -> None:
    _sql(home, "ALTER TABLE events_network_attempted RENAME TO _na",
         f"CREATE VIEW events_network_attempted AS SELECT * FROM _na WHERE {_VERIFIER}")


def _shadowing_macro(home: Path) -> None:
    _sql(home, "CREATE MACRO coalesce(a, b) AS 0")


@pytest.mark.parametrize("attack, relation", [
    (_redefine_events, "events"), (_redefine_denied_actions, "denied_actions"),
    (_kind_table_as_view, "events_network_attempted"), (_shadowing_macro, "coalesce"),
], ids=["events_view", "derived_view", "kind_table_made_a_view", "macro"])
def test_a_schema_other_than_the_code_s_is_schema_tampered_and_refused_to_queries(pristine, tmp_path, attack,
                                                                                   relation):
    home = _copy(pristine, tmp_path)
    before = _sql(home, "SELECT count(*) FROM events WHERE kind = 'network_attempted'")[0][0][0]
    attack(home)
    if relation == "events":  # what the audit showed: other queries see fewer rows, verify's the same
        assert _sql(home, "SELECT count(*) FROM events WHERE kind = 'network_attempted'")[0][0][0] < before
    rc, doc = _verify(home)
    assert rc == 1 and not doc["ok"]
    problems = _tampered(doc)
    assert problems and any(p.startswith(f"{relation}:") for p in problems), doc["tree"]["problems"]
    if relation != "events_network_attempted":  # the rows themselves are untouched: every session verifies
        assert doc["broken"] == 0, [r for r in doc["results"] if not r["ok"]]
    proc = run_cli("sql", "SELECT count(*) FROM events", env=cli_env(home), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "refused" in proc.stderr and relation in proc.stderr and "agentledger verify" in proc.stderr


# --- 2: a field the row's writer schema lacks --------------------------------------------------


def _records(home: Path) -> list[dict]:
    store = load_store()
    log = LocalLog(str(home / "log"))
    out = []
    for p in range(log.partition_count(TOPIC)):
        off = 0
        while batch := log.read(TOPIC, p, off, 10000):
            out += [store.decode(m.value) for m in batch]
            off = batch[-1].offset + 1
    return sorted(out, key=lambda r: (r["session_id"], r["seq"]))


def _reseal(records: list[dict], version) -> list[bytes]:
    """One session's records as a producer of ``version`` sealed them (checkpoints restated, unsigned)."""
    values, prev, hashes = [], GENESIS_HASH, []
    for r in records:
        r = copy.deepcopy(r)
        r["prev_hash"] = prev
        name, payload = r["payload"]
        if name.endswith("Checkpoint"):
            payload.update(head_seq=r["seq"] - 1, head_hash=hashes[-1], event_count=r["seq"], signature=None,
                           key_id=None)
        r["hash"] = ""
        value, prev = seal(codec.SOE_MAGIC + version.fingerprint, codec.encode(version.parsed, r))
        hashes.append(prev)
        values.append(value)
    return values


@pytest.fixture(scope="module")
def v3_home(tmp_path_factory) -> Path:
    from agentledger import api

    root = tmp_path_factory.mktemp("v3")
    src, home = root / "src", root / "home"
    api.simulate(from_env({"AGENTLEDGER_HOME": str(src)}), 1, 3, sign=False)
    records = _records(src)
    v3 = next(v for v in load_store().released if v.version == 3)
    log = LocalLog(str(home / "log"))
    log.ensure_topic(TOPIC)
    log.append(TOPIC, 0, _reseal([r for r in records if r["session_id"] == records[0]["session_id"]], v3))
    api.ingest(from_env({"AGENTLEDGER_HOME": str(home)}))
    assert _sql(home, "SELECT DISTINCT schema_fingerprint FROM events")[0] == [(v3.fingerprint_hex,)]
    return home


def test_the_fields_an_older_writer_schema_lacks_are_known_per_writer():
    store = load_store()
    by_version = {v.version: writer_gaps(store, v) for v in store.released}
    assert writer_gaps(store, store.current) is None
    payload = dict(by_version[3][1])["payload"][1]
    started = dict(payload["dev.agentledger.SessionStarted"][0])
    assert set(started) == {"control_surface", "workspace_trusted", "observed_by", "mcp_tools"}
    mcp = dict(payload["dev.agentledger.CommandStarted"][1])["mcp"][1]  # v3 had McpCall, without the digest
    assert [n for n, _ in mcp["dev.agentledger.McpCall"][0]] == ["definition_digest"]
    assert dict(dict(by_version[2][1])["payload"][1]["dev.agentledger.CommandStarted"][0]) == {"mcp": (None,)}


def test_a_column_the_writer_schema_lacks_is_covered(v3_home, tmp_path):
    home = _copy(v3_home, tmp_path)
    rc, doc = _verify(home)
    assert rc == 0 and doc["broken"] == 0, doc
    sid = doc["results"][0]["session_id"]
    _sql(home, """UPDATE events_session_started SET session_started = struct_update(session_started,
        control_surface := [{'path': '~/.codex/config.toml', 'role': 'agent_config', 'digest': 'sha256:' || repeat('ab', 32),
                             'size': 12, 'content': 'approval="never"', 'truncated': false}])""")
    rc, doc = _verify(home)
    assert rc == 1, doc
    r = doc["results"][0]
    assert (r["session_id"], r["status"], r["first_bad_seq"], r["reason"]) == (
        sid, "broken", 0, "field_not_in_writer_schema")
    assert "control_surface" in r["detail"] and "v3" in r["detail"]
    proc = run_cli("replay", sid, env=cli_env(home), check=False)  # replay re-encodes the same way
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "field_not_in_writer_schema" in proc.stderr


def test_a_true_workspace_trusted_on_a_v3_row_is_caught_and_the_default_is_not(v3_home, tmp_path):
    home = _copy(v3_home, tmp_path)
    _sql(home, "UPDATE events_session_started SET session_started = struct_update(session_started, "
               "workspace_trusted := NULL, control_surface := NULL, mcp_tools := [])")  # defaults / a migration's NULL
    rc, doc = _verify(home)
    assert rc == 0, doc
    _sql(home, "UPDATE events_session_started SET session_started = struct_update(session_started, "
               "workspace_trusted := true)")
    rc, doc = _verify(home)
    assert rc == 1 and doc["results"][0]["reason"] == "field_not_in_writer_schema"
    assert "workspace_trusted" in doc["results"][0]["detail"]


# --- 3: a value the writer schema cannot encode ------------------------------------------------


def test_a_value_that_does_not_fit_the_writer_schema_breaks_its_session_only(pristine, tmp_path):
    home = _copy(pristine, tmp_path)
    (sid, seq), = _sql(home, """SELECT session_id, min(seq) FROM events_command_started
                                 GROUP BY 1 ORDER BY 1 LIMIT 1""")[0]
    _sql(home, ("UPDATE events_command_started SET command_started = struct_update(command_started, argv := NULL) "
                "WHERE session_id = ? AND seq = ?", [sid, seq]))
    rc, doc = _verify(home)
    assert rc == 1 and doc["sessions"] == 3 and doc["broken"] == 1
    bad = next(r for r in doc["results"] if not r["ok"])
    assert (bad["session_id"], bad["first_bad_seq"], bad["reason"]) == (sid, seq, "unreadable_row")
    assert "argv" in bad["detail"]
    proc = run_cli("verify", env=cli_env(home), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "unreadable_row" in proc.stdout
    proc = run_cli("replay", sid, env=cli_env(home), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "unreadable_row" in proc.stderr
