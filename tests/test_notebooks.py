"""Every notebook in notebooks/ runs top to bottom on data it generates itself and writes its plots.

Each notebook runs in a fresh temporary working directory with this venv's Python as its kernel;
the plots it saves (every ``savefig("...")`` path in its code) must exist and not be empty."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SAVEFIG = re.compile(r"""savefig\(\s*["']([^"']+)["']""")


def test_there_are_notebooks():
    assert any(p.name.startswith("03_incident_replay") for p in NOTEBOOKS)
    assert {"01_audit_queries", "02_anomaly_model", "03_incident_replay"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_writes_its_plots(path: Path, tmp_path, monkeypatch):
    kernels = tmp_path / "jupyter" / "kernels" / "agentledger-venv"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "agentledger (test venv)", "language": "python"}))
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"
    for k in [k for k in list(__import__("os").environ) if k.startswith("AGENTLEDGER_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("AGENTLEDGER_HOME", str(home))
    # nothing of this test in the real user home: agentledger's per-user home, the kernel's runtime files
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="agentledger-venv", timeout=600, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    plots = sorted({m for c in nb.cells if c.cell_type == "code" for m in SAVEFIG.findall(c.source)})
    assert plots, f"{path.name} saves no plot"
    for p in plots:
        f = work / p
        assert f.exists() and f.stat().st_size > 5000, f"{path.name} did not write {p}"


# `jupyter SUBCOMMAND` the docs give for the notebooks, and the distribution that provides it
JUPYTER_SUBCOMMANDS = {"lab": "jupyterlab", "execute": "nbclient"}


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _declared_for(extra: str) -> set[str]:
    """The distributions `pip install agentledger[extra]` brings in by name (the extras it names, too)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names, todo, seen = _requirement_names(project["dependencies"]), [extra], set()
    while todo:
        e = todo.pop()
        seen.add(e)
        for r in project["optional-dependencies"][e]:
            m = re.match(r"agentledger\[([\w,]+)\]", r)
            if m:
                todo += [x for x in m.group(1).split(",") if x not in seen]
            else:
                names |= _requirement_names([r])
    return names


def _notebook_imports(path: Path) -> set[str]:
    import ast

    mods = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        src = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                mods.add(node.args[0].value.split(".")[0])
    return mods


def test_the_notebooks_extra_provides_every_import_of_the_notebooks_and_the_jupyter_commands():
    """`./scripts/demo --notebooks` installs agentledger[notebooks]: every module a notebook imports
    comes from the standard library, agentledger, or a distribution that extra declares."""
    from importlib.metadata import packages_distributions

    declared = _declared_for("notebooks")
    providers = packages_distributions()
    missing = {}
    for path in NOTEBOOKS:
        for mod in sorted(_notebook_imports(path)):
            if mod in sys.stdlib_module_names or mod == "agentledger":
                continue
            dists = {d.lower().replace("_", "-") for d in providers.get(mod, [])}
            if not dists & declared:
                missing.setdefault(path.stem, []).append(f"{mod} ({', '.join(sorted(dists)) or 'not installed'})")
    assert not missing, f"imported by the notebooks but not declared in agentledger[notebooks]: {missing}"
    docs = (REPO / "README.md").read_text() + (REPO / "notebooks" / "README.md").read_text()
    used = set(re.findall(r"\.venv/bin/jupyter (\w+)", docs))
    assert used and used <= set(JUPYTER_SUBCOMMANDS), used
    assert {JUPYTER_SUBCOMMANDS[u] for u in used} <= declared
