"""`agentledger hook`: the command Codex and Claude Code run on every lifecycle event.

Input: one JSON object on stdin (``session_id``, ``hook_event_name``, ``cwd``, ``permission_mode``,
``tool_name``, ``tool_input``, ``tool_use_id``, ``tool_response``; Codex adds ``turn_id`` and
``model``). What is recorded (source ``hook``):

===================  ==================================================================
SessionStart         session_started (cwd, model, approval policy from permission_mode,
                     policy digest, the control surface read now: producers/controlsurface.py,
                     observed_by "hook") -- also on the first event of a session we never saw
PreToolUse           shell tools and MCP tools (``mcp__<server>__<tool>``): command_started (an
                     MCP call with its ``mcp`` record, as the importers state it; a shell-like
                     MCP tool's command is judged by the policy as the shell tool's); WebFetch:
                     network_attempted (+ the policy's network_decided); a policy denial:
                     approval_requested + approval_decided (denied, decided_by policy) and no
                     command_started
PermissionRequest    approval_requested (+ approval_decided when the policy denies)
PostToolUse(Failure) command_finished (exit code, duration since PreToolUse, output digest,
                     inferred sandbox denial; MCP: outcome ok / error); apply_patch / Edit / Write / MultiEdit /
                     NotebookEdit / Read: file_accessed; WebFetch: network_completed
SessionEnd           session_ended
others (Stop, ...)   nothing beyond opening the session: they carry no sandbox, approval or
                     network fact
===================  ==================================================================

With a policy (``--policy FILE`` / ``AGENTLEDGER_POLICY``), PreToolUse and PermissionRequest are
answered with a deny when the policy forbids the command, the write, the read or the destination,
in the format both agents read (JSON on stdout, exit 0)::

    {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                            "permissionDecisionReason": "..."}}
    {"hookSpecificOutput": {"hookEventName": "PermissionRequest",
                            "decision": {"behavior": "deny", "message": "..."}}}

or, with ``deny_style="exit-code"``, exit code 2 and the reason on stderr. Anything the policy
allows or would prompt for is left to the agent's own approval flow (no output).

Recording goes through `SessionAppender` (per-session lock, write-ahead outbox, each fact once),
so concurrent hook processes of one session get gapless seqs in transport order. Failures never
block the agent unless ``fail_closed``: the event stays in the outbox for the next producer of the
session to send, the hook exits 1 (a non-blocking error in both agents) and says why on stderr.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from agentledger.schemas.config import Settings

from .coverage import observation as coverage_observation
from .coverage import statements as coverage_statements
from .ledger import Observation, SessionAppender, SessionInfo
from .importstate import LockTimeout
from .sinks import recording_mode_from_env
from .normalize import (as_int, command_argv, infer_sandbox_denial, inside, loads_bounded, mcp_arguments_json, mcp_call,
                        mcp_result, mcp_split, network_protocol, parse_exec_output, parse_patch, permission_mode_policy,
                        resolve_path, short_digest, urls_in)
from .recorder import action_digest, output_digest

SOURCE = "hook"
MAX_INPUT = 16 * 1024 * 1024
SHELL_TOOLS = frozenset({"Bash", "bash", "shell", "shell_command", "exec_command", "local_shell", "unified_exec",
                         "run_shell_command"})
# Gemini CLI's tool events (google-gemini/gemini-cli docs/hooks/reference.md), read as the others'
GEMINI_EVENTS = {"BeforeTool": "PreToolUse", "AfterTool": "PostToolUse"}
PATCH_TOOLS = frozenset({"apply_patch"})
WRITE_TOOLS = frozenset({"Edit", "Write", "MultiEdit", "NotebookEdit"})
READ_TOOLS = frozenset({"Read"})
NET_TOOLS = frozenset({"WebFetch"})
DECISION_EVENTS = ("PreToolUse", "PermissionRequest")
# MCP tools that run a command line on the machine (shell, terminal, process, exec servers): the
# policy judges their command as it judges the shell tool's (the rule mcp-exec-tool-bypass of
# consumers/detect names the same tools after the fact)
MCP_EXEC_TOOL = re.compile(
    r"^(?:run|exec|execute|shell|bash|sh|terminal|spawn|command|cmd|run_command|execute_command|exec_command|"
    r"run_shell|shell_exec|run_terminal_cmd|interact_with_process|"
    r"(?:run|exec|execute|start|launch|spawn)_(?:command|cmd|shell|process|program|script|terminal|bash)[a-z_]*|"
    r"[a-z_]*_(?:command|shell_command|terminal_command))$", re.I)


@dataclass
class HookOutcome:
    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""


@dataclass
class Verdict:
    deny: bool
    reason: str
    rule: str | None = None
    network: tuple | None = None  # (host, port, protocol, decision) for WebFetch


def kafka_options(budget_s: float) -> dict:
    """Producer sink options that keep one hook call within its budget: send at once; a connection
    and an acknowledgement get at most the budget, after which the producer sink spools the events
    locally (durably) and drains them to Kafka later (producers/sinks.py)."""
    ms = max(500, int(budget_s * 1000))
    return {"linger_ms": 0, "flush_timeout_ms": ms, "connect_timeout_ms": ms, "max_block_ms": min(ms, 1000)}


def load_policy(path: str | None):
    if not path:
        return None
    from agentledger.schemas.policy import Policy  # lazily: tomllib and the policy engine only when used

    return Policy.load(path)


def _agent(data: dict, forced: str) -> str:
    if forced and forced != "auto":
        return forced
    if data.get("hook_event_name") in GEMINI_EVENTS or "/.gemini/" in str(data.get("transcript_path") or ""):
        return "gemini-cli"
    codex = bool(data.get("turn_id")) or "/.codex/" in str(data.get("transcript_path") or "")
    return "codex" if codex else "claude-code"


def gemini_input(data: dict, now_us: int) -> dict:
    """A Gemini CLI hook input in the shape of Claude Code's: BeforeTool / AfterTool become
    PreToolUse / PostToolUse(Failure); an MCP tool (``mcp_context{server_name, tool_name}``) is
    named ``mcp__<server>__<tool>``; the response's ``llmContent`` is the tool's output. Gemini
    names no tool call: a BeforeTool gets the id ``gemini-<digest of session, tool, arguments,
    time>``, and its AfterTool is paired with it by ``_gemini_key`` (`HookEvent.build`)."""
    d = dict(data)
    event = d.get("hook_event_name")
    d["hook_event_name"] = GEMINI_EVENTS.get(event, event)
    ctx = d.get("mcp_context")
    if isinstance(ctx, dict) and isinstance(ctx.get("server_name"), str) and isinstance(ctx.get("tool_name"), str) \
            and ctx["server_name"].strip() and ctx["tool_name"].strip():
        d["tool_name"] = f"mcp__{ctx['server_name']}__{ctx['tool_name']}"
    if event not in GEMINI_EVENTS:
        return d
    resp = d.get("tool_response")
    if isinstance(resp, dict):
        if resp.get("error"):
            d["hook_event_name"] = "PostToolUseFailure"
            err = resp["error"]
            d["error"] = str(err.get("message") if isinstance(err, dict) and err.get("message") else err)
        d["tool_response"] = resp.get("llmContent", resp.get("returnDisplay"))
    args = d.get("tool_input") if isinstance(d.get("tool_input"), dict) else {}
    key = short_digest(d.get("session_id"), d.get("tool_name"), json.dumps(args, sort_keys=True, default=str))
    d["_gemini_key"] = key
    if event == "BeforeTool":
        d["tool_use_id"] = "gemini-" + short_digest(key, d.get("timestamp") or now_us, n=20)
    else:
        d.pop("tool_use_id", None)
    return d


def _tool_command(tool_input: dict) -> tuple[list[str], str | None] | None:
    return command_argv(tool_input.get("command") if "command" in tool_input else tool_input.get("cmd"))


def _as_named_and_as_linked(path: str) -> list[str]:
    """The path a tool names and, when links lead elsewhere, where they lead on this machine (the
    hook runs where the agent does): a link the agent made in its workspace to a file the policy
    denies is denied as that file. A file not made yet is where its existing parent leads."""
    if not os.path.isabs(path):
        return [path]
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return [path]
    return [path] if real == path else [path, real]


def _write(policy, path: str, cwd: str, home: str | None, *, linked: bool):
    if not linked:
        return policy.evaluate_write(path, workspace=cwd or None, home=home)
    # where links lead is held against where the roots lead (a workspace under a linked home)
    return policy.evaluate_write(path, workspace=os.path.realpath(cwd) if cwd else None, home=home,
                                 resolve=os.path.realpath)


def evaluate(policy, tool: str, tool_input: dict, cwd: str, home: str | None = None) -> Verdict | None:
    """The policy's verdict on a tool call; only denials are acted on. ``home``: the agent's home
    directory (its HOME: the hook runs as the session's user), `~` of the policy and of paths."""
    if policy is None:
        return None
    name = policy.name
    if tool in SHELL_TOOLS:
        parsed = _tool_command(tool_input)
        if not parsed:
            return None
        argv, shell = parsed
        escalated = str(tool_input.get("sandbox_permissions") or "") == "require_escalated"
        d = policy.evaluate_shell_call(argv, shell, escalated=escalated)  # (what-if re-decides it the same way)
        if d.action == "forbidden":
            return Verdict(True, f"agentledger policy {name}: {d.subject}: {d.reason}", d.rule)
        return None
    names = mcp_split(tool)
    if names is not None and MCP_EXEC_TOOL.match(names[1]):
        cmd = next((tool_input[k] for k in ("command", "cmd", "commandLine", "script") if tool_input.get(k)), None)
        parsed = command_argv(cmd)
        if not parsed:
            return None
        argv, shell = parsed
        d = policy.evaluate_shell_call(argv, shell, escalated=False)
        if d.action == "forbidden":
            return Verdict(True, f"agentledger policy {name}: {d.subject} (through MCP tool {tool}): {d.reason}", d.rule)
        return None
    if tool in PATCH_TOOLS:
        patch = str(tool_input.get("command") or tool_input.get("input") or "")
        for op in parse_patch(patch):
            for p in filter(None, (op["path"], op.get("new_path"))):
                named = resolve_path(p, cwd, home)
                for at in _as_named_and_as_linked(named):
                    d = _write(policy, at, cwd, home, linked=at != named)
                    if d.action == "deny":
                        return Verdict(True, f"agentledger policy {name}: write {p}: {d.reason}", d.rule)
        return None
    if tool in WRITE_TOOLS | READ_TOOLS:
        path = tool_input.get("file_path") or tool_input.get("notebook_path")
        if not path:
            return None
        path = resolve_path(str(path), cwd, home)
        for at in _as_named_and_as_linked(path):
            d = (policy.evaluate_read(at, home=home) if tool in READ_TOOLS
                 else _write(policy, at, cwd, home, linked=at != path))
            if d.action == "deny":
                return Verdict(True, f"agentledger policy {name}: {'read' if tool in READ_TOOLS else 'write'} {path}"
                               + (f" (a link to {at})" if at != path else "") + f": {d.reason}", d.rule)
        return None
    if tool in NET_TOOLS:
        urls = urls_in(str(tool_input.get("url") or ""))
        if not urls:
            return None
        scheme, host, port = urls[0]
        proto = network_protocol(scheme, port)
        d = policy.evaluate_network(host, port, proto, "GET")
        v = Verdict(d.action == "deny", f"agentledger policy {name}: network to {host}:{port}: {d.reason}", d.rule,
                    (host, port, proto, d.action))
        return v
    return None


def _deny_response(event: str, reason: str, style: str, agent: str = "") -> tuple[int, str, str]:
    if style == "exit-code":
        return 2, "", reason + "\n"
    if agent == "gemini-cli":  # Gemini CLI reads a top-level decision (docs/hooks/reference.md)
        return 0, json.dumps({"decision": "deny", "reason": reason}) + "\n", ""
    if event == "PermissionRequest":
        out = {"hookSpecificOutput": {"hookEventName": "PermissionRequest",
                                      "decision": {"behavior": "deny", "message": reason}}}
    else:
        out = {"hookSpecificOutput": {"hookEventName": "PreToolUse", "permissionDecision": "deny",
                                      "permissionDecisionReason": reason}}
    return 0, json.dumps(out) + "\n", ""


def save_reject(settings: Settings, raw: bytes, reason: str) -> Path:
    """Input we could not use is kept with the reason, never dropped."""
    from .importstate import ProducerState

    state = ProducerState(settings.home)
    state.ensure_dirs()
    d = state.dir / "hook-rejects"
    d.mkdir(exist_ok=True, mode=0o700)
    p = d / f"{time.time_ns()}-{os.getpid()}.json"
    # Owner-only: the input may hold what redaction would have removed from an event.
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"reason": reason, "received_at_ns": time.time_ns(),
                            "raw": raw.decode("utf-8", "replace")}) + "\n")
    return p


