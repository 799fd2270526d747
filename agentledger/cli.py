"""The `agentledger` command line. Thin: each command wires stages together and renders the result."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from agentledger.schemas.config import Settings, from_env
from agentledger.schemas.errors import AgentLedgerError
from agentledger.schemas.homes import prepare_process, say
from agentledger.schemas.keys import git_work_tree

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
    env = dict(__import__("os").environ)
    if home is not None:
        env["AGENTLEDGER_HOME"] = str(home)
    if bootstrap_servers is not None:
        env["AGENTLEDGER_BOOTSTRAP_SERVERS"] = bootstrap_servers
    if warehouse is not None:
        env["AGENTLEDGER_WAREHOUSE"] = warehouse
    if topic is not None:
        env["AGENTLEDGER_TOPIC"] = topic
    ctx.obj = from_env(env)
    # owner-only files from here on; an old ./.agentledger is named (never used); a loose home tightened
    say(prepare_process(env, home=str(ctx.obj.home)))
    tree = git_work_tree(str(ctx.obj.home))
    if tree is not None:
        err_console.print(f"[yellow]warning:[/] the home {ctx.obj.home} is inside the git work tree {tree}: an agent "
                          "working there can rewrite its own ledger, and keys there are refused. Unset "
                          "AGENTLEDGER_HOME (or point it outside any repository).", highlight=False)


def settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else from_env()


def _register() -> None:
    from .commands import (agents, config_cmd, core, detect_cmd, groups, ledger_cmd, producers_cmd, replay_cmd,
                           sandbox_cmd, schemas_cmd)

    core.register(app)           # demo, simulate, ingest, sql
    schemas_cmd.register(app)    # schemas check | list | release
    groups.register(app)         # the shared `import` group
    ledger_cmd.register(app)     # verify, deadletters, compact, snapshots
    producers_cmd.register(app)  # keys, spool
    agents.register(app)         # import codex-rollout | otel, hook
    detect_cmd.register(app)     # detect, alerts, rules
    replay_cmd.register(app)     # replay, whatif, export, verify-bundle, import bundle
    sandbox_cmd.register(app)    # sandbox run | reexecute | end | doctor | forget
    from .commands import doctor_cmd

    doctor_cmd.register(app)     # doctor
    config_cmd.register(app)     # config


_register()


def main() -> None:
    try:
        app()
    except AgentLedgerError as exc:
        # the message is text, not markup ("[sandbox]" stays), on one line however long
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(1)
