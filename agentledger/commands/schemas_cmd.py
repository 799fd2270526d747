"""schemas check | list | release: the Avro contract's compatibility gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import typer

from ..output import Format, console, err_console, print_json, render_rows
from .options import TableCsvOrJson

schemas_app = typer.Typer(help="The Avro event contract.\n\nExample:  agentledger schemas check", no_args_is_help=True)


@schemas_app.command("check")
def check(
    candidate: Optional[Path] = typer.Argument(None, metavar="[SCHEMA]", help="Candidate .avsc (same as --schema)."),
    schema: Optional[Path] = typer.Option(None, "--schema", help="Candidate .avsc (default: schemas/event.avsc)."),
    subject: str = typer.Option("event", help="Schema subject."),
    fmt: TableCsvOrJson = Format.table,
) -> None:
    """Fail unless the schema is FULL_TRANSITIVE compatible with every released version.

    Example:  agentledger schemas check /tmp/event-edited.avsc
    """
    from agentledger.schemas.compat import check_store
    from agentledger.schemas.contract import SchemaStore

    if candidate is not None and schema is not None and candidate != schema:
        err_console.print("give the candidate schema once: as an argument or with --schema")
        raise typer.Exit(2)
    schema = schema or candidate
    if schema is not None and not schema.is_file():
        err_console.print(f"no such schema file: {schema}")
        raise typer.Exit(2)

    store = SchemaStore(subject)
    results = check_store(store, schema)
    ok = all(r.ok for r in results)
    if fmt is Format.json:
        print_json({"ok": ok, "versions": [r.__dict__ for r in results]})
    else:
        render_rows(["released", "backward", "forward", "problems"],
                    [(r.version, r.backward, r.forward, "\n".join(r.messages)) for r in results], fmt,
                    title=f"{schema or store.current.path} vs released {subject} schemas (FULL_TRANSITIVE)")
        (console if ok else err_console).print("compatible" if ok else "[bold red]INCOMPATIBLE[/]")
    if not results:
        err_console.print("no released versions to check against")
        raise typer.Exit(1)
    raise typer.Exit(0 if ok else 1)


@schemas_app.command("list")
def list_(subject: str = typer.Option("event"), fmt: TableCsvOrJson = Format.table) -> None:
    """List every schema version with its fingerprint.

    Example:  agentledger schemas list --format json
    """
    from agentledger.schemas.contract import SchemaStore

    store = SchemaStore(subject)
    rows = [(v.label, v.fingerprint_hex, str(v.path)) for v in [*store.released, store.current]]
    render_rows(["version", "fingerprint", "path"], rows, fmt)


@schemas_app.command("release")
def release(subject: str = typer.Option("event")) -> None:
    """Freeze the current schema as the next released version (after `schemas check` passes).

    Example:  agentledger schemas release
    """
    from agentledger.schemas.compat import check_store
    from agentledger.schemas.contract import RELEASED_DIR, SchemaStore

    store = SchemaStore(subject)
    if store.is_current_released:
        console.print("the current schema is already released")
        return
    bad = [r for r in check_store(store) if not r.ok]
    if bad:
        err_console.print("refusing to release: not FULL_TRANSITIVE compatible; run `agentledger schemas check`")
        raise typer.Exit(1)
    n = max((v.version for v in store.released), default=0) + 1
    dest = RELEASED_DIR / f"{subject}.v{n}.avsc"
    shutil.copyfile(store.current.path, dest)
    dest.chmod(0o644)  # repository content every user reads (the CLI's umask keeps its own files private)
    # released files are immutable history: pin the new one (tests/test_schemas.py checks every pin)
    pins_path = RELEASED_DIR / "FINGERPRINTS.json"
    pins = json.loads(pins_path.read_text()) if pins_path.exists() else {}
    pins[f"{subject}.v{n}"] = store.current.fingerprint_hex
    pins_path.write_text(json.dumps(pins, indent=2) + "\n")
    console.print(f"released {dest} ({store.current.fingerprint_hex}), pinned in {pins_path.name}")
