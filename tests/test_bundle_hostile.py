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
