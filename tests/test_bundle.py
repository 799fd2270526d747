"""Evidence bundles: export, offline verification, every kind of tampering named by seq, import."""

from __future__ import annotations

import json
import random
from pathlib import Path

import duckdb
import pytest

from conftest import cli_env, run_cli
from agentledger.replay.bundle import BundleError, checkpoint_entry, parse_bundle, write_bundle
from agentledger.replay.session import replay, verify_bundle
from agentledger.replay.sources import BundleSource, LocalLogSessionSource
from agentledger.schemas import codec, signing
from agentledger.schemas.contract import load_store
from agentledger.schemas.warehouse import event_table_names, load_extension
from test_replay import signed_session, simulate_and_ingest


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory):
    """A signed session (checkpoints every 5 events), exported with the CLI."""
    d = tmp_path_factory.mktemp("bundle")
    signer = signing.generate()
    _, pub = signing.write_keypair(signer, d / "keys")
    home = d / "home"
    st, sid = signed_session(home, signer)
    run_cli("ingest", env=cli_env(home))  # the log operator signs a tree head that holds the session
    out = d / "session.avro"
    doc = json.loads(run_cli("export", sid, "--out", str(out), "--source", "warehouse", "--public-key", str(pub),
                             "--embed-public-key", "--format", "json", env=cli_env(home)).stdout)
    assert doc["events"] > 30 and doc["checkpoints"] >= 5 and doc["embedded_keys"] == [signer.key_id]
    assert doc["tree_head"] is not None and doc["provenance_missing"] is None
    return out, pub, signer, sid, home


def test_exported_bundle_is_a_standard_avro_file_and_verifies_offline(signed_bundle, tmp_path):
    out, pub, signer, sid, home = signed_bundle
    n = parse_bundle(out.read_bytes()).header.meta_int("event_count")
    import fastavro  # any Avro tool reads it (the test may import it; the project code may not)

    with open(out, "rb") as f:
        recs = list(fastavro.reader(f))
    assert [r["seq"] for r in recs] == list(range(n)) and {r["session_id"] for r in recs} == {sid}
    con = duckdb.connect()
    load_extension(con, "avro")
    assert con.execute(f"SELECT count(*), max(seq) FROM read_avro('{out}')").fetchone() == (n, n - 1)
    # offline: an empty home (no warehouse, no log, no keys) and no broker configured
    env = cli_env(tmp_path / "empty")
    operator = next((home / "keys" / "operator").glob("*.pub"))
    proc = run_cli("verify-bundle", str(out), "--public-key", str(pub), "--operator-key", str(operator),
                   "--require-signature", env=env)
    assert "VERIFIED" in proc.stdout and "signatures valid" in proc.stdout and "provenance valid" in proc.stdout
    # without the operator's key the header and tree head are no proof
    proc = run_cli("verify-bundle", str(out), "--public-key", str(pub), "--require-signature", env=env, check=False)
    assert proc.returncode == 1 and "provenance unknown_key" in proc.stderr
    assert not (tmp_path / "empty" / "warehouse.duckdb").exists()
    doc = json.loads(run_cli("verify-bundle", str(out), "--format", "json", env=env).stdout)
    assert doc["ok"] and {c["status"] for c in doc["verification"]["checkpoints"]} == {"embedded_key_only"}
    # without a trusted key a signature is no proof
    proc = run_cli("verify-bundle", str(out), "--require-signature", env=env, check=False)
    assert proc.returncode == 1 and "signature" in proc.stderr
    # replaying the bundle gives the same state as replaying the session from the log
    a = json.loads(run_cli("replay", str(out), "--format", "json", env=env).stdout)
    b = json.loads(run_cli("replay", sid, "--source", "log", "--format", "json", env=cli_env(home)).stdout)
    assert a["state_digest"] == b["state_digest"] and a["verification"]["status"] == "ok"


def _blocks(data: bytes):
    b = parse_bundle(data)
    spans = b.spans
    starts = [b.header.length] + [e + 16 for _, e in spans[:-1]]
    return data[: b.header.length], [data[s : e + 16] for s, (_, e) in zip(starts, spans)]


def _expected_first_bad(orig: list[bytes], mutated: list[bytes]) -> int:
    for i, blk in enumerate(mutated):
        if i >= len(orig) or blk != orig[i]:
            return i
    return len(mutated)  # the mutated list is a prefix: the first missing one


