"""The gates the test command holds the code to (issue 23 point 8): ruff's lint rules and mypy strict
on the core (schemas/), both configured in pyproject.toml. Each runs as a subprocess over the repo
and the test fails with its output. A missing tool fails too (it is in the `dev` extra): never a skip."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_tool(module: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    assert importlib.util.find_spec(module) is not None, (
        f"{module} is not installed in {sys.executable}: it is in the dev extra (pip install -e '.[dev]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_ruff_check_passes() -> None:
    # --no-cache: the test writes nothing into the repository
    r = _run_tool("ruff", ["check", "--no-cache", "--output-format", "concise", "."])
    assert r.returncode == 0, f"ruff check found problems (rules: pyproject.toml [tool.ruff.lint]):\n{r.stdout}{r.stderr}"
    assert "All checks passed" in r.stdout


def test_mypy_strict_on_the_core_passes(tmp_path: Path) -> None:
    r = _run_tool("mypy", ["--cache-dir", str(tmp_path / "mypy-cache")])
    assert r.returncode == 0, f"mypy found problems (settings: pyproject.toml [tool.mypy]):\n{r.stdout}{r.stderr}"
    assert "Success: no issues found" in r.stdout
    checked = int(r.stdout.split(" in ")[1].split()[0])
    assert checked >= len(list((REPO / "schemas").glob("*.py"))), r.stdout


def test_gates_can_fail(tmp_path: Path) -> None:
    """Both gates reject a bad file (so a green run means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f(x):\n    return undefined_name + x\n")
    r = _run_tool("ruff", ["check", "--no-cache", "--config", str(REPO / "pyproject.toml"), str(bad)])
    assert r.returncode != 0 and "F401" in r.stdout and "F821" in r.stdout, r.stdout + r.stderr
    r = _run_tool("mypy", ["--strict", "--cache-dir", str(tmp_path / "mypy-cache"), str(bad)])
    assert r.returncode != 0 and "no-untyped-def" in r.stdout, r.stdout + r.stderr
