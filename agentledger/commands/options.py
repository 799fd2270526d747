"""What the commands share: the settings of this invocation and the options several commands take,
declared once (`Annotated` types: `fmt: TableOrJson = Format.table`)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from agentledger.api import Settings, settings as settings_from_env

from ..output import Format


def settings(ctx: typer.Context) -> Settings:
    """The settings of this invocation: the environment with the global flags (--home, --warehouse,
    ...) applied by the root callback (cli.py)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else settings_from_env(private=False)


def _format(help: str | None) -> object:
    return Annotated[Format, typer.Option("--format", help=help)]


class TableOrJsonOnly(str, Enum):
    """--format of commands whose output is no table of rows (no csv)."""

    table = "table"
    json = "json"


TableOrJson = _format("table or json.")
TableCsvOrJson = _format("table, csv or json.")
SummaryFormat = _format("table or json (summary).")
ImportFormat = _format("table, csv or json (full per-file counts).")
ReplayFormat = _format("table or json (the documented replay document).")
WhatIfFormat = _format("table, csv (divergences) or json.")
StrictTableOrJson = Annotated[TableOrJsonOnly, typer.Option("--format", help="table or json.")]

PublicKeys = Annotated[Optional[List[Path]], typer.Option(
    "--public-key", help="Trusted public key file or directory (repeatable).")]
OperatorKeys = Annotated[Optional[List[Path]], typer.Option(
    "--operator-key", help="Trusted log operator public key file or directory (repeatable; HOME/keys/operator is "
                           "always included).")]
SessionFilter = Annotated[Optional[str], typer.Option("--session", help="Only this session (id or unique prefix).")]
Reasons = Annotated[Optional[List[str]], typer.Option("--reason", help="Only this reason (repeatable).")]
Snapshot = Annotated[Optional[int], typer.Option("--snapshot", help="DuckLake: as of this snapshot.")]


def rule_dirs(dirs: Optional[List[Path]]) -> list[Path]:
    return [Path(d) for d in dirs or []]
