"""replay, whatif, export, verify-bundle, import bundle: the incident responder's commands."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import ConfigError, WarehouseError

from ..output import Format, console, err_console, print_json, render_rows
from .groups import import_app

FAMILY_STYLE = {"session": "bright_black", "sandbox": "blue", "approval": "yellow", "network": "green"}
STATUS_STYLE = {"ok": "bold green", "open": "bold blue", "broken": "bold red", "empty": "bold red"}
TABLE_LIMIT = 1000


# --- wiring ------------------------------------------------------------------------------------------

def _keyring(s: Settings, public_keys: list[Path] | None):
    from agentledger.schemas.signing import home_keyring

    return home_keyring(s.home, public_keys or [])


def _operators(s: Settings, operator_keys: list[Path] | None):
    from agentledger.schemas.signing import Keyring, operator_key_dir

    for p in operator_keys or []:
        if not Path(p).exists():
            raise ConfigError(f"operator key {p} does not exist")
    return Keyring.from_paths(*(operator_keys or []), operator_key_dir(s.home))


def _provenance(s: Settings, session_id: str, head_seq: int, head_hash: str, count: int):
    """(Provenance, None) for a bundle whose last event is (head_seq, head_hash): the operator key, the
    newest signed tree head holding the session's leaf for exactly that head, and its inclusion proof;
    or (None, why not)."""
    from agentledger.replay.bundle import Provenance
    from agentledger.schemas import treelog
    from agentledger.schemas.signing import load_operator_signer

    signer = load_operator_signer(s)
    if signer is None:
        return None, "no log operator key in this home (AGENTLEDGER_OPERATOR_KEY[_FILE] or HOME/keys/operator)"
    try:
        wh = _warehouse_if_any(s)
    except WarehouseError as exc:
        return None, f"the warehouse cannot be read ({exc})"
    if wh is None:
        return None, "no warehouse"
    with wh:
        if not treelog.has_tree(wh.con):
            return None, "the warehouse has no Merkle tree (run `agentledger ingest` once)"
        row = wh.con.execute("SELECT leaf_index FROM tree_leaves WHERE session_id = ? AND head_seq = ? AND "
                             "head_hash = ? AND event_count = ? ORDER BY leaf_index DESC LIMIT 1",
                             [session_id, head_seq, head_hash, count]).fetchone()
        if row is None:
            return None, f"the session's head (seq {head_seq}) is not a leaf of the warehouse's Merkle tree"
        head = treelog.head_covering(wh.con, row[0])
        if head is None:
            return None, "no signed tree head holds the session's head yet (run `agentledger ingest` to sign one)"
        return Provenance(signer, head, row[0], treelog.inclusion_proof(wh.con, row[0], head.tree_size)), None



def _warehouse_if_any(s: Settings):
    from agentledger.schemas.warehouse import open_warehouse

    if s.warehouse != ":memory:" and not Path(s.warehouse).exists():
        return None
    return open_warehouse(s.warehouse, read_only=True)


def read_session(s: Settings, session: str, source: str):
    """The session's raw events and, when the warehouse is there, its alerts."""
    from agentledger.replay.session import warehouse_alerts
    from agentledger.replay.sources import (BundleSource, KafkaSessionSource, LocalLogSessionSource, SessionNotFound,
                                WarehouseSource)

    if source not in ("auto", "warehouse", "kafka", "log", "bundle"):
        raise typer.BadParameter("--source must be auto, warehouse, kafka, log or bundle")
    if source == "bundle" or (source == "auto" and Path(session).is_file()):
        return BundleSource(Path(session)).read(), []
    if source == "kafka" and not s.bootstrap_servers:
        raise ConfigError("--source kafka needs --bootstrap-servers (or AGENTLEDGER_BOOTSTRAP_SERVERS)")
    from ..sessions import for_reading

    session = for_reading(s, session, transport={"auto": "auto", "kafka": "kafka", "log": "local"}.get(source),
                          warehouse_only=source == "warehouse")
    try:
        wh = _warehouse_if_any(s)
    except WarehouseError as exc:
        if source == "warehouse":
            raise
        # e.g. locked by a running `ingest --follow`: read the transport without the offsets hint
        err_console.print(f"[yellow]warehouse not used: {exc}[/]")
        wh = None
    try:
        alerts, hint = [], None
        if wh is not None:
            ws = WarehouseSource(wh.con, label=s.warehouse)
            if source in ("auto", "warehouse"):
                if ws.has(session):
                    return ws.read(session), warehouse_alerts(wh.con, session)
                if source == "warehouse":
                    raise SessionNotFound(f"session {session} is not in the warehouse {s.warehouse}")
            hint = ws.hint(session, s.topic)
            alerts = warehouse_alerts(wh.con, session)
        elif source == "warehouse":
            raise SessionNotFound(f"no warehouse at {s.warehouse}: run `agentledger ingest` first")
    finally:
        if wh is not None:
            wh.close()
    if source == "kafka" or (source == "auto" and s.uses_kafka):
        if not s.bootstrap_servers:
            raise ConfigError("--source kafka needs --bootstrap-servers (or AGENTLEDGER_BOOTSTRAP_SERVERS)")
        return KafkaSessionSource(s.bootstrap_servers, s.topic, hint).read(session), alerts
    return LocalLogSessionSource(s.log_dir, s.topic, hint).read(session), alerts


