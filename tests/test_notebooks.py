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
