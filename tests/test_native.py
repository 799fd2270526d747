"""The native bundle decoder (native/avro2arrow, run by replay/native.py): it must decode exactly
what DuckDB's avro reader decodes, vouch for a chain only when agentledger's own verifier accepts
it, and never be needed: without it (or when it fails) replay gives the same answers.

scripts/test builds it (AGENTLEDGER_NATIVE=require); a machine without it fails the first test
here loudly rather than skipping the rest."""

from __future__ import annotations

import itertools
import json
import os
import random
import stat
from pathlib import Path

import pytest

import agentledger.replay.session as S
from agentledger.producers.recorder import ProducerIdentity, Recorder
from agentledger.producers.redact import Redactor
from agentledger.producers.simulate import SIM_EPOCH_US
from agentledger.replay import native
from agentledger.replay.bundle import check_bundle, checkpoint_entry, parse_bundle, write_bundle
from agentledger.replay.session import replay, verify_bundle
from agentledger.replay.sources import BundleSource
from agentledger.replay.workset import load, load_bundle_natively
from agentledger.schemas import codec, signing
from agentledger.schemas.contract import load_store
from agentledger.schemas.transport.base import MemorySink
from conftest import FULL_SCALE
from test_bundle import MUTATION_KINDS, _blocks, _mutate


def test_the_native_decoder_is_installed_and_runs():
    exe = native.decoder()
    assert exe is not None, "agentledger-avro2arrow is missing: run scripts/bootstrap with cargo installed"
    assert os.access(exe, os.X_OK)


def _every_kind_session(n_rounds: int = 40, seed: int = 3) -> tuple[str, list[bytes]]:
    """A session with every event kind, nulls and non-nulls, nested records, lists, timestamps
    inside payloads, signatures (bytes), redactions and non-ASCII text."""
    rng = random.Random(seed)
    clock = itertools.count(SIM_EPOCH_US, 7_919).__next__
    sink = MemorySink()
    rec = Recorder(sink, identity=ProducerIdentity("codex", "0.63.0", "devbox-ü", "dév"), clock=clock, rng=rng,
                   transforms=[Redactor(b"k" * 32)], signer=signing.generate(), checkpoint_every=25)
    s = rec.session(agent="codex", cwd="/w", model="gpt-5.1-codex", sandbox_mode="workspace_write",
                    writable_roots=["/w", "/tmp"], approval_policy="on_request",
                    network_policy={"mode": "allowlist", "allowed_domains": ["pypi.org"], "denied_domains": []},
                    git={"commit": "a" * 40, "branch": "main", "repository_url": None})
    for i in range(n_rounds):
        c = s.command_started(["bash", "-lc", f"echo héllo {i} && pytest -q", ""], "/w", escalated=i % 7 == 0,
                              env_names=["PATH", "HOME"] if i % 2 else [], pid=1000 + i,
                              parent_command_id=None if i % 3 else "c-parent", turn_id=f"t{i}",
                              tool_call_id=f"call_{i}")
        s.command_finished(c, exit_code=None if i % 11 == 5 else i % 3, duration_ms=rng.randint(0, 10_000),
                           stdout="token ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8" if i == 4 else f"{i} passed ✓",
                           stderr="" if i % 2 else "warn")
        if i % 3 == 1:  # an MCP tool call (v3): the nested mcp records, every outcome, an error text or none
            outcome = ["ok", "error", "declined", "unknown"][i % 4]
            m = s.command_started([f"mcp__srv{i % 2}__tool_ü", json.dumps({"q": i})], "/w", sandbox_profile="mcp",
                                  mcp={"server": f"srv{i % 2}", "tool": "tool_ü", "arguments_digest": f"sha256:{i:064x}",
                                       "arguments_size": 8 + i})
            s.command_finished(m, exit_code=int(outcome != "ok"), duration_ms=i, status="completed",
                               mcp={"server": f"srv{i % 2}", "tool": "tool_ü", "outcome": outcome,
                                    "error": None if outcome == "ok" else f"error {i} ✗"})
        s.file_accessed(f"/w/src/m{i % 9}.py", ["read", "write", "create", "rename", "delete", "chmod"][i % 6],
                        new_path="/w/src/renamed.py" if i % 6 == 3 else None, digest_after=f"{i:064x}",
                        size_after=i * 10, mode=0o644 if i % 6 == 5 else None, inside_workspace=i % 5 != 0)
        if i % 4 == 0:
            s.sandbox_denied("file_write", f"/etc/x{i}", "outside writable roots", command_id=c, inferred=i % 8 == 0)
        req = s.approval_requested("exec", f"make deploy {i}", f"{i:064x}", risk="high" if i % 2 else "low",
                                   justification=None if i % 3 else "needed", command_id=c)
        if i % 5:
            s.approval_decided(req, "approved" if i % 2 else "denied", "user", latency_ms=rng.randint(1, 5000),
                               decider="dana", action_digest=f"{i:064x}")
        a = s.network_attempted("pypi.org" if i % 2 else "203.0.113.9", 443, "https", method="GET",
                                url=f"https://pypi.org/simple/p{i}/", command_id=c)
        s.network_decided(a, "allow" if i % 2 else "deny", rule="r1", reason="policy", policy_source="test",
                          addresses=["151.101.0.223", "2a04:4e42::223"] if i % 2 else [])
        if i % 2:
            s.network_completed(a, "ok", status=200, bytes_in=1000 + i, bytes_out=200, duration_ms=12,
                                response_digest=f"{i:064x}")
        if i == 17:
            now = clock()
            s.gap("dropped", "test gap", lost_events=3, lost_bytes=1200, first_lost_at=now - 5000,
                  last_lost_at=now - 10, related_seq=s.seq - 1)
    s.end("completed", reason="done")
    return s.session_id, sink.values


