"""The timeline: each event of a session as one readable entry, with its pairs and chain status.

Entries are built from the ``events``-shaped table of a workset, in seq order. Pairs: a command's
start and finish (command_id), an approval request and its decision (request_id), a network
attempt, its decision and its completion (attempt_id), and an approval and the command it is
about (command_id). ``chain`` is ``ok`` for events the raw verifier accepted, ``bad`` for the first
one it rejected, ``unverified`` after it.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from agentledger.schemas.contract import SchemaStore, load_store

from .chain import ChainResult
from .projection import _iso

FAMILY_COLOURS = {"session": "#6b7280", "sandbox": "#2563eb", "approval": "#d97706", "network": "#059669"}
LINK_FIELDS = ("command_id", "request_id", "attempt_id")


def _payload_sql(store: SchemaStore) -> str:
    cases = " ".join(f"WHEN '{k.kind}' THEN to_json(\"{k.column}\")" for k in store.kinds)
    return f"CASE kind {cases} END"


def fetch_events(con, session_id: str, at: int | None = None, store: SchemaStore | None = None) -> list[dict]:
    store = store or load_store()
    sql = (f"SELECT seq, occurred_at, family, kind, turn_id, tool_call_id, event_id, hash, prev_hash, "
           f"{_payload_sql(store)} AS payload, producer.source AS source FROM events "
           "WHERE session_id = ? AND seq <= ? ORDER BY seq, event_id")
    rows = con.execute(sql, [session_id, 2**62 if at is None else at]).fetchall()
    out = []
    for seq, at_, fam, kind, turn, call, eid, h, ph, payload, source in rows:
        out.append({"seq": seq, "occurred_at": _iso(at_), "family": fam, "kind": kind, "turn_id": turn,
                    "tool_call_id": call, "event_id": str(eid), "hash": h, "prev_hash": ph,
                    "payload": json.loads(payload) if payload else {}, "producer_source": source})
    return out


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "?"
    n = int(n)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarize(kind: str, p: dict) -> str:
    """One human line per event."""
    g = p.get
    if kind == "session_started":
        net = (g("network_policy") or {}).get("mode", "?")
        return (f"session started: {g('agent')} {g('model') or ''} in {g('cwd')} (sandbox {g('sandbox_mode')}, "
                f"approvals {g('approval_policy')}, network {net})").replace("  ", " ")
    if kind == "session_ended":
        return f"session ended: {g('status')}" + (f" ({g('reason')})" if g("reason") else "")
    if kind == "checkpoint":
        return (f"checkpoint: events 0..{g('head_seq')} ({g('event_count')}) signed by key {g('key_id')}"
                + (" [final]" if g("final") else ""))
    if kind == "gap" and g("gap_kind") == "not_observable":  # a coverage statement, not a loss (issue 24)
        return f"this source cannot contain {g('field')}: {g('reason')}"
    if kind == "gap":
        lost = f", {g('lost_events')} events lost" if g("lost_events") else ""
        return f"GAP {g('gap_kind')}: {g('reason')}{lost}"
    if kind == "command_started":
        cmd = g("shell") or shlex.join(g("argv") or [])
        return f"$ {cmd}" + (" [escalated]" if g("escalated") else "")
    if kind == "command_finished":
        return f"command {g('status')}: exit {g('exit_code')} after {g('duration_ms')} ms"
    if kind == "file_accessed":
        tail = f" -> {g('new_path')}" if g("new_path") else ""
        return f"{g('operation')} {g('path')}{tail}"
    if kind == "sandbox_denied":
        return f"DENIED {g('operation')} {g('target')}: {g('reason')}" + (f" (rule {g('rule')})" if g("rule") else "")
    if kind == "approval_requested":
        return f"approval requested ({g('action_kind')}, risk {g('risk')}): {g('subject')}"
    if kind == "approval_decided":
        who = g("decided_by") + (f" {g('decider')}" if g("decider") else "")
        lat = f" after {g('latency_ms')} ms" if g("latency_ms") is not None else ""
        return f"approval {g('decision')} by {who}{lat}"
    if kind == "network_attempted":
        return f"{g('method') or ''} {g('protocol')}://{g('host')}:{g('port')}".strip()
    if kind == "network_decided":
        return f"network {g('decision')}" + (f" by rule {g('rule')}" if g("rule") else "")
    if kind == "network_completed":
        st = f" {g('status')}" if g("status") is not None else ""
        return f"network {g('outcome')}{st} in {_fmt_bytes(g('bytes_in'))} out {_fmt_bytes(g('bytes_out'))}"
    return kind


def build_timeline(events: list[dict], chain: ChainResult | None, alerts: list[dict] | None = None) -> list[dict]:
    """Entries with summary, links, related seqs, chain status and pinned alerts."""
    by_link: dict[tuple[str, str], list[int]] = {}
    for e in events:
        for f in LINK_FIELDS:
            v = e["payload"].get(f)
            if v:
                by_link.setdefault((f, v), []).append(e["seq"])
    pinned: dict[int, list[str]] = {}
    for a in alerts or []:
        for s in a.get("evidence_seqs") or []:
            pinned.setdefault(int(s), []).append(a["alert_id"])
    verified_hash = {}
    if chain is not None:
        for i, h in enumerate(chain.hashes):
            verified_hash[chain.first_seq + i] = h
    out = []
    for e in events:
        links = {f: e["payload"][f] for f in LINK_FIELDS if e["payload"].get(f)}
        related = sorted({s for f, v in links.items() for s in by_link.get((f, v), []) if s != e["seq"]})
        if chain is None:
            status = "unverified"
        elif verified_hash.get(e["seq"]) == e["hash"]:
            status = "ok"
        elif chain.first_bad_seq is not None and e["seq"] == chain.first_bad_seq:
            status = "bad"
        else:
            status = "unverified"
        out.append({**{k: e[k] for k in ("seq", "occurred_at", "family", "kind", "turn_id", "tool_call_id",
                                         "event_id", "hash", "prev_hash")},
                    "summary": summarize(e["kind"], e["payload"]), "links": links, "related_seqs": related,
                    "chain": status, "alerts": pinned.get(e["seq"], []), "payload": e["payload"]})
    return out
