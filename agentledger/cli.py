"""The `agentledger` command line: the root app, its global flags, and the command modules'
apps (agentledger/commands/*.py). Thin: commands parse arguments, call the application layer
(agentledger.api) and render what it returns."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from agentledger.schemas.errors import AgentLedgerError
from agentledger.schemas.homes import prepare_process, say
from agentledger.schemas.keys import git_work_tree

from . import api
from .commands import (agents, config_cmd, console_cmd, core, detect_cmd, doctor_cmd, export_cmd, groups, ledger_cmd,
                       mcp_cmd, model_cmd, producers_cmd,
                       replay_cmd, sandbox_cmd, schemas_cmd, why_cmd)
from .output import err_console

app = typer.Typer(
    name="agentledger",
    help=(
        "A flight recorder for AI coding agents: every sandbox, approval and network event as a "
        "hash-chained Avro record, through Kafka (or an embedded local log) into DuckDB.\n\n"
        "Example:  agentledger demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _global(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, "--home", envvar="AGENTLEDGER_HOME",
                                        help="Local state: embedded log, spool, keys, default warehouse; private to "
                                             "its user (0700). Default: $XDG_DATA_HOME/agentledger, else "
                                             "~/.local/share/agentledger (never the current directory)."),
    bootstrap_servers: Optional[str] = typer.Option(None, "--bootstrap-servers", envvar="AGENTLEDGER_BOOTSTRAP_SERVERS",
                                                    help="Kafka bootstrap servers; when set, Kafka is the transport."),
    warehouse: Optional[str] = typer.Option(None, "--warehouse", envvar="AGENTLEDGER_WAREHOUSE",
                                            help="DuckDB file (or ducklake:...). [default: HOME/warehouse.duckdb]"),
    topic: Optional[str] = typer.Option(None, "--topic", envvar="AGENTLEDGER_TOPIC", help="Events topic."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (also the Kafka client's own log)."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from agentledger.schemas.transport import quiet_library_logs

    quiet_library_logs(verbose)
    ctx.obj = api.settings(home=home, bootstrap_servers=bootstrap_servers, warehouse=warehouse, topic=topic,
                           private=False)  # made private just below, with the CLI's notices
    # owner-only files from here on; an old ./.agentledger is named (never used); a loose home tightened
    env = {**os.environ, **({"AGENTLEDGER_HOME": str(home)} if home is not None else {})}
    say(prepare_process(env, home=str(ctx.obj.home)))
    tree = git_work_tree(str(ctx.obj.home))
    if tree is not None:
        err_console.print(f"[yellow]warning:[/] the home {ctx.obj.home} is inside the git work tree {tree}: an agent "
                          "working there can rewrite its own ledger, and keys there are refused. Unset "
                          "AGENTLEDGER_HOME (or point it outside any repository).", highlight=False)


# Top-level commands, in the order `agentledger --help` lists them, then the command groups.
for commands in (core.app, ledger_cmd.app, agents.app, detect_cmd.app, replay_cmd.app, doctor_cmd.app,
                 config_cmd.app, console_cmd.app, why_cmd.app):
    app.add_typer(commands)
for name, group in (("schemas", schemas_cmd.schemas_app), ("import", groups.import_app), ("export", export_cmd.export_app),
                    ("deadletters", ledger_cmd.deadletters_app), ("keys", producers_cmd.keys_app),
                    ("spool", producers_cmd.spool_app), ("rules", detect_cmd.rules_app), ("model", model_cmd.model_app),
                    ("sandbox", sandbox_cmd.sandbox_app), ("mcp", mcp_cmd.mcp_app)):
    app.add_typer(group, name=name)


def main() -> None:
    try:
        app()
    except AgentLedgerError as exc:
        # the message is text, not markup ("[sandbox]" stays), on one line however long
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
