from __future__ import annotations

import random
import uuid

from hypothesis import given, settings, strategies as st

from agentledger.producers.recorder import Recorder
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import GENESIS_HASH, ChainVerifier, claimed_hash, hash_ok, uuid7
from agentledger.schemas.transport.base import MemorySink


def record_session(n_commands=5, seed=1):
    sink = MemorySink()
    t = [1_700_000_000_000_000]

    def clock():
        t[0] += 1000
        return t[0]

    rec = Recorder(sink, clock=clock, rng=random.Random(seed))
    with rec.session(agent="codex", cwd="/w", sandbox_mode="workspace_write") as s:
        for i in range(n_commands):
            c = s.command_started(["echo", str(i)], "/w")
            s.command_finished(c, exit_code=0, duration_ms=3, stdout=f"{i}\n")
    return s.session_id, [v for _, _, v in sink.sent]


def test_uuid7_is_rfc9562_and_time_ordered():
    a = uuid7(1_700_000_000_000, bytes(range(10)))
    b = uuid7(1_700_000_000_001, bytes(10))
    assert uuid.UUID(a).version == 7 and uuid.UUID(a).variant == uuid.RFC_4122
    assert a < b


def test_recorder_chains_hashes_and_numbers_events():
    sid, values = record_session()
    store = load_store()
    v = ChainVerifier()
    for raw in values:
        rec = store.decode(raw)
        assert rec["session_id"] == sid
        assert v.check(raw, rec) is None
    assert v.head_seq == len(values) - 1
    first = store.decode(values[0])
    assert first["prev_hash"] == GENESIS_HASH and first["payload"][0].endswith("SessionStarted")
    assert store.decode(values[-1])["payload"][0].endswith("SessionEnded")


def test_same_seed_same_bytes():
    assert record_session(seed=3)[1] == record_session(seed=3)[1]
    assert record_session(seed=3)[1] != record_session(seed=4)[1]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_single_byte_flip_breaks_the_hash(data):
    _, values = record_session(n_commands=1)
    raw = values[data.draw(st.integers(0, len(values) - 1))]
    pos = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = bytearray(raw)
    tampered[pos] ^= 1 << bit
    assert hash_ok(raw)
    assert not hash_ok(bytes(tampered))


def test_chain_verifier_names_deletion_reordering_and_forgery():
    store = load_store()
    _, values = record_session(n_commands=3)
    recs = [store.decode(v) for v in values]

    def first_problem(seq_of_values):
        v = ChainVerifier()
        for raw in seq_of_values:
            p = v.check(raw, store.decode(raw))
            if p:
                return p
        return None

    assert first_problem(values) is None
    p = first_problem(values[:2] + values[3:])
    assert p.reason == "seq_gap" and p.seq == 3
    p = first_problem([values[0], values[2], values[1]] + values[3:])
    assert p.reason == "seq_gap" and p.seq == 2
    p = first_problem(values[:2] + [values[1]] + values[2:])
    assert p.reason == "duplicate" and p.seq == 1
    assert claimed_hash(values[0]) == recs[0]["hash"]
