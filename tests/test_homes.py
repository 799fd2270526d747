"""Homes (issue 20, items 4): per user, never the current directory; private (0700/0600); an old
`./.agentledger` is named, never used. Key files are refused where an agent could plant them."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
from pathlib import Path


from conftest import REPO, cli_env, run_cli
from agentledger.schemas.config import from_env

SECRET_CMD = "mysql -h db.internal -u admin --password={pw} -e 'select 1'"
# what the attacker guesses from: a small dictionary (the real one is millions of leaked passwords)
DICTIONARY = ["123456", "password", "hunter2", "Winter2025!", "Summer2024!", "letmein", "qwerty123"]
PASSWORD = "Summer2024!"


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user who did not set AGENTLEDGER_HOME (HOME is a temporary directory)."""
    env = cli_env(tmp_path / "unused-home")
    env.pop("AGENTLEDGER_HOME")
    env.pop("XDG_DATA_HOME", None)
    env["HOME"] = str(tmp_path / "user")
    (tmp_path / "user").mkdir(exist_ok=True)
    env.update(extra)
    return env


def git_repo(path: Path) -> Path:
    """An agent's workspace: a git work tree (a `.git` directory is all the walk looks for)."""
    (path / ".git").mkdir(parents=True)
    (path / "src").mkdir()
    (path / "src" / "app.py").write_text("print('hi')\n")
    return path


def hook_call(env, cwd: Path, payload: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentledger", "hook"], input=json.dumps(payload).encode(),
                          capture_output=True, env={**env, "AGENTLEDGER_HOOK_DAEMON": "0"}, cwd=cwd, timeout=120)


def token_hex(text: str) -> list[str]:
    import re

    return re.findall(r"\[SECRET:[a-z_]+:([0-9a-f]{8})\]", text)


def recover(tokens: list[str], key: bytes) -> set[str]:
    """The dictionary attack on HMAC tokens with a known key."""
    return {w for w in DICTIONARY for t in tokens
            if hmac.new(key, w.encode(), hashlib.sha256).hexdigest()[:8] == t}


def all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --- the default home ---------------------------------------------------------------------------

def test_default_home_follows_xdg_and_never_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert from_env({"HOME": "/home/ann"}).home == Path("/home/ann/.local/share/agentledger")
    assert from_env({"HOME": "/home/ann", "XDG_DATA_HOME": "/data/ann"}).home == Path("/data/ann/agentledger")
    # a relative XDG_DATA_HOME is invalid (XDG spec) and ignored: it would be the current directory again
    assert from_env({"HOME": "/home/ann", "XDG_DATA_HOME": "rel"}).home == Path("/home/ann/.local/share/agentledger")
    assert from_env({"HOME": "/home/ann", "AGENTLEDGER_HOME": "/srv/al"}).home == Path("/srv/al")
    assert from_env({"HOME": "/home/ann", "AGENTLEDGER_HOME": "~/al"}).home == Path("/home/ann/al")
    for env in ({"HOME": "/home/ann"}, {}, {"HOME": "relative"}):
        assert not str(from_env(env).home).startswith(str(tmp_path)), env


def test_simulate_without_agentledger_home_writes_to_the_per_user_home_not_the_repo(tmp_path):
    repo = git_repo(tmp_path / "repo")
    env = user_env(tmp_path)
    run_cli("simulate", "--sessions", "2", "--seed", "3", env=env, cwd=repo)
    assert not (repo / ".agentledger").exists(), "nothing is written into the current directory"
    home = tmp_path / "user" / ".local" / "share" / "agentledger"
    assert list((home / "log").rglob("*.avro"))
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    run_cli("simulate", "--sessions", "1", "--seed", "4", env=env, cwd=repo)
    assert list((tmp_path / "xdg" / "agentledger" / "log").rglob("*.avro"))
    out = run_cli("--help", env=env, cwd=repo).stdout
    assert "./.agentledger" not in out and "XDG_DATA_HOME" in out


