"""MCP tool definitions: the stdio proxy that records them (`mcp_proxy`) and the calls made under a
definition that changed after the tool was first approved (`mcp_drift`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import AgentLedgerError, WarehouseError


def mcp_proxy(s: Settings, server: str, command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` (an MCP server speaking stdio) behind the recording proxy
    (producers/mcpproxy.py) on this process's stdin / stdout, recording the tool definitions of
    its tools/list answers under ``server`` in the home's definitions store; the server's exit code."""
    from agentledger.producers.mcpproxy import run_proxy
    from agentledger.producers.redact import default_transforms, redactor_of

    if not command:
        raise AgentLedgerError("mcp proxy: no server command given (agentledger mcp proxy --server NAME -- CMD ...)")
    if not server.strip():
        raise AgentLedgerError("mcp proxy: --server must name the server")
    env = os.environ if env is None else env
    redact = None
    try:  # the hook's key (a refused key file never stops the proxy: the per-user one, else this run's)
        red = redactor_of(default_transforms(s, env, key_fallback=True))
    except Exception as exc:  # noqa: BLE001 - redaction unavailable: descriptions are not kept
        import sys

        sys.stderr.write(f"agentledger mcp proxy: redaction unavailable ({exc}): descriptions are not recorded\n")
        red = None
        redact = lambda text: None  # noqa: E731
    if red is not None:
        redact = lambda text: red.scan(text)[0]  # noqa: E731
    return run_proxy(server, list(command), s.home, redact)


@dataclass
class McpDrift:
    """Per (server, tool): the definition in force at its first approved call (the baseline) and the
    later calls made under another definition (``drift``); calls without a definition digest are
    ``unverified``."""

    tools: list[dict] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.drift)

    def as_dict(self) -> dict:
        return {"drift_found": self.found, "drift": self.drift, "tools": self.tools,
                "unverified": sum(t["unverified"] for t in self.tools)}


_CALLS = """
SELECT c.server, c.tool, c.session_id, c.seq, c.ts, c.tool_call_id, c.definition_digest, c.outcome,
       (c.outcome IN ('ok', 'error', 'unknown')
        OR EXISTS (SELECT 1 FROM events d WHERE d.kind = 'approval_decided' AND d.session_id = c.session_id
                   AND d.tool_call_id = c.tool_call_id
                   AND d.approval_decided.decision IN ('approved', 'approved_for_session'))) AS approved
FROM mcp_calls c
WHERE c.server IS NOT NULL AND c.tool IS NOT NULL
ORDER BY c.ts, c.session_id, c.seq
"""


def mcp_drift(s: Settings, *, server: str | None = None) -> McpDrift:
    """From the warehouse: for each (server, tool) the definition in force at its first approved call
    that names one (a call that ran -- outcome ok or error -- or that an approval_decided approved),
    and every later call, of any session, made under a different definition. Descriptions come from
    the sessions' mcp_tool_definitions, else the home's definitions store."""
    import duckdb

    from agentledger.producers.mcpdefs import Definitions
    from agentledger.schemas.warehouse import open_for_query

    with open_for_query(s) as wh:
        try:
            calls = wh.query(_CALLS).fetchall()
            described = wh.query("SELECT definition_digest, any_value(description) FROM mcp_tool_definitions "
                                 "WHERE description IS NOT NULL GROUP BY 1").fetchall()
        except duckdb.Error as exc:
            raise WarehouseError(str(exc).strip()) from exc
    descriptions = dict(described)
    store = Definitions.load(s.home)

    def description(digest: str | None) -> str | None:
        if not digest:
            return None
        return descriptions.get(digest) or store.description(digest)

    per: dict[tuple[str, str], dict] = {}
    out = McpDrift()
    for srv, tool, sid, seq, ts, call_id, digest, outcome, approved in calls:
        if server is not None and srv != server:
            continue
        t = per.setdefault((srv, tool), {"server": srv, "tool": tool, "calls": 0, "unverified": 0, "drifted": 0,
                                         "baseline_digest": None, "baseline_session_id": None,
                                         "baseline_seq": None, "baseline_at": None})
        t["calls"] += 1
        if not digest:
            t["unverified"] += 1
            continue
        if t["baseline_digest"] is None:
            if approved:
                t.update(baseline_digest=digest, baseline_session_id=sid, baseline_seq=seq, baseline_at=ts)
            continue
        if digest != t["baseline_digest"]:
            t["drifted"] += 1
            out.drift.append({"server": srv, "tool": tool, "session_id": sid, "seq": seq, "occurred_at": ts,
                              "tool_call_id": call_id, "outcome": outcome,
                              "approved_digest": t["baseline_digest"], "definition_digest": digest,
                              "approved_in_session": t["baseline_session_id"], "approved_seq": t["baseline_seq"],
                              "description_before": description(t["baseline_digest"]),
                              "description_after": description(digest)})
    out.tools = list(per.values())
    return out
