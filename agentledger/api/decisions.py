"""Decision provenance (issue 24): why an action was allowed or denied, from the `decisions` view.

`why` resolves any event of an action (its command_started, command_finished, approval, sandbox
denial, network decision, ...) to the action, through the ids events share (``tool_call_id``,
``command_id``, request and attempt ids), and returns the action with its chain of deciders.
`why_line` is the one-line summary the web console shows next to each action."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import AgentLedgerError, WarehouseError

from .sessions import in_warehouse

ACTION_COLUMNS = ("session_id", "seq", "occurred_at", "action_kind", "subject", "tool_call_id", "command_id",
                  "attempt_id", "outcome")
# the ids an event names its action by, whatever its kind
_EVENT_IDS = """
SELECT kind, tool_call_id,
       coalesce(command_started.command_id, command_finished.command_id, sandbox_denied.command_id,
                approval_requested.command_id, file_accessed.command_id, network_attempted.command_id) AS command_id,
       coalesce(approval_requested.request_id, approval_decided.request_id) AS request_id,
       coalesce(network_attempted.attempt_id, network_decided.attempt_id, network_completed.attempt_id) AS attempt_id
FROM events WHERE session_id = ? AND seq = ?
"""


SCOPE_WORDS = {"once": "once", "session": "for the session", "persistent": "permanently", "unknown": "scope unknown"}


class NoSuchAction(AgentLedgerError):
    """The session has no event at that seq, or that event belongs to no action."""


@dataclass
class Why:
    """An action and the deciders that allowed or denied it, in order."""

    session_id: str
    asked_seq: int
    action: dict
    deciders: list[dict] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return self.action.get("outcome") or "unknown"

    def as_dict(self) -> dict:
        return {"session_id": self.session_id, "asked_seq": self.asked_seq, "action": self.action,
                "deciders": self.deciders, "outcome": self.outcome}


def _row(cur, row) -> dict:
    return dict(zip([d[0] for d in cur.description], row))


def why(s: Settings, session: str, seq: int) -> Why:
    """The action event ``seq`` of ``session`` belongs to, and its decider chain. Raises
    `SessionIdError` for an unknown session and `NoSuchAction` for a seq that names no action."""
    import duckdb

    from agentledger.schemas.warehouse import open_for, session_decisions_sql

    with open_for(s, read_only=True) as wh:
        sid = in_warehouse(wh.con, session, s.warehouse)
        try:
            ev = wh.con.execute(_EVENT_IDS, [sid, seq]).fetchone()
            if ev is None:
                raise NoSuchAction(f"session {sid} has no event at seq {seq}")
            kind, tool_call_id, command_id, request_id, attempt_id = ev
            ids = [i for i in {tool_call_id, command_id, request_id} if i]
            cur = wh.con.execute(f"""
                SELECT {', '.join(ACTION_COLUMNS)}, deciders FROM ({session_decisions_sql(wh.store)})
                WHERE seq = $seq OR list_contains($ids, tool_call_id)
                      OR list_contains($ids, command_id) OR attempt_id = $attempt
                ORDER BY seq = $seq DESC,
                         action_kind IN ('command', 'mcp_call', 'network', 'tool_call', 'permission') DESC, seq
                LIMIT 1""", {"session_id": sid, "seq": seq, "ids": ids, "attempt": attempt_id})
            found = cur.fetchone()
        except duckdb.CatalogException as exc:
            raise WarehouseError(f"the warehouse is not up to date: run `agentledger ingest` once ({exc})") from exc
        if found is None:
            raise NoSuchAction(f"seq {seq} of session {sid} is a {kind} event that belongs to no command, file "
                               "write, network request or MCP call")
        row = _row(cur, found)
        deciders = [dict(d) for d in (row.pop("deciders") or [])]
        _name_config_rules(wh.con, sid, row, deciders)
        return Why(sid, seq, row, deciders)


_ACTION_EVENT = """
SELECT kind, command_started.argv, command_started.shell, command_started.cwd, command_started.sandbox_profile,
       file_accessed.path, network_attempted.host
FROM events WHERE session_id = ? AND seq = ?
"""
_PATCH_TARGET = re.compile(r"^\*\*\* (?:Add|Update|Delete) File: (.+)$", re.M)
_ALLOWING = ("approved", "approved_for_session")


def _call(con, sid: str, action: dict, cwd: str):
    """The action as the agent's permission rules see it (producers/permrules.py `Call`)."""
    from agentledger.producers.permrules import Call

    ev = con.execute(_ACTION_EVENT, [sid, action["seq"]]).fetchone()
    kind, argv, shell, ccwd, profile, path, host = ev or (None,) * 7
    argv = list(argv or [])
    if kind == "command_started":
        cwd = ccwd or cwd
        if argv and (profile == "mcp" or argv[0].startswith("mcp__")):
            return Call(argv[0], cwd=cwd)
        if profile == "tool" and argv:
            if argv[0] == "apply_patch" and len(argv) > 1:
                m = _PATCH_TARGET.search(argv[1])
                return Call("Edit", path=m.group(1).strip() if m else None, cwd=cwd)
            return Call(argv[0], path=argv[1] if len(argv) > 1 else None, cwd=cwd)
        return Call("Bash", command=shell or " ".join(argv), argv=tuple(argv), cwd=cwd)
    if kind == "file_accessed":
        return Call("Edit", path=path, cwd=cwd)
    if kind == "network_attempted":
        return Call("WebFetch", host=host, cwd=cwd)
    if action.get("action_kind") == "command" and action.get("subject"):
        return Call("Bash", command=action["subject"], cwd=cwd)
    return None