MUTATION_KINDS = {"flip", "delete", "swap", "insert_copy", "insert_foreign", "truncate"}


def _mutate(blocks: list[bytes], rng: random.Random, kind: str | None = None) -> tuple[str, list[bytes], int]:
    """One random tampering of a bundle's blocks (of ``kind`` if given): (kind, mutated blocks, first bad seq)."""
    n = len(blocks)
    kind = kind or rng.choice(["flip", "flip", "flip", "delete", "swap", "insert_copy", "insert_foreign", "truncate"])
    mutated = list(blocks)
    if kind == "flip":
        i = rng.randrange(n)
        blk = bytearray(mutated[i])
        pos = rng.randrange(len(blk))
        blk[pos] ^= rng.randrange(1, 256)
        mutated[i] = bytes(blk)
    elif kind == "delete":
        del mutated[rng.randrange(n)]
    elif kind == "swap":
        i, j = rng.sample(range(n), 2)
        mutated[i], mutated[j] = mutated[j], mutated[i]
    elif kind == "insert_copy":
        mutated.insert(rng.randrange(n + 1), blocks[rng.randrange(n)])
    elif kind == "insert_foreign":  # a well-formed event of the same session, but forged
        j = rng.randrange(n)
        body = bytearray(blocks[j])
        body[-20] ^= 1  # inside the hash hex: framing intact, hash wrong
        mutated.insert(rng.randrange(n + 1), bytes(body))
    else:
        mutated = mutated[: rng.randrange(1, n)] if rng.random() < 0.5 else mutated[:-1] + [mutated[-1][:-rng.randrange(1, 30)]]
    expected = _expected_first_bad(blocks, mutated)
    if kind == "truncate" and len(mutated) == n:  # last block cut mid-way
        expected = n - 1
    return kind, mutated, expected


def test_a_thousand_random_mutations_are_all_caught_and_named(signed_bundle, tmp_path):
    out, pub, signer, sid, _ = signed_bundle
    data = out.read_bytes()
    header, blocks = _blocks(data)
    assert header + b"".join(blocks) == data
    keyring = signing.Keyring([signer.public_key])
    assert verify_bundle(out, keyring).ok
    rng = random.Random(2024)
    path = tmp_path / "m.avro"
    kinds: dict[str, int] = {}
    for trial in range(1000):
        kind, mutated, expected = _mutate(blocks, rng)
        path.write_bytes(header + b"".join(mutated))
        res = verify_bundle(path, keyring)
        assert not res.ok, (trial, kind)
        assert res.first_bad_seq == expected, (trial, kind, res.problem)
        assert f"first bad seq {expected}" in res.problem
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"flip", "delete", "swap", "insert_copy", "insert_foreign", "truncate"}


def test_big_bundle_path_frames_and_verifies_in_a_child_and_agrees_with_the_serial_path(signed_bundle, tmp_path,
                                                                                        monkeypatch):
    """Without the native decoder, bundles over PARALLEL_MIN_BYTES are framed and verified in a
    forked child while the parent decodes parts cut at sync markers: same verdicts, same first bad
    seq, same state. (The native path is held to the same in test_native.py.)"""
    import agentledger.replay.session as S

    monkeypatch.setenv("AGENTLEDGER_AVRO2ARROW", "off")

    out, pub, signer, sid, _ = signed_bundle
    header, blocks = _blocks(out.read_bytes())
    keyring = signing.Keyring([signer.public_key])
    rng = random.Random(99)
    path = tmp_path / "m.avro"
    # every kind of tampering, several times, on both paths (the thousand-mutation runs are the test
    # above and bench/chaos.py --scenario tampering)
    cases = [blocks] + [_mutate(blocks, rng, kind)[1] for kind in sorted(MUTATION_KINDS) for _ in range(4)]
    for trial, mutated in enumerate(cases):
        path.write_bytes(header + b"".join(mutated))
        monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 1 << 40)
        serial = verify_bundle(path, keyring)
        monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 0)
        par = verify_bundle(path, keyring)
        assert (par.ok, par.first_bad_seq, par.problem) == (serial.ok, serial.first_bad_seq, serial.problem), trial
    assert verify_bundle(out, keyring).ok  # (still parallel)
    with replay(BundleSource(out).read(), keyring=keyring) as r:
        par_state = r.state()
        assert r.verification.status == "ok" and r.bundle_check.ok and len(r.chain.hashes) == len(blocks)
        assert r.chain.hashes[-1] == r.chain.head_hash and r.verification.source["scanned"] == len(blocks)
    monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 1 << 40)
    with replay(BundleSource(out).read(), keyring=keyring) as r:
        assert r.state().digest == par_state.digest