@pytest.fixture(scope="module")
def every_kind_bundle(tmp_path_factory) -> Path:
    sid, values = _every_kind_session()
    store = load_store()
    path = tmp_path_factory.mktemp("native") / "every-kind.avro"
    cps = []
    for v in values:
        ev = store.decode(v)
        kind, payload = ev["payload"]
        if kind.endswith("Checkpoint"):
            cps.append(checkpoint_entry(ev["seq"], payload))
    assert len(cps) >= 2
    write_bundle(path, session_id=sid, values=values, writer_schema=store.current.schema, checkpoints=cps)
    return path


def test_native_decoding_equals_duckdbs_reader_row_for_row(every_kind_bundle, monkeypatch):
    store = load_store()
    b = parse_bundle(every_kind_bundle.read_bytes())
    kinds_used = {k.kind for k in store.kinds}
    with load_bundle_natively(b, store)[0] as nat:
        monkeypatch.setenv(native.ENV, "off")
        with load(BundleSource(every_kind_bundle).read(), store) as ref:
            assert ref.con.execute("SELECT count(DISTINCT kind) FROM events").fetchone()[0] == len(kinds_used)
            assert nat.events == ref.events == len(b.spans)
            columns = "SELECT column_name, column_type FROM (DESCRIBE events)"
            assert nat.con.execute(columns).fetchall() == ref.con.execute(columns).fetchall()
            theirs = ref.con.execute("SELECT * FROM events ORDER BY seq").to_arrow_table()
            nat.con.register("theirs", theirs)
            for a, b_ in (("events", "theirs"), ("theirs", "events")):
                diff = nat.con.execute(f"SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b_})").fetchone()
                assert diff == (0,), (a, b_)
            # the values that matter most to an auditor, spelled out
            row = nat.con.execute("SELECT event_id, occurred_at, gap.first_lost_at, redactions FROM events "
                                  "WHERE kind = 'gap'").fetchone()
            assert len(row[0]) == 36 and row[2] is not None and row[2] < row[1]
            assert nat.con.execute("SELECT count(*) FROM events WHERE len(redactions) > 0").fetchone()[0] >= 1
            assert nat.con.execute("SELECT count(*) FROM events WHERE kind = 'checkpoint' "
                                   "AND octet_length(checkpoint.signature) = 64").fetchone()[0] >= 2


