"""Events and alerts as OCSF 1.x records (Open Cybersecurity Schema Framework), for SIEMs and
security lakes: one JSON object per event or alert revision.

OCSF version 1.8.0 (the latest release). Classes (``class_uid = category_uid * 1000 + n``,
``type_uid = class_uid * 100 + activity_id``):

* Process Activity (1007): command_started (Launch), command_finished (Terminate: exit code,
  status) -- MCP tool calls too (OCSF 1.8 has no tool-call class: AI Agent Activity 6009 is
  unreleased), with server, tool, arguments digest, outcome and error in ``unmapped.agentledger.mcp``, session_started / session_ended (the agent itself: Launch / Terminate), sandbox denials
  of exec/process/permission (Launch, action Denied), approvals of exec/permission actions (Other).
* File System Activity (1001): file_accessed (read, write, create, delete, chmod, rename ->
  Read, Update, Create, Delete, Set Attributes, Rename), sandbox denials of file_read/file_write
  (action Denied), approvals of patches (Other).
* Network Activity (4001): network_attempted (Open), network_decided (allow/ask: Other "Policy
  Decision", deny: Refuse), network_completed (ok: Traffic with bytes, refused/blocked: Refuse,
  error/timeout: Fail), sandbox denials of network, approvals of network actions (Other).
* Detection Finding (2004): alerts (revision 1: Create, later revisions: Update).

Approvals and sandbox denials are not activities of their own in OCSF 1.8: they are the outcome
of a security control over an action, which the ``security_control`` profile expresses on the
action's own class (``action_id`` Allowed/Denied, ``disposition_id`` Approved/Blocked/Rejected...).
So each lands in the class of the action it is about. (The schema's draft pull request #1754 adds an
AI Agent Activity class 6009; no release has it. On request only -- `Mapper(ai_agent_activity=True)`
-- `Mapper.ai_records` also writes its Permission Request (600906) and Tool Use (600907) records of
approvals and commands, in addition to their 1.8.0 records.) Checkpoints (signatures over the chain) and gaps are not activity:
they are counted, not exported; every record carries its event's chain hash instead.

Every record: ``metadata`` (product agentledger and its version, OCSF ``version``, ``uid`` = the
event id (alerts: ``alert_id/revision``), ``correlation_uid`` = the session id, ``sequence`` = the
seq, ``profiles`` host + security_control, ``logged_time`` = ingest time), ``time`` in ms,
``actor`` (the agent as ``app_name``, its ``session``, the ``user``), ``device`` (the host),
``severity_id``, ``status_id``, an observable of type Hash for the chain hash and ``unmapped``
with what OCSF has no attribute for (kind, seq, hash, prev_hash, tool call and turn ids, redactions).

Every string comes from the warehouse as stored: secrets were replaced by ``[SECRET:rule:hmac8]``
tokens before the event was encoded, and tokens stay tokens here. Nothing is decoded or looked up.
"""

from __future__ import annotations

import os.path
import shlex
from datetime import datetime, timezone
from typing import Any, Iterable

OCSF_VERSION = "1.8.0"
PROFILES = ["host", "security_control"]

