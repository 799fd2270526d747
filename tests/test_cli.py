"""The CLI: every command documented with an example; the demo's done-when on an empty home."""

from __future__ import annotations

import json

import pytest
import typer.main

from agentledger.cli import app
from conftest import cli_env, run_cli


def all_commands():
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
        else:
            out.append((path, cmd))

    walk(root, [])
    return out


def test_there_are_commands():
    names = {" ".join(p) for p, _ in all_commands()}
    assert {"demo", "simulate", "ingest", "sql", "schemas check"} <= names


@pytest.mark.parametrize("path", [p for p, _ in all_commands()], ids=lambda p: " ".join(p))
def test_every_command_help_has_an_example(path):
    cmd = dict((tuple(p), c) for p, c in all_commands())[tuple(path)]
    assert "Example:" in (cmd.help or ""), f"`agentledger {' '.join(path)} --help` needs an example"


def test_demo_on_an_empty_home_shows_all_four_families(tmp_path):
    home = tmp_path / "empty"
    env = cli_env(home)
    out = run_cli("demo", env=env)
    assert "Try next" in out.stdout
    rows = json.loads(run_cli("sql", "select family, count(*) as n from events group by 1", "--format", "json",
                              env=env).stdout)
    assert {r["family"] for r in rows} == {"session", "sandbox", "approval", "network"}
    assert all(r["n"] > 0 for r in rows)


def test_sql_is_read_only_and_errors_are_clear(tmp_path):
    env = cli_env(tmp_path / "h")
    run_cli("simulate", "--sessions", "2", "--seed", "1", env=env)
    run_cli("ingest", env=env)
    proc = run_cli("sql", "delete from events", env=env, check=False)
    assert proc.returncode != 0
    assert "read-only" in (proc.stderr + proc.stdout).lower()
    assert "Traceback" not in proc.stderr
    leak = tmp_path / "leak.csv"
    proc = run_cli("sql", f"copy (select * from events) to '{leak}'", env=env, check=False)
    assert proc.returncode != 0 and not leak.exists()
    n = json.loads(run_cli("sql", "select count(*) n from events", "--format", "json", env=env).stdout)[0]["n"]
    assert n > 0
    csv_out = run_cli("sql", "select session_id, event_count from sessions order by 1", "--format", "csv", env=env).stdout
    assert csv_out.splitlines()[0] == "session_id,event_count" and len(csv_out.splitlines()) == 3


def test_sql_without_a_warehouse_says_what_to_do(tmp_path):
    proc = run_cli("sql", "select 1", env=cli_env(tmp_path / "none"), check=False)
    assert proc.returncode == 1 and "agentledger ingest" in proc.stderr


def test_simulate_is_deterministic(tmp_path):
    outs = []
    for d in ("a", "b"):
        env = cli_env(tmp_path / d)
        outs.append(run_cli("simulate", "--sessions", "15", "--seed", "3", "--format", "json", env=env).stdout)
    assert outs[0] == outs[1]
    a = sorted(p for p in (tmp_path / "a" / "log").rglob("*") if p.is_file())
    b = sorted(p for p in (tmp_path / "b" / "log").rglob("*") if p.is_file())
    assert len(a) == len(b) > 0
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