def test_a_sync_marker_inside_event_bytes_never_changes_what_is_replayed(tmp_path, monkeypatch):
    """The parallel path cuts the file at sync markers found by search; an event that carries the
    marker in its own bytes gets a wrong cut, which must be noticed (the decode is redone on the
    framed blocks), never replayed."""
    import agentledger.replay.session as S
    from agentledger.replay.bundle import header_digest
    from agentledger.replay.workset import cuts_are_block_starts
    from agentledger.producers.recorder import ProducerIdentity, Recorder
    from agentledger.schemas.transport.base import MemorySink

    monkeypatch.setenv("AGENTLEDGER_AVRO2ARROW", "off")  # (the native decoder cuts nothing: it reads block by block)
    marker = b"SYNC-in-an-argv!"
    sink = MemorySink()
    rec = Recorder(sink, identity=ProducerIdentity("codex", "1.0"), rng=random.Random(5))
    sess = rec.session(agent="codex", cwd="/w")
    for k in range(60):
        c = sess.command_started(["echo", *([marker.decode()] * 40), str(k)], "/w")
        sess.command_finished(c, exit_code=0, duration_ms=1)
    sess.end("completed")
    honest = tmp_path / "honest.avro"
    write_bundle(honest, session_id=sess.session_id, values=sink.values, writer_schema=load_store().current.schema,
                 checkpoints=[])
    # the same bundle re-framed with the marker as its sync (header digest recomputed: still valid)
    b = parse_bundle(honest.read_bytes())
    meta = dict(b.header.metadata)
    meta["agentledger.header_digest"] = header_digest(meta, marker).encode()
    body = b"".join(b"\x02" + codec.zigzag_varint(e - s) + b.data[s:e] + marker for s, e in b.spans)
    crafted = tmp_path / "crafted.avro"
    crafted.write_bytes(codec.ocf_header(b.header.schema, marker, meta) + body)
    assert parse_bundle(crafted.read_bytes()).spans and verify_bundle(crafted).ok
    cb = parse_bundle(crafted.read_bytes())
    inside = cb.spans[11][0] + 100  # inside a command_started event, whose argv carries the marker
    assert cb.data.find(marker, cb.spans[11][0]) < cb.spans[11][1] - 16
    assert not cuts_are_block_starts(cb, [cb.data.find(marker, inside) + 16])
    assert cuts_are_block_starts(cb, [cb.spans[11][1] + 16])
    monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 1 << 40)
    with replay(BundleSource(honest).read()) as r:
        want = r.state().digest
    checked, attempts = [], []
    real_check, real_load = S.cuts_are_block_starts, S.load_unframed_bundle

    def load(bb, store):
        try:
            ws, cuts = real_load(bb, store)
        except Exception as exc:  # DuckDB could not decode a part cut mid-event: also caught
            attempts.append(type(exc).__name__)
            raise
        attempts.append(ws)
        return ws, cuts

    monkeypatch.setattr(S, "cuts_are_block_starts", lambda bb, cuts: checked.append(real_check(bb, cuts)) or checked[-1])
    monkeypatch.setattr(S, "load_unframed_bundle", load)
    monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 0)
    with replay(BundleSource(crafted).read()) as r:
        assert r.verification.status == "ok" and r.workset.events == len(cb.spans)
        assert r.state().digest == want
        # the parts cut mid-event failed to decode, or decoded to the wrong rows: either way they were
        # thrown away (row count, then cut positions, are checked against the child's framing)
        assert len(attempts) == 1 and r.workset is not attempts[0]
    # a wrong cut whose parts DuckDB did decode is caught by the framing check and decoded again
    checked.clear()
    monkeypatch.setattr(S, "load_unframed_bundle",
                        lambda bb, store: (real_load(bb, store)[0], [bb.data.find(marker, bb.header.length + 500) + 16]))
    with replay(BundleSource(honest).read()) as r:  # (honest: its parts decode whatever the cut)
        assert r.verification.status == "ok" and r.state().digest == want
    assert checked == [False]


