"""why: the chain of deciders that allowed or denied one action (decision provenance, issue 24)."""

from __future__ import annotations

import typer
from rich.markup import escape

from agentledger import api
from agentledger.schemas.sessionids import SessionIdError

from ..output import console, err_console, print_json
from .options import StrictTableOrJson, TableOrJsonOnly, settings

app = typer.Typer()

OUTCOME_STYLE = {"allowed": "bold green", "denied": "bold red", "unknown": "bold yellow"}


@app.command()
def why(
    ctx: typer.Context,
    session: str = typer.Argument(..., help="Session id (or a unique prefix)."),
    seq: int = typer.Argument(..., help="Any event of the action: its command_started, command_finished, "
                                         "approval, sandbox denial, network decision, ..."),
    fmt: StrictTableOrJson = TableOrJsonOnly.table,
) -> None:
    """Why was this allowed? The action an event belongs to and every decider of it, in order.

    One line per decider: who or what decided (config rule, hook, automated reviewer, human,
    an earlier session-wide grant, the session's approval mode), the rule and the file it came
    from, the scope, the latency, and the seq of the event that states it. Steps no source states
    are marked (derived). Reads the `decisions` view.

    Example:  agentledger why 0199a1b2 7 --format json
    """
    try:
        found = api.why(settings(ctx), session, seq)
    except (SessionIdError, api.NoSuchAction) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if fmt is TableOrJsonOnly.json:
        print_json(found.as_dict())
        return
    a = found.action
    console.print(f"[bold]{escape(a['action_kind'])}[/] #{a['seq']} of {escape(found.session_id)} "
                  f"at {a['occurred_at']}", highlight=False)
    console.print(f"  {escape(str(a['subject'] or '')[:500])}", highlight=False, soft_wrap=True)
    if a.get("tool_call_id"):
        console.print(f"  tool call {escape(a['tool_call_id'])}", highlight=False)
    for d in found.deciders:
        console.print(f"  {d['step']}. {escape(api.decider_text(d))}", highlight=False, soft_wrap=True)
    style = OUTCOME_STYLE.get(found.outcome, "bold")
    console.print(f"  outcome: [{style}]{found.outcome}[/]", highlight=False)
