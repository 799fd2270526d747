"""config: the effective settings, each with where it came from (schemas/envvars.py declares them)."""

from __future__ import annotations

import os

import typer

from agentledger.schemas import envvars

from ..output import Format, render_rows
from .options import settings

app = typer.Typer()

USER_SECTIONS = tuple(s for s in envvars.SECTIONS if s not in ("dev", "set"))


@app.command("config")
def config(
    ctx: typer.Context,
    markdown: bool = typer.Option(False, "--markdown", help="Print the README's configuration tables (every variable) instead."),
    show_all: bool = typer.Option(False, "--all", help="Also the development variables (scripts/, tests/, bench/)."),
    fmt: Format = typer.Option(Format.table, "--format"),
) -> None:
    """Every AGENTLEDGER_* setting: its effective value and its source (env, flag or default).

    Secrets (keys, the SASL password) are shown as ****. The README's table is this command's
    --markdown output.

    Example:  agentledger config
    """
    if markdown:
        typer.echo(envvars.markdown(), nl=False)
        return
    sections = None if show_all else USER_SECTIONS
    s = settings(ctx)
    root = ctx.find_root()
    flags = {"AGENTLEDGER_HOME": ("home", str(s.home)),
             "AGENTLEDGER_BOOTSTRAP_SERVERS": ("bootstrap_servers", s.bootstrap_servers),
             "AGENTLEDGER_WAREHOUSE": ("warehouse", s.warehouse), "AGENTLEDGER_TOPIC": ("topic", s.topic)}
    rows = envvars.effective(os.environ, sections)
    for r in rows:
        if r["name"] not in flags:
            continue
        param, value = flags[r["name"]]
        source = root.get_parameter_source(param)
        if source is not None and source.name == "COMMANDLINE":
            r["source"] = "flag"
        if value is not None:  # the value in effect: the flag's, or the resolved default (home, warehouse)
            r["value"] = value
    render_rows(["name", "value", "source", "read by"], [(r["name"], r["value"], r["source"], r["reader"])
                                                         for r in rows], fmt, title="agentledger configuration")