def _careful_framing(data: bytes) -> tuple[list, int | None]:
    """Reference framing parse: Avro block by block with the general varint reader."""
    b = parse_bundle(data)  # the header (blocks are framed on first use)
    sync, pos, spans = b.header.sync, b.header.length, []
    while pos < len(data):
        try:
            count, p = codec.read_varint(data, pos)
            size, p = codec.read_varint(data, p)
        except Exception:
            return spans, len(spans)
        if count != 1 or size <= 0 or p + size + 16 > len(data) or data[p + size : p + size + 16] != sync:
            return spans, len(spans)
        spans.append((p, p + size))
        pos = p + size + 16
    return spans, None


def test_framing_fast_path_agrees_with_the_general_parser_on_damaged_and_large_blocks(signed_bundle, tmp_path):
    out, *_ = signed_bundle
    data = out.read_bytes()
    header, blocks = _blocks(data)
    rng = random.Random(7)
    cases = [data]
    for _ in range(400):  # damage where the fast path decides: block count, size varint, sync marker
        i = rng.randrange(len(blocks))
        blk = bytearray(blocks[i])
        pos = rng.choice([0, 1, 2, len(blk) - 1 - rng.randrange(16)])
        blk[pos] = rng.randrange(256)
        cases.append(header + b"".join(blocks[:i]) + bytes(blk) + b"".join(blocks[i + 1:]))
    # events of 100 B .. 20 KiB: one-, two- and three-byte size varints
    rec_home = tmp_path / "big"
    from agentledger.producers.recorder import ProducerIdentity, Recorder
    from agentledger.schemas.transport.base import MemorySink

    sink = MemorySink()
    rec = Recorder(sink, identity=ProducerIdentity("codex", "1.0"), rng=random.Random(3))
    sess = rec.session(agent="codex", cwd="/w")
    for k in (10, 3_000, 9_000, 20_000):
        c = sess.command_started(["echo", "x" * k], "/w")
        sess.command_finished(c, exit_code=0, duration_ms=1)
    sess.end("completed")
    big = rec_home.with_suffix(".avro")
    write_bundle(big, session_id=sess.session_id, values=sink.values, writer_schema=load_store().current.schema,
                 checkpoints=[])
    cases.append(big.read_bytes())
    for case in cases:
        b = parse_bundle(case)
        spans, bad = _careful_framing(case)
        assert b.spans == spans
        assert (b.framing_error[0] if b.framing_error else None) == bad
    assert len(parse_bundle(cases[-1]).spans) == 10 and verify_bundle(big).ok


def test_every_header_byte_and_sync_marker_is_covered(signed_bundle, tmp_path):
    out, *_ = signed_bundle
    data = out.read_bytes()
    b = parse_bundle(data)
    hl = b.header.length
    path = tmp_path / "h.avro"
    rng = random.Random(7)
    positions = sorted(set(rng.sample(range(hl), min(hl, 400))) | set(range(hl - 16, hl)) | set(range(0, 8)))
    for pos in positions:
        m = bytearray(data)
        m[pos] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(m))
        res = verify_bundle(path)  # never raises
        assert not res.ok and res.problem, pos
    # a flipped sync marker of one block names that block's seq
    first_sync = b.spans[3][1]
    m = bytearray(data)
    m[first_sync + 5] ^= 0xFF
    path.write_bytes(bytes(m))
    res = verify_bundle(path)
    assert not res.ok and res.first_bad_seq == 3 and "sync" in res.problem
    # not a bundle at all
    path.write_bytes(b"hello")
    assert "not an Avro" in verify_bundle(path).problem
    path.write_bytes(b"")
    assert not verify_bundle(path).ok