SYSTEM, FINDINGS, NETWORK, APPLICATION = 1, 2, 4, 6
FILE_ACTIVITY, PROCESS_ACTIVITY, DETECTION_FINDING, NETWORK_ACTIVITY = 1001, 1007, 2004, 4001
# AI Agent Activity (category 6 Application Activity, class 9): in the OCSF schema's draft pull request
# #1754 (events/application/ai_agent_activity.json), in no release. Written only when asked for
# (`Mapper(ai_agent_activity=True)`, `export ocsf --ai-agent-activity`), *in addition to* the 1.8.0
# record of the same event: permission requests (approval_requested / approval_decided -> 600906)
# and tool uses (command_started / command_finished, MCP calls included -> 600907).
AI_AGENT_ACTIVITY = 6009
PERMISSION_REQUEST, TOOL_USE = 6, 7
CLASSES = {
    FILE_ACTIVITY: ("File System Activity", SYSTEM, "System Activity"),
    PROCESS_ACTIVITY: ("Process Activity", SYSTEM, "System Activity"),
    DETECTION_FINDING: ("Detection Finding", FINDINGS, "Findings"),
    NETWORK_ACTIVITY: ("Network Activity", NETWORK, "Network Activity"),
    AI_AGENT_ACTIVITY: ("AI Agent Activity", APPLICATION, "Application Activity"),
}
ACTIVITIES = {
    FILE_ACTIVITY: {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 5: "Rename", 6: "Set Attributes", 99: "Other"},
    PROCESS_ACTIVITY: {1: "Launch", 2: "Terminate", 99: "Other"},
    NETWORK_ACTIVITY: {1: "Open", 2: "Close", 4: "Fail", 5: "Refuse", 6: "Traffic", 99: "Other"},
    DETECTION_FINDING: {1: "Create", 2: "Update", 3: "Close"},
    AI_AGENT_ACTIVITY: {1: "Session Start", 2: "Session End", 3: "Subagent Start", 4: "Subagent Stop",
                        5: "User Prompt Submit", 6: "Permission Request", 7: "Tool Use", 8: "Stop", 9: "Compact",
                        99: "Other"},
}
SEVERITY = {0: "Unknown", 1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical"}
ALERT_SEVERITY = {"low": 2, "medium": 3, "high": 4, "critical": 5}
RISK_SEVERITY = {"low": 1, "medium": 2, "high": 3, "critical": 4}
STATUS = {0: "Unknown", 1: "Success", 2: "Failure"}
ACTION = {1: "Allowed", 2: "Denied", 3: "Observed"}
DISPOSITION = {1: "Allowed", 2: "Blocked", 8: "Approved", 14: "Delayed", 17: "Logged", 25: "Rejected"}
FILE_OPS = {"read": 2, "write": 3, "create": 1, "delete": 4, "chmod": 6, "rename": 5}
HASH_OBSERVABLE = 8  # observable type_id "Hash"
SHA256 = 3  # fingerprint algorithm_id

SKIPPED_KINDS = ("checkpoint", "gap")


def ms(t: Any) -> int | None:
    """A warehouse TIMESTAMP (naive UTC datetime) as epoch milliseconds."""
    if t is None:
        return None
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return int(t.timestamp() * 1000)
    return int(t)


def _clean(x: Any) -> Any:
    """Drop None values and empty containers: OCSF attributes are absent, never null."""
    if isinstance(x, dict):
        out = {k: _clean(v) for k, v in x.items() if v is not None}
        return {k: v for k, v in out.items() if v != {} and v != []}
    if isinstance(x, list):
        return [_clean(v) for v in x if v is not None]
    return x


class Mapper:
    """Maps warehouse rows (the ``events`` view, the ``alerts`` table) to OCSF records."""

    def __init__(self, product_version: str, *, ai_agent_activity: bool = False):
        self.product_version = product_version
        self.ai_agent_activity = ai_agent_activity
        self.skipped: dict[str, int] = {}

    # --- common parts --------------------------------------------------------------------------

    def _base(self, class_uid: int, activity_id: int, *, time: Any, uid: str, session_id: str, seq: int | None,
              severity_id: int = 1, status_id: int = 0, logged: Any = None) -> dict:
        name, cat_uid, cat_name = CLASSES[class_uid]
        activity = ACTIVITIES[class_uid][activity_id]
        return {
            "class_uid": class_uid, "class_name": name, "category_uid": cat_uid, "category_name": cat_name,
            "activity_id": activity_id, "activity_name": activity, "type_uid": class_uid * 100 + activity_id,
            "type_name": f"{name}: {activity}", "time": ms(time), "severity_id": severity_id,
            "severity": SEVERITY[severity_id], "status_id": status_id, "status": STATUS[status_id],
            "metadata": {
                "version": OCSF_VERSION, "profiles": PROFILES, "uid": uid, "correlation_uid": session_id,
                "sequence": seq, "logged_time": ms(logged), "log_name": "agentledger.events",
                "product": {"name": "agentledger", "vendor_name": "agentledger", "version": self.product_version},
            },
        }

    @staticmethod
    def _actor(producer: dict | None, session_id: str) -> dict:
        p = producer or {}
        agent = p.get("agent_name")
        app = f"{agent} {p['agent_version']}" if agent and p.get("agent_version") else agent
        return {"app_name": app, "session": {"uid": session_id},
                "user": {"name": p.get("user")} if p.get("user") else None}

    @staticmethod
    def _device(host: str | None) -> dict:
        # name and hostname: OCSF's server requires one of hostname/name/uid/ip, its repository's
        # inheritance name or uid; give both
        return {"type_id": 0, "type": "Unknown", "hostname": host or "unknown", "name": host or "unknown"}

    def _event_base(self, row: dict, class_uid: int, activity_id: int, **kw) -> dict:
        rec = self._base(class_uid, activity_id, time=row["occurred_at"], uid=row["event_id"],
                         session_id=row["session_id"], seq=row["seq"], logged=row.get("ingested_at"), **kw)
        producer = row.get("producer") or {}
        rec["actor"] = self._actor(producer, row["session_id"])
        rec["device"] = self._device(producer.get("host"))
        rec["observables"] = [{"name": "unmapped.agentledger.hash", "type_id": HASH_OBSERVABLE, "type": "Hash",
                               "value": row["hash"]}]
        rec["unmapped"] = {"agentledger": {
            "kind": row["kind"], "family": row["family"], "seq": row["seq"], "hash": row["hash"],
            "prev_hash": row["prev_hash"], "tool_call_id": row.get("tool_call_id"), "turn_id": row.get("turn_id"),
            "source": producer.get("source"), "redactions": row.get("redactions") or None}}
        return rec

    @staticmethod
    def _control(rec: dict, action_id: int, disposition_id: int | None = None) -> None:
        rec["action_id"], rec["action"] = action_id, ACTION[action_id]
        if disposition_id is not None:
            rec["disposition_id"], rec["disposition"] = disposition_id, DISPOSITION[disposition_id]

    @staticmethod
    def _process(command_id: str | None, argv: list | None = None, shell: str | None = None,
                 cwd: str | None = None, pid: int | None = None, parent: str | None = None) -> dict:
        argv = list(argv or [])
        name = os.path.basename(argv[0]) if argv else None
        cmd_line = shell or (shlex.join(argv) if argv else None)
        return {"uid": command_id or "unknown", "pid": pid, "name": name, "cmd_line": cmd_line,
                "working_directory": cwd, "parent_process": {"uid": parent} if parent else None}

    @staticmethod
    def _file(path: str | None, digest: str | None = None, size: int | None = None) -> dict:
        path = path or "unknown"
        return {"name": os.path.basename(path.rstrip("/")) or path, "path": path, "type_id": 0, "type": "Unknown",
                "size": size,
                "hashes": [{"algorithm_id": SHA256, "algorithm": "SHA-256", "value": digest}] if digest else None}

    @staticmethod
    def _endpoint(host: str | None, port: int | None, addresses: list | None = None) -> dict:
        ip = next((a for a in addresses or [] if a), None)
        return {"name": host or ip or "unknown", "hostname": host, "port": port, "ip": ip}

    # --- events --------------------------------------------------------------------------------

    def event(self, row: dict) -> dict | None:
        """One ``events`` row as an OCSF record (None: a kind OCSF has no activity for; counted)."""
        kind = row["kind"]
        fn = getattr(self, "_" + kind, None)
        if fn is None or kind in SKIPPED_KINDS:
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
            return None
        return _clean(fn(row, row[kind] or {}))

    def _session_started(self, row: dict, p: dict) -> dict:
        rec = self._event_base(row, PROCESS_ACTIVITY, 1, status_id=1)
        rec["process"] = {"uid": row["session_id"], "name": p.get("agent") or (row.get("producer") or {}).get("agent_name"),
                          "working_directory": p.get("cwd")}
        rec["message"] = f"agent session started ({p.get('model') or 'model unknown'}, sandbox {p.get('sandbox_mode')}, " \
                         f"approvals {p.get('approval_policy')})"
        return rec

    def _session_ended(self, row: dict, p: dict) -> dict:
        status = p.get("status")
        rec = self._event_base(row, PROCESS_ACTIVITY, 2, status_id=1 if status == "completed" else 2)
        rec["process"] = {"uid": row["session_id"], "name": (row.get("producer") or {}).get("agent_name")}
        rec["status_detail"] = status
        rec["message"] = f"agent session ended: {status}" + (f" ({p['reason']})" if p.get("reason") else "")
        return rec

    def _command_started(self, row: dict, p: dict) -> dict:
        rec = self._event_base(row, PROCESS_ACTIVITY, 1)
        rec["process"] = self._process(p.get("command_id"), p.get("argv"), p.get("shell"), p.get("cwd"), p.get("pid"),
                                       p.get("parent_command_id"))
        rec["launch_type_id"], rec["launch_type"] = 99, "Other"
        rec["message"] = f"ran {rec['process'].get('cmd_line') or '?'}"
        if p.get("mcp"):
            m = p["mcp"]
            rec["unmapped"]["agentledger"]["mcp"] = {"server": m.get("server"), "tool": m.get("tool"),
                                                     "arguments_digest": m.get("arguments_digest"),
                                                     "arguments_size": m.get("arguments_size")}
            rec["message"] = f"called MCP tool {m.get('tool')} of server {m.get('server')}"
        return rec

    def _command_finished(self, row: dict, p: dict) -> dict:
        status = p.get("status")
        rec = self._event_base(row, PROCESS_ACTIVITY, 2, status_id=1 if status == "completed" else 2,
                               severity_id=2 if status == "declined" else 1)
        rec["process"] = self._process(p.get("command_id"))
        rec["exit_code"] = p.get("exit_code")
        rec["duration"] = p.get("duration_ms")
        rec["status_detail"] = status
        if status == "declined":
            self._control(rec, 2, 25)
        rec["message"] = f"command {status}" + (f", exit code {p['exit_code']}" if p.get("exit_code") is not None else "")
        if p.get("mcp"):
            m = p["mcp"]
            rec["unmapped"]["agentledger"]["mcp"] = {"server": m.get("server"), "tool": m.get("tool"),
                                                     "outcome": m.get("outcome"), "error": m.get("error")}
            rec["message"] = f"MCP tool {m.get('tool')} of server {m.get('server')}: {m.get('outcome')}"
        return rec

    def _file_accessed(self, row: dict, p: dict) -> dict:
        op = p.get("operation")
        rec = self._event_base(row, FILE_ACTIVITY, FILE_OPS.get(op, 99), status_id=1)
        rec["file"] = self._file(p.get("path"), p.get("digest_after"), p.get("size_after"))
        if op == "rename" and p.get("new_path"):
            rec["file_result"] = self._file(p["new_path"])
        rec["process"] = {"uid": p["command_id"]} if p.get("command_id") else None
        rec["message"] = f"{op} {p.get('path')}" + ("" if p.get("inside_workspace") in (None, True) else " (outside the workspace)")
        return rec

    def _sandbox_denied(self, row: dict, p: dict) -> dict:
        op = p.get("operation")
        if op in ("file_read", "file_write"):
            rec = self._event_base(row, FILE_ACTIVITY, 2 if op == "file_read" else 3, status_id=2, severity_id=2)
            rec["file"] = self._file(p.get("target"))
        elif op == "network":
            rec = self._event_base(row, NETWORK_ACTIVITY, 5, status_id=2, severity_id=2)
            host, _, port = (p.get("target") or "").rpartition(":")
            rec["dst_endpoint"] = (self._endpoint(host, int(port)) if host and port.isdigit()
                                   else self._endpoint(p.get("target"), None))
            rec["connection_info"] = {"direction_id": 2, "direction": "Outbound"}
        else:  # exec, process, permission
            rec = self._event_base(row, PROCESS_ACTIVITY, 1, status_id=2, severity_id=2)
            rec["process"] = {"uid": p.get("command_id") or "unknown", "cmd_line": p.get("target")}
        self._control(rec, 2, 2)
        rec["status_detail"] = p.get("reason")
        rec["policy"] = {"name": p.get("rule") or "sandbox", "desc": p.get("reason")}
        if p.get("command_id") and "process" not in rec:
            rec["actor"]["process"] = {"uid": p["command_id"]}
        rec["message"] = f"sandbox denied {op} {p.get('target')}" + (" (inferred)" if p.get("inferred") else "")
        return rec

    def _approval_class(self, row: dict, p: dict, **kw) -> dict:
        kind = p.get("action_kind")
        if kind == "patch":
            rec = self._event_base(row, FILE_ACTIVITY, 99, **kw)
            rec["file"] = self._file(p.get("subject") or "patch")
        elif kind == "network":
            rec = self._event_base(row, NETWORK_ACTIVITY, 99, **kw)
            rec["dst_endpoint"] = self._endpoint(p.get("subject"), None)
        else:
            rec = self._event_base(row, PROCESS_ACTIVITY, 99, **kw)
            rec["process"] = {"uid": p.get("command_id") or p.get("request_id") or "unknown",
                              "cmd_line": p.get("subject")}
        return rec

    def _approval_requested(self, row: dict, p: dict) -> dict:
        rec = self._approval_class(row, p)
        rec["activity_name"] = "Approval Requested"
        self._control(rec, 3, 14)  # observed, delayed: waiting for a decision
        rec["risk_level"] = p.get("risk")
        if p.get("risk") in RISK_SEVERITY:
            rec["risk_level_id"] = RISK_SEVERITY[p["risk"]]
        rec["message"] = f"approval requested for {p.get('action_kind')}: {p.get('subject')}" + \
                         (f" ({p['justification']})" if p.get("justification") else "")
        rec["unmapped"]["agentledger"].update(request_id=p.get("request_id"), action_digest=p.get("action_digest"))
        return rec

    def _approval_decided(self, row: dict, p: dict) -> dict:
        d = p.get("decision")
        approved = d in ("approved", "approved_for_session")
        # the decision only says what was decided about; the request's action kind is in its own event
        kind = (row.get("_action_kind") or "exec")
        rec = self._approval_class(row, {"action_kind": kind, "subject": p.get("rule"), "request_id": p.get("request_id")},
                                   status_id=1 if approved else 2, severity_id=1 if approved else 2)
        rec["activity_name"] = "Approval Decided"
        self._control(rec, 1 if approved else 2, 8 if approved else 25)
        rec["status_detail"] = d
        by = p.get("decided_by")
        if by:
            rec["actor"]["invoked_by"] = by
        if p.get("decider"):
            rec["actor"]["user"] = {"name": p["decider"]} if by == "user" else rec["actor"].get("user")
        if p.get("rule"):
            rec["policy"] = {"name": p["rule"]}
        rec["duration"] = p.get("latency_ms")
        rec["message"] = f"{d} by {by or '?'}" + (f" ({p['decider']})" if p.get("decider") else "")
        rec["unmapped"]["agentledger"].update(request_id=p.get("request_id"), action_digest=p.get("action_digest"))
        return rec

    def _network_attempted(self, row: dict, p: dict) -> dict:
        rec = self._event_base(row, NETWORK_ACTIVITY, 1)
        self._net(rec, p)
        rec["message"] = f"{p.get('method') or p.get('protocol') or 'connect'} {p.get('url') or p.get('host')}"
        return rec

    def _net(self, rec: dict, p: dict, addresses: list | None = None) -> None:
        rec["dst_endpoint"] = self._endpoint(p.get("host"), p.get("port"), addresses)
        rec["connection_info"] = {"direction_id": 2, "direction": "Outbound", "protocol_name": p.get("protocol"),
                                  "uid": p.get("attempt_id")}
        if p.get("url"):
            rec["url"] = {"url_string": p["url"], "hostname": p.get("host"), "port": p.get("port")}
        if p.get("command_id"):
            rec["actor"]["process"] = {"uid": p["command_id"]}

    def _network_decided(self, row: dict, p: dict) -> dict:
        d = p.get("decision")
        deny = d == "deny"
        rec = self._event_base(row, NETWORK_ACTIVITY, 5 if deny else 99, status_id=2 if deny else 0,
                               severity_id=2 if deny else 1)
        if not deny:
            rec["activity_name"] = "Policy Decision"
        net = dict(row.get("_attempt") or {})
        net["attempt_id"] = p.get("attempt_id")
        self._net(rec, net, p.get("addresses"))
        self._control(rec, {"allow": 1, "deny": 2}.get(d, 3), {"allow": 1, "deny": 2}.get(d, 14))
        if p.get("rule") or p.get("policy_source"):
            rec["policy"] = {"name": p.get("rule") or p.get("policy_source"), "desc": p.get("reason")}
        rec["status_detail"] = p.get("reason")
        rec["message"] = f"network {d}" + (f": {p['reason']}" if p.get("reason") else "")
        return rec

    def _network_completed(self, row: dict, p: dict) -> dict:
        outcome = p.get("outcome")
        activity = {"ok": 6, "refused": 5, "blocked": 5, "error": 4, "timeout": 4}.get(outcome, 99)
        rec = self._event_base(row, NETWORK_ACTIVITY, activity, status_id=1 if outcome == "ok" else 2)
        net = dict(row.get("_attempt") or {})
        net["attempt_id"] = p.get("attempt_id")
        self._net(rec, net)
        bi, bo = p.get("bytes_in"), p.get("bytes_out")
        if bi is not None or bo is not None:
            rec["traffic"] = {"bytes_in": bi, "bytes_out": bo, "bytes": (bi or 0) + (bo or 0)}
        rec["duration"] = p.get("duration_ms")
        rec["status_code"] = str(p["status"]) if p.get("status") is not None else None
        rec["status_detail"] = p.get("error") or outcome
        if outcome == "blocked":
            self._control(rec, 2, 2)
        rec["message"] = f"network {outcome}" + (f", status {p['status']}" if p.get("status") is not None else "")
        return rec

    # --- AI Agent Activity (6009, draft) --------------------------------------------------------

    def ai_records(self, row: dict) -> list[dict]:
        """The AI Agent Activity records of one ``events`` row (with ``ai_agent_activity``; else none):
        a permission request (600906) for approval_requested / approval_decided, a tool use (600907)
        for command_started / command_finished. ``row`` went through `join_context` (the request of a
        decision, the command of a finish)."""
        if not self.ai_agent_activity:
            return []
        kind = row["kind"]
        p = row.get(kind) or {}
        if kind in ("approval_requested", "approval_decided"):
            return [_clean(self._permission_request(row, p))]
        if kind in ("command_started", "command_finished"):
            return [_clean(self._tool_use(row, p))]
        return []

    def _ai_base(self, row: dict, activity_id: int, **kw) -> dict:
        rec = self._event_base(row, AI_AGENT_ACTIVITY, activity_id, **kw)
        rec["metadata"]["uid"] = f"{row['event_id']}/ai"  # the 1.8.0 record of the same event has the event id
        rec["metadata"]["profiles"] = ["security_control"]
        producer = row.get("producer") or {}
        rec["ai_agent"] = {"name": producer.get("agent_name"), "version": producer.get("agent_version")}
        return rec

    @staticmethod
    def tool_name(started: dict | None) -> str | None:
        """The tool a command_started payload is a call of: the MCP tool (``mcp__<server>__<tool>``),
        a file or sub-agent tool (``Read``, ``apply_patch``, ``Task``), else ``shell``."""
        if not started:
            return None
        argv = started.get("argv") or []
        first = str(argv[0]) if argv else ""
        if started.get("mcp") or started.get("sandbox_profile") in ("mcp", "tool", "subagent") or first == "apply_patch":
            return first or None
        return "shell"

    def _permission_request(self, row: dict, p: dict) -> dict:
        kind = row["kind"]
        req = p if kind == "approval_requested" else (row.get("_request") or {})
        info = {"request_uid": p.get("request_id"), "action_kind": req.get("action_kind"), "subject": req.get("subject"),
                "action_digest": p.get("action_digest") or req.get("action_digest"), "risk": req.get("risk"),
                "justification": req.get("justification"), "tool_call_uid": row.get("tool_call_id"),
                "name": self.tool_name(row.get("_command")) or req.get("action_kind")}
        if kind == "approval_requested":
            rec = self._ai_base(row, PERMISSION_REQUEST)
            self._control(rec, 3, 14)  # observed, delayed: waiting for a decision
            info["is_decided"] = False
            rec["message"] = f"permission requested for {req.get('action_kind')}: {req.get('subject')}"
        else:
            d = p.get("decision")
            approved = d in ("approved", "approved_for_session")
            rec = self._ai_base(row, PERMISSION_REQUEST, status_id=1 if approved else 2, severity_id=1 if approved else 2)
            self._control(rec, 1 if approved else 2, 8 if approved else 25)
            info.update(is_decided=True, decision=d, decided_by=p.get("decided_by"), decider=p.get("decider"),
                        scope=p.get("scope"), rule=p.get("rule"), rule_source=p.get("rule_source"),
                        grant_request_uid=p.get("grant_request_id"), reported_as=p.get("reported_as"),
                        latency_ms=p.get("latency_ms"))
            rec["status_detail"] = d
            rec["duration"] = p.get("latency_ms")
            if p.get("rule"):
                rec["policy"] = {"name": p["rule"], "desc": p.get("rule_source")}
            rec["message"] = f"permission {d} by {p.get('decided_by') or '?'}" + \
                (f" ({p['decider']})" if p.get("decider") else "") + (f", scope {p['scope']}" if p.get("scope") else "")
        rec["ai_agent_permission_request_info"] = info
        return rec

    def _tool_use(self, row: dict, p: dict) -> dict:
        started = p if row["kind"] == "command_started" else (row.get("_command") or {})
        name = self.tool_name(started) or "unknown"
        m = started.get("mcp") or {}
        launch = row["kind"] == "command_started" and not m  # (a finish's command line is on its start)
        tool_input = {"uid": p.get("command_id"), "cmd_line": None if not launch else (started.get("shell") or (
            shlex.join(map(str, started.get("argv") or [])) if started.get("argv") else None)),
            "arguments_digest": m.get("arguments_digest"), "arguments_size": m.get("arguments_size"),
            "working_directory": started.get("cwd")}
        info: dict = {"name": name, "tool_call_uid": row.get("tool_call_id"), "ai_tool_input": tool_input,
                      "mcp_server": m.get("server"), "mcp_tool": m.get("tool")}
        if row["kind"] == "command_started":
            rec = self._ai_base(row, TOOL_USE)
            info["is_pre_occurrence"] = True
            rec["message"] = f"tool use {name}" + (f" of MCP server {m['server']}" if m.get("server") else "")
        else:
            status = p.get("status")
            fm = p.get("mcp") or {}
            outcome = fm.get("outcome") or {"completed": "ok", "declined": "declined"}.get(status, "error")
            rec = self._ai_base(row, TOOL_USE, status_id=1 if status == "completed" else 2,
                                severity_id=2 if status == "declined" else 1)
            if status == "declined":
                self._control(rec, 2, 25)
            info["is_pre_occurrence"] = False
            info["ai_tool_response"] = {"outcome": outcome, "status": status, "exit_code": p.get("exit_code"),
                                        "error": fm.get("error"), "duration_ms": p.get("duration_ms"),
                                        "stdout_digest": (p.get("stdout") or {}).get("sha256")}
            rec["status_detail"] = status
            rec["duration"] = p.get("duration_ms")
            rec["message"] = f"tool use {name}: {outcome}"
        rec["ai_agent_tool_use_info"] = info
        return rec

    # --- alerts --------------------------------------------------------------------------------

    def alert(self, a: dict, evidence: dict[int, str] | None = None) -> dict:
        """One ``alerts`` row (one revision) as a Detection Finding. ``evidence``: seq -> event id of
        the session's evidence events (related events)."""
        rec = self._base(DETECTION_FINDING, 1 if a["revision"] == 1 else 2, time=a["updated_at"],
                         uid=f"{a['alert_id']}/{a['revision']}", session_id=a["session_id"], seq=None,
                         severity_id=ALERT_SEVERITY.get(a["severity"], 0), status_id=0)
        rec["metadata"]["log_name"] = "agentledger.alerts"
        rec["status_id"], rec["status"] = 1, "New"
        rec["is_alert"] = True
        model = a["detector"] == "model"
        evidence = evidence or {}
        rec["finding_info"] = {
            "uid": a["alert_id"], "title": a["title"], "desc": a["explanation"], "types": [a["detector"]],
            "analytic": {"uid": a["rule_id"], "name": a["rule_id"], "type_id": 4 if model else 1,
                         "type": "Learning (ML/DL)" if model else "Rule", "version": a.get("detector_version")},
            "attacks": [{"technique": {"uid": t}} for t in a.get("mitre") or []],
            "created_time": ms(a["created_at"]), "modified_time": ms(a["updated_at"]),
            "first_seen_time": ms(a.get("first_event_at")), "last_seen_time": ms(a.get("last_event_at")),
            "related_events": [{"uid": evidence[s], "product_uid": "agentledger"} for s in a.get("evidence_seqs") or []
                               if s in evidence],
            "related_events_count": len(a.get("evidence_seqs") or []),
        }
        rec["attacks"] = rec["finding_info"]["attacks"]
        if model and a.get("score") is not None:
            rec["risk_score"] = int(round(float(a["score"]) * 100))
        rec["actor"] = self._actor({"agent_name": a.get("agent"), "user": a.get("user")}, a["session_id"])
        rec["device"] = self._device(a.get("host"))
        rec["message"] = a["title"]
        rec["unmapped"] = {"agentledger": {"revision": a["revision"], "rule_id": a["rule_id"],
                                           "first_seq": a["first_seq"], "last_seq": a["last_seq"],
                                           "evidence_seqs": a.get("evidence_seqs"), "score": a.get("score"),
                                           "threshold": a.get("threshold")}}
        return _clean(rec)


def join_context(rows: Iterable[dict]) -> Iterable[dict]:
    """Rows in session/seq order, each network decision/outcome given its attempt (host, port, url)
    and each approval decision its request's action kind, as ``_attempt`` / ``_action_kind``."""
    attempts: dict[tuple[str, str], dict] = {}
    requests: dict[tuple[str, str], str] = {}
    request_payloads: dict[tuple[str, str], dict] = {}  # (AI Agent Activity: a decision's request)
    commands: dict[tuple[str, str], dict] = {}  # (AI Agent Activity: the tool of a finish or an approval)
    for row in rows:
        sid, kind = row["session_id"], row["kind"]
        p = row.get(kind) or {}
        if kind == "network_attempted" and p.get("attempt_id"):
            attempts[(sid, p["attempt_id"])] = p
        elif kind == "approval_requested" and p.get("request_id"):
            requests[(sid, p["request_id"])] = p.get("action_kind")
            request_payloads[(sid, p["request_id"])] = p
            row = {**row, "_command": commands.get((sid, p.get("command_id") or row.get("tool_call_id") or ""))}
        elif kind == "command_started" and p.get("command_id"):
            commands[(sid, p["command_id"])] = {"argv": (p.get("argv") or [])[:1], "mcp": p.get("mcp"),
                                                "sandbox_profile": p.get("sandbox_profile"), "cwd": p.get("cwd")}
        elif kind == "command_finished" and p.get("command_id"):
            row = {**row, "_command": commands.get((sid, p["command_id"]))}
        elif kind in ("network_decided", "network_completed") and p.get("attempt_id"):
            row = {**row, "_attempt": attempts.get((sid, p["attempt_id"]))}
        elif kind == "approval_decided" and p.get("request_id"):
            req = request_payloads.get((sid, p["request_id"]))
            row = {**row, "_action_kind": requests.get((sid, p["request_id"])), "_request": req,
                   "_command": commands.get((sid, (req or {}).get("command_id") or row.get("tool_call_id") or ""))}
        yield row
