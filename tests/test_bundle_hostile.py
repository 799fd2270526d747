"""Evidence bundles made by an attacker: what is decoded is what was verified (never another file a
glob in the path names), every verified event must be decoded (a decoder that stops early is a
failure named by seq), a rewritten header is a FAILED line (never a traceback), and strings from a
bundle are printed as text, never as Rich markup."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from conftest import cli_env, run_cli
from agentledger.replay.bundle import HEADER_DIGEST_KEY, checkpoint_entry, header_digest, parse_bundle, write_bundle
from agentledger.replay.session import replay, verify_bundle
from agentledger.replay.sources import BundleSource
from agentledger.schemas import codec, signing
from test_replay import signed_session

FORGED = "FORGED-BY-ATTACKER"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A signed session exported with the CLI (checkpoints every 5 events, operator provenance)."""
    d = tmp_path_factory.mktemp("hostile")
    signer = signing.generate()
    _, pub = signing.write_keypair(signer, d / "keys")
    home = d / "home"
    st, sid = signed_session(home, signer)
    run_cli("ingest", env=cli_env(home))
    out = d / "session.avro"
    run_cli("export", sid, "--out", str(out), "--source", "warehouse", env=cli_env(home))
    operator = next((home / "keys" / "operator").glob("*.pub"))
    return out, pub, operator, signer


def _records(b):
    p = codec.parse(b.header.schema)
    return p, [codec.decode(b.body(i), p) for i in range(len(b.spans))]


def _seal(b, p, rec: dict, prev: str, patch=None) -> tuple[bytes, str]:
    body = codec.encode(p, dict(rec, prev_hash=prev, hash="0" * 64))
    if patch is not None:
        body = patch(body)
    v = codec.SOE_MAGIC + b.fingerprint + body
    h = hashlib.sha256(v[:-66]).hexdigest()
    return v[:-64] + h.encode(), h


def test_a_glob_in_the_bundle_path_never_decodes_another_file(exported, tmp_path):
    """'incident[1].avro' is a glob that names 'incident1.avro' to DuckDB's read_avro: the events shown
    must be the verified bytes, not the attacker's sibling file."""
    out, pub, operator, _ = exported
    genuine = tmp_path / "incident[1].avro"
    shutil.copy(out, genuine)
    b = parse_bundle(genuine.read_bytes())
    p, recs = _records(b)
    bodies = []
    for r in recs:
        if r["payload"][0].endswith("CommandStarted") and r["seq"] == 1:
            r["payload"][1]["argv"] = ["echo", FORGED]  # (its hash is not recomputed: nothing would check it)
        bodies.append(codec.encode(p, r))
    sync = b"\x11" * 16
    (tmp_path / "incident1.avro").write_bytes(codec.ocf_header(b.header.schema, sync) + codec.ocf_blocks(bodies, sync))

    res = verify_bundle(genuine, signing.Keyring([signing.load_public(pub.read_bytes())]), require_signature=True,
                        operators=signing.Keyring([signing.load_public(operator.read_bytes())]))
    assert res.ok, res.problem
    with replay(BundleSource(genuine).read()) as r:
        argv = {e["seq"]: e["payload"].get("argv") for e in r.timeline()}
        assert argv[1] == ["pytest", "-k0"] and FORGED not in json.dumps(r.timeline(), default=str)
    with replay(BundleSource(out).read()) as r:
        want = r.state().digest
    doc = json.loads(run_cli("replay", str(genuine), "--format", "json", env=cli_env(tmp_path / "v")).stdout)
    assert doc["state_digest"] == want and FORGED not in json.dumps(doc)


