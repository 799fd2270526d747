"""Ingest into DuckDB: exactly once, chains continued across batches, bad input quarantined. The
invariants run over a DuckDB file and a DuckLake warehouse (the ``warehouse_url`` fixture)."""

from __future__ import annotations

import random

import pytest

from conftest import new_warehouse
from agentledger.consumers.ingest import Ingestor
from agentledger.producers.recorder import Recorder
from agentledger.producers.simulate import simulate
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import Sealer, uuid7_now
from agentledger.schemas.transport import open_sink, open_source
from agentledger.schemas.transport.base import Message
from agentledger.schemas.warehouse import open_warehouse
from test_envelope import record_session


def settings_for(home, warehouse: str | None = None):
    if warehouse is None:
        new_warehouse(home / "warehouse.duckdb")
    return from_env({"AGENTLEDGER_HOME": str(home), **({"AGENTLEDGER_WAREHOUSE": warehouse} if warehouse else {})})


def sim(s, sessions, seed):
    sink = open_sink(s)
    res = simulate(lambda clock, rng: Recorder(sink, topic=s.topic, clock=clock, rng=rng), sessions, seed)
    sink.close()
    return res


def assert_exact(con, expected_events):
    n, distinct = con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    assert n == distinct == expected_events
    gaps = con.execute("""SELECT count(*) FROM (SELECT session_id, count(*) c, min(seq) lo, max(seq) hi
                          FROM events GROUP BY 1) WHERE lo <> 0 OR hi <> c - 1""").fetchone()[0]
    assert gaps == 0


def test_embedded_ingest_exactly_once_across_small_batches(home, warehouse_url):
    s = settings_for(home, warehouse_url)
    res = sim(s, 14, seed=5)  # batches cut through sessions; each DuckLake commit is a snapshot: a few
    with open_warehouse(s.warehouse) as wh:
        stats = Ingestor(wh, open_source(s), s.topic, batch_records=97).run()
        assert stats.accepted == res.events and stats.dead_letters == 0
        assert stats.batches > 3
        assert_exact(wh.con, res.events)
        assert wh.con.execute("SELECT count(*) FROM chain_status WHERE status <> 'ok'").fetchone()[0] == 0
        # the same messages again (offsets reset) are refused by the chain guard, not duplicated
        wh.con.execute("DELETE FROM ingest_offsets")
        again = Ingestor(wh, open_source(s), s.topic, batch_records=1000).run()
        assert again.accepted == 0 and again.dead_letters == res.events
        assert set(again.reasons) == {"duplicate"}
        assert_exact(wh.con, res.events)
        # and a normal restart reads nothing
        wh.con.execute("DELETE FROM dead_letters")


def test_typed_columns_and_sessions_view(home):
    s = settings_for(home)
    res = sim(s, 20, seed=9)
    with open_warehouse(s.warehouse) as wh:
        Ingestor(wh, open_source(s), s.topic).run()
        con = wh.con
        fams = dict(con.execute("SELECT family, count(*) FROM events GROUP BY 1").fetchall())
        assert set(fams) == {"session", "sandbox", "approval", "network"}
        assert con.execute("SELECT count(*) FROM sessions").fetchone()[0] == 20
        # per-kind struct columns are set exactly on their kind
        bad = con.execute("""SELECT count(*) FROM events WHERE (kind = 'command_started') <> (command_started IS NOT NULL)
                             OR (kind = 'network_decided') <> (network_decided IS NOT NULL)""").fetchone()[0]
        assert bad == 0
        argv = con.execute("SELECT command_started.argv FROM events WHERE kind='command_started' LIMIT 1").fetchone()[0]
        assert isinstance(argv, list) and argv
        assert con.execute("SELECT typeof(approval_decided.decision) FROM events LIMIT 1").fetchone()[0] == "VARCHAR"
        total = con.execute("SELECT sum(event_count) FROM sessions").fetchone()[0]
        assert total == res.events


def _msgs(values, partition=0, start=0):
    return [Message("t", partition, start + i, None, v) for i, v in enumerate(values)]


