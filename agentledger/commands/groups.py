"""Command groups shared by several command modules (e.g. `import` has codex-rollout, otel, bundle)."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

import_app = typer.Typer(
    help="Import sessions recorded elsewhere into the transport (and so into the warehouse).\n\n"
         "Example:  agentledger import codex-rollout ~/.codex/sessions",
    no_args_is_help=True,
)



class _BundleByDefault(TyperGroup):
    """`agentledger export SESSION --out F` (as before the group existed) is `export bundle SESSION
    --out F`: a first argument that names no subcommand is a session id."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["bundle", *args]
        return super().resolve_command(ctx, args)


export_app = typer.Typer(
    cls=_BundleByDefault,
    help="Export sessions: a self-verifying evidence bundle (`export bundle SESSION`, or just `export SESSION`), "
         "OCSF records for SIEMs (`export ocsf`), OpenTelemetry traces (`export otel`).\n\n"
         "Example:  agentledger export ocsf --out agentledger.ocsf.jsonl",
    no_args_is_help=True,
)
