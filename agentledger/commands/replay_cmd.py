"""replay, whatif, export, verify-bundle, import bundle: the incident responder's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from agentledger import api

from ..output import Format, console, err_console, print_json, render_rows
from .groups import export_app, import_app
from .options import OperatorKeys, PublicKeys, ReplayFormat, TableOrJson, WhatIfFormat, settings

app = typer.Typer()

FAMILY_STYLE = {"session": "bright_black", "sandbox": "blue", "approval": "yellow", "network": "green"}
STATUS_STYLE = {"ok": "bold green", "open": "bold blue", "broken": "bold red", "empty": "bold red"}
TABLE_LIMIT = 1000


def _check_source(source: str) -> None:
    if source not in api.evidence.SOURCES:
        raise typer.BadParameter("--source must be auto, warehouse, kafka, log or bundle")


def _notes(notes: list[str]) -> None:
    for note in notes:
        err_console.print(f"[yellow]{escape(note)}[/]")


# --- rendering ---------------------------------------------------------------------------------------

def _verification_line(v: dict) -> Text:
    t = Text()
    t.append(f"chain {v['status']}", STATUS_STYLE.get(v["status"], "bold"))
    if v.get("first_bad_seq") is not None:
        t.append(f" — first bad seq {v['first_bad_seq']} ({v.get('reason')}): {v.get('detail')}", "red")
    elif v.get("reason"):  # (a damaged header names no seq)
        t.append(f" — {v['reason']}: {v.get('detail')}", "red")
    t.append(f"   signatures {v['signatures']}")
    if v["signatures"] == "simulator":
        t.append(" (a simulator's seed-derived key: never trusted)", "yellow")
    if v.get("signed_through") is not None:
        t.append(f" through seq {v['signed_through']}")
    if v.get("key_ids"):
        t.append(f" (keys {', '.join(v['key_ids'])})")
    t.append(f"   gaps {v['gaps']}")
    if v.get("lost_events"):
        t.append(f" ({v['lost_events']} events lost)")
    if v.get("duplicates_dropped"):
        t.append(f"   {v['duplicates_dropped']} transport duplicates dropped")
    return t


def _print_cannot_prove(coverage: dict | None, where: str = "") -> None:
    """What the evidence does not prove: the coverage statements of the session's sources (issue 24)."""
    lines = (coverage or {}).get("cannot_prove") or []
    if not lines:
        return
    console.print(f"this evidence cannot prove{where}:", markup=False, highlight=False)
    for line in lines:
        console.print(f"  - {line}", markup=False, highlight=False)


def _alert_names(alerts: list[dict]) -> dict[str, str]:
    """How the terminal names an alert: its rule (or model) and severity, not its id."""
    return {a["alert_id"]: f"{a.get('source') or '?'}" + (f" ({a['severity']})" if a.get("severity") else "")
            for a in alerts}


def _print_timeline(entries: list[dict], total: int, limit: int | None, names: dict[str, str] | None = None) -> None:
    t = Table(title="timeline", show_lines=False, expand=True)
    # on a narrow terminal the family column goes (the kind carries its colour) and "what happened"
    # keeps a readable width; the rest fold
    narrow = console.width < 120
    cols = [("seq", {"justify": "right", "no_wrap": True}), ("time (UTC)", {"no_wrap": True}),
            *([] if narrow else [("family", {})]), ("kind", {"overflow": "fold"}),
            ("what happened", {"overflow": "fold", "ratio": 1}),
            *([] if narrow else [("pairs", {"overflow": "fold", "max_width": 16})]), ("chain", {"no_wrap": True})]
    for col, kw in cols:
        t.add_column(col, **kw)
    shown = entries if limit is None else entries[:limit]
    for e in shown:
        chain = {"ok": Text("✔", "green"), "bad": Text("✘" if narrow else "✘ first bad", "bold red"),
                 "unverified": Text("?", "yellow")}[e["chain"]]
        summary = Text(e["summary"])
        if (e["kind"] in ("sandbox_denied", "gap") and e["payload"].get("gap_kind") != "not_observable") \
                or e["payload"].get("decision") in ("deny", "denied"):  # (a coverage statement is no loss)
            summary.stylize("bold red")
        for a in e["alerts"]:
            summary.append(f"  ⚑ {(names or {}).get(a, a)}", "bold red")
        style = FAMILY_STYLE.get(e["family"], "")
        fam = [] if narrow else [Text(e["family"], style)]
        pairs = [] if narrow else [" ".join(f"#{s}" for s in e["related_seqs"])]
        if narrow and e["related_seqs"]:
            summary.append("  ↔ " + " ".join(f"#{s}" for s in e["related_seqs"]), "dim")
        t.add_row(str(e["seq"]), (e["occurred_at"] or "")[11:19 if narrow else 23], *fam,
                  Text(e["kind"], style if narrow else ""), summary, *pairs, chain)
    console.print(t)
    if len(shown) < total:
        console.print(f"[dim]showing {len(shown)} of {total} events; --limit 0 shows all, --format json gives all[/]")