def test_bad_input_is_quarantined_with_raw_bytes_and_reason(home, warehouse_url):
    s = settings_for(home, warehouse_url)
    store = load_store()
    sid, good = record_session(n_commands=3, seed=11)
    _, other = record_session(n_commands=2, seed=12)
    forged = bytearray(good[3])
    forged[40] ^= 0x01  # a flipped byte: the hash no longer matches
    unknown_fp = good[2][:2] + b"\x00" * 8 + good[2][10:]
    rnd = random.Random(1).randbytes(300)
    # a well-formed, correctly sealed event whose seq jumps ahead (a gap)
    rec = store.decode(good[4])
    rec["seq"] = 40
    rec["event_id"] = uuid7_now(random.Random(2))
    gap = Sealer(store).seal(rec).value
    stream = [good[0], good[1], rnd, good[2], unknown_fp, bytes(forged), good[3], b"", gap, good[2]] + good[4:] + other
    with open_warehouse(s.warehouse) as wh:
        ing = Ingestor(wh, open_source(s), "t")
        r = ing.ingest_batch(_msgs(stream))
        assert r.accepted == len(good) + len(other)
        reasons = sorted(wh.con.execute("SELECT reason FROM dead_letters").fetchall())
        assert [x[0] for x in reasons] == sorted(["undecodable", "unknown_fingerprint", "hash_mismatch", "undecodable",
                                                  "seq_gap", "duplicate"])
        raw = dict(wh.con.execute("SELECT reason, raw FROM dead_letters WHERE reason IN ('hash_mismatch','seq_gap')").fetchall())
        assert raw["hash_mismatch"] == bytes(forged) and raw["seq_gap"] == gap
        sid_seq = wh.con.execute("SELECT session_id, seq FROM dead_letters WHERE reason='seq_gap'").fetchone()
        assert sid_seq == (sid, 40)
        assert wh.con.execute("SELECT next_offset FROM ingest_offsets").fetchone()[0] == len(stream)
        # chain_status reports the session whose next event is stuck behind a gap
        st = dict(wh.con.execute("SELECT session_id, status FROM chain_status").fetchall())
        assert st[sid] == "broken"


@pytest.mark.parametrize("cut", ["same_batch", "next_batch"])
def test_a_reused_event_id_ahead_of_the_chain_has_one_reason_wherever_batches_are_cut(home, cut):
    s = settings_for(home)
    store = load_store()
    _, good = record_session(n_commands=3, seed=13)
    rec = store.decode(good[2])
    rec["seq"] = 50  # ahead of the chain, and with the id of an event already accepted
    forged = Sealer(store).seal(rec).value
    with open_warehouse(s.warehouse) as wh:
        ing = Ingestor(wh, open_source(s), "t")
        if cut == "same_batch":
            ing.ingest_batch(_msgs(good + [forged]))
        else:
            ing.ingest_batch(_msgs(good))
            ing.ingest_batch(_msgs([forged], start=len(good)))
        rows = wh.con.execute("SELECT reason, raw FROM dead_letters").fetchall()
        assert rows == [("duplicate_event_id", forged)]
        assert wh.con.execute("SELECT count(*) FROM events").fetchone()[0] == len(good)


def test_crash_mid_batch_commits_nothing(home, monkeypatch, warehouse_url):
    s = settings_for(home, warehouse_url)
    res = sim(s, 10, seed=3)
    with open_warehouse(s.warehouse) as wh:
        ing = Ingestor(wh, open_source(s), s.topic, batch_records=50)
        calls = {"n": 0}
        orig = ing._write_offsets

        def boom(msgs, *rest):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash before COMMIT")
            return orig(msgs, *rest)

        monkeypatch.setattr(ing, "_write_offsets", boom)
        with pytest.raises(RuntimeError):
            ing.run()
        n = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
        off = wh.con.execute("SELECT sum(next_offset) FROM ingest_offsets").fetchone()[0]
        assert n == off == 100, "two committed batches of 50, nothing of the third"
        Ingestor(wh, open_source(s), s.topic, batch_records=50).run()
        assert_exact(wh.con, res.events)


def test_a_warehouse_made_before_a_record_gained_a_field_gains_it_and_keeps_its_rows(tmp_path, warehouse_url):
    """network_decided.addresses was added after v1: a warehouse created from v1 gets the STRUCT field
    when opened, its rows read it as NULL, and new events fill it."""
    from agentledger.schemas.contract import SchemaStore, payload_kinds
    from agentledger.schemas.warehouse import Warehouse

    url = warehouse_url
    s = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home"), "AGENTLEDGER_WAREHOUSE": url})
    v1 = SchemaStore()
    v1.current = next(v for v in v1.released if v.version == 1)
    v1.kinds = payload_kinds(v1.current.schema)
    with Warehouse(url, store=v1) as old:
        old.ensure_schema()
        fields = [r[0] for r in old.con.execute("DESCRIBE SELECT network_decided.* FROM events").fetchall()]
        assert "addresses" not in fields
        old.con.execute("INSERT INTO events_network_decided (event_id, session_id, seq, occurred_at, prev_hash, hash, "
                        "network_decided) VALUES ('e0', 'old', 0, now()::TIMESTAMP, "
                        "'0', '1', {'attempt_id': 'a', 'decision': 'deny', 'rule': 'r', 'reason': NULL, "
                        "'policy_source': NULL})")
    sink = open_sink(s)
    sess = Recorder(sink, topic=s.topic).session(agent="agentledger-sandbox", cwd="/w")
    a = sess.network_attempted("localhost", 80, "http")
    sess.network_decided(a, "deny", rule="no-local", addresses=["127.0.0.1"])
    sink.close()
    with open_warehouse(s.warehouse) as wh:
        stats = Ingestor(wh, open_source(s), s.topic).run()
        assert stats.accepted == 3 and stats.dead_letters == 0
        rows = wh.con.execute("SELECT session_id, network_decided.addresses FROM events "
                              "WHERE kind = 'network_decided' ORDER BY session_id").fetchall()
    assert sorted(rows, key=lambda r: r[0] != "old") == [("old", None), (sess.session_id, ["127.0.0.1"])]


