"""keys generate / list, spool status / drain: the producer side's durability and signing tools."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from agentledger import api

from ..output import Format, console, print_json, render_rows
from .options import TableCsvOrJson, TableOrJson, settings

keys_app = typer.Typer(
    help="Checkpoint signing keys (Ed25519).\n\nExample:  agentledger keys generate",
    no_args_is_help=True,
)
spool_app = typer.Typer(
    help="The producer spool: events held locally while Kafka is unreachable.\n\n"
         "Example:  agentledger spool status",
    no_args_is_help=True,
)


@keys_app.command("generate")
def keys_generate(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the key pair. [default: HOME/keys]"),
    activate: Optional[bool] = typer.Option(None, "--activate/--no-activate",
                                            help="Make it the key producers sign with (HOME/keys/current). "
                                                 "[default: yes when writing to HOME/keys]"),
    fmt: TableOrJson = Format.table,
) -> None:
    """Generate an Ed25519 key pair for signing checkpoints: <key_id>.key and <key_id>.pub (0600).

    Key files are refused (by producers and verifiers alike) inside a git work tree, when writable by
    group/others or not owned by you: keep --out outside any repository.

    Producers sign with AGENTLEDGER_SIGNING_KEY / AGENTLEDGER_SIGNING_KEY_FILE if set, else with the key
    named in HOME/keys/current. Give the .pub file to whoever verifies (verify/replay read HOME/keys).

    Example:  agentledger keys generate --out /etc/agentledger/keys
    """
    key = api.generate_key(settings(ctx), out, activate)
    if fmt is Format.json:
        print_json(key.as_dict())
    else:
        console.print(f"key id {key.key_id}\n  private: {key.private_key} (keep it secret)\n  public:  {key.public_key}"
                      + ("\n  producers now sign checkpoints with it" if key.active else ""))


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    directory: Optional[Path] = typer.Option(None, "--dir", help="Key directory. [default: HOME/keys]"),
    fmt: TableCsvOrJson = Format.table,
) -> None:
    """List the public keys (key ids) in the key directory, which one signs, and which are a
    simulator's (seed-derived: anyone can sign with them). Older versions put the simulator's key
    among the trusted ones: a row with `simulator` set there should be removed (rm the file).

    Example:  agentledger keys list --format json
    """
    rows = api.list_keys(settings(ctx), directory)
    render_rows(rows.columns, rows.rows, fmt)


@spool_app.command("status")
def spool_status(
    ctx: typer.Context,
    fmt: TableOrJson = Format.table,
) -> None:
    """Show what the spool holds: undrained events and bytes per topic, the oldest one, and events
    refused because the spool was full (each also recorded as a gap event in its session).

    Example:  agentledger spool status --format json
    """
    st = api.spool_status(settings(ctx))
    if fmt is Format.json:
        print_json(st)
        return
    console.print(f"spool {st['spool']} — {st['undrained_events']} events ({st['undrained_bytes']} bytes) "
                  f"waiting for Kafka; bound {st['max_bytes']} bytes")
    if st["topics"]:
        cols = ["topic", "undrained_events", "undrained_bytes", "oldest_undrained_at", "drained_offset", "end_offset"]
        render_rows(cols, [[t[c] for c in cols] for t in st["topics"]], Format.table)
    if st["overflow_events"]:
        console.print(f"[bold red]spool overflow:[/] {st['overflow_events']} events ({st['overflow_bytes']} bytes) "
                      f"refused between {st['overflow_first_at']} and {st['overflow_last_at']} in "
                      f"{st['overflow_sessions']} sessions (each session records a spool_overflow gap)")


@spool_app.command("drain")
def spool_drain(
    ctx: typer.Context,
    timeout: float = typer.Option(300.0, help="Give up after this many seconds (what is left stays spooled)."),
    follow: bool = typer.Option(False, "--follow", help="Keep draining as producers spool (until interrupted)."),
    fmt: TableOrJson = Format.table,
) -> None:
    """Send spooled events to Kafka, in order, and forget them once Kafka acknowledged them.

    Producers drain by themselves when Kafka answers again; this is for a spool left behind by
    processes that ended during an outage (e.g. agent hooks). Safe to run next to producers: one
    drainer at a time holds the spool's lock.

    Example:  AGENTLEDGER_BOOTSTRAP_SERVERS=127.0.0.1:9092 agentledger spool drain
    """
    s = settings(ctx)
    total = api.spool_drain(s, timeout, follow)
    if fmt is Format.json:
        print_json(total)
    else:
        console.print(f"drained {total['drained']} events to {s.bootstrap_servers}; {total['remaining']} left")