class HookEvent:
    """Turns one hook input into observations (built under the session lock, see `prepare`)."""

    def __init__(self, data: dict, agent: str, now_us: int, policy, verdict: Verdict | None):
        self.d = data
        self.agent = agent
        self.now = now_us
        self.policy = policy
        self.verdict = verdict
        self.sid = str(data["session_id"])
        self.event = str(data.get("hook_event_name") or data.get("hookEventName") or "")
        self.cwd = str(data.get("cwd") or "")
        self.tool = str(data.get("tool_name") or "")
        ti = data.get("tool_input")
        self.tool_input = ti if isinstance(ti, dict) else ({"command": ti} if isinstance(ti, (str, list)) else {})
        self.turn = str(data["turn_id"]) if data.get("turn_id") else None
        tid = data.get("tool_use_id")
        self.tid = str(tid) if tid else None
        self.gemini_key = str(data["_gemini_key"]) if data.get("_gemini_key") else None
        self.version = str(data["agent_version"]) if data.get("agent_version") else None
        self._n = 0
        self.home: str | None = None  # the agent's HOME (the warm server's own may differ): `~` of its paths
        self.ledger_home: Path | None = None  # agentledger's home: its MCP tool-definition store (producers/mcpdefs.py)
        self.open_call: tuple[int, dict] | None = None
        self.call_change: tuple[str, Any] | None = None  # ("open", info) | ("close", None)

    def redact_ids(self, rid) -> None:
        """Ids from the agent that carry a secret become their tokens before anything (state rows,
        fact keys, events) uses them; the importers do the same with the same ids."""
        self.sid = rid(self.sid)
        self.turn = rid(self.turn) if self.turn else self.turn
        self.tid = rid(self.tid) if self.tid else self.tid

    def obs(self, fact: str, kind: str, payload: dict, at: int | None = None, call: str | None = None) -> Observation:
        self._n += 1
        return Observation(self.sid, fact, kind, payload, at if at is not None else self.now, turn_id=self.turn,
                           tool_call_id=call or self.tid, source=SOURCE, agent=self.agent, agent_version=self.version,
                           priority=25, order=(0, self.now, self._n))

    def info(self) -> SessionInfo:
        fields: dict[str, Any] = {"agent": self.agent, "cwd": self.cwd, "model": self.d.get("model"),
                                  "approval_policy": permission_mode_policy(self.d.get("permission_mode"))}
        if self.policy is not None:
            fields["policy_digest"] = self.policy.digest
            fields["network_policy"] = self.policy.network_summary()
            fields["writable_roots"] = self.policy.roots(self.cwd or None, self.home)
        if self.event == "SessionStart" and self.ledger_home is not None:  # the MCP tool definitions in force
            from .mcpdefs import current_definitions
            fields["mcp_tools"] = current_definitions(self.ledger_home, self.now)
        return SessionInfo(self.sid, self.now, self.agent, SOURCE, fields, self.version,
                           priority=20 if self.event == "SessionStart" else 10)

    def coverage(self, head) -> list[Observation]:
        """What hooks cannot see (producers/coverage.py), stated at SessionStart or the first event of
        a session never seen: not on every call (each fact is recorded once anyway)."""
        if self.event != "SessionStart" and head.next_seq > 0:
            return []
        return [coverage_observation(self.sid, SOURCE, f, reason, self.now, source=SOURCE, agent=self.agent,
                                     agent_version=self.version, order=(0, self.now, -1))
                for f, reason in coverage_statements(SOURCE)]

    def control_surface(self, head) -> list[SessionInfo]:
        """The control surface (producers/controlsurface.py) when this call opens the session
        (SessionStart, or the first event of a session never seen): read once, not on every call."""
        if head.next_seq > 0 or not self.cwd:
            return []
        from .controlsurface import snapshot

        snap = snapshot(self.cwd, self.home, self.agent)
        return [SessionInfo(self.sid, self.now, self.agent, SOURCE, {**snap, "observed_by": "hook"}, self.version,
                            priority=30)]

    def request_id(self) -> str:
        if self.tid:
            return self.tid
        return "perm-" + short_digest(self.sid, self.turn, self.tool, json.dumps(self.tool_input, sort_keys=True,
                                                                                 default=str))

    def subject(self) -> tuple[str, str, str]:
        """(action_kind, subject, digest) of the tool call, as an approver sees it."""
        if self.tool in SHELL_TOOLS:
            parsed = _tool_command(self.tool_input)
            if parsed:
                argv, shell = parsed
                return "exec", (shell or " ".join(argv))[:4000], action_digest(argv, self.cwd)
        if self.tool in PATCH_TOOLS | WRITE_TOOLS:
            target = self.tool_input.get("file_path") or self.tool_input.get("notebook_path") or \
                ", ".join(op["path"] for op in parse_patch(str(self.tool_input.get("command") or "")))
            return "patch", str(target)[:4000], action_digest(self.tool, json.dumps(self.tool_input, sort_keys=True, default=str))
        if self.tool in NET_TOOLS:
            url = str(self.tool_input.get("url") or "")
            return "network", url.split("?")[0][:4000], action_digest(url)
        text = json.dumps(self.tool_input, sort_keys=True, default=str)
        return "permission", f"{self.tool} {text}"[:4000], action_digest(self.tool, text)

    # -- per event ------------------------------------------------------------------------
    def build(self, state) -> list[Observation]:
        e = self.event
        if e in ("PreToolUse", "PermissionRequest"):
            return self._pre(e)
        if e in ("PostToolUse", "PostToolUseFailure"):
            if self.tid is None and self.gemini_key:  # its BeforeTool's call, else one of its own
                self.tid = state.open_call_by_key(self.sid, self.gemini_key) or \
                    "gemini-" + short_digest(self.gemini_key, self.d.get("timestamp") or self.now, n=20)
            if self.tid:
                self.open_call = state.open_call(self.sid, self.tid)
            return self._post(e == "PostToolUseFailure")
        if e == "SessionEnd":
            reason = self.d.get("reason")
            return [self.obs("session_ended", "session_ended",
                             {"status": "completed", "reason": f"SessionEnd: {reason}" if reason else "SessionEnd"},
                             call=None)]
        return []

    def _approval_request(self) -> tuple[Observation, str, str]:
        """The approval request of this tool call: (observation, request id, action digest)."""
        rid = self.request_id()
        kind, subject, digest = self.subject()
        return self.obs(f"approval_req:{rid}", "approval_requested",
                        {"request_id": rid, "action_kind": kind, "subject": subject, "action_digest": digest,
                         "risk": "unknown", "justification": self.tool_input.get("description") or self.tool_input.get("justification"),
                         "command_id": self.tid if kind == "exec" else None}), rid, digest

    def _denial(self, v: Verdict) -> list[Observation]:
        req, rid, digest = self._approval_request()
        return [req, self.obs(f"approval:{rid}:decided", "approval_decided",
                              {"request_id": rid, "decision": "denied", "decided_by": "policy",
                               "decider": (self.policy.source or self.policy.name) if self.policy else None,
                               "rule": v.rule or v.reason[:300], "latency_ms": 0, "action_digest": digest,
                               "scope": "once", "reported_as": "agentledger-hook",
                               "rule_source": (str(self.policy.source)[:1000] if self.policy and self.policy.source
                                               else None)})]

    def _network_pre(self) -> list[Observation]:
        urls = urls_in(str(self.tool_input.get("url") or ""))
        if not urls or not self.tid:
            return []
        scheme, host, port = urls[0]
        aid = f"net-{self.tid}"
        url = str(self.tool_input.get("url"))[:4000]  # with its query: the redactor masks secrets in it
        out = [self.obs(f"net:{aid}:attempted", "network_attempted",
                        {"attempt_id": aid, "host": host, "port": port, "protocol": network_protocol(scheme, port),
                         "method": "GET", "url": url, "command_id": None})]
        v = self.verdict
        if v is not None and v.network is not None:
            out.append(self.obs(f"net:{aid}:decided", "network_decided",
                                {"attempt_id": aid, "decision": v.network[3], "rule": v.rule, "reason": v.reason[:300],
                                 "policy_source": "agentledger-hook"}))
        return out

    def _pre(self, e: str) -> list[Observation]:
        v = self.verdict
        out: list[Observation] = []
        if self.tool in NET_TOOLS and e == "PreToolUse":
            out += self._network_pre()
        if v is not None and v.deny:
            return out + self._denial(v)
        if e == "PermissionRequest":
            out.append(self._approval_request()[0])
            return out
        if self.tid:
            self.call_change = ("open", {"tool": self.tool, **({"key": self.gemini_key} if self.gemini_key else {})})
        if self.tool in SHELL_TOOLS and self.tid:
            out += self._command_started(self.now)
        elif self.tid and mcp_split(self.tool):
            out += self._mcp_started(self.now)
        return out

    def _mcp_started(self, at: int) -> list[Observation]:
        """An MCP tool call, as the importers record it: ``[tool, arguments JSON]``, profile ``mcp``."""
        server, tool = mcp_split(self.tool) or ("", "")
        args = self.d.get("tool_input") if isinstance(self.d.get("tool_input"), dict) else {}  # (as the importer reads it)
        return [self.obs(f"cmd:{self.tid}:started", "command_started",
                         {"command_id": self.tid, "argv": [self.tool, mcp_arguments_json(args)[:MAX_TOOL_TEXT]],
                          "shell": None, "cwd": self.cwd, "env_names": [], "sandbox_profile": "mcp",
                          "escalated": False, "mcp": self._mcp_definition(mcp_call(server, tool, args), at)}, at)]

    def _mcp_definition(self, rec: dict, at: int) -> dict:
        """``rec`` with the definition of its tool in force at ``at`` (the MCP proxy's store), if known."""
        if self.ledger_home is not None:
            from .mcpdefs import definition_at
            rec["definition_digest"] = definition_at(self.ledger_home, rec["server"], rec["tool"], at)
        return rec

    def _command_started(self, at: int) -> list[Observation]:
        parsed = _tool_command(self.tool_input)
        if not parsed:
            return []
        argv, shell = parsed
        cwd = resolve_path(str(self.tool_input.get("workdir") or ""), self.cwd, self.home) or self.cwd
        escalated = str(self.tool_input.get("sandbox_permissions") or "") == "require_escalated"
        return [self.obs(f"cmd:{self.tid}:started", "command_started",
                         {"command_id": self.tid, "argv": argv, "shell": shell, "cwd": cwd, "env_names": [],
                          "sandbox_profile": None, "escalated": escalated}, at)]

    def _post(self, failure: bool) -> list[Observation]:
        if not self.tid:
            return []
        self.call_change = ("close", None)
        started = self.open_call[0] if self.open_call else None
        dur = max(0, (self.now - started) // 1000) if started else 0
        out: list[Observation] = []
        resp = self.d.get("tool_response")
        if self.tool in SHELL_TOOLS:
            out += self._command_started(started or self.now)
            stdout, stderr, code, interrupted = _response_streams(resp)
            if failure and not stderr:
                stderr = str(self.d.get("error") or "")
            if code is None and failure:
                code = parse_exec_output(stderr)["exit_code"]
            status = "killed" if interrupted else ("failed" if failure or (code not in (None, 0)) else "completed")
            out.append(self.obs(f"cmd:{self.tid}:finished", "command_finished",
                                {"command_id": self.tid, "exit_code": code, "duration_ms": dur, "status": status,
                                 "stdout": output_digest(stdout), "stderr": output_digest(stderr)}))
            if status == "failed":
                denial = infer_sandbox_denial(code if code is not None else 1, stderr, stdout)
                if denial:
                    parsed = _tool_command(self.tool_input)
                    target = denial["target"] or ((parsed[1] or " ".join(parsed[0])) if parsed else self.tid)
                    out.append(self.obs(f"denied:{self.tid}", "sandbox_denied",
                                        {"operation": denial["operation"], "target": str(target)[:1000], "rule": None,
                                         "reason": denial["reason"], "command_id": self.tid, "inferred": True}))
        elif mcp_split(self.tool):
            out += self._mcp_started(started or self.now)
            server, tool = mcp_split(self.tool) or ("", "")
            text = _tool_text(resp)
            is_error = failure or (isinstance(resp, dict) and (resp.get("isError") is True or resp.get("is_error") is True))
            error = (str(self.d.get("error") or "") or text) if is_error else None
            out.append(self.obs(f"cmd:{self.tid}:finished", "command_finished",
                                {"command_id": self.tid, "exit_code": int(is_error), "duration_ms": dur,
                                 "status": "failed" if is_error else "completed",
                                 "stdout": output_digest(text), "stderr": output_digest(error if failure else ""),
                                 "mcp": mcp_result(server, tool, "error" if is_error else "ok", error)}))
        elif self.tool in PATCH_TOOLS and not failure:
            patch = str(self.tool_input.get("command") or self.tool_input.get("input") or "")
            for op in parse_patch(patch):
                path = resolve_path(op["path"], self.cwd, self.home)
                out.append(self.obs(f"file:{self.tid}:{path}", "file_accessed",
                                    {"path": path, "operation": op["operation"],
                                     "new_path": (resolve_path(op["new_path"], self.cwd, self.home)
                                                  if op.get("new_path") else None),
                                     "command_id": None, "inside_workspace": inside(path, self.cwd)}))
        elif self.tool in WRITE_TOOLS | READ_TOOLS and not failure:
            path = self.tool_input.get("file_path") or self.tool_input.get("notebook_path")
            if path:
                path = resolve_path(str(path), self.cwd, self.home)
                op = "read" if self.tool in READ_TOOLS else (
                    "create" if isinstance(resp, dict) and str(resp.get("type")) == "create" else "write")
                out.append(self.obs(f"file:{self.tid}:{path}", "file_accessed",
                                    {"path": path, "operation": op, "new_path": None, "command_id": None,
                                     "inside_workspace": inside(path, self.cwd)}))
        elif self.tool in NET_TOOLS:
            out += self._network_pre()
            aid = f"net-{self.tid}"
            status = as_int(resp.get("code") or resp.get("status")) if isinstance(resp, dict) else None
            body = resp.get("result") if isinstance(resp, dict) else resp
            out.append(self.obs(f"net:{aid}:completed", "network_completed",
                                {"attempt_id": aid, "outcome": "error" if failure else "ok", "status": status,
                                 "bytes_in": len(str(body or "").encode()), "bytes_out": 0, "duration_ms": dur,
                                 "response_digest": output_digest(str(body or ""))["sha256"] if body else None,
                                 "error": str(self.d.get("error"))[:500] if failure and self.d.get("error") else None}))
        return out

    def state_change(self, con) -> None:
        if self.call_change is None or not self.tid:
            return
        if self.call_change[0] == "open":
            con.execute("INSERT OR IGNORE INTO open_calls VALUES (?, ?, ?, ?)",
                        (self.sid, self.tid, self.now, json.dumps(self.call_change[1])))
        else:
            con.execute("DELETE FROM open_calls WHERE session_id = ? AND call_id = ?", (self.sid, self.tid))


MAX_TOOL_TEXT = 64_000  # characters of an MCP call's arguments kept in its argv (as the importers keep)


def _tool_text(resp: Any) -> str:
    """The text of an MCP tool's response: its text content blocks (``[{type: text, text}]``, or
    ``{content: [...]}``), a string as is, anything else as JSON."""
    blocks = resp.get("content") if isinstance(resp, dict) and isinstance(resp.get("content"), list) else resp
    if isinstance(blocks, list):
        parts = [b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str)]
        if parts or not blocks:
            return "\n".join(parts)
    if isinstance(blocks, str):
        return blocks
    return "" if resp is None else json.dumps(resp, ensure_ascii=False, default=str)[:MAX_TOOL_TEXT]