def test_native_verifier_vouches_only_for_what_agentledgers_verifier_accepts(every_kind_bundle, tmp_path):
    """Differential: on the intact bundle and on 300 random tamperings (flipped bytes, deleted,
    swapped, inserted, forged and truncated events), the decoder vouches for the chain exactly when
    `check_bundle` finds it sound, and then its framing is the framing."""
    header, blocks = _blocks(every_kind_bundle.read_bytes())
    rng = random.Random(7)
    cases = [("intact", blocks)] + [_mutate(blocks, rng)[:2] for _ in range(300)]
    vouched_for = 0
    for trial, (kind, mutated) in enumerate(cases):
        b = parse_bundle(header + b"".join(mutated))
        with native.scratch_dir() as d:
            try:
                with native.Decoding(b.data, b.header.schema, d, bundle=b) as run:
                    v = run.result().vouched
            except native.NativeDecodeError:
                v = None  # it could not decode this: replay then does not ask it
        pb = parse_bundle(b.data)
        ref = check_bundle(pb)
        chain_sound = ref.chain is not None and ref.chain.ok and pb.framing_error is None
        if v is not None:
            assert v.sound == chain_sound, (trial, kind, ref.reason)
            if v.framing_ok:
                assert list(v.spans) == pb.spans, (trial, kind)
            if v.sound:  # the count and head are still checked, here: same verdict as without it
                assert (v.head_seq, v.head_hash) == (ref.chain.head_seq, ref.chain.head_hash)
                again = parse_bundle(b.data)
                again.set_framing(list(v.spans), None)
                with_native = check_bundle(again, ref.chain)
                assert (with_native.ok, with_native.first_bad_seq, with_native.reason) == (ref.ok, ref.first_bad_seq,
                                                                                          ref.reason)
        else:
            assert not chain_sound, (trial, kind)
        vouched_for += bool(v is not None and v.sound)
    assert vouched_for >= 2 and vouched_for < len(cases) / 2


def test_big_bundle_replay_gives_the_same_verdicts_and_state_with_and_without_the_native_decoder(
        every_kind_bundle, tmp_path, monkeypatch):
    header, blocks = _blocks(every_kind_bundle.read_bytes())
    rng = random.Random(11)
    path = tmp_path / "m.avro"
    # every kind of tampering, several times, on both paths
    per_kind = 3 if FULL_SCALE else 1  # every kind each run; 3 of each with AGENTLEDGER_TEST_SCALE=full
    cases = [blocks] + [_mutate(blocks, rng, kind)[1] for kind in sorted(MUTATION_KINDS) for _ in range(per_kind)]
    monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 0)  # every bundle takes the big-bundle path
    used = []
    real = S._native_check_and_load
    monkeypatch.setattr(S, "_native_check_and_load", lambda *a: used.append(1) or real(*a))
    for trial, mutated in enumerate(cases):
        path.write_bytes(header + b"".join(mutated))
        got = []
        for mode in (None, "off"):
            if mode is None:
                monkeypatch.delenv(native.ENV, raising=False)
            else:
                monkeypatch.setenv(native.ENV, mode)
            with replay(BundleSource(path).read()) as r:
                st = r.state()
                got.append((r.verification.status, r.bundle_check.ok, r.bundle_check.first_bad_seq,
                            r.bundle_check.reason, r.chain.verified, r.chain.head_hash, r.workset.events,
                            st.digest, r.decode_note, r.verification.as_dict() if hasattr(r.verification, "as_dict") else None))
        assert got[0] == got[1], trial
    assert len(used) == len(cases)  # (the native path was taken each time it was allowed)
    monkeypatch.delenv(native.ENV, raising=False)
    res = verify_bundle(every_kind_bundle)
    assert res.ok, res.problem


def _fake_decoder(tmp_path: Path, script: str) -> Path:
    exe = tmp_path / "fake-avro2arrow"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@pytest.mark.parametrize("script", [
    "echo 'agentledger-avro2arrow: boom' >&2; exit 2",  # fails
    "echo '{\"kind\": 4, \"rows\": 1}'; echo 'not json'",  # prints nonsense
    "exit 0",  # says nothing at all
])
def test_a_missing_or_broken_decoder_changes_nothing_but_speed(every_kind_bundle, tmp_path, monkeypatch, script):
    monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.delenv(native.ENV, raising=False)
    with replay(BundleSource(every_kind_bundle).read()) as r:
        want = (r.verification.status, r.state().digest, r.workset.events)
    assert want[0] == "ok"
    monkeypatch.setenv(native.ENV, str(_fake_decoder(tmp_path, script)))
    with replay(BundleSource(every_kind_bundle).read()) as r:
        assert (r.verification.status, r.state().digest, r.workset.events) == want
    monkeypatch.setenv(native.ENV, str(tmp_path / "does-not-exist"))
    assert native.decoder() is None
    with replay(BundleSource(every_kind_bundle).read()) as r:
        assert (r.verification.status, r.state().digest, r.workset.events) == want


def test_the_decoder_reads_a_private_copy_not_the_file_on_disk(every_kind_bundle, tmp_path, monkeypatch):
    """What is decoded is what was read and verified: rewriting the file afterwards changes nothing."""
    path = tmp_path / "b.avro"
    path.write_bytes(every_kind_bundle.read_bytes())
    raw = BundleSource(path).read()
    path.write_bytes(b"\0" * len(raw.bundle.data))
    monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.delenv(native.ENV, raising=False)
    with replay(raw) as r:
        assert r.verification.status == "ok" and r.workset.events == len(raw.bundle.spans)