def test_an_old_dot_agentledger_in_the_current_directory_is_named_never_used(tmp_path):
    repo = git_repo(tmp_path / "repo")
    old = repo / ".agentledger"
    (old / "keys").mkdir(parents=True)
    env = user_env(tmp_path)
    proc = run_cli("simulate", "--sessions", "1", "--seed", "3", env=env, cwd=repo)
    notes = [line for line in proc.stderr.splitlines() if ".agentledger" in line]
    assert len(notes) == 1 and "no longer used" in notes[0] and "AGENTLEDGER_HOME" in notes[0], proc.stderr
    assert not (old / "log").exists()
    # the hook says it too (once), and records into the per-user home
    p = hook_call(env, repo, {"session_id": "legacy-1", "hook_event_name": "SessionStart", "cwd": str(repo)})
    assert p.returncode == 0, p.stderr
    assert p.stderr.decode().count("no longer used") == 1
    assert not (old / "log").exists() and not (old / "state").exists()
    # with AGENTLEDGER_HOME set, nothing is said
    proc = run_cli("simulate", "--sessions", "1", "--seed", "3", env=cli_env(tmp_path / "h"), cwd=repo)
    assert "no longer used" not in proc.stderr


def test_cli_subprocesses_of_the_tests_never_use_the_real_user_home(tmp_path):
    """conftest.cli_env points HOME and XDG_DATA_HOME next to the test's home: a command that falls
    back to the per-user home (no AGENTLEDGER_HOME) writes there, never to the real one."""
    env = cli_env(tmp_path / "h")
    real = os.path.expanduser("~")
    assert env["HOME"] != real and env["HOME"].startswith(str(tmp_path))
    assert env["XDG_DATA_HOME"].startswith(str(tmp_path))
    env.pop("AGENTLEDGER_HOME")
    run_cli("simulate", "--sessions", "1", "--seed", "1", env=env)
    assert list((Path(env["XDG_DATA_HOME"]) / "agentledger" / "log").rglob("*.avro"))


# --- attack: a redaction key planted in the agent's repository ------------------------------------

def test_a_planted_redaction_key_in_the_workspace_does_not_make_tokens_guessable(tmp_path):
    """The agent writes `.agentledger/keys/redaction.key` into its repository; the hook runs there.
    Before: the home was ./.agentledger, the planted key keyed every token, and a dictionary gave the
    password back. Now: the home is per user and the planted key is never read."""
    repo = git_repo(tmp_path / "repo")
    planted = b"attacker-known-key"
    (repo / ".agentledger" / "keys").mkdir(parents=True)
    (repo / ".agentledger" / "keys" / "redaction.key").write_bytes(planted)
    env = user_env(tmp_path)
    base = {"session_id": "plant-1", "cwd": str(repo), "hook_event_name": "PreToolUse", "tool_name": "Bash"}
    p = hook_call(env, repo, {**base, "tool_use_id": "t1", "tool_input": {"command": SECRET_CMD.format(pw=PASSWORD)}})
    assert p.returncode == 0, p.stderr
    run_cli("ingest", env=env, cwd=repo)
    rows = json.loads(run_cli("sql", "select command_started.shell sh from events where kind = 'command_started'",
                              "--format", "json", env=env, cwd=repo).stdout)
    assert rows and PASSWORD not in json.dumps(rows)
    tokens = token_hex(json.dumps(rows))
    assert tokens, rows
    assert recover(tokens, planted) == set(), "the planted key keyed the tokens: the password is recoverable"
    home = tmp_path / "user" / ".local" / "share" / "agentledger"
    assert PASSWORD.encode() not in all_bytes(home)


def test_a_redaction_key_refused_in_the_hook_falls_back_warns_and_never_leaks(tmp_path):
    """AGENTLEDGER_HOME points into the repository (an old setup kept by hand): the key there is
    refused; the hook records anyway (spool mode never blocks the agent) with the per-user key,
    says so on stderr, and the secret is still redacted."""
    repo = git_repo(tmp_path / "repo")
    home = repo / ".agentledger"
    planted = b"attacker-known-key"
    (home / "keys").mkdir(parents=True)
    (home / "keys" / "redaction.key").write_bytes(planted)
    env = user_env(tmp_path, AGENTLEDGER_HOME=str(home))
    base = {"session_id": "plant-2", "cwd": str(repo), "hook_event_name": "PreToolUse", "tool_name": "Bash"}
    p = hook_call(env, repo, {**base, "tool_use_id": "t1", "tool_input": {"command": SECRET_CMD.format(pw=PASSWORD)}})
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode()
    assert "redaction key" in err and "git work tree" in err and str(home / "keys" / "redaction.key") in err
    user_key = tmp_path / "user" / ".local" / "share" / "agentledger" / "keys" / "redaction.key"
    assert str(user_key) in err and user_key.exists()
    blob = all_bytes(home / "log")
    assert blob and PASSWORD.encode() not in blob
    tokens = token_hex(blob.decode("latin-1"))
    assert tokens and recover(tokens, planted) == set()
    assert recover(tokens, user_key.read_bytes().strip()) == {PASSWORD}  # (the right key does join them)
    # fail-closed: the event is recorded (safely), so there is nothing to deny
    p = hook_call({**env, "AGENTLEDGER_RECORDING_MODE": "fail_closed"}, repo,
                  {**base, "tool_use_id": "t2", "tool_input": {"command": "ls"}})
    assert p.returncode == 0 and b"deny" not in p.stdout and b"git work tree" in p.stderr, p
    # a CLI producer (import) says the same and stops: a person is there to fix it
    proc = run_cli("import", "otel", str(REPO / "tests" / "fixtures" / "codex" / "otel-claude-code-4c7b2e1a.json"), env=env, cwd=repo,
                   check=False)
    assert proc.returncode == 1 and "git work tree" in proc.stderr


