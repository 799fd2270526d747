"""The pipeline shows in the import graph: stages depend on the core (`schemas`), never on each
other, and nothing below the CLI imports the CLI. The CLI (agentledger/cli.py, agentledger/commands/)
reaches the stages only through the application layer (agentledger/api/), which imports no CLI
module, and the command modules never import cli.py. One adapter module per external system."""

from __future__ import annotations

import ast
import re
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


def modules_of(path: Path, source: str | None = None, rel: Path | None = None) -> set[str]:
    """The full names of the modules a file imports (relative imports resolved; `from a import b`
    gives `a.b`, which is a module or a name in `a`: both are checked as prefixes)."""
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    rel = rel or path.relative_to(REPO)
    package = list(rel.with_suffix("").parts[:-1]) if rel.name != "__init__.py" else list(rel.parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# The web console (agentledger/console, `agentledger serve`) is a UI like the CLI: the same rules.
CLI_FILES = sorted([*(REPO / "agentledger").glob("*.py"), *(REPO / "agentledger" / "commands").glob("*.py"),
                    *(REPO / "agentledger" / "console").glob("*.py")])
API_FILES = sorted((REPO / "agentledger" / "api").glob("*.py"))
FAST_PATHS = {"agentledger/hookmain.py"}  # `agentledger hook`: records without the CLI (see its docstring)


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


KAFKA_ADAPTER = "schemas/transport/kafka/"  # one package, split by role (clients, sink, process, source)


@pytest.mark.parametrize("library,allowed,where", [
    # tests and benchmarks too: one that needs a raw client gets it from the adapter (bench/rawkafka.py
    # drives the clients `producer_client`/`consumer_client` make); a broker is never mocked
    ("kafka", {KAFKA_ADAPTER}, [*FIRST_PARTY, "tests", "bench"]),
    # tests may decode with fastavro as an independent reference
    ("fastavro", {"schemas/codec.py"}, list(FIRST_PARTY)),
    # the web framework, templates and server: only the console package
    ("starlette", {"agentledger/console/"}, list(FIRST_PARTY)),
    ("jinja2", {"agentledger/console/"}, list(FIRST_PARTY)),
    ("uvicorn", {"agentledger/console/"}, list(FIRST_PARTY)),
    # tests decode what it sends with opentelemetry-proto (tests/otlp_receiver.py)
    ("opentelemetry", {"consumers/export/otel.py"}, list(FIRST_PARTY)),
])
def test_one_adapter_module_per_external_system(library, allowed, where):
    users = {str(f.relative_to(REPO)) for pkg in where for f in py_files(pkg) if library in imports_of(f)}
    outside = {u for u in users if not any(u == a or (a.endswith("/") and u.startswith(a)) for a in allowed)}
    assert not outside, f"only {allowed} may import {library}; also found in {sorted(outside)}"
    assert users, f"no adapter imports {library}: the rule checks nothing"


def test_only_the_transport_package_reaches_into_the_kafka_adapter():
    """Stages, the application layer, tests and benchmarks use the transport interface
    (`schemas.transport`: `Sink`, `Source`, `open_*`, `kafka_*`, `local_*`), not the Kafka adapter's
    modules; the exceptions are listed here, each with its reason."""
    allowed = {
        "bench/rawkafka.py": "raw kafka-python baselines: clients configured by the adapter",
        "bench/emit.py": "creates the baseline's topic",
        "bench/chaos_scenarios/bad_input.py": "creates the topic the hostile bytes go to",
    }
    offenders = {}
    for pkg in [*STAGES, "agentledger", "bench"]:
        for f in py_files(pkg):
            rel = str(f.relative_to(REPO))
            mods = modules_of(f)
            if any(under(m, "agentledger.schemas.transport.kafka") for m in mods) and rel not in allowed:
                offenders[rel] = sorted(m for m in mods if under(m, "agentledger.schemas.transport.kafka"))
    assert not offenders, offenders


def test_stages_do_not_reimplement_a_partitioner():
    """Where a key lands is `Sink.partition_for` / `Source.partition_for`: no stage hashes keys itself."""
    offenders = sorted(str(f.relative_to(REPO)) for pkg in (*STAGES, "agentledger") for f in py_files(pkg)
                       if PARTITIONER.search(f.read_text()))
    assert not offenders, offenders
    assert PARTITIONER.search("p = zlib.crc32(session_id.encode()) % n") and PARTITIONER.search(
        "(murmur2(key) & 0x7FFFFFFF) % len(parts)") and not PARTITIONER.search('f"{zlib.crc32(blob):08x}"')


PARTITIONER = re.compile(r"(crc32|murmur2)\((?:[^()]|\([^()]*\))*\)[^%\n]{0,20}%")


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


def cli_violations(path: Path, source: str | None = None, rel: Path | None = None) -> list[str]:
    """What a CLI file imports that it must not: a stage (only through agentledger.api), or, from a
    command module, the CLI's root module (commands import their settings and options from
    agentledger.commands.options)."""
    rel = rel or path.relative_to(REPO)
    mods = modules_of(path, source, rel)
    bad = sorted(m for m in mods if any(under(m, f"agentledger.{s}") for s in STAGES))
    if rel.parts[:2] == ("agentledger", "commands"):
        bad += sorted(m for m in mods if under(m, "agentledger.cli"))
    return [m for m in bad if not any(m != o and under(m, o) for o in bad)]  # `a`, not also `a.name`


def test_the_cli_reaches_the_stages_only_through_the_application_layer():
    assert any(f.name == "cli.py" for f in CLI_FILES) and len([f for f in CLI_FILES if "commands" in f.parts]) >= 8
    offenders = {str(f.relative_to(REPO)): cli_violations(f) for f in CLI_FILES
                 if str(f.relative_to(REPO)) not in FAST_PATHS and cli_violations(f)}
    assert not offenders, f"the CLI must call agentledger.api, not the stages (nor commands cli.py): {offenders}"


def test_the_application_layer_imports_no_cli():
    """agentledger.api is plain Python under the CLI: no typer, no rich, no CLI module."""
    assert API_FILES
    cli = ("agentledger.cli", "agentledger.commands", "agentledger.output", "agentledger.console", "typer", "rich",
           "click", "starlette", "jinja2", "uvicorn")
    offenders = {str(f.relative_to(REPO)): sorted(m for m in modules_of(f) if any(under(m, c) for c in cli))
                 for f in API_FILES}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders


def test_the_cli_checker_sees_violations(tmp_path):
    """The CLI rules can fail: a command importing cli.py (relatively or not) or a stage is caught."""
    src = ("from ..cli import settings\nfrom agentledger.replay.session import replay\n"
           "from agentledger import cli\nimport agentledger.producers.simulate\nfrom ..api import ingest\n")
    bad = cli_violations(tmp_path / "probe.py", src, Path("agentledger/commands/_probe.py"))
    assert {"agentledger.cli", "agentledger.replay.session", "agentledger.producers.simulate"} <= set(bad)
    assert not any(under(m, "agentledger.api") for m in bad)
    # cli.py itself may import the command modules, but not a stage
    assert cli_violations(tmp_path / "probe.py", "from .commands import core\nfrom .consumers import ingest\n",
                          Path("agentledger/cli.py")) == ["agentledger.consumers"]


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