def test_no_room_for_the_decoders_files_falls_back_to_duckdbs_reader(every_kind_bundle, tmp_path, monkeypatch):
    """A full scratch directory (a small /dev/shm in a container) is not an error: replay falls back."""
    import agentledger.replay.workset as W
    from contextlib import contextmanager

    @contextmanager
    def full(need_bytes: int = 0):
        d = tmp_path / "full"
        d.mkdir(exist_ok=True)
        yield d

    real_open = open

    def no_space(path, mode="r", *a, **k):
        if "full" in str(path) and "w" in mode:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(native, "scratch_dir", full)
    monkeypatch.setattr("builtins.open", no_space)
    b = parse_bundle(every_kind_bundle.read_bytes())
    with pytest.raises(native.NativeDecodeError, match="No space left"):
        load_bundle_natively(b)
    monkeypatch.setattr(W, "NATIVE_MIN_BYTES", 0)  # load() tries the decoder, then DuckDB's reader
    with load(BundleSource(every_kind_bundle).read()) as ws:
        assert ws.events == len(b.spans)
    monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 0)
    with replay(BundleSource(every_kind_bundle).read()) as r:
        assert r.verification.status == "ok" and r.workset.events == len(b.spans)


# --- hostile bundles: the decoder never vouches for what agentledger's verifier would refuse -----

def _sealed_chain(seqs: list[int], sid: str = "019b76da-0000-7000-8000-00000000f022") -> list[bytes]:
    """Events with exactly these seqs, each sealed and chained to the one before (whatever the seqs)."""
    from agentledger.schemas.envelope import GENESIS_HASH, Sealer, make_record

    store = load_store()
    sealer, prev, out = Sealer(store), GENESIS_HASH, []
    ended = next(k.name for k in store.kinds if k.kind == "session_ended")
    for i, seq in enumerate(seqs):
        rec = make_record(event_id=f"019b76da-0000-7000-8000-{i:012x}", session_id=sid, seq=seq,
                          occurred_at_us=SIM_EPOCH_US + i, producer=ProducerIdentity("codex", "1").record(),
                          payload_name=ended, payload={"status": "completed", "reason": None}, prev_hash=prev)
        sealed = sealer.seal(rec)
        out.append(sealed.value)
        prev = sealed.hash
    return out


def _vouched(data: bytes, **kw):
    """(what the decoder vouched for, or None when it gave up), and `check_bundle`'s verdict."""
    b = parse_bundle(data)
    with native.scratch_dir() as d:
        try:
            with native.Decoding(b.data, load_store().current.schema, d, bundle=b, **kw) as run:
                v = run.result().vouched
        except native.NativeDecodeError:
            v = None
    return v, check_bundle(parse_bundle(data))


def _bundle_of(values: list[bytes], path: Path) -> bytes:
    write_bundle(path, session_id=parse_session(values[0]), values=values, writer_schema=load_store().current.schema,
                 checkpoints=[], allow_broken=True)
    return path.read_bytes()


def parse_session(value: bytes) -> str:
    from agentledger.replay.chain import envelope_head

    return envelope_head(value)[1]


def test_seq_overflowing_a_long_is_not_vouched_for(tmp_path):
    top = 2**63 - 1
    v, ref = _vouched(_bundle_of(_sealed_chain([top, -(2**63)]), tmp_path / "wrap.avro"))
    assert not ref.ok and (v is None or not v.sound)
    v, ref = _vouched(_bundle_of(_sealed_chain([top]), tmp_path / "top.avro"))
    assert v is None or not v.sound or ref.ok  # (the last long: vouched only if agentledger accepts it too)


def test_an_overlong_seq_varint_is_not_vouched_for(tmp_path):
    """seq 0 written as ten bytes whose last one overflows 64 bits: Python reads 2**63, not 0."""
    import hashlib

    from agentledger.replay.chain import envelope_head

    (value,) = _sealed_chain([0])
    body = bytearray(value[10:])
    eid_len = body[0] >> 1
    at = 1 + eid_len
    sid_len = body[at] >> 1
    at += 1 + sid_len
    assert body[at] == 0  # seq 0: one byte
    body[at:at + 1] = b"\x80" * 9 + b"\x02"
    header = value[:10]
    body[-64:] = hashlib.sha256(header + bytes(body[:-66])).hexdigest().encode()
    assert envelope_head(header + bytes(body))[2] != 0  # agentledger's reader: not seq 0
    b = parse_bundle(_bundle_of(_sealed_chain([0]), tmp_path / "one.avro"))
    data = b.data[: b.header.length] + b"\x02" + codec.zigzag_varint(len(body)) + bytes(body) + b.data[b.spans[0][1]:]
    v, ref = _vouched(data)
    assert not ref.ok and (v is None or not v.sound)


