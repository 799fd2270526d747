"""Installed, agentledger is ONE top-level package: its parts are agentledger.schemas,
agentledger.producers, agentledger.consumers and agentledger.replay, so a project or notebook that
has its own `schemas` (or `producers`, ...) package on the path still gets ours.

The wheel is built from a copy of the tracked files (nothing is written into the checkout) and
installed, without network, into a fresh virtualenv whose only other site directory is this venv's
(for the third-party dependencies; its editable agentledger hook is not loaded from there). Then
the CLI runs from a directory where `import schemas` would find an impostor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("schemas", "producers", "consumers", "replay")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        s, d = REPO / name, src / name
        if not s.exists() and not s.is_symlink():
            continue  # deleted in the working tree
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_symlink():
            d.symlink_to(os.readlink(s))
        else:
            shutil.copy2(s, d)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("agentledger-*.whl")
    return whl


def test_the_wheel_holds_one_top_level_package_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"agentledger"}, sorted(tops)
    for part in PARTS:
        assert f"agentledger/{part}/__init__.py" in names
    for data in ("agentledger/schemas/event.avsc", "agentledger/schemas/released/event.v1.avsc",
                 "agentledger/schemas/released/FINGERPRINTS.json", "agentledger/producers/rulesets/gitleaks.json",
                 "agentledger/consumers/detect/models/isoforest-v1.json"):
        assert data in names, data


def test_a_fresh_venv_with_an_unrelated_schemas_package_on_its_path_still_works(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies: this venv's site-packages as a plain path entry (its .pth files are not run)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    impostors = tmp_path / "project"
    for part in PARTS:
        (impostors / part).mkdir(parents=True)
        (impostors / part / "__init__.py").write_text(f"raise ImportError('the project\\'s own {part}, not agentledger\\'s')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTLEDGER_", "PYTHON"))}
    env.update({"AGENTLEDGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path / "user"),
                "PYTHONPATH": str(impostors), "NO_COLOR": "1", "COLUMNS": "200"})
    (tmp_path / "user").mkdir()

    def run(*args: str, exe: str | None = None) -> str:
        cmd = [exe or str(venv / "bin" / "agentledger"), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=impostors, timeout=300)
        assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        return p.stdout

    where = run("-c", "import agentledger, agentledger.schemas.codec as c, sys; "
                      "print(agentledger.__file__); print(c.__file__); print(sorted(set(sys.modules) & "
                      f"{set(PARTS)!r}))", exe=str(py))
    lines = where.splitlines()
    assert lines[0].startswith(site) and lines[1].startswith(site), where
    assert lines[2] == "[]", "a bare first-party module was imported"
    run("simulate", "--sessions", "3", "--seed", "5")
    run("ingest")
    assert '"ok": true' in run("verify", "--format", "json").replace(" ", "").replace('"ok":true', '"ok": true')
    assert "events" in run("sql", "select count(*) as events from events")