def test_cli_names_the_first_bad_seq_without_a_traceback(signed_bundle, tmp_path):
    out, *_ = signed_bundle
    header, blocks = _blocks(out.read_bytes())
    bad = tmp_path / "bad.avro"
    bad.write_bytes(header + b"".join(blocks[:7] + blocks[8:]))  # event 7 removed
    proc = run_cli("verify-bundle", str(bad), env=cli_env(tmp_path / "h"), check=False)
    assert proc.returncode == 1 and "first bad seq 7" in proc.stderr and "Traceback" not in proc.stderr
    doc = json.loads(run_cli("verify-bundle", str(bad), "--format", "json", env=cli_env(tmp_path / "h"),
                             check=False).stdout)
    assert doc["ok"] is False and doc["first_bad_seq"] == 7 and doc["structure"]["reason"] == "seq_gap"
    cut = tmp_path / "cut.avro"
    cut.write_bytes(header + b"".join(blocks[:-1]))
    proc = run_cli("verify-bundle", str(cut), env=cli_env(tmp_path / "h"), check=False)
    assert proc.returncode == 1 and f"first bad seq {len(blocks) - 1}" in proc.stderr and "truncated" in proc.stderr
    garbage = tmp_path / "garbage.avro"
    garbage.write_bytes(header[:40])
    proc = run_cli("verify-bundle", str(garbage), env=cli_env(tmp_path / "h"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.strip()


def test_a_session_with_two_writer_schemas_is_refused_clearly(tmp_path):
    store = load_store()
    st, sid = signed_session(tmp_path / "h", signing.generate(), final=False)
    values = LocalLogSessionSource(st.log_dir, st.topic).read(sid).values
    other = dict(store.current.schema, doc="an older writer")  # another writer schema (doc is not canonical ...)
    other["fields"] = [*other["fields"][:-2], {"name": "note", "type": ["null", "string"], "default": None},
                       *other["fields"][-2:]]
    fp2 = codec.fingerprint(other)
    mixed = values[:5] + [codec.SOE_MAGIC + fp2 + v[10:] for v in values[5:]]
    with pytest.raises(BundleError, match="changes writer schema at position 5"):
        write_bundle(tmp_path / "x.avro", session_id=sid, values=mixed, writer_schema=store.current.schema,
                     checkpoints=[])
    assert not (tmp_path / "x.avro").exists()


def test_export_refuses_a_broken_session_and_import_is_idempotent(tmp_path):
    s, _ = simulate_and_ingest(tmp_path / "src", sessions=2, seed=8)
    env = cli_env(s.home)
    sid = json.loads(run_cli("sql", "select session_id from sessions order by started_at limit 1", "--format", "json",
                             env=env).stdout)[0]["session_id"]
    out = tmp_path / "case.avro"
    run_cli("export", sid, "--out", str(out), env=env)
    other = cli_env(tmp_path / "other")
    first = json.loads(run_cli("import", "bundle", str(out), "--format", "json", env=other).stdout)
    again = json.loads(run_cli("import", "bundle", str(out), "--format", "json", env=other).stdout)
    assert first["imported"] == first["events"] > 0 and first["quarantined"] == 0
    assert again["imported"] == 0 and again["already_present"] == first["events"]
    rows = json.loads(run_cli("sql", "select status, event_count from chain_status", "--format", "json", env=other).stdout)
    assert rows == [{"status": "ok", "event_count": first["events"]}]
    n = json.loads(run_cli("sql", "select count(*) n, count(distinct source_topic) t, min(source_topic) topic "
                           "from events", "--format", "json", env=other).stdout)[0]
    assert n["n"] == first["events"] and n["t"] == 1 and n["topic"].startswith("bundle:")
    dead = json.loads(run_cli("sql", "select count(*) n from dead_letters", "--format", "json", env=other).stdout)
    assert dead == [{"n": 0}]
    # the same events, read back from the other warehouse, replay to the same state
    a = json.loads(run_cli("replay", sid, "--format", "json", env=env).stdout)["state_digest"]
    b = json.loads(run_cli("replay", sid, "--format", "json", env=other).stdout)["state_digest"]
    assert a == b
    # a tampered session is not exported as evidence unless asked
    from agentledger.schemas.warehouse import open_warehouse

    with open_warehouse(s.warehouse) as wh:
        for t in event_table_names():
            wh.con.execute(f"UPDATE {t} SET turn_id = 'forged' WHERE session_id = ? AND seq = 4", [sid])
    proc = run_cli("export", sid, "--out", str(tmp_path / "bad.avro"), env=env, check=False)
    assert proc.returncode == 1 and "first bad seq 4" in proc.stderr and not (tmp_path / "bad.avro").exists()
    run_cli("export", sid, "--out", str(tmp_path / "bad.avro"), "--allow-broken", env=env)
    proc = run_cli("verify-bundle", str(tmp_path / "bad.avro"), env=env, check=False)
    assert proc.returncode == 1 and "first bad seq 4" in proc.stderr
    proc = run_cli("import", "bundle", str(tmp_path / "bad.avro"), env=cli_env(tmp_path / "third"), check=False)
    assert proc.returncode == 1 and "does not verify" in proc.stderr


def test_bundle_paths_in_sql_are_quoted(tmp_path):
    """A bundle whose path holds a quote still loads (the path goes into read_avro)."""
    st, sid = signed_session(tmp_path / "h", signing.generate())
    values = LocalLogSessionSource(st.log_dir, st.topic).read(sid).values
    raw = LocalLogSessionSource(st.log_dir, st.topic).read(sid)
    with replay(raw) as r:
        cps = [checkpoint_entry(c["seq"], c) for c in r.checkpoint_rows()]
    p = Path(tmp_path / "it's.avro")
    write_bundle(p, session_id=sid, values=values, writer_schema=load_store().current.schema, checkpoints=cps)
    assert verify_bundle(p).ok


def test_a_bundle_of_a_writer_schema_this_version_does_not_know_verifies_and_replays(tmp_path):
    """The bundle embeds its writer schema: events written by another (e.g. newer) producer version
    verify offline and replay to the same state as the same events under the current schema."""
    from agentledger.schemas.envelope import GENESIS_HASH, seal

    store = load_store()
    # unsigned: re-sealing under another schema changes every hash, which no checkpoint could cover
    s, _ = simulate_and_ingest(tmp_path / "home", sessions=1, seed=12, sign=False)
    sid = json.loads(run_cli("sql", "select session_id from sessions", "--format", "json",
                             env=cli_env(s.home)).stdout)[0]["session_id"]
    values = LocalLogSessionSource(s.log_dir, s.topic).read(sid).values
    newer = json.loads(json.dumps(store.current.schema))
    newer["fields"].insert(-2, {"name": "host_boot_id", "type": ["null", "string"], "default": None})
    assert store.by_fingerprint(codec.fingerprint(newer)) is None
    parsed = codec.parse(newer)
    header = codec.SOE_MAGIC + codec.fingerprint(newer)
    resealed, prev = [], GENESIS_HASH
    for v in values:
        rec = store.decode(v)
        rec.update(host_boot_id="boot-1", prev_hash=prev, hash="")
        value, prev = seal(header, codec.encode(parsed, rec))
        resealed.append(value)
    out = tmp_path / "newer.avro"
    write_bundle(out, session_id=sid, values=resealed, writer_schema=newer, checkpoints=[])
    res = verify_bundle(out)
    assert res.ok, res.problem
    a = json.loads(run_cli("replay", str(out), "--format", "json", env=cli_env(tmp_path / "x")).stdout)
    b = json.loads(run_cli("replay", sid, "--format", "json", env=cli_env(s.home)).stdout)
    assert a["verification"]["status"] == "ok" and a["state_digest"] == b["state_digest"]
    assert a["verification"]["head_hash"] != b["verification"]["head_hash"]


def test_the_fast_chain_pass_checks_the_exact_first_prev_hash_and_session(signed_bundle):
    from agentledger.replay.chain import verify_spans
    from agentledger.schemas.envelope import GENESIS_HASH

    out, *_ = signed_bundle
    b = parse_bundle(out.read_bytes())
    hdr = codec.SOE_MAGIC + b.fingerprint
    assert verify_spans(b.data, b.spans, hdr, first_prev_hash=GENESIS_HASH).ok
    for odd in ("", GENESIS_HASH[:10], GENESIS_HASH + "0", "f" * 64):
        r = verify_spans(b.data, b.spans, hdr, first_prev_hash=odd)
        assert not r.ok and r.first_bad_seq == 0 and r.reason == "chain_mismatch", odd
    sid = b.session_id
    for other in (sid[:-1], sid + "x", sid[:-1] + ("0" if sid[-1] != "0" else "1")):
        r = verify_spans(b.data, b.spans, hdr, session_id=other)
        assert not r.ok and r.first_bad_seq == 0 and r.reason == "wrong_session", other
