"""The pipeline shows in the import graph: stages depend on the core (`schemas`), never on each
other, and nothing below the CLI imports the CLI. One adapter module per external system."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = "schemas"
STAGES = ("producers", "consumers", "replay")
CLI = "agentledger"
FIRST_PARTY = {CORE, *STAGES, CLI}
BARE = "bare import"  # `import schemas` instead of `import agentledger.schemas`: never allowed


def component(module: str) -> str | None:
    """Which part of agentledger a module name belongs to: the core, a stage, the CLI (anything else
    under `agentledger`), BARE for a top-level name of ours, None for third-party modules."""
    parts = module.split(".")
    if parts[0] == "agentledger":
        return parts[1] if len(parts) > 1 and parts[1] in (CORE, *STAGES) else CLI
    if parts[0] in (CORE, *STAGES):
        return BARE
    return None


def imports_of(path: Path, source: str | None = None, rel: Path | None = None) -> set[str]:
    """The components (and third-party top-level modules) a file imports. ``rel``: its path inside
    the repository, when ``source`` is given for a file that is not there."""
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    pkg_parts = (rel or path.relative_to(REPO)).with_suffix("").parts
    out: set[str] = set()

    def add(module: str) -> None:
        c = component(module)
        out.add(c if c is not None else module.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: stays inside the package it is in
                base = pkg_parts[: len(pkg_parts) - node.level]
                out.add(base[0] if base else pkg_parts[0])
            elif node.module == "agentledger":  # from agentledger import schemas, cli
                for a in node.names:
                    add(f"agentledger.{a.name}")
            elif node.module:
                add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(arg.value)
    return out


def py_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_only_the_core(stage):
    offenders = {}
    for f in py_files(stage):
        bad = (imports_of(f) & FIRST_PARTY) - {CORE, stage}
        if bad:
            offenders[str(f.relative_to(REPO))] = sorted(bad)
    assert not offenders, f"{stage} must import only the core ({CORE}): {offenders}"


def test_core_imports_no_stage_and_no_cli():
    offenders = {str(f.relative_to(REPO)): sorted((imports_of(f) & FIRST_PARTY) - {CORE})
                 for f in py_files(CORE) if (imports_of(f) & FIRST_PARTY) - {CORE}}
    assert not offenders, offenders


@pytest.mark.parametrize("library,allowed", [
    ("kafka", {"schemas/transport/kafka.py"}),
    ("fastavro", {"schemas/codec.py"}),
])
def test_one_adapter_module_per_external_system(library, allowed):
    users = {str(f.relative_to(REPO)) for pkg in FIRST_PARTY for f in py_files(pkg) if library in imports_of(f)}
    assert users <= allowed, f"only {allowed} may import {library}; also found in {sorted(users - allowed)}"


def test_ddl_lives_in_the_warehouse_module():
    pattern = ("CREATE TABLE", "CREATE OR REPLACE VIEW", "CREATE VIEW", "ALTER TABLE")
    users = set()
    for pkg in FIRST_PARTY:
        for f in py_files(pkg):
            text = f.read_text()
            if any(p in text for p in pattern):
                users.add(str(f.relative_to(REPO)))
    assert users <= {"schemas/warehouse.py"}, sorted(users)


def test_the_import_checker_sees_violations(tmp_path):
    """The layering test must be able to fail: a stage importing another stage, or a bare
    top-level name of ours, is caught."""
    src = ("from agentledger.consumers.ingest import Ingestor\nimport agentledger.producers.recorder\n"
           "from agentledger import cli\nimport schemas.codec\n")
    found = imports_of(tmp_path / "probe.py", src, Path("replay/_layering_probe.py"))
    assert {"consumers", "producers", CLI, BARE} <= found


def test_no_first_party_module_is_imported_by_a_bare_top_level_name():
    """Installed, agentledger is one package: `import schemas` would pick up whatever else is called
    `schemas` on the path (issue: namespaced packages)."""
    offenders = {str(f.relative_to(REPO)): "bare import"
                 for pkg in [*FIRST_PARTY, "tests", "bench"] for f in py_files(pkg) if BARE in imports_of(f)}
    assert not offenders, offenders


def test_the_packages_are_the_required_folders():
    """agentledger.schemas etc. are the top-level folders themselves (symlinks), not copies."""
    for name in (CORE, *STAGES):
        link = REPO / "agentledger" / name
        assert link.is_symlink() and link.resolve() == (REPO / name).resolve(), link
