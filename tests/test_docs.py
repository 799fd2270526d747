"""The README is executable and the warehouse doc covers the warehouse."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, cli_shim, run_cli
from agentledger.schemas.contract import load_store
from agentledger.schemas.warehouse import event_columns

README = (REPO / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [b.strip() for b in blocks]


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    cmds = quick_start_commands()
    assert cmds[:2] == ["./scripts/demo", "./scripts/test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/test" in ci


# --- every shell example runs -------------------------------------------------------------------
# Each ```sh block of the README and docs/*.md runs (bash -e, from a stand-in for the clone's root)
# against a home the README's demo command made, unless an HTML comment right above it says why
# not: <!-- not-tested: REASON -->. Bare `agentledger` in docs/*.md is this checkout's CLI on PATH.

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SH_BLOCK = re.compile(r"(?:<!--\s*not-tested:\s*(?P<why>[^>]*?)\s*-->\s*\n)?^```sh\n(?P<body>.*?)^```", re.S | re.M)
DEMO_SESSION = "019b76db-346b"  # the demo's suspicious session: its ids are deterministic (seed 42)


def sh_blocks(path: Path) -> list[tuple[int, str | None, str]]:
    text = path.read_text()
    return [(text.count("\n", 0, m.start("body")) + 1, m.group("why"), m.group("body"))
            for m in SH_BLOCK.finditer(text)]


def _path_without_agentledger() -> str:
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "agentledger").exists()]
    return os.pathsep.join(dirs)


def _stand_in_clone(root: Path) -> Path:
    """A directory that looks like the clone's root (its entries linked), where examples write."""
    clone = root / "clone"
    clone.mkdir()
    for entry in REPO.iterdir():
        if entry.name != ".git":
            (clone / entry.name).symlink_to(entry)
    return clone


