"""Warehouse rows re-encode to the exact sealed bytes, so edits to the warehouse are detectable."""

from __future__ import annotations

from agentledger.consumers.ingest import Ingestor
from agentledger.producers.recorder import Recorder
from agentledger.producers.simulate import simulate
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import ChainVerifier
from agentledger.schemas.rows import iter_session_values
from agentledger.schemas.transport import open_sink, open_source
from agentledger.schemas.warehouse import event_table_names, open_warehouse


def first_problem(con, store, sid):
    v = ChainVerifier()
    for value, rec, _ in iter_session_values(con, store, sid):
        p = v.check(value, rec)
        if p:
            return p
    return None


def test_rows_reencode_to_their_hashes_and_edits_show(home):
    s = from_env({"AGENTLEDGER_HOME": str(home)})
    sink = open_sink(s)
    simulate(lambda clock, rng: Recorder(sink, clock=clock, rng=rng), 8, 21, attack_rate=0.5)
    sink.close()
    store = load_store()
    with open_warehouse(s.warehouse) as wh:
        Ingestor(wh, open_source(s), s.topic).run()
        sessions = [r[0] for r in wh.con.execute("SELECT session_id FROM sessions ORDER BY 1").fetchall()]
        assert all(first_problem(wh.con, store, sid) is None for sid in sessions)
        # an auditor-invisible edit: change one argv element of one command
        sid = sessions[0]
        seq = wh.con.execute("SELECT min(seq) FROM events WHERE session_id=? AND kind='command_started'", [sid]).fetchone()[0]
        wh.con.execute("""UPDATE events_command_started SET command_started = struct_update(command_started, argv := ['rm', '-rf', '/'])
                          WHERE session_id = ? AND seq = ?""", [sid, seq])
        p = first_problem(wh.con, store, sid)
        assert p is not None and p.seq == seq and p.reason == "hash_mismatch"
        # deleting an event shows as a gap at that seq
        sid2 = sessions[1]
        for t in event_table_names():
            wh.con.execute(f"DELETE FROM {t} WHERE session_id = ? AND seq = 3", [sid2])
        p = first_problem(wh.con, store, sid2)
        assert p is not None and p.seq == 4 and p.reason == "seq_gap"