def test_an_empty_bundle_is_not_vouched_for(tmp_path):
    from agentledger.replay.bundle import header_digest

    b = parse_bundle(_bundle_of(_sealed_chain([0]), tmp_path / "one.avro"))
    meta = dict(b.header.metadata)
    meta["agentledger.event_count"] = b"0"
    meta["agentledger.head_hash"] = b""
    meta["agentledger.header_digest"] = header_digest(meta, b.header.sync).encode()
    empty = codec.ocf_header(b.header.schema, b.header.sync, meta)
    v, ref = _vouched(empty)
    assert not ref.ok and (v is None or not v.sound)


def test_a_block_with_bytes_after_its_record_cannot_hang_replay(tmp_path):
    """arrow-avro 60 loops on a block whose record ends before the block does; agentledger's fast
    verifier accepts such a block when its last bytes are valid hash fields. The decoder is given up
    on after its time bound, and nothing of it is used."""
    import hashlib
    import time

    (value,) = _sealed_chain([0])
    header, body = value[:10], value[10:]
    padded = bytearray(body + b"\x00" * 8 + body[-132:])  # the record, junk, then prev + hash fields again
    padded[-64:] = hashlib.sha256(header + bytes(padded[:-66])).hexdigest().encode()
    b = parse_bundle(_bundle_of(_sealed_chain([0]), tmp_path / "one.avro"))
    data = b.data[: b.header.length] + b"\x02" + codec.zigzag_varint(len(padded)) + bytes(padded) + b.data[b.spans[0][1]:]
    t0 = time.monotonic()
    v, ref = _vouched(data, timeout=3)
    assert time.monotonic() - t0 < 30
    assert v is None or not v.sound or ref.ok


def test_a_summary_that_does_not_add_up_leaves_the_workset_untouched(every_kind_bundle, tmp_path, monkeypatch):
    """The decoder's summary is checked before anything is committed: a wrong one (here, one row
    more than its files hold) leaves the kind tables empty, and DuckDB's reader fills them."""
    import agentledger.replay.workset as W

    real = native.decoder()
    liar = _fake_decoder(tmp_path, f'"{real}" "$@" | sed -E \'s/^\\{{"rows":([0-9]+)/{{"rows":1\\1/\'')
    monkeypatch.setenv(native.ENV, str(liar))
    b = parse_bundle(every_kind_bundle.read_bytes())
    with pytest.raises(native.NativeDecodeError, match="rows"):
        load_bundle_natively(b)
    monkeypatch.setattr(W, "NATIVE_MIN_BYTES", 0)
    with load(BundleSource(every_kind_bundle).read()) as ws:
        assert ws.decoder == "duckdb" and ws.events == len(b.spans)  # (nothing of the failed load stayed)
    monkeypatch.setenv(native.ENV, str(real))
    with load(BundleSource(every_kind_bundle).read()) as ws:
        assert ws.decoder == "native" and ws.events == len(b.spans)


def test_a_header_schema_differing_only_in_logical_types_is_read_with_the_current_one(tmp_path):
    """Logical types do not change a schema's fingerprint: a bundle whose header drops them is
    decoded with the current reader schema all the same (timestamps stay timestamps)."""
    import copy

    store = load_store()
    sid, values = _every_kind_session(n_rounds=3)
    bare = copy.deepcopy(store.current.schema)
    for f in bare["fields"]:
        if f["name"] == "occurred_at":
            f["type"] = "long"
    path = tmp_path / "bare.avro"
    write_bundle(path, session_id=sid, values=values, writer_schema=bare, checkpoints=[
        checkpoint_entry(ev["seq"], ev["payload"][1]) for ev in map(store.decode, values)
        if ev["payload"][0].endswith("Checkpoint")])
    b = parse_bundle(path.read_bytes())
    assert b.fingerprint == store.current.fingerprint
    with load_bundle_natively(b, store)[0] as ws:
        t, first = ws.con.execute("SELECT any_value(typeof(occurred_at)), min(occurred_at) FROM events").fetchone()
        assert t == "TIMESTAMP" and first.year == 2026