def _name_config_rules(con, sid: str, action: dict, deciders: list[dict]) -> None:
    """Name the configured rule behind a decision its source only attributes to "the config", or
    behind an action no source decided: the rule of the settings the session recorded at its start
    (session_started.control_surface) that matches the call, as the agent matches it. Marked
    ``inferred`` with the seq of that session_started: it is an inference from recorded evidence."""
    from agentledger.producers.permrules import decide, rules_from_surface

    needs = [d for d in deciders
             if (d.get("decided_by") == "policy" and not d.get("rule_source")  # OTel's rule is only "tool <name>"
                 and (d.get("reported_as") or "").lower() == "config")
             or (d.get("source") == "derived" and d.get("decided_by") in ("policy", "unknown"))]
    if not needs:
        return
    try:
        start = con.execute("SELECT seq, session_started.cwd, session_started.control_surface FROM events "
                            "WHERE session_id = ? AND kind = 'session_started' ORDER BY seq LIMIT 1", [sid]).fetchone()
    except Exception:  # noqa: BLE001 - a store before v4 has no control surface: nothing to name
        return
    if not start or not start[2]:
        return
    rules = rules_from_surface([dict(f) for f in start[2]])
    call = _call(con, sid, action, start[1] or "") if rules else None
    rule = decide(rules, call) if call else None
    if rule is None:
        return
    why = f"inferred: the rule of the settings recorded at session start (#{start[0]}) that matches"
    for d in needs:
        if d.get("source") == "derived":
            if rule.behaviour != "allow":
                said = ("asks before this runs: the approval is not on record" if rule.behaviour == "ask" else
                        "denies this, yet no denial is on record (the settings changed, or the rule did not apply)")
                d.update(rule=f"{rule.text} {said}", rule_source=rule.source, inferred=why)
                continue
            d.update(decided_by="policy", decision="approved", decider="settings rule", rule=rule.text,
                     rule_source=rule.source, inferred=why)
            if action.get("outcome") in (None, "unknown") and d is deciders[-1]:
                action["outcome"] = "allowed"
        elif (rule.behaviour == "allow") == (d.get("decision") in _ALLOWING):
            d.update(rule=rule.text, rule_source=rule.source, inferred=why)


def decider_text(d: dict) -> str:
    """One decider as a short phrase: who, what it decided, the rule, the scope."""
    by = d.get("decided_by") or "unknown"
    who = d.get("decider")
    parts = [f"{by}" + (f" ({who})" if who and who != by else ""), str(d.get("decision") or "unknown")]
    if d.get("scope"):
        parts.append(SCOPE_WORDS.get(d["scope"], d["scope"]))
    if d.get("rule"):
        parts.append(f"rule: {d['rule']}" + (f" [{d['rule_source']}]" if d.get("rule_source") else ""))
    elif d.get("rule_source"):
        parts.append(f"[{d['rule_source']}]")
    if d.get("grant_request_id"):
        parts.append(f"grant {d['grant_request_id']}")
    if d.get("latency_ms") is not None:
        parts.append(f"{d['latency_ms']} ms")
    if d.get("seq") is not None:
        parts.append(f"#{d['seq']}")
    if d.get("source") == "derived":
        parts.append("(derived)")
    if d.get("inferred"):
        parts.append("(rule inferred from the recorded settings)")
    return " ".join(parts)


def why_line(deciders: Any, outcome: str | None = None) -> str:
    """The chain on one line, e.g. ``why: grant (user) approved … → allowed``."""
    chain = " → ".join(decider_text(dict(d)) for d in (deciders or []))
    return f"why: {chain or 'not recorded'}" + (f" ⇒ {outcome}" if outcome else "")


def session_decisions(con, session_id: str, store=None) -> dict[int, dict]:
    """Every action of a session with its chain, by the action's seq (one query, reading only that
    session's events; the console's)."""
    import duckdb

    from agentledger.schemas.contract import load_store
    from agentledger.schemas.warehouse import session_decisions_sql

    try:
        cur = con.execute(f"SELECT seq, outcome, deciders FROM ({session_decisions_sql(store or load_store())})",
                          {"session_id": session_id})
    except duckdb.CatalogException:
        return {}
    return {seq: {"outcome": outcome, "deciders": [dict(d) for d in deciders or []]}
            for seq, outcome, deciders in cur.fetchall()}