def test_opening_a_current_warehouse_skips_the_schema_work_and_repairs_what_changed_since(tmp_path, warehouse_url):
    """A write-open of a warehouse this code made is a few catalog reads (the comment on
    schema_versions holds the digest of the DDL and of the catalog as left), not the full check that
    builds the canonical forms in memory; a view replaced or dropped, or a column dropped since, is
    seen and repaired by the next write-open."""
    from agentledger.schemas import warehouse as w

    url = warehouse_url
    open_warehouse(url).close()
    w._CANONICAL.clear()
    with open_warehouse(url) as wh:
        assert w._CANONICAL == {}, "the full schema check ran on a current warehouse"
        marker = wh.con.execute("SELECT comment FROM duckdb_tables() WHERE table_name = 'schema_versions' "
                                "AND database_name = current_database()").fetchone()[0]
        assert marker == wh._schema_marker()
        wh.con.execute("CREATE OR REPLACE VIEW sessions AS SELECT 1 AS session_id")
        wh.con.execute("DROP VIEW denied_actions")
        wh.con.execute("ALTER TABLE events_gap DROP COLUMN gap")
    with open_warehouse(url) as wh:
        assert w._CANONICAL != {}, "the full check did not run after the catalog changed"
        cols = [r[0] for r in wh.con.execute("DESCRIBE sessions").fetchall()]
        assert "started_at" in cols and len(cols) > 5
        assert wh.con.execute("SELECT count(*) FROM denied_actions").fetchone()[0] == 0
        assert "gap" in [r[0] for r in wh.con.execute("DESCRIBE events_gap").fetchall()]
    w._CANONICAL.clear()
    open_warehouse(url).close()
    assert w._CANONICAL == {}, "the repaired warehouse is current again"


def test_ingest_statements_run_on_one_duckdb_thread_and_detection_after_a_batch_on_all(home, monkeypatch):
    """On a DuckDB file the decoder has the other core: the ingest's statements run on one DuckDB
    thread, and what runs after each commit (detection, whose catch-up may scan everything) on as many
    as before (AGENTLEDGER_DUCKDB_THREADS, which scripts/test sets to 1, here 3)."""
    monkeypatch.setenv("AGENTLEDGER_DUCKDB_THREADS", "3")
    s = settings_for(home)
    sim(s, 4, seed=3)
    seen = []
    with open_warehouse(s.warehouse) as wh:
        before = wh.con.execute("SELECT current_setting('threads')").fetchone()[0]
        assert before == 3
        ing = Ingestor(wh, open_source(s), s.topic, batch_records=40,
                       after_commit=lambda b: seen.append(wh.con.execute("SELECT current_setting('threads')").fetchone()[0]))
        assert wh.con.execute("SELECT current_setting('threads')").fetchone()[0] == 1
        stats = ing.run()
        assert stats.batches >= 2 and seen == [before] * stats.batches
        assert wh.con.execute("SELECT current_setting('threads')").fetchone()[0] == 1


def test_duckdb_threads_are_configurable_and_checked(tmp_path, monkeypatch):
    from agentledger.schemas.errors import ConfigError
    from agentledger.schemas.warehouse import Warehouse

    monkeypatch.setenv("AGENTLEDGER_DUCKDB_THREADS", "1")
    for url in (str(tmp_path / "w.duckdb"), f"ducklake:sqlite:{tmp_path}/lake/meta.sqlite"):
        wh = Warehouse(url)
        try:
            assert wh.con.execute("SELECT current_setting('threads')").fetchone()[0] == 1
        finally:
            wh.close()
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("AGENTLEDGER_DUCKDB_THREADS", bad)
        with pytest.raises(ConfigError, match="AGENTLEDGER_DUCKDB_THREADS"):
            Warehouse(str(tmp_path / "w.duckdb"))