def _response_streams(resp: Any) -> tuple[str, str, int | None, bool]:
    """stdout, stderr, exit code, interrupted from a tool_response (Claude: {stdout, stderr,
    interrupted}; Codex: a string or {output, exit_code, ...})."""
    if isinstance(resp, str):
        res = parse_exec_output(resp)
        return res["text"], "", res["exit_code"], False
    if not isinstance(resp, dict):
        return ("" if resp is None else json.dumps(resp, default=str)), "", None, False
    stdout = resp.get("stdout", resp.get("output", resp.get("aggregated_output", "")))
    stderr = resp.get("stderr", "")
    code = as_int(next((resp[k] for k in ("exit_code", "exitCode", "returncode", "code") if k in resp), None))
    if code is None and isinstance(stdout, str):
        code = parse_exec_output(stdout)["exit_code"]
    return (stdout if isinstance(stdout, str) else json.dumps(stdout, default=str),
            stderr if isinstance(stderr, str) else json.dumps(stderr, default=str), code, bool(resp.get("interrupted")))


def handle(
    raw: bytes,
    settings: Settings,
    *,
    policy_path: str | None = None,
    agent: str = "auto",
    deny_style: str = "json",
    fail_closed: bool = False,
    budget_s: float = 5.0,
    appender: SessionAppender | None = None,
    now_us: int | None = None,
    env: Mapping[str, str] | None = None,
) -> HookOutcome:
    """Record one hook invocation and say what to answer (stdout, stderr, exit code). Fail-closed
    when asked, or when AGENTLEDGER_RECORDING_MODE=fail_closed (the producers' recording mode).
    ``env``: the caller's environment (os.environ when None; the warm server passes its client's),
    which must also be the one ``appender`` was made with."""
    out = HookOutcome()
    fail_closed = fail_closed or recording_mode_from_env(env) == "fail_closed"
    try:
        data = loads_bounded(raw.decode("utf-8", "replace")) if raw.strip() else None
    except ValueError as exc:
        data, err = None, f"invalid JSON: {exc}"
    else:
        err = "empty input" if data is None else ("not a JSON object" if not isinstance(data, dict) else
                                                  ("no session_id" if not data.get("session_id") else None))
    if err:
        p = save_reject(settings, raw, err)
        out.exit_code, out.stderr = 1, f"agentledger hook: {err}; input kept in {p}\n"
        return out
    now = now_us if now_us is not None else time.time_ns() // 1000
    who = _agent(data, agent)
    if who == "gemini-cli":
        data = gemini_input(data, now)
    hev = HookEvent(data, who, now, None, None)
    event = hev.event
    try:
        policy = load_policy(policy_path)
    except Exception as exc:  # a broken policy must not silently allow: say so, and fail closed if asked
        policy = None
        out.stderr += f"agentledger hook: policy not loaded: {exc}\n"
        if fail_closed and event in DECISION_EVENTS:
            out.exit_code, out.stdout, extra = _deny_response(event, f"agentledger: policy not loaded: {exc}", deny_style,
                                                              who)
            out.stderr += extra
            return out
    hev.policy = policy
    hev.home = (os.environ if env is None else env).get("HOME") or None
    hev.ledger_home = settings.home
    if policy is not None and event in DECISION_EVENTS:
        hev.verdict = evaluate(policy, hev.tool, hev.tool_input, hev.cwd, home=hev.home)
    verdict = hev.verdict
    own = appender is None
    try:
        if appender is None:
            sink_options = kafka_options(budget_s) if settings.uses_kafka else {}
            appender = SessionAppender(settings, sink_options=sink_options, lock_timeout_s=budget_s,
                                       flush_timeout_s=budget_s, env=env, key_fallback=True)
        out.stderr += "".join(appender.notices)  # a refused key file: what the call used instead, every call
        hev.redact_ids(appender.redact_id)
        appender.append(hev.sid, [], [hev.info()], prepare=lambda head: (hev.build(appender.state) + hev.coverage(head),
                                                                         hev.control_surface(head)),
                        extra=hev.state_change, start_if_new=True)
    except Exception as exc:  # recording failed: never silently; the outbox keeps what was sealed
        out.exit_code = 1
        out.stderr += f"agentledger hook: event not recorded durably: {type(exc).__name__}: {exc}\n"
        if isinstance(exc, LockTimeout):  # nothing was sealed: keep the input itself, never lose it
            try:
                kept = save_reject(settings, raw, f"not recorded: {exc}")
                out.stderr += f"agentledger hook: input kept in {kept}\n"
            except OSError as keep_exc:
                out.stderr += f"agentledger hook: the input could not be kept either: {keep_exc}\n"
        if fail_closed and event in DECISION_EVENTS:
            out.exit_code, out.stdout, extra = _deny_response(
                event, f"agentledger (fail-closed): this action could not be recorded: {exc}", deny_style, who)
            out.stderr += extra
            return out
    finally:
        if own and appender is not None:
            try:
                appender.close()
            except Exception as exc:
                out.stderr += f"agentledger hook: closing the transport: {exc}\n"
    if verdict is not None and verdict.deny:
        code, stdout, stderr = _deny_response(event, verdict.reason, deny_style, who)
        out.exit_code, out.stdout, out.stderr = code, stdout, out.stderr + stderr
    return out
