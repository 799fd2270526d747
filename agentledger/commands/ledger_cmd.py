"""verify, deadletters, compact, snapshots: checking and maintaining the warehouse."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from agentledger.schemas.errors import WarehouseError

from ..output import Format, console, err_console, print_json, render_rows
from ..sessions import in_warehouse


class _Kind(str, Enum):
    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    from ..cli import settings

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
        fmt: _Kind = typer.Option(_Kind.table, "--format", help="table or json."),
    ) -> None:
        """Re-check sessions from the warehouse: every hash, the chain, signed checkpoints and the Merkle tree.

        Exits 1 if any session is broken, naming its first bad seq and the reason, or if the tree does
        not match its leaves, its signed heads or the heads published outside the warehouse. Rows are
        re-encoded to the exact bytes the producer sealed, so an edited row is found; rows are held to
        chain_heads and the tree, so removed rows and sessions are found too.

        Example:  agentledger verify --require-signatures --heads /audit/heads.jsonl --format json
        """
        from agentledger.consumers.verify import verify as run_verify
        from agentledger.schemas import treelog
        from agentledger.schemas.signing import Keyring, home_keyring, operator_key_dir
        from agentledger.schemas.warehouse import open_for

        s = settings(ctx)
        for p in operator_key or []:
            if not p.exists():
                raise WarehouseError(f"no public key at {p}")
        keyring = home_keyring(s.home, public_key or [])
        operators = Keyring.from_paths(operator_key_dir(s.home), *(operator_key or []))
        with open_for(s, read_only=True) as wh:
            sessions = [in_warehouse(wh.con, x, s.warehouse) for x in sessions or []]  # ids or unique prefixes
            sources, pin_problem = _heads_sources(s, wh.con, heads)
            tree = treelog.check_tree(wh.con, operators, sources, require_sources=bool(heads))
            if pin_problem:
                tree.problem("log_replaced", pin_problem)
            verdicts = list(run_verify(wh, sessions, keyring, require_signatures=require_signatures,
                                       allow_open=allow_open, tree=tree))
        bad = [v for v in verdicts if not v.ok]
        if fmt is _Kind.json:
            print_json({"ok": not bad and tree.ok, "sessions": len(verdicts), "broken": len(bad), "keys": len(keyring),
                        "operator_keys": len(operators), "tree": tree.as_dict(),
                        "results": [v.as_dict() for v in verdicts]})
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
        if bad or not tree.ok:
            raise typer.Exit(1)

    dl = typer.Typer(help="Quarantined messages: list them, feed them through validation again.\n\n"
                          "Example:  agentledger deadletters list --reason seq_gap",
                     no_args_is_help=True)
    app.add_typer(dl, name="deadletters")

    @dl.command("list")
    def deadletters_list(
        ctx: typer.Context,
        reason: Optional[List[str]] = typer.Option(None, "--reason", help="Only this reason (repeatable)."),
        session: Optional[str] = typer.Option(None, "--session", help="Only this session (id or unique prefix)."),
        include_resolved: bool = typer.Option(False, "--all", help="Include resolved dead letters."),
        summary: bool = typer.Option(False, "--summary", help="Counts per reason instead of letters."),
        limit: int = typer.Option(100, help="At most this many rows."),
        fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    ) -> None:
        """List quarantined messages with their reason (raw bytes: size and a hex prefix).

        Example:  agentledger deadletters list --reason hash_mismatch --format json
        """
        from agentledger.schemas.warehouse import open_for

        s = settings(ctx)
        with open_for(s, read_only=True) as wh:
            where, params = _filters(reason, session and in_warehouse(wh.con, session, s.warehouse), include_resolved)
            if summary:
                cur = wh.con.execute(f"""
                    SELECT reason, count(*) AS letters, count(*) FILTER (WHERE resolved_at IS NULL) AS unresolved,
                           count(DISTINCT session_id) AS sessions, min(received_at) AS first_received_at,
                           max(received_at) AS last_received_at
                    FROM dead_letters WHERE {where} GROUP BY reason ORDER BY letters DESC""", params)
            else:
                cur = wh.con.execute(f"""
                    SELECT dead_letter_id, reason, detail, topic, "partition", "offset", session_id, seq,
                           octet_length(raw) AS raw_bytes, hex(raw[1:24]) AS raw_prefix, received_at,
                           resolved_at, resolution
                    FROM dead_letters WHERE {where}
                    ORDER BY received_at, topic, "partition", "offset" LIMIT ?""", [*params, limit])
            render_rows([d[0] for d in cur.description], cur.fetchall(), fmt)

    @dl.command("retry")
    def deadletters_retry(
        ctx: typer.Context,
        reason: Optional[List[str]] = typer.Option(None, "--reason", help="Only this reason (repeatable)."),
        session: Optional[str] = typer.Option(None, "--session", help="Only this session (id or unique prefix)."),
        letter_id: Optional[List[str]] = typer.Option(None, "--id", help="Only this dead letter (repeatable)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json (summary)."),
    ) -> None:
        """Feed unresolved dead letters through the same validation again (idempotent).

        Use it after the cause is fixed: a writer schema was added (AGENTLEDGER_SCHEMA_PATH), or a
        missing predecessor arrived. Accepted letters become events and are marked resolved, in the
        same transaction; identical duplicates are resolved as such; the rest stay, with the reason
        they failed for this time.

        Example:  AGENTLEDGER_SCHEMA_PATH=./more-schemas agentledger deadletters retry --reason unknown_fingerprint
        """
        from agentledger.consumers.ingest import Ingestor
        from agentledger.schemas.transport.base import Message
        from agentledger.schemas.treelog import tree_heads_for
        from agentledger.schemas.warehouse import open_for

        s = settings(ctx)
        with open_for(s) as wh:
            where, params = _filters(reason, session and in_warehouse(wh.con, session, s.warehouse), False)
            if letter_id:
                where += " AND dead_letter_id IN (SELECT unnest(?))"
                params.append(list(letter_id))
            rows = wh.con.execute(f"""
                SELECT dead_letter_id, topic, "partition", "offset", "key", raw, reason, detail FROM dead_letters
                WHERE {where} ORDER BY session_id NULLS LAST, seq, received_at""", params).fetchall()
            # bytes cut out of a damaged log are not an event: they stay log_damaged, with their detail
            letters = [(lid, Message(t, p, o, k, bytes(raw) if raw is not None else b"", 0,
                                     detail if why == "log_damaged" else None))
                       for lid, t, p, o, k, raw, why, detail in rows]
            ing = Ingestor(wh, None, s.topic, tree_heads=tree_heads_for(s, wh.con))
            total = {"retried": len(letters), "accepted": 0, "resolved_as_duplicate": 0, "still_quarantined": 0,
                     "reasons": {}}
            for i in range(0, len(letters), 50_000):
                r = ing.retry_dead_letters(letters[i:i + 50_000])
                total["accepted"] += r.accepted
                dup = r.reasons.get("duplicate", 0)
                total["resolved_as_duplicate"] += dup
                total["still_quarantined"] += r.dead_letters - dup
                for k, v in r.reasons.items():
                    if k != "duplicate":
                        total["reasons"][k] = total["reasons"].get(k, 0) + v
            ing.finish_tree()
            ing.tree_heads.publisher.close()
        if fmt is Format.json:
            print_json(total)
        else:
            console.print(f"retried {total['retried']} dead letters: {total['accepted']} ingested, "
                          f"{total['resolved_as_duplicate']} resolved as duplicates, "
                          f"{total['still_quarantined']} still quarantined {total['reasons'] or ''}")

    @app.command()
    def compact(
        ctx: typer.Context,
        expire_older_than: str = typer.Option("1 hour", help="Expire snapshots older than this interval "
                                                              "(queries pinned to them stop working)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Merge small Parquet files of a DuckLake warehouse and expire old snapshots (safe while ingest runs).

        Example:  agentledger compact --expire-older-than "7 days"
        """
        from agentledger.schemas.warehouse import open_for

        s = settings(ctx)
        with open_for(s) as wh:
            out = wh.compact(expire_older_than)
        if fmt is Format.json:
            print_json(out)
        else:
            console.print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in out.items()))

    @app.command()
    def snapshots(
        ctx: typer.Context,
        limit: int = typer.Option(20, help="How many, newest first."),
        fmt: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    ) -> None:
        """List the snapshots of a DuckLake warehouse (pin a query to one with `sql --snapshot N`).

        Example:  agentledger snapshots --limit 5
        """
        from agentledger.schemas.warehouse import open_for

        s = settings(ctx)
        with open_for(s, read_only=True) as wh:
            render_rows(["snapshot_id", "snapshot_time", "changes"], wh.snapshots(limit), fmt)