def _attack_bundle(out, path, *, malformed: bool):
    """The signed prefix 0..10 byte for byte, then (with ``malformed``) a command_started whose argv
    claims 2**40 items, then a forged unsigned command and the end: a sound chain throughout."""
    b = parse_bundle(out.read_bytes())
    p, recs = _records(b)
    keep = 11
    values = [b.value(i) for i in range(keep)]
    cps = [checkpoint_entry(r["seq"], r["payload"][1]) for r in recs[:keep] if r["payload"][0].endswith("Checkpoint")]
    assert cps
    prev = values[-1][-64:].decode()
    cmd = next(r for r in recs if r["payload"][0].endswith("CommandStarted"))
    ended = next(r for r in recs if r["payload"][0].endswith("SessionEnded"))
    extra, seq = [], keep
    if malformed:
        r = dict(cmd, seq=seq, payload=(cmd["payload"][0], dict(cmd["payload"][1], argv=["AAAA"])))
        extra.append((r, lambda body: body.replace(b"\x02\x08AAAA\x00", codec.zigzag_varint(2**40) + b"\x08AAAA\x00", 1)))
        seq += 1
    extra.append((dict(cmd, seq=seq, payload=(cmd["payload"][0], dict(cmd["payload"][1], argv=["curl", FORGED]))), None))
    extra.append((dict(ended, seq=seq + 1), None))
    for r, patch in extra:
        v, prev = _seal(b, p, r, prev, patch)
        values.append(v)
    write_bundle(path, session_id=b.session_id, values=values, writer_schema=b.header.schema, checkpoints=cps)
    return keep, keep + len(extra)


@pytest.mark.parametrize("path", ["serial", "child", "native"])
def test_a_record_the_decoder_stops_at_is_undecodable_not_a_shorter_session(exported, tmp_path, monkeypatch, path):
    """DuckDB's avro reader stops without an error at an array claiming 2**40 items: the events after
    it verified but were never decoded. The session is broken there (reason undecodable), never a
    shorter session whose signatures look complete."""
    import agentledger.replay.session as S
    from agentledger.replay import native

    out, pub, *_ = exported
    keyring = signing.Keyring([signing.load_public(pub.read_bytes())])
    control, attack = tmp_path / "control.avro", tmp_path / "attack.avro"
    bad_seq, n_control = _attack_bundle(out, control, malformed=False)
    _, n_attack = _attack_bundle(out, attack, malformed=True)
    if path == "native" and native.decoder() is None:
        pytest.skip("the native decoder is not installed")
    if path == "child":
        monkeypatch.setenv("AGENTLEDGER_AVRO2ARROW", "off")
    if path != "serial":  # the big-bundle paths: framed and checked in a child, or by the native decoder
        monkeypatch.setattr(S, "PARALLEL_MIN_BYTES", 0)
    ok = verify_bundle(control, keyring)
    assert ok.ok and ok.verification.as_dict()["signatures"] == "partial" and ok.verification.events == n_control
    res = verify_bundle(attack, keyring)
    assert not res.ok and res.first_bad_seq == bad_seq and res.verification.reason == "undecodable", res.problem
    assert res.problem.startswith(f"first bad seq {bad_seq}: undecodable")
    with replay(BundleSource(attack).read(), keyring=keyring) as r:
        v = r.verification
        assert v.status == "broken" and v.first_bad_seq == bad_seq and v.verified == bad_seq
        assert v.as_dict()["signatures"] == "partial" and v.unsigned_events >= n_attack - bad_seq
        assert max(e["seq"] for e in r.timeline()) == bad_seq - 1 and r.workset.events == bad_seq
    if path == "serial":
        proc = run_cli("verify-bundle", str(attack), "--public-key", str(pub), env=cli_env(tmp_path / "v"), check=False)
        assert proc.returncode == 1 and f"first bad seq {bad_seq}: undecodable" in " ".join(proc.stderr.split())
        assert "Traceback" not in proc.stderr


def _rewrite(src, dst, update=None, raw_schema=None):
    """``src`` with header fields replaced and the (unkeyed) header digest recomputed, as an attacker can."""
    b = parse_bundle(src.read_bytes())
    meta = {k: v for k, v in b.header.metadata.items() if not k.startswith("avro.")}
    meta.update(update or {})
    meta.pop(HEADER_DIGEST_KEY)
    schema = b.header.schema_json if raw_schema is None else raw_schema
    meta[HEADER_DIGEST_KEY] = header_digest({"avro.schema": schema, "avro.codec": b"null", **meta},
                                            b.header.sync).encode()
    m = {"avro.schema": schema, "avro.codec": b"null", **meta}
    head = codec.OCF_MAGIC + codec.zigzag_varint(len(m))
    for k, v in m.items():
        head += codec.zigzag_varint(len(k)) + k.encode() + codec.zigzag_varint(len(v)) + v
    dst.write_bytes(head + b"\x00" + b.header.sync + b.data[b.header.length:])
    return dst


DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE_HEADERS = {
    "checkpoints_not_objects": {"agentledger.checkpoints": b"[1]"},
    "checkpoint_without_seq": {"agentledger.checkpoints": b'[{"x": 1}]'},
    "checkpoints_of_mixed_types": {"agentledger.checkpoints":
                                   b'[{"seq": 1, "signature": 1}, {"seq": 1, "signature": "a"}]'},
    "checkpoint_seq_a_string": {"agentledger.checkpoints": b'[{"seq": "1", "signature": "a", "key_id": "k"}]'},
    "checkpoints_deep": {"agentledger.checkpoints": DEEP},
    "coverage_deep": {"agentledger.coverage": DEEP},
    "tree_head_deep": {"agentledger.tree_head": DEEP},
    "public_keys_deep": {"agentledger.public_keys": DEEP},
    "schema_deep": None,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_a_rewritten_header_is_a_failure_never_a_traceback(exported, tmp_path, case):
    out, *_ = exported
    upd = HOSTILE_HEADERS[case]
    bad = _rewrite(out, tmp_path / f"{case}.avro", upd, DEEP if upd is None else None)
    res = verify_bundle(bad)  # never raises for bad data
    assert not res.ok and res.problem
    env = cli_env(tmp_path / "v")
    proc = run_cli("verify-bundle", str(bad), env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.startswith("FAILED")
    if case in ("checkpoint_without_seq", "schema_deep"):
        for args in (["replay", str(bad), "--strict"], ["import", "bundle", str(bad)]):
            proc = run_cli(*args, env=env, check=False)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, args
            assert "bad_header" in proc.stdout or "error:" in proc.stderr, args


def _consistent_bundle(out, path, session_id: str):
    """The events of ``out`` under another session id, re-chained: a sound (unsigned) bundle."""
    b = parse_bundle(out.read_bytes())
    p, recs = _records(b)
    recs = [r for r in recs if not r["payload"][0].endswith("Checkpoint")]
    prev, values = "0" * 64, []
    for i, r in enumerate(recs):
        v, prev = _seal(b, p, dict(r, session_id=session_id, seq=i), prev)
        values.append(v)
    write_bundle(path, session_id=session_id, values=values, writer_schema=b.header.schema, checkpoints=[])
    return path


@pytest.mark.parametrize("sid", ["abc[/]def", "[bold red]EVIL[/bold red] [link=https://evil.example]click[/link]"])
def test_strings_from_a_bundle_are_printed_as_text_not_markup(exported, tmp_path, sid):
    out, *_ = exported
    bundle = _consistent_bundle(out, tmp_path / "[bold]odd.avro", sid)
    env = cli_env(tmp_path / "v")
    proc = run_cli("verify-bundle", str(bundle), env=env, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    text = " ".join(proc.stdout.split())
    assert text.startswith("VERIFIED") and f"session {sid}," in text and "[bold]odd.avro" in text
    proc = run_cli("replay", str(bundle), env=env, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and f"session {sid}" in proc.stdout
    # a failure names the file as it is too
    cut = tmp_path / "[bold]cut.avro"
    cut.write_bytes(bundle.read_bytes()[:-40])
    proc = run_cli("verify-bundle", str(cut), env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "[bold]cut.avro" in proc.stderr
    proc = run_cli("import", "bundle", str(bundle), env=env, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and sid in " ".join(proc.stdout.split())


def test_import_imports_the_bytes_it_verified_even_if_the_file_is_swapped_meanwhile(exported, tmp_path, monkeypatch):
    """`import bundle` verified the file, then read it again to import it: a file swapped between the
    two reads was imported unverified. Now one read: the swap changes nothing."""
    from agentledger import api
    import agentledger.replay.session as session_mod

    out, pub, _, _ = exported
    path = tmp_path / "incident.avro"
    shutil.copy(out, path)
    real = session_mod.verify_bundle

    def verify_then_swap(*args, **kwargs):
        res = real(*args, **kwargs)
        path.write_bytes(b"swapped by an attacker after the check")
        return res

    monkeypatch.setattr(session_mod, "verify_bundle", verify_then_swap)
    s = api.settings(home=tmp_path / "home")
    got = api.import_bundle(s, path, public_keys=[pub])
    assert got.imported == got.events > 0 and got.quarantined == 0
    assert path.read_bytes() == b"swapped by an attacker after the check"