def _load_policy(path: Path):
    from agentledger.schemas.policy import Policy

    return Policy.load(path)


# --- rendering ---------------------------------------------------------------------------------------

def _verification_line(v: dict) -> Text:
    t = Text()
    t.append(f"chain {v['status']}", STATUS_STYLE.get(v["status"], "bold"))
    if v.get("first_bad_seq") is not None:
        t.append(f" — first bad seq {v['first_bad_seq']} ({v.get('reason')}): {v.get('detail')}", "red")
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
        if e["kind"] in ("sandbox_denied", "gap") or e["payload"].get("decision") in ("deny", "denied"):
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
                  f"({', '.join(f'{k} {v}' for k, v in c['by_family'].items())}); session {sess.get('status')}")
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
                      d["effect"], d["outcome"]) for d in shown], Format.table, title=f"what if: policy {s['policy']}")
        if len(shown) < len(divs):
            console.print(f"[dim]showing {len(shown)} of {len(divs)} divergences[/]")
    from agentledger.replay.whatif import summarize_for_humans
    for line in summarize_for_humans(s):
        console.print(line, markup=False, highlight=False)


def _past_the_end(r, at: int | None) -> str | None:
    """What to say when --at names a seq after the session's last event (its end is shown)."""
    if at is None:
        return None
    count, first, last = r.con.execute("SELECT count(*), min(seq), max(seq) FROM events").fetchone()
    if last is None or at <= last:
        return None
    return (f"session {r.session_id} has {count} events (seq {first}..{last}): --at {at} is past its end, "
            f"so this is its end (the state after seq {last})")


# --- commands ----------------------------------------------------------------------------------------

