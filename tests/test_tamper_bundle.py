"""Issue 20, attack 2: a bundle rebuilt WITHOUT any key so that it stops right after a signed
checkpoint (the end event and the final checkpoint cut, the header's head and count rewritten, its
digest recomputed) passed `verify-bundle --require-signature`. The head and count are now signed by
the log operator and tied to a signed tree head by an inclusion proof."""

from __future__ import annotations

import json

import pytest

from conftest import cli_env, run_cli
from agentledger.replay.bundle import HEADER_DIGEST_KEY, header_digest, parse_bundle, write_bundle
from agentledger.schemas import codec, signing
from agentledger.schemas.contract import load_store
from test_replay import signed_session


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("tb")
    signer = signing.generate()
    _, pub = signing.write_keypair(signer, d / "home" / "keys")
    home = d / "home"
    _, sid = signed_session(home, signer)
    env = cli_env(home)
    run_cli("ingest", env=env)
    out = d / "session.avro"
    run_cli("export", sid, "--out", str(out), "--source", "warehouse", env=env)
    return out, pub, home, env


def _verify(path, env, *extra):
    proc = run_cli("verify-bundle", str(path), "--require-signature", "--format", "json", *extra, env=env, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _cut_after_signed_checkpoint(src, dst):
    """What an attacker without any key can do: keep the events up to a non-final signed checkpoint and
    write a fresh, internally consistent bundle of them."""
    b = parse_bundle(src.read_bytes())
    values = b.values()
    cps = [c for c in b.checkpoints if not c["final"]]
    last = max(c["seq"] for c in cps)
    write_bundle(dst, session_id=b.session_id, values=values[: last + 1], writer_schema=load_store().current.schema,
                 checkpoints=[c for c in b.checkpoints if c["seq"] <= last])
    return last, len(values)


def _with_metadata(path, changes: dict[str, bytes]) -> None:
    """Rewrite the header's metadata (and recompute its digest, which needs no key)."""
    data = path.read_bytes()
    b = parse_bundle(data)
    meta = {k: v for k, v in b.header.metadata.items() if k not in ("avro.schema", "avro.codec")}
    meta.update(changes)
    full = {"avro.schema": b.header.schema_json, "avro.codec": b"null", **meta}
    meta[HEADER_DIGEST_KEY] = header_digest(full, b.header.sync).encode()
    path.write_bytes(codec.ocf_header(b.header.schema, b.header.sync, meta) + data[b.header.length:])


def test_the_exported_bundle_proves_its_head_with_the_operators_signatures(exported):
    out, pub, home, env = exported
    rc, doc = _verify(out, env)
    assert rc == 0 and doc["provenance"]["status"] == "valid", doc
    assert doc["verification"]["signatures"] == "valid"


def test_a_bundle_cut_after_a_signed_checkpoint_fails_require_signature(exported, tmp_path):
    out, pub, home, env = exported
    cut = tmp_path / "cut.avro"
    last, n = _cut_after_signed_checkpoint(out, cut)
    assert last < n - 2
    rc, doc = _verify(cut, env)
    assert rc == 1 and "provenance absent" in doc["problem"], doc  # no signed header: no proof of the head
    # keeping the original signed header fields does not help: they sign another head and count
    orig = parse_bundle(out.read_bytes()).header.metadata
    keep = {k: orig[k] for k in ("agentledger.tree_head", "agentledger.inclusion", "agentledger.header_signature",
                                 "agentledger.log_id")}
    _with_metadata(cut, keep)
    rc, doc = _verify(cut, env)
    assert rc == 1 and doc["provenance"]["status"] == "bad_header_signature", doc
    # ... and without --require-signature too: a header that contradicts its signature is tampering
    proc = run_cli("verify-bundle", str(cut), "--format", "json", env=env, check=False)
    assert proc.returncode == 1 and "bad_header_signature" in json.loads(proc.stdout)["problem"]


def test_a_bundle_re_signed_by_an_attackers_key_is_not_trusted(exported, tmp_path):
    from agentledger.replay.bundle import Provenance
    from agentledger.schemas import merkle, treelog

    out, pub, home, env = exported
    b = parse_bundle(out.read_bytes())
    cut = tmp_path / "resigned.avro"
    last, _ = _cut_after_signed_checkpoint(out, cut)
    # the attacker makes a one-leaf tree of the cut head and signs everything with a key of its own
    attacker = signing.generate()
    c = parse_bundle(cut.read_bytes())
    h = c.header
    leaf = treelog.session_leaf_hash(c.session_id, h.meta_int("head_seq"), h.meta("head_hash"), h.meta_int("event_count"))
    root = merkle.root([leaf]).hex()
    log_id = b.header.meta("log_id")
    th = treelog.TreeHead(log_id, 1, root, 1, attacker.key_id, attacker.sign(signing.tree_head_message(log_id, 1, root, 1)))
    write_bundle(cut, session_id=c.session_id, values=c.values(), writer_schema=load_store().current.schema,
                 checkpoints=c.checkpoints, provenance=Provenance(attacker, th, 0, []))
    rc, doc = _verify(cut, env)
    assert rc == 1 and doc["provenance"]["status"] == "unknown_key", doc
    # trusting the operator key explicitly changes nothing for the attacker's key
    rc, doc = _verify(cut, env, "--operator-key", str(next((home / "keys" / "operator").glob("*.pub"))))
    assert rc == 1 and doc["provenance"]["status"] == "unknown_key"


def test_an_old_format_bundle_verifies_without_the_flag_and_fails_with_it(exported, tmp_path):
    out, pub, home, env = exported
    old = tmp_path / "v1.avro"
    old.write_bytes(out.read_bytes())
    orig = parse_bundle(old.read_bytes()).header.metadata
    data = old.read_bytes()
    b = parse_bundle(data)
    meta = {k: v for k, v in b.header.metadata.items() if k not in ("avro.schema", "avro.codec") and k not in (
        "agentledger.tree_head", "agentledger.inclusion", "agentledger.header_signature", "agentledger.log_id",
        "agentledger.final_checkpoint_seq")}
    meta["agentledger.bundle"] = b"1"
    full = {"avro.schema": b.header.schema_json, "avro.codec": b"null", **meta}
    meta[HEADER_DIGEST_KEY] = header_digest(full, b.header.sync).encode()
    old.write_bytes(codec.ocf_header(b.header.schema, b.header.sync, meta) + data[b.header.length:])
    assert "agentledger.tree_head" in orig
    proc = run_cli("verify-bundle", str(old), "--format", "json", env=env, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["provenance"]["status"] == "absent"
    rc, doc = _verify(old, env)
    assert rc == 1 and "format 1 bundle" in doc["problem"]