def _print_state(state: dict, limit: int | None = TABLE_LIMIT) -> None:
    state = {k: (v[:limit] if limit and isinstance(v, list) else v) for k, v in state.items()}
    c = state["counts"]
    sess = state["session"]
    console.print(f"[bold]state after seq {state['as_of_seq']}[/]: {c['events']} events "
                  f"({escape(', '.join(f'{k} {v}' for k, v in c['by_family'].items()))}); session "
                  f"{escape(str(sess.get('status')))}")
    procs = state["processes"]
    if procs:
        render_rows(["seq", "command", "status", "exit", "ms"],
                    [(p["started_seq"], " ".join(p["argv"] or []), p["status"], p["exit_code"], p["duration_ms"])
                     for p in procs], Format.table, title="processes")
    if state["approvals"]:
        render_rows(["requested", "subject", "decision", "by", "decided", "latency_ms"],
                    [(a["requested_seq"], a["subject"], a["decision"], a["decided_by"], a["decided_seq"], a["latency_ms"])
                     for a in state["approvals"]], Format.table, title="approvals")
    if state["destinations"]:
        render_rows(["destination", "attempts", "allowed", "denied", "asked", "bytes_out"],
                    [(f"{d['protocol']}://{d['host']}:{d['port']}", d["attempts"], d["allowed"], d["denied"], d["asked"],
                      d["bytes_out"]) for d in state["destinations"]], Format.table, title="network destinations")
    changed = [f for f in state["files"] if f["changes"]]
    if changed:
        render_rows(["path", "last op", "last digest", "present"],
                    [(f["path"], f["last_operation"], (f["last_digest"] or "")[:16], f["present"]) for f in changed],
                    Format.table, title="files changed")
    for name in ("denials", "gaps"):
        if state[name]:
            rows = state[name]
            render_rows(list(rows[0].keys()), [list(r.values()) for r in rows], Format.table, title=name)


def _print_whatif(rep: dict, limit: int | None = None) -> None:
    s = rep["summary"]
    divs = rep["divergences"]
    if divs:
        shown = divs if not limit else divs[:limit]
        render_rows(["session", "seq", "kind", "request", "recorded", "new", "rule", "effect", "outcome"],
                    [(d["session_id"][:13], d["seq"], d["kind"], d["request"], d["recorded"], d["new"], d["rule"],
                      d["effect"], d["outcome"]) for d in shown], Format.table,
                    title=escape(f"what if: policy {s['policy']}"))
        if len(shown) < len(divs):
            console.print(f"[dim]showing {len(shown)} of {len(divs)} divergences[/]")
    for line in api.whatif_summary(s):
        console.print(line, markup=False, highlight=False)


# --- commands ----------------------------------------------------------------------------------------

