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


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg_parts = path.relative_to(REPO).with_suffix("").parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: stays inside the package it is in
                base = pkg_parts[: len(pkg_parts) - node.level]
                out.add(base[0] if base else pkg_parts[0])
            elif node.module:
                out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.add(arg.value.split(".")[0])
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


def test_the_import_checker_sees_violations(tmp_path, monkeypatch):
    """The layering test must be able to fail: a stage importing another stage is caught."""
    f = REPO / "replay" / "_layering_probe.py"
    f.write_text("from consumers.ingest import Ingestor\nimport producers.recorder\n")
    try:
        assert {"consumers", "producers"} <= imports_of(f)
    finally:
        f.unlink()