def register(app: typer.Typer) -> None:
    from ..cli import settings

    @app.command("replay")
    def replay_cmd(
        ctx: typer.Context,
        session: str = typer.Argument(..., help="Session id (or a unique prefix), or the path of a bundle file."),
        at: Optional[int] = typer.Option(None, "--at", help="Show the state after this seq (time travel; past the "
                                                            "last seq: the end, with a note)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json (the documented replay document)."),
        html_out: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML timeline here."),
        policy: Optional[Path] = typer.Option(None, "--policy", help="Re-decide every request under this policy (TOML)."),
        source: str = typer.Option("auto", "--source", help="auto, warehouse, kafka, log or bundle."),
        public_key: Optional[List[Path]] = typer.Option(None, "--public-key", help="Trusted public key file or directory (repeatable)."),
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
        from agentledger.replay.html import render
        from agentledger.replay.session import replay
        from agentledger.replay.whatif import what_if

        s = settings(ctx)
        if at is not None and at < 0:
            raise typer.BadParameter("--at takes a seq of the session (0 or more)")
        if reexecute:
            from .sandbox_cmd import render_report, run_reexecution

            report, _ = run_reexecution(s, session, source="auto" if source in ("auto", "bundle", "kafka") else source)
            render_report(report, fmt)
            raise typer.Exit(0 if report.reproducible else 3)
        raw, alerts = read_session(s, session, source)
        with replay(raw, keyring=_keyring(s, public_key), alerts=alerts) as r:
            v = r.verification.as_dict()
            notice = _past_the_end(r, at)
            state = r.state(at).as_dict()
            timeline = r.timeline(at)
            rep = None
            if policy is not None:
                rep = what_if(r.con, _load_policy(policy), [r.session_id]).as_dict()
                if at is not None:
                    rep["divergences"] = [d for d in rep["divergences"] if d["seq"] <= at]
        n = len(timeline)
        if limit:
            timeline_out = timeline[:limit]
        else:
            timeline_out = timeline
        if html_out is not None:
            html_out.parent.mkdir(parents=True, exist_ok=True)
            html_out.write_text(render(session_id=raw.session_id, verification=v, state=state, timeline=timeline,
                                       alerts=alerts, whatif=rep), encoding="utf-8")
        if fmt is Format.json:
            print_json({"format": "agentledger.replay/1", "session_id": raw.session_id, "at": at,
                        "source": v["source"], "verification": v, "state_digest": state["state_digest"],
                        "state": state, "timeline": timeline_out, "alerts": alerts, "whatif": rep,
                        **({"notice": notice} if notice else {})})
        else:
            console.print(f"[bold]session {raw.session_id}[/] from {raw.where}")
            console.print(_verification_line(v))
            if notice:
                err_console.print(f"[yellow]note:[/] {notice}", highlight=False)
            _print_timeline(timeline, n, None if limit == 0 else (limit or TABLE_LIMIT), _alert_names(alerts))
            _print_state(state, None if limit == 0 else (limit or TABLE_LIMIT))
            if rep is not None:
                _print_whatif(rep)
            if alerts:
                render_rows(["rule", "severity", "evidence", "alert"],
                            [(a["source"], a.get("severity"), ", ".join(map(str, a["evidence_seqs"])), a["alert_id"])
                             for a in alerts], Format.table, title="alerts")
            console.print(f"state digest [bold]{state['state_digest']}[/]"
                          + (f" (after seq {state['as_of_seq']})" if at is not None else ""))
            if html_out is not None:
                console.print(f"HTML timeline written to {html_out}")
        if strict and v["status"] not in ("ok", "open"):
            raise typer.Exit(1)

    @app.command("whatif")
    def whatif_cmd(
        ctx: typer.Context,
        policy: Path = typer.Option(..., "--policy", help="The policy to re-decide with (TOML, see docs/policy.md)."),
        sessions: Optional[str] = typer.Option(None, "--sessions", help="SQL selecting session_id from the warehouse (default: all sessions)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table, csv (divergences) or json."),
        limit: Optional[int] = typer.Option(200, "--limit", help="Divergences to list in the table (0 = all)."),
    ) -> None:
        """Which past sessions would this policy have stopped, and which legitimate work would it have broken?

        Re-decides every recorded network attempt, command, approval and file access of the selected
        sessions and reports each decision that would differ.

        Example:  agentledger whatif --policy new-egress.toml --sessions "select session_id from sessions where started_at > '2026-01-01'"
        """
        import duckdb

        from agentledger.replay.whatif import session_ids, what_if

        s = settings(ctx)
        pol = _load_policy(policy)
        wh = _warehouse_if_any(s)
        if wh is None:
            raise WarehouseError(f"no warehouse at {s.warehouse}: run `agentledger ingest` first")
        with wh:
            wh.lock_down()  # --sessions is user SQL: no file or network access, as for `agentledger sql`
            try:
                ids = session_ids(wh.con, sessions)
            except duckdb.Error as exc:
                raise WarehouseError(f"--sessions query failed: {str(exc).strip()}") from exc
            rep = what_if(wh.con, pol, ids).as_dict()
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

    @app.command("export")
    def export_cmd(
        ctx: typer.Context,
        session: str = typer.Argument(..., help="Session id (or a unique prefix)."),
        out: Path = typer.Option(..., "--out", "-o", help="Bundle file to write (.avro)."),
        source: str = typer.Option("auto", "--source", help="auto, warehouse, kafka or log."),
        public_key: Optional[List[Path]] = typer.Option(None, "--public-key", help="Trusted public key file or directory (repeatable)."),
        embed_public_key: bool = typer.Option(False, "--embed-public-key", help="Embed the public keys of the checkpoint signers (informational: verifiers must still trust them)."),
        allow_broken: bool = typer.Option(False, "--allow-broken", help="Export a session that does not verify (verify-bundle will fail on it)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Write one session as a self-verifying evidence bundle: one standard Avro container file.

        Readable by any Avro tool and by DuckDB's read_avro; verify it offline with `verify-bundle`.

        Example:  agentledger export 019b76db-57b7-7950-9849-665d7968f07e --out incident-42.avro
        """
        from agentledger.replay.bundle import BundleError, checkpoint_entry, write_bundle
        from agentledger.replay.chain import envelope_head
        from agentledger.replay.session import replay
        from agentledger.schemas.contract import load_store

        s = settings(ctx)
        if source == "bundle":
            raise typer.BadParameter("export reads a session from the warehouse, Kafka or the local log")
        raw, _ = read_session(s, session, source)
        store = load_store()
        fps = raw.fingerprints
        version = store.by_fingerprint(fps[0])
        if version is None:
            raise BundleError(f"writer schema {fps[0].hex()} is unknown to this version of agentledger")
        with replay(raw, keyring=_keyring(s, public_key), store=store) as r:
            v = r.verification
            if v.status == "broken" and not allow_broken:
                raise BundleError(f"session {raw.session_id} does not verify (first bad seq {v.first_bad_seq}: "
                                  f"{v.reason}); refusing to export it as evidence (--allow-broken exports anyway)")
            cps = [checkpoint_entry(c["seq"], c) for c in r.checkpoint_rows()]
            last = raw.values[-1]
            prov, why_not = _provenance(s, raw.session_id, envelope_head(last)[2],
                                        last[-64:].decode("ascii", "replace"), len(raw.values))
            if prov is None:
                err_console.print(f"[yellow]the bundle carries no signed header or tree proof ({why_not}): it "
                                  "will not pass verify-bundle --require-signature[/]")
            pems = {}
            if embed_public_key:  # (a simulator key keeps its marker: verifiers recognise it, never trust it)
                have = _keyring(s, public_key).pems()
                pems = {k: have[k] for k in {c["key_id"] for c in cps} if k in have}
            res = write_bundle(out, session_id=raw.session_id, values=raw.values, writer_schema=version.schema,
                               checkpoints=cps, public_keys=pems, source=f"{raw.source}: {raw.where}", chain=r.chain,
                               allow_broken=allow_broken, provenance=prov,
                               extra={"signatures": v.as_dict()["signatures"], "gaps": str(v.gaps)})
        doc = {"path": str(res.path), "session_id": res.session_id, "events": res.events, "head_seq": res.head_seq,
               "head_hash": res.head_hash, "writer_fingerprint": res.writer_fingerprint, "checkpoints": res.checkpoints,
               "embedded_keys": sorted(pems), "bytes": res.bytes, "sha256": _file_sha256(res.path),
               "chain": v.status, "tree_head": prov.tree_head.as_dict() if prov else None,
               "leaf_index": prov.leaf_index if prov else None, "provenance_missing": why_not}
        if fmt is Format.json:
            print_json(doc)
        else:
            console.print(f"wrote {res.events} events of session {res.session_id} to {res.path} ({res.bytes} bytes, "
                          f"sha256 {doc['sha256']}); chain {v.status}, head seq {res.head_seq}, "
                          f"{res.checkpoints} checkpoints")

    @app.command("verify-bundle")
    def verify_bundle_cmd(
        ctx: typer.Context,
        bundle: Path = typer.Argument(..., help="The bundle file."),
        public_key: Optional[List[Path]] = typer.Option(None, "--public-key", help="Trusted public key file or directory (repeatable)."),
        operator_key: Optional[List[Path]] = typer.Option(None, "--operator-key", help="Trusted log operator public key file or directory (repeatable; HOME/keys/operator is always included)."),
        require_signature: bool = typer.Option(False, "--require-signature", help="Fail unless trusted signatures cover every event and a trusted log operator signed the header (head, count, final checkpoint) and a tree head that includes the session."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Verify an evidence bundle offline (no warehouse, no broker); exit 1 naming the first bad seq.

        Example:  agentledger verify-bundle incident-42.avro --public-key keys/3f2a9c01d4e5b6a7.pub --operator-key keys/operator/9b1c2d3e4f5a6b7c.pub --require-signature
        """
        from agentledger.replay.session import verify_bundle

        s = settings(ctx)
        res = verify_bundle(bundle, _keyring(s, public_key), require_signature=require_signature,
                            operators=_operators(s, operator_key))
        if fmt is Format.json:
            print_json(res.as_dict())
        else:
            v = res.verification
            if res.ok:
                console.print(f"[bold green]VERIFIED[/] {bundle}: session {v.session_id}, {v.events} events "
                              f"(seq {v.first_seq}..{v.head_seq}), head {v.head_hash}")
                console.print(_verification_line(v.as_dict()))
                p = res.provenance
                if p is not None:
                    console.print(f"provenance {p.status}" + (f": tree head of size {p.tree_size} of log {p.log_id}, "
                                                              f"leaf {p.leaf_index}" if p.ok else f" ({p.detail})"),
                                  markup=False, highlight=False)
                if v.status == "open":
                    console.print("[yellow]the session has no session_ended event: it was exported while open, or "
                                  "its end was lost[/]")
            else:
                err_console.print(f"[bold red]FAILED[/] {bundle}: {res.problem}")
        if not res.ok:
            raise typer.Exit(1)

    @import_app.command("bundle")
    def import_bundle_cmd(
        ctx: typer.Context,
        bundle: Path = typer.Argument(..., help="The bundle file."),
        public_key: Optional[List[Path]] = typer.Option(None, "--public-key", help="Trusted public key file or directory (repeatable)."),
        fmt: Format = typer.Option(Format.table, "--format", help="table or json."),
    ) -> None:
        """Load an evidence bundle into this warehouse, through the normal exactly-once ingest.

        The bundle is verified first. Its events keep their sealed bytes, so ingest re-checks every
        hash and the chain; events already present (same seq, same hash) are skipped, so importing
        twice adds nothing.

        Example:  agentledger --warehouse /cases/42.duckdb import bundle incident-42.avro
        """
        from agentledger.consumers.ingest import Ingestor
        from agentledger.replay.bundle import BundleError
        from agentledger.replay.importing import bundle_messages, new_messages
        from agentledger.replay.session import verify_bundle
        from agentledger.schemas.treelog import tree_heads_for
        from agentledger.schemas.warehouse import open_warehouse

        s = settings(ctx)
        res = verify_bundle(bundle, _keyring(s, public_key))
        if not res.ok:
            raise BundleError(f"{bundle} does not verify ({res.problem}); not importing it")
        from agentledger.replay.bundle import read_bundle

        b = read_bundle(bundle)
        topic, msgs = bundle_messages(b)
        with open_warehouse(s.warehouse) as wh:
            todo = new_messages(wh.con, b.session_id, topic, msgs)
            ing = Ingestor(wh, None, topic, tree_heads=tree_heads_for(s.with_(warehouse=s.warehouse), wh.con))
            accepted = dead = 0
            for i in range(0, len(todo), 50_000):
                r = ing.ingest_batch(todo[i : i + 50_000])
                accepted += r.accepted
                dead += r.dead_letters
            ing.finish_tree()
            ing.tree_heads.publisher.close()
        doc = {"bundle": str(bundle), "session_id": b.session_id, "events": len(msgs), "imported": accepted,
               "already_present": len(msgs) - len(todo), "quarantined": dead, "topic": topic, "warehouse": s.warehouse}
        if fmt is Format.json:
            print_json(doc)
        else:
            console.print(f"imported {accepted} events of session {b.session_id} into {s.warehouse} "
                          f"({doc['already_present']} already present, {dead} quarantined)")
        if dead:
            raise typer.Exit(1)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

