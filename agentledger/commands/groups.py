"""Command groups shared by several command modules (e.g. `import` has codex-rollout, otel, bundle)."""

from __future__ import annotations

import typer

import_app = typer.Typer(
    help="Import sessions recorded elsewhere into the transport (and so into the warehouse).\n\n"
         "Example:  agentledger import codex-rollout ~/.codex/sessions",
    no_args_is_help=True,
)