@app.command("replay")
def replay_cmd(
    ctx: typer.Context,
    session: str = typer.Argument(..., help="Session id (or a unique prefix), or the path of a bundle file."),
    at: Optional[int] = typer.Option(None, "--at", help="Show the state after this seq (time travel; past the "
                                                        "last seq: the end, with a note)."),
    fmt: ReplayFormat = Format.table,
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML timeline here."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Re-decide every request under this policy (TOML)."),
    source: str = typer.Option("auto", "--source", help="auto, warehouse, kafka, log or bundle."),
    public_key: PublicKeys = None,
    limit: Optional[int] = typer.Option(None, "--limit", help=f"Timeline rows to show (table default {TABLE_LIMIT}; 0 = all)."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when the session does not verify."),
    reexecute: bool = typer.Option(False, "--reexecute",
                                   help="Re-run a sandbox-recorded session and compare it event by event "
                                        "(exit 3 on divergence); see `agentledger sandbox reexecute`."),
) -> None:
    """Rebuild a session step by step: verify its chain and signatures, show its timeline and its state.

    The same events always give the same state digest; `--at SEQ` shows the state after SEQ.
    With `--reexecute`, a session recorded by `agentledger sandbox run` is re-run in a fresh sandbox.

    Example:  agentledger replay 019b76db-57b7-7950-9849-665d7968f07e --at 12 --html /tmp/session.html
    """
    s = settings(ctx)
    if at is not None and at < 0:
        raise typer.BadParameter("--at takes a seq of the session (0 or more)")
    if reexecute:
        from .sandbox_cmd import DIVERGED_EXIT, render_report

        run = api.reexecute(s, session, source="auto" if source in ("auto", "bundle", "kafka") else source)
        render_report(run.report, fmt)
        raise typer.Exit(0 if run.reproducible else DIVERGED_EXIT)
    _check_source(source)
    r = api.replay(s, session, at=at, policy=policy, source=source, public_keys=public_key)
    _notes(r.notes)
    if html_out is not None:
        html_out.parent.mkdir(parents=True, exist_ok=True)
        html_out.write_text(r.html(), encoding="utf-8")
    if fmt is Format.json:
        print_json(r.as_dict(limit))
    else:
        console.print(f"[bold]session {escape(r.session_id)}[/] from {escape(str(r.where))}")
        console.print(_verification_line(r.verification))
        if r.notice:
            err_console.print(f"[yellow]note:[/] {escape(r.notice)}", highlight=False)
        _print_timeline(r.timeline, len(r.timeline), None if limit == 0 else (limit or TABLE_LIMIT),
                        _alert_names(r.alerts))
        _print_state(r.state, None if limit == 0 else (limit or TABLE_LIMIT))
        if r.whatif is not None:
            _print_whatif(r.whatif)
        if r.alerts:
            render_rows(["rule", "severity", "evidence", "alert"],
                        [(a["source"], a.get("severity"), ", ".join(map(str, a["evidence_seqs"])), a["alert_id"])
                         for a in r.alerts], Format.table, title="alerts")
        console.print(f"state digest [bold]{r.state['state_digest']}[/]"
                      + (f" (after seq {r.state['as_of_seq']})" if at is not None else ""))
        _print_cannot_prove(r.coverage)
        if html_out is not None:
            console.print(f"HTML timeline written to {html_out}", markup=False, highlight=False)
    if strict and not r.verifies:
        raise typer.Exit(1)


@app.command("whatif")
def whatif_cmd(
    ctx: typer.Context,
    policy: Path = typer.Option(..., "--policy", help="The policy to re-decide with (TOML, see docs/policy.md)."),
    sessions: Optional[str] = typer.Option(None, "--sessions", help="SQL selecting session_id from the warehouse (default: all sessions)."),
    fmt: WhatIfFormat = Format.table,
    limit: Optional[int] = typer.Option(200, "--limit", help="Divergences to list in the table (0 = all)."),
) -> None:
    """Which past sessions would this policy have stopped, and which legitimate work would it have broken?

    Re-decides every recorded network attempt, command, approval and file access of the selected
    sessions and reports each decision that would differ.

    Example:  agentledger whatif --policy new-egress.toml --sessions "select session_id from sessions where started_at > '2026-01-01'"
    """
    rep = api.whatif(settings(ctx), policy, sessions)
    if fmt is Format.json:
        print_json(rep)
    elif fmt is Format.csv:
        cols = ["session_id", "seq", "kind", "request", "recorded", "recorded_rule", "new", "rule", "effect",
                "outcome", "broke_work", "target"]
        render_rows(cols, [[d[c] for c in cols] for d in rep["divergences"]], Format.csv)
    else:
        stopped = [x for x in rep["sessions"] if x["divergences"]]
        if stopped:
            render_rows(["session", "requests", "divergences", "stopped", "broke_work", "effects"],
                        [(x["session_id"], x["requests"], x["divergences"], x["stopped"], x["broke_work"],
                          ", ".join(f"{k} {v}" for k, v in x["effects"].items())) for x in stopped],
                        Format.table, title="sessions that would have gone differently")
        _print_whatif(rep, limit or None)