def _heads_sources(s, con, heads: list[str] | None) -> tuple[list, str | None]:
    """Where published tree heads are read from: ``--heads`` (files, ``kafka:TOPIC``), else the home's
    heads file of this warehouse's log and, with Kafka, the heads topic. Also says whether the
    warehouse's log is not the one this home published heads for (its tree was dropped and re-made)."""
    from agentledger.schemas import treelog

    if heads:
        out = []
        for h in heads:
            if h.startswith("kafka:"):
                if not s.bootstrap_servers:
                    raise WarehouseError(f"--heads {h} needs --bootstrap-servers (or AGENTLEDGER_BOOTSTRAP_SERVERS)")
                out.append(treelog.HeadsTopic(s.bootstrap_servers, h[len("kafka:"):]))
            else:
                out.append(treelog.HeadsFile(Path(h)))
        return out, None
    if not treelog.has_tree(con):
        return [], None
    try:
        log_id = treelog.read_state(con).log_id
    except treelog.TreeError:
        return [], None
    out = treelog.default_destinations(s, log_id)
    out = [d for d in out if not isinstance(d, treelog.HeadsFile) or d.path.exists()]
    pinned = treelog.pinned_log(s.home, s.warehouse)
    if pinned and pinned != log_id:
        old = treelog.HeadsFile(treelog.heads_file_path(s.home, pinned))
        return out + ([old] if old.path.exists() else []), (
            f"this home published heads of log {pinned} for {s.warehouse}, whose tree is now log {log_id}: the "
            "tree was dropped and made anew")
    return out, None


def _filters(reason, session, include_resolved) -> tuple[str, list]:
    where = ["TRUE"]
    params: list = []
    if not include_resolved:
        where.append("resolved_at IS NULL")
    if reason:
        where.append("reason IN (SELECT unnest(?))")
        params.append(list(reason))
    if session:
        where.append("session_id = ?")
        params.append(session)
    return " AND ".join(where), params