def _example_inputs(clone: Path, user_home: Path) -> None:
    """The files the docs' examples name: Codex sessions, Claude Code transcripts and OpenTelemetry
    exports (the test fixtures)."""
    fx = REPO / "tests" / "fixtures" / "codex"
    sessions = user_home / ".codex" / "sessions"
    for f in fx.glob("rollout-*.jsonl"):
        year, month, day_time = f.name.split("-")[1:4]
        day = sessions / year / month / day_time[:2]  # where Codex keeps them
        day.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, day / f.name)
    for d in (user_home / "otel" / "codex-logs", user_home / "otel" / "codex", clone / "collector-output"):
        d.mkdir(parents=True, exist_ok=True)
        for f in fx.glob("otel-codex-*.jsonl"):
            shutil.copy(f, d / f.name)
    shutil.copy(fx / "otel-claude-code-4c7b2e1a.json", clone / "claude-logs.json")
    shutil.copytree(REPO / "tests" / "fixtures" / "claude-code" / "projects", user_home / ".claude" / "projects")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's demo command, run once on an empty home (at 80 columns: what it prints must
    still be copyable); returns (home, its stdout)."""
    root = tmp_path_factory.mktemp("demo")
    home = root / "home"
    env = cli_env(home, COLUMNS="80", PATH=_path_without_agentledger())
    proc = subprocess.run(["bash", "-c", quick_start_commands()[0]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return home, proc.stdout


def _copy_of(home: Path, root: Path) -> Path:
    h = root / "home"
    shutil.copytree(home, h, symlinks=True)
    return h


def test_readme_demo_command_runs_on_an_empty_home(demo):
    home, _ = demo
    out = run_cli("sql", "select family, count(*) from events group by 1", "--format", "json", env=cli_env(home))
    assert {r["family"] for r in json.loads(out.stdout)} == {"session", "sandbox", "approval", "network"}


def test_the_commands_the_demo_prints_work_as_printed(demo, tmp_path):
    """`agentledger` is not on PATH after ./scripts/demo: what it prints runs from the clone's root as it is."""
    home, out = demo
    tail = out.split("Try next:", 1)[1]
    cmds = [line.strip() for line in tail.splitlines() if line.startswith("  ") and line.strip()]
    assert len(cmds) >= 5 and all(c.startswith(".venv/bin/agentledger ") for c in cmds), cmds
    assert any(DEMO_SESSION in c for c in cmds), f"the demo's suspicious session is no longer {DEMO_SESSION}"
    env = cli_env(_copy_of(home, tmp_path), PATH=_path_without_agentledger())
    clone = _stand_in_clone(tmp_path)
    for c in cmds:
        proc = subprocess.run(["bash", "-c", c], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{c}\n{proc.stderr[-2000:]}"


def test_demo_notebooks_flag_installs_the_notebooks_extra(tmp_path):
    """`./scripts/demo --notebooks` (the README's one command for the notebooks' extras) runs
    `scripts/bootstrap notebooks` and hands every other option to the demo. Run from a copy of the
    script whose bootstrap and .venv/bin/agentledger only write down how they were called (the real
    bootstrap would install from PyPI)."""
    clone = tmp_path / "clone"
    calls = tmp_path / "calls"
    for stub, name in ((clone / "scripts" / "bootstrap", "bootstrap"), (clone / ".venv" / "bin" / "agentledger",
                                                                        "agentledger")):
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        stub.chmod(0o755)
    shutil.copy(REPO / "scripts" / "demo", clone / "scripts" / "demo")

    def demo(*args: str) -> tuple[list[str], str]:
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["bash", "scripts/demo", *args], cwd=clone, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [line.rstrip() for line in calls.read_text().splitlines()], proc.stdout

    made, out = demo("--notebooks", "--sessions", "3")
    assert made == ["bootstrap notebooks", "agentledger demo --sessions 3"]
    assert ".venv/bin/jupyter lab notebooks/" in out
    assert "./scripts/demo --notebooks" in README and ".venv/bin/jupyter lab notebooks/" in README
    made, out = demo()
    assert made == ["bootstrap", "agentledger demo"] and "jupyter" not in out


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_every_shell_example_runs_against_a_demo_home(doc, demo, tmp_path):
    blocks = sh_blocks(doc)
    tested = [(line, body) for line, why, body in blocks if why is None]
    if not tested:
        return
    clone = _stand_in_clone(tmp_path)
    env = cli_env(_copy_of(demo[0], tmp_path))
    shim = cli_shim(tmp_path / "bin").parent
    env["PATH"] = f"{shim}{os.pathsep}{_path_without_agentledger()}"
    _example_inputs(clone, Path(env["HOME"]))
    for line, body in tested:
        assert not re.search(r"scripts/(test|kafka|bootstrap)\b|pip install", body), \
            f"{doc.name}:{line}: installs or starts services: mark it not-tested"
        # the demo itself (a path's first step) is what made this home: the fixture ran it
        body = "\n".join(l for l in body.splitlines() if l.strip() != quick_start_commands()[0])
        if not body.strip():
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{doc.name}:{line} exited {proc.returncode}:\n{body}\n{proc.stderr[-3000:]}"


def test_test_command_fails_rather_than_skips_without_a_broker():
    script = (REPO / "scripts" / "test").read_text()
    assert "set -euo pipefail" in script and "scripts/kafka start" in script
    conftest = (REPO / "tests" / "conftest.py").read_text()
    assert "pytest.fail" in conftest and "pytest.skip" not in conftest


def test_every_events_column_is_documented():
    doc = (REPO / "docs" / "warehouse.md").read_text()
    missing = [c.name for c in event_columns(load_store()) if f"`{c.name}`" not in doc]
    assert not missing, f"docs/warehouse.md lacks: {missing}"


def test_every_detection_column_is_documented():
    """alerts (from the alert schema) and anomaly_scores/detection_state in docs/warehouse.md; the
    detect_events relation rules are written against in docs/detection.md."""
    from agentledger.consumers.detect.prepare import BUILTIN_DIR, columns, load_lists, prepare
    from agentledger.schemas.warehouse import alert_columns, open_warehouse

    wh_doc = (REPO / "docs" / "warehouse.md").read_text()
    with open_warehouse(":memory:") as wh:
        missing = [n for n, _ in alert_columns() if f"`{n}`" not in wh_doc]
        for table in ("anomaly_scores", "detection_state"):
            cols = [r[0] for r in wh.con.execute(f"DESCRIBE {table}").fetchall()]
            missing += [f"{table}.{c}" for c in cols if f"`{c}`" not in wh_doc]
        prepare(wh.con, load_lists([BUILTIN_DIR]), [])
        det_doc = (REPO / "docs" / "detection.md").read_text()
        missing += [f"detect_events.{c}" for c, _ in columns(wh.con) if f"`{c}`" not in det_doc]
    assert not missing, f"undocumented: {missing}"


def test_untested_examples_are_few_and_say_why():
    """The not-tested list stays short: a new example that cannot run in a test has to push this bound."""
    untested = [(doc.name, line, why) for doc in DOC_FILES for line, why, _ in sh_blocks(doc) if why]
    assert all(len(why) > 10 for *_, why in untested), untested
    # 15th: export otel needs a receiver (tests/test_export_otel.py runs one); 16th: docs/scale.md starts a
    # cluster and a lake stack (tests/test_scale_out.py runs them)
    assert len(untested) <= 16, untested
    tested = [1 for doc in DOC_FILES for _, why, _ in sh_blocks(doc) if not why]
    assert len(tested) >= len(untested)


def _cli_commands() -> list[str]:
    """Every command of the CLI, as typed after `agentledger` ("sql", "sandbox run"), walking the typer app."""
    import typer

    from agentledger.cli import app

    def walk(cmd, prefix: tuple[str, ...]):
        subs = getattr(cmd, "commands", None)
        if not subs:
            yield " ".join(prefix)
            return
        for name, sub in subs.items():
            if not getattr(sub, "hidden", False):
                yield from walk(sub, (*prefix, name))

    return list(walk(typer.main.get_command(app), ()))


def _table_commands() -> set[str]:
    """The commands the README's command table names: in its first column, each `agentledger G ...`
    span names G, and G followed by each word of the span (`schemas check \\| list` names schemas list)."""
    section = README.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    named = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = re.split(r"(?<!\\)\|", line)[1]
        for span in re.findall(r"`([^`]*)`", first_cell):
            words = span.replace("\\|", " ").split()
            if words and words[0] == "agentledger":
                words = words[1:]
            if words:
                named.add(words[0])
                named |= {f"{words[0]} {w}" for w in words[1:]}
    return named


def test_every_cli_command_is_in_the_readme_command_table():
    commands = _cli_commands()
    assert {"demo", "doctor", "sandbox run", "import bundle"} <= set(commands)
    missing = [c for c in commands if c not in _table_commands()]
    assert not missing, f"README.md's command table lacks: {missing}"


def test_printed_commands_say_agentledger_only_when_that_is_this_installation(tmp_path, monkeypatch):
    from agentledger.invocation import prog

    script = REPO / ".venv" / "bin" / "agentledger"
    monkeypatch.chdir(REPO)
    assert prog(str(script), path=str(tmp_path)) == ".venv/bin/agentledger"  # not on PATH
    assert prog(str(script), path=str(script.parent)) == "agentledger"  # on PATH: this one
    other = tmp_path / "agentledger"  # another installation first on PATH
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    assert prog(str(script), path=f"{tmp_path}{os.pathsep}{script.parent}") == ".venv/bin/agentledger"
    monkeypatch.chdir(tmp_path)
    assert prog(str(script), path=str(tmp_path)) == str(script)  # elsewhere: the whole path
def readme_python_blocks() -> list[str]:
    section = README.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_api_snippet_runs(tmp_path):
    """The README's first lines of Python run as written, on an empty home (the embedded log)."""
    blocks = readme_python_blocks()
    assert blocks and "import agentledger.api as al" in blocks[0]
    env = cli_env(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\d+ events, \d+ ingested, \d+ alerts$", proc.stdout, re.M), proc.stdout
    assert "ok " in proc.stdout or "open " in proc.stdout, proc.stdout
    assert (tmp_path / "home" / "incident.avro").stat().st_size > 0
    assert not proc.stderr.strip(), proc.stderr  # no progress bars, no printing: the API is silent