@export_app.command("bundle")
def export_cmd(
    ctx: typer.Context,
    session: str = typer.Argument(..., help="Session id (or a unique prefix)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle file to write (.avro)."),
    source: str = typer.Option("auto", "--source", help="auto, warehouse, kafka or log."),
    public_key: PublicKeys = None,
    embed_public_key: bool = typer.Option(False, "--embed-public-key", help="Embed the public keys of the checkpoint signers (informational: verifiers must still trust them)."),
    allow_broken: bool = typer.Option(False, "--allow-broken", help="Export a session that does not verify (verify-bundle will fail on it)."),
    fmt: TableOrJson = Format.table,
) -> None:
    """Write one session as a self-verifying evidence bundle: one standard Avro container file.

    Readable by any Avro tool and by DuckDB's read_avro; verify it offline with `verify-bundle`.

    Example:  agentledger export 019b76db-57b7-7950-9849-665d7968f07e --out incident-42.avro
    (the same as `agentledger export bundle 019b76db-... --out incident-42.avro`)
    """
    if source == "bundle":
        raise typer.BadParameter("export reads a session from the warehouse, Kafka or the local log")
    _check_source(source)
    res = api.export_bundle(settings(ctx), session, out, source=source, public_keys=public_key,
                            embed_public_key=embed_public_key, allow_broken=allow_broken)
    _notes(res.notes)
    doc = res.doc
    if res.provenance_missing:
        err_console.print(f"[yellow]the bundle carries no signed header or tree proof ({escape(str(res.provenance_missing))})"
                          ": it will not pass verify-bundle --require-signature[/]")
    if fmt is Format.json:
        print_json(doc)
    else:
        console.print(f"wrote {doc['events']} events of session {doc['session_id']} to {doc['path']} "
                      f"({doc['bytes']} bytes, sha256 {doc['sha256']}); chain {doc['chain']}, head seq "
                      f"{doc['head_seq']}, {doc['checkpoints']} checkpoints", markup=False)


@app.command("verify-bundle")
def verify_bundle_cmd(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="The bundle file."),
    public_key: PublicKeys = None,
    operator_key: OperatorKeys = None,
    require_signature: bool = typer.Option(False, "--require-signature", help="Fail unless trusted signatures cover every event and a trusted log operator signed the header (head, count, final checkpoint) and a tree head that includes the session."),
    fmt: TableOrJson = Format.table,
) -> None:
    """Verify an evidence bundle offline (no warehouse, no broker); exit 1 naming the first bad seq.

    Example:  agentledger verify-bundle incident-42.avro --public-key keys/3f2a9c01d4e5b6a7.pub --operator-key keys/operator/9b1c2d3e4f5a6b7c.pub --require-signature
    """
    res = api.verify_bundle(settings(ctx), bundle, public_keys=public_key, operator_keys=operator_key,
                            require_signature=require_signature)
    if fmt is Format.json:
        print_json(res.as_dict())
    else:
        v = res.verification
        if res.ok:
            console.print(f"[bold green]VERIFIED[/] {escape(str(bundle))}: session {escape(v.session_id)}, {v.events} "
                          f"events (seq {v.first_seq}..{v.head_seq}), head {escape(v.head_hash)}")
            console.print(_verification_line(v.as_dict()))
            p = res.provenance
            if p is not None:
                console.print(f"provenance {p.status}" + (f": tree head of size {p.tree_size} of log {p.log_id}, "
                                                          f"leaf {p.leaf_index}" if p.ok else f" ({p.detail})"),
                              markup=False, highlight=False)
            if v.status == "open":
                console.print("[yellow]the session has no session_ended event: it was exported while open, or "
                              "its end was lost[/]")
            _print_cannot_prove(res.coverage, (" (from the header, signed by the log operator)" if res.coverage_in_header
                                               and p is not None and p.ok else " (from the header)"
                                               if res.coverage_in_header else
                                               " (from the events: the header has no coverage summary)"))
        else:
            err_console.print(f"[bold red]FAILED[/] {escape(str(bundle))}: {escape(str(res.problem))}")
    if not res.ok:
        raise typer.Exit(1)


@import_app.command("bundle")
def import_bundle_cmd(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="The bundle file."),
    public_key: PublicKeys = None,
    fmt: TableOrJson = Format.table,
) -> None:
    """Load an evidence bundle into this warehouse, through the normal exactly-once ingest.

    The bundle is verified first. Its events keep their sealed bytes, so ingest re-checks every
    hash and the chain; events already present (same seq, same hash) are skipped, so importing
    twice adds nothing.

    Example:  agentledger --warehouse /cases/42.duckdb import bundle incident-42.avro
    """
    res = api.import_bundle(settings(ctx), bundle, public_keys=public_key)
    if fmt is Format.json:
        print_json(res.as_dict())
    else:
        console.print(f"imported {res.imported} events of session {res.session_id} into {res.warehouse} "
                      f"({res.already_present} already present, {res.quarantined} quarantined)", markup=False)
        _print_cannot_prove({"cannot_prove": res.cannot_prove})
    if res.quarantined:
        raise typer.Exit(1)
