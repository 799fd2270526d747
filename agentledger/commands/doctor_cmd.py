"""doctor: what this machine has for agentledger, what is missing, and the command that fixes each
(the checks: agentledger/api/health.py)."""

from __future__ import annotations

from enum import Enum
from typing import List, Optional

import typer

from agentledger import api

from ..output import Format, console, print_json, render_rows
from .options import TableOrJson, settings

app = typer.Typer()


class Area(str, Enum):  # api.health.AREAS
    sandbox = "sandbox"
    native = "native"
    signing = "signing"
    ml = "ml"
    notebooks = "notebooks"


@app.command("doctor")
def doctor(
    ctx: typer.Context,
    require: Optional[List[Area]] = typer.Option(None, "--require", help="Also require this (repeatable): sandbox, "
                                                 "native, signing, ml, notebooks."),
    fmt: TableOrJson = Format.table,
) -> None:
    """Check what this machine has for agentledger: what is installed, what is missing and the command
    that fixes each (DuckDB extensions, Kafka when configured, keys, the native decoder, the sandbox's
    tools, the notebooks' Python extras). Exits 1 when something required is missing.

    Example:  agentledger doctor --require sandbox --format json
    """
    found = api.doctor(settings(ctx), {a.value for a in require or []})
    checks, ok = found.checks, found.ok
    if fmt is Format.json:
        print_json(found.as_dict())
    else:
        rows = [[c.area, c.check, "ok" if c.ok else "MISSING" if c.required else "missing (optional)", c.detail,
                 c.fix] for c in checks]
        render_rows(["area", "check", "status", "detail", "fix"], rows, Format.table)
        console.print("everything required is in place" if ok else
                      "[bold red]something required is missing[/]: run the command in its fix column")
    raise typer.Exit(0 if ok else 1)

