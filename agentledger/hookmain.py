"""The fast path of `agentledger hook`: agents run it on every tool use, so it must start quickly.

`agentledger hook ...` (and `python -m agentledger hook ...`) land here without importing typer,
rich or the other commands (about half the CPU of a hook call); everything else goes through the
typer CLI. The options mirror `agentledger.commands.agents.hook` exactly (a test checks it).
"""

from __future__ import annotations

import argparse
import os
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentledger hook", add_help=False)
    p.add_argument("--policy", default=os.environ.get("AGENTLEDGER_POLICY") or None)
    p.add_argument("--agent", default="auto", choices=("auto", "codex", "claude-code"))
    p.add_argument("--deny-style", default="json", choices=("json", "exit-code"))
    p.add_argument("--fail-closed", action="store_true")
    p.add_argument("--budget", type=float, default=5.0)
    p.add_argument("--drain", action="store_true")
    return p


def main(argv: list[str]) -> int:
    from schemas.config import from_env
    from schemas.errors import AgentLedgerError

    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse already said why on stderr
        return int(exc.code or 2)
    settings = from_env()
    try:
        if args.drain:
            from producers.ledger import SessionAppender

            appender = SessionAppender(settings, lock_timeout_s=args.budget, flush_timeout_s=args.budget)
            try:
                n = appender.drain_all()
            finally:
                appender.close()
            sys.stderr.write(f"re-sent {n} events\n")
            return 0
        from producers.hook import MAX_INPUT, handle

        raw = sys.stdin.buffer.read(MAX_INPUT + 1)
        out = handle(raw[:MAX_INPUT], settings, policy_path=args.policy, agent=args.agent, deny_style=args.deny_style,
                     fail_closed=args.fail_closed, budget_s=args.budget)
    except AgentLedgerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    if out.stdout:
        sys.stdout.write(out.stdout)
        sys.stdout.flush()
    if out.stderr:
        sys.stderr.write(out.stderr)
        sys.stderr.flush()
    return out.exit_code
