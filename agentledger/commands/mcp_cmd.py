"""`agentledger mcp proxy` (record MCP servers' tool definitions) and `agentledger mcp drift`."""

from __future__ import annotations

from typing import List, Optional

import typer

from agentledger import api

from ..output import Format, console, print_json, render_rows
from .options import StrictTableOrJson, TableOrJsonOnly, settings

mcp_app = typer.Typer(
    help="MCP tool definitions: record what servers' tools/list answered (`mcp proxy`), find calls made under "
         "a definition that changed after approval (`mcp drift`).\n\n"
         "Example:  agentledger mcp drift --format json",
    no_args_is_help=True,
)


@mcp_app.command("proxy", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def proxy(
    ctx: typer.Context,
    server: str = typer.Option(..., "--server", help="The server's name in the agent's MCP configuration "
                                                     "(the <server> of mcp__<server>__<tool>)."),
    command: List[str] = typer.Argument(..., help="The MCP server's command and arguments (after --)."),
) -> None:
    """Run an MCP server (stdio) behind a proxy that records its tool definitions.

    Put it in the agent's MCP configuration instead of the server's command: messages pass both
    ways unchanged; each tools/list answer's tool definitions (name, description, input schema
    digests; the description redacted) go to HOME/mcp/definitions.jsonl when they changed, so
    that the hook and the importers link every MCP call to the definition in force. Exits with
    the server's exit code.

    Example:  agentledger mcp proxy --server github -- npx -y @modelcontextprotocol/server-github
    """
    raise typer.Exit(api.mcp_proxy(settings(ctx), server, command))


@mcp_app.command("drift")
def drift(
    ctx: typer.Context,
    server: Optional[str] = typer.Option(None, "--server", help="Only this server's tools."),
    fmt: StrictTableOrJson = TableOrJsonOnly.table,
) -> None:
    """MCP calls made under a tool definition that changed after the tool was first approved.

    Per (server, tool) the baseline is the definition in force at the first approved call that
    names one (it ran, or an approval_decided approved it); every later call, of any session,
    under another definition is listed, with the descriptions before and after when known.
    Calls without a definition digest are counted as unverified, not as drift. Exit code 1 when
    drift is found, 0 otherwise.

    Example:  agentledger mcp drift --server github --format json
    """
    res = api.mcp_drift(settings(ctx), server=server)
    if fmt is TableOrJsonOnly.json:
        print_json(res.as_dict())
    else:
        if res.drift:
            render_rows(["session_id", "seq", "occurred_at", "server", "tool", "approved", "now", "description before",
                         "description after"],
                        [(d["session_id"], d["seq"], d["occurred_at"], d["server"], d["tool"],
                          d["approved_digest"][:19], d["definition_digest"][:19],
                          (d["description_before"] or "")[:60], (d["description_after"] or "")[:60])
                         for d in res.drift], Format.table, title="calls under a changed tool definition")
        t = res.as_dict()
        console.print(f"{len(res.tools)} MCP tools, {sum(x['calls'] for x in res.tools)} calls: "
                      f"{len(res.drift)} under a changed definition, {t['unverified']} unverified "
                      "(no definition recorded)", highlight=False)
    raise typer.Exit(1 if res.found else 0)
