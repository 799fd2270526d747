"""verify, deadletters, compact, snapshots: checking and maintaining the warehouse."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from agentledger import api

from ..output import Format, console, print_json, render_rows
from .options import Reasons, SessionFilter, StrictTableOrJson, SummaryFormat, TableCsvOrJson, TableOrJson, \
    TableOrJsonOnly, settings

app = typer.Typer()
deadletters_app = typer.Typer(help="Quarantined messages: list them, feed them through validation again.\n\n"
                                   "Example:  agentledger deadletters list --reason seq_gap",
                              no_args_is_help=True)


@app.command()
def verify(
    ctx: typer.Context,
    sessions: Optional[List[str]] = typer.Argument(None, help="Sessions to verify, by id or unique prefix "
                                                               "(default: all)."),
    public_key: Optional[List[Path]] = typer.Option(
        None, "--public-key", help="Ed25519 public key (.pub PEM) or a directory of them; repeatable. "
                                   "$AGENTLEDGER_HOME/keys/*.pub are always included; simulator keys "
                                   "(HOME/keys/simulator) are never trusted."),
    operator_key: Optional[List[Path]] = typer.Option(
        None, "--operator-key", help="Trusted log operator public key (file or directory; repeatable), for "
                                     "signed tree heads. $AGENTLEDGER_HOME/keys/operator/*.pub are always included."),
    heads: Optional[List[str]] = typer.Option(
        None, "--heads", help="Published tree heads to check the warehouse against: a heads file, or "
                              "kafka:TOPIC (repeatable). Default: HOME/heads/<log_id>.jsonl, and the heads "
                              "topic with Kafka."),
    require_signatures: bool = typer.Option(False, "--require-signatures",
                                            help="An unsigned session is a failure, not 'ok (unsigned)': it needs "
                                                 "a signed final checkpoint and a signed tree head covering it "
                                                 "(a simulator key's signature never counts)."),
    allow_open: bool = typer.Option(False, "--allow-open", help="With --require-signatures: accept sessions "
                                                                 "that have not ended yet (live monitoring)."),
    fmt: StrictTableOrJson = TableOrJsonOnly.table,
) -> None:
    """Re-check sessions from the warehouse: every hash, the chain, signed checkpoints and the Merkle tree.

    Exits 1 if any session is broken, naming its first bad seq and the reason, or if the tree does
    not match its leaves, its signed heads or the heads published outside the warehouse. Rows are
    re-encoded to the exact bytes the producer sealed, so an edited row is found; rows are held to
    chain_heads and the tree, so removed rows and sessions are found too.

    Example:  agentledger verify --require-signatures --heads /audit/heads.jsonl --format json
    """
    res = api.verify(settings(ctx), sessions, public_keys=public_key, operator_keys=operator_key, heads=heads,
                     require_signatures=require_signatures, allow_open=allow_open)
    verdicts, bad, tree = res.verdicts, res.broken, res.tree
    if fmt is TableOrJsonOnly.json:
        print_json(res.as_dict())
    else:
        render_rows(["session_id", "result", "events", "checkpoints", "signed", "detail"],
                    [(v.session_id, v.label, v.events, v.checkpoints, v.signed_checkpoints, v.detail or "")
                     for v in verdicts], Format.table, title="verify")
        console.print(f"{len(verdicts) - len(bad)} of {len(verdicts)} sessions verify"
                      + (f"; [bold red]{len(bad)} broken[/]" if bad else ""))
        console.print(f"Merkle tree: log {tree.log_id}, {tree.size} leaves, root {(tree.root_hash or '?')[:16]}…; "
                      f"{tree.heads_valid} of {tree.heads} stored heads trusted; "
                      f"{tree.published_valid} of {tree.published} published heads verify"
                      + (f" ({', '.join(tree.sources)})" if tree.sources else " (no published heads)"),
                      markup=False, highlight=False)
        for w in tree.warnings:
            console.print(f"  note: {w}", markup=False, highlight=False, style="yellow")
        for pr in tree.problems:
            console.print(f"  tree broken: {pr['code']}: {pr['detail']}", markup=False, highlight=False,
                          style="bold red")
    if not res.ok:
        raise typer.Exit(1)


@deadletters_app.command("list")
def deadletters_list(
    ctx: typer.Context,
    reason: Reasons = None,
    session: SessionFilter = None,
    include_resolved: bool = typer.Option(False, "--all", help="Include resolved dead letters."),
    summary: bool = typer.Option(False, "--summary", help="Counts per reason instead of letters."),
    limit: int = typer.Option(100, help="At most this many rows."),
    fmt: TableCsvOrJson = Format.table,
) -> None:
    """List quarantined messages with their reason (raw bytes: size and a hex prefix).

    Example:  agentledger deadletters list --reason hash_mismatch --format json
    """
    rows = api.dead_letters(settings(ctx), reasons=reason, session=session, include_resolved=include_resolved,
                            summary=summary, limit=limit)
    render_rows(rows.columns, rows.rows, fmt)


@deadletters_app.command("retry")
def deadletters_retry(
    ctx: typer.Context,
    reason: Reasons = None,
    session: SessionFilter = None,
    letter_id: Optional[List[str]] = typer.Option(None, "--id", help="Only this dead letter (repeatable)."),
    fmt: SummaryFormat = Format.table,
) -> None:
    """Feed unresolved dead letters through the same validation again (idempotent).

    Use it after the cause is fixed: a writer schema was added (AGENTLEDGER_SCHEMA_PATH), or a
    missing predecessor arrived. Accepted letters become events and are marked resolved, in the
    same transaction; identical duplicates are resolved as such; the rest stay, with the reason
    they failed for this time.

    Example:  AGENTLEDGER_SCHEMA_PATH=./more-schemas agentledger deadletters retry --reason unknown_fingerprint
    """
    total = api.retry_dead_letters(settings(ctx), reasons=reason, session=session, ids=letter_id)
    if fmt is Format.json:
        print_json(total.as_dict())
    else:
        console.print(f"retried {total.retried} dead letters: {total.accepted} ingested, "
                      f"{total.resolved_as_duplicate} resolved as duplicates, "
                      f"{total.still_quarantined} still quarantined {total.reasons or ''}")


@app.command()
def compact(
    ctx: typer.Context,
    expire_older_than: str = typer.Option("1 hour", help="Expire snapshots older than this interval "
                                                          "(queries pinned to them stop working)."),
    merge: bool = typer.Option(False, "--merge", help="Also merge small Parquet files. Stop `ingest` and every "
                                                      "reader first: while DuckLake 1.5.5 commits a merge, other "
                                                      "processes see the merged tables as empty."),
    fmt: TableOrJson = Format.table,
) -> None:
    """Expire old snapshots of a DuckLake warehouse and delete unused files (safe while ingest runs);
    `--merge` also merges small files (maintenance: nothing else may use the warehouse meanwhile).

    Example:  agentledger compact --expire-older-than "7 days"
    """
    out = api.compact(settings(ctx), expire_older_than, merge=merge)
    if fmt is Format.json:
        print_json(out)
    else:
        console.print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in out.items()))


@app.command()
def snapshots(
    ctx: typer.Context,
    limit: int = typer.Option(20, help="How many, newest first."),
    fmt: TableCsvOrJson = Format.table,
) -> None:
    """List the snapshots of a DuckLake warehouse (pin a query to one with `sql --snapshot N`).

    Example:  agentledger snapshots --limit 5
    """
    rows = api.snapshots(settings(ctx), limit)
    render_rows(rows.columns, rows.rows, fmt)