# --- permissions --------------------------------------------------------------------------------

def _loose(root: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_mode & 0o077:
                bad.append(f"{oct(st.st_mode & 0o777)} {p.relative_to(root.parent)}")
    return sorted(set(bad))


def test_a_demo_home_is_private_to_its_user(tmp_path):
    home = tmp_path / "al"
    env = cli_env(home)
    run_cli("simulate", "--sessions", "3", "--seed", "2", "--write-policy", str(tmp_path / "pol.toml"), env=env)
    run_cli("ingest", "--detect", env=env)
    run_cli("keys", "generate", env=env)
    sid = json.loads(run_cli("sql", "select session_id from sessions limit 1", "--format", "json",
                             env=env).stdout)[0]["session_id"]
    run_cli("export", sid, "--out", str(home / "bundles" / "b.avro"), env=env)
    p = hook_call(env, tmp_path, {"session_id": "perm-1", "hook_event_name": "SessionStart", "cwd": "/w"})
    assert p.returncode == 0, p.stderr
    lake = f"ducklake:sqlite:{home / 'lake' / 'meta.sqlite'}"
    run_cli("--warehouse", lake, "ingest", env=env)
    assert (home / "keys" / "simulator").is_dir() and (home / "warehouse.duckdb").exists()
    assert list((home / "lake").rglob("*.parquet")) or (home / "lake" / "meta.sqlite").exists()
    assert _loose(home) == []


def test_an_existing_loose_home_is_tightened(tmp_path):
    """A home an older version made under a 022 umask: the next command makes it owner-only --
    the home and what agentledger keeps in it, nothing else of the user's."""
    home = tmp_path / "old"
    (home / "keys").mkdir(parents=True)
    (home / "log" / "agentledger.events").mkdir(parents=True)
    (home / "keys" / "x.pub").write_text("not a key")
    (home / "warehouse.duckdb").write_bytes(b"x")
    (home / "log" / "agentledger.events" / "00000.avro").write_bytes(b"x")
    (home / "notes.txt").write_text("the user's own file")
    for p in (home, home / "keys", home / "log", home / "log" / "agentledger.events"):
        p.chmod(0o755)
    for p in (home / "keys" / "x.pub", home / "warehouse.duckdb", home / "log" / "agentledger.events" / "00000.avro",
              home / "notes.txt"):
        p.chmod(0o644)
    proc = run_cli("spool", "status", "--format", "json", env=cli_env(home))
    assert _loose(home) == ["0o644 old/notes.txt"], proc.stderr
    assert "tightened" in proc.stderr
    # a home that is not a directory of its own (the user's home directory) is reported, not changed
    user = tmp_path / "me"
    user.mkdir(mode=0o755)
    user.chmod(0o755)
    env = {**cli_env(user), "HOME": str(user)}
    proc = run_cli("spool", "status", "--format", "json", env=env)
    assert "warning" in proc.stderr and "open to group/others" in proc.stderr
    assert user.stat().st_mode & 0o777 == 0o755


def test_the_sandboxed_command_keeps_the_users_umask(tmp_path):
    """agentledger's owner-only umask is its own: the command it runs for the user creates files
    with the user's modes (the recording store stays private)."""
    from sandbox_support import policy, sandbox, sandbox_env

    ws, home = tmp_path / "ws", tmp_path / "home"
    ws.mkdir()
    pol = tmp_path / "policy.toml"
    pol.write_text(policy())
    proc = sandbox("run", "--policy", str(pol), "--", "sh", "-c", "umask; echo x > made.txt", env=sandbox_env(home),
                   cwd=ws, preexec_fn=lambda: os.umask(0o022))
    assert "0022" in proc.stdout, proc.stdout + proc.stderr
    assert (ws / "made.txt").stat().st_mode & 0o777 == 0o644
    assert _loose(home) == []
