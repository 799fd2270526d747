"""Claude Code transcripts (``~/.claude/projects/<cwd with / as ->/<session id>.jsonl``) as observations.

One JSON object a line. Conversation entries (``type`` user / assistant / system) carry ``uuid``,
``parentUuid``, ``sessionId``, ``timestamp``, ``cwd``, ``gitBranch``, ``version``, ``isSidechain``
and ``message{role, content}``; other entry types (``summary``, ``file-history-snapshot``,
``queue-operation``, ``permission-mode``, ...) are bookkeeping, counted as ignored. Mapping:

* the first entry of a session -> session info (cwd, git branch, Claude Code version, model from
  the first assistant message, approval policy from ``permissionMode``).
* assistant ``tool_use`` blocks, completed by the ``tool_result`` block (and the entry's
  ``toolUseResult``) of the later user entry with the same ``tool_use_id``:

  - ``Bash`` -> command_started (argv, shell; ``dangerouslyDisableSandbox`` -> escalated) +
    command_finished (exit code, duration, status, stdout/stderr digests) and, for a failure
    whose output reads like a sandbox denial, sandbox_denied(inferred);
  - ``Read`` / ``Write`` / ``Edit`` / ``MultiEdit`` / ``NotebookEdit`` -> file_accessed (read,
    create, write) once the tool succeeded, and the call as a command (``sandbox_profile =
    "tool"``), so what was read and written is judged like a shell's: a ``Read`` is
    command_started ``["Read", path]`` + command_finished whose stdout is the text read (a secret
    read is redacted there and followed, by its token, to where it is sent); a write or an edit is
    command_started ``["apply_patch", <patch>]``, the patch the Codex importer records for an
    apply_patch (``*** Add File`` for a Write that created the file, ``*** Update File`` with the
    old and new strings as ``-``/``+`` lines for Edit / MultiEdit / NotebookEdit and a Write over a
    file), + command_finished;
  - ``WebFetch`` -> network_attempted (GET of the URL, its query included: the recorder's redactor
    masks secrets in it, as in a command line) + network_completed;
    ``WebSearch`` -> network_attempted to ``(web search)`` (the search runs on the provider's side:
    no destination of this host) + network_completed;
  - ``mcp__<server>__<tool>`` -> command_started ``[tool, arguments JSON]`` with
    ``sandbox_profile = "mcp"`` and its ``mcp`` record (server, tool, digest of the arguments'
    canonical JSON) + command_finished (failed when ``is_error``; ``mcp.outcome`` ok / error /
    declined), as the Codex importer and the hook record MCP calls;
  - ``Task`` / ``Agent`` (a sub-agent) -> command_started ``["Task", arguments JSON]`` with
    ``sandbox_profile = "subagent"`` + command_finished whose output starts with the sub-agent's
    ``agentId``; the sub-agent's own transcript (``<session>/subagents/agent-<agentId>.jsonl``,
    entries with ``isSidechain`` and ``agentId``) is the child session
    ``<session id>:agent-<agentId>``, its session_started ``originator`` = ``subagent of
    <session id>`` (the event contract has no parent-session field: the id and the originator
    are the link);
  - other tools (Glob, Grep, TodoWrite, ...) are counted as ignored.

* denials, which transcripts state only as text in an ``is_error`` tool result:
  "The user doesn't want to proceed with this tool use…" -> approval_requested +
  approval_decided(denied, by the user, latency = time to the answer); "Permission to use <Tool>
  … has been denied" / "… but you haven't granted it yet" -> the same, decided by policy (Claude
  Code's permission rules; ``decider`` = "claude-code permissions"); another PreToolUse hook's
  denial -> decided by ``hook``; a denial by our own hook (its reason names ``agentledger policy``) ->
  the same facts the hook records (and no command, as the hook records none). A denied command
  also gets command_finished(declined), as in the Codex importer; a denied WebFetch a
  network_decided(deny).

Fact keys are the hook's (``cmd:<tool_use_id>:started``, ``file:<tool_use_id>:<path>``,
``net:net-<tool_use_id>:attempted``, ``approval:<tool_use_id>:decided``, ...), so a call the hook
recorded live and its transcript entry are one fact. Observations of a call are made when its
result is read (so a hook denial suppresses the command, as the hook does); calls without a
result yet are announced (started) at the end of each import and completed by a later one.

Unknown entry types and content block types are counted as unknown types, unknown top-level
fields as unknown fields; neither is ever fatal.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from .counts import FileCounts
from .ledger import Observation, SessionInfo
from .normalize import (as_int, command_argv, infer_sandbox_denial, inside, mcp_arguments_json, mcp_call, mcp_result,
                        mcp_split, network_protocol, parse_exec_output, parse_time_us, permission_mode_policy,
                        resolve_path, short_digest, type_name, urls_in)
from .recorder import action_digest, output_digest

# The event contract's ProducerSource enum has no symbol for Claude Code transcripts yet (adding
# one is a schema release): recorded as "unknown", the agent as "claude-code".
SOURCE = "unknown"
KIND = "claude_code"
AGENT = "claude-code"

SHELL_TOOLS = frozenset({"Bash"})
READ_TOOLS = frozenset({"Read"})
WRITE_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit"})
FETCH_TOOLS = frozenset({"WebFetch"})
SEARCH_TOOLS = frozenset({"WebSearch"})
AGENT_TOOLS = frozenset({"Task", "Agent"})
OTHER_TOOLS = frozenset({"Glob", "Grep", "LS", "TodoWrite", "TodoRead", "ExitPlanMode", "BashOutput", "KillShell",
                         "KillBash", "SlashCommand", "Skill", "AskUserQuestion", "NotebookRead", "ListMcpResourcesTool",
                         "ReadMcpResourceTool", "EnterPlanMode"})

P_CALL, P_RESULT = 30, 30
MAX_OPEN_CALLS = 5000
MAX_KEPT = 64_000  # characters of a command or tool arguments kept in the context of an open call
MAX_SESSIONS_KEPT = 1000

KNOWN_ENTRY = frozenset({
    "uuid", "parentUuid", "logicalParentUuid", "sessionId", "timestamp", "cwd", "gitBranch", "version", "isSidechain",
    "userType", "type", "message", "toolUseResult", "requestId", "isMeta", "isCompactSummary", "agentId", "slug",
    "level", "subtype", "content", "summary", "leafUuid", "isApiErrorMessage", "permissionMode", "entrypoint",
    "thinkingMetadata", "todos", "isVisibleInTranscriptOnly", "compactMetadata", "toolUseID", "promptId",
    "sourceToolUseID", "messageId", "snapshot", "isSnapshotUpdate", "operation", "mcpMeta", "imagePasteIds",
    "hookInfos", "hookErrors", "hookCount", "stopReason", "preventedContinuation", "hasOutput", "error",
    "isInterrupted", "data", "parentToolUseID", "title", "customTitle", "durationMs", "retryAttempt", "maxRetries",
    "retryInMs", "cause", "planContent", "model"})
CONVERSATION = frozenset({"user", "assistant"})
BOOKKEEPING = frozenset({"system", "summary", "file-history-snapshot", "queue-operation", "ai-title", "permission-mode",
                         "custom-title", "progress", "attachment", "tag", "agent-name", "last-prompt"})
IGNORED_BLOCKS = frozenset({"text", "thinking", "redacted_thinking", "image", "document", "server_tool_use",
                            "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
                            "mcp_tool_use", "mcp_tool_result", "container_upload", "search_result"})

_UUID = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", re.I)
_AGENT_FILE = re.compile(r"^agent-([A-Za-z0-9_-]+)\.jsonl$")
_USER_DENIED = re.compile(r"^\s*(?:Error:\s*)?The user doesn'?t want to (?:proceed with this tool use|take this action)", re.I)
_RULE_DENIED = re.compile(r"(Permission to use .{1,4000}? has been denied|requested permissions? to .{1,4000}?"
                          r"but you haven'?t granted it yet|permission (?:was |has been )?denied by (?:the )?"
                          r"(?:permission rules|settings|policy))", re.I | re.S)
_HOOK_DENIED = re.compile(r"agentledger (?:policy|\(fail-closed\)|: policy not loaded)")
_OTHER_HOOK = re.compile(r"\bPreToolUse\b[^\n]{0,200}\b(?:blocked|denied|deny)", re.I)
_INTERRUPTED = "[Request interrupted by user"
_EXIT = re.compile(r"^\s*(?:Error:\s*)?Exit code:?\s*(-?\d+)", re.I)


def session_ids_from_path(path: str) -> tuple[str | None, str | None]:
    """(session id, agent id) a Claude Code transcript's path names: ``<sid>.jsonl``, or
    ``<sid>/subagents/agent-<agentId>.jsonl`` for a sub-agent."""
    name = os.path.basename(path)
    m = _AGENT_FILE.match(name)
    if m:
        parent = os.path.basename(os.path.dirname(os.path.dirname(path)))
        u = _UUID.fullmatch(parent)
        return (u.group(1).lower() if u else None), m.group(1)
    u = _UUID.findall(name)
    return (u[-1].lower() if u else None), None


def child_session_id(session_id: str, agent_id: str) -> str:
    """The session id of a sub-agent of ``session_id``: the parent's id, then ``:agent-<agentId>``."""
    return f"{session_id}:agent-{agent_id}"


def _text_of(content: Any) -> str:
    """The text of a tool_result's content: a string, or blocks of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for b in content:
            if isinstance(b, dict):
                if isinstance(b.get("text"), str):
                    parts.append(b["text"])
            elif isinstance(b, str):
                parts.append(b)
        return "\n".join(parts)
    if content is None:
        return ""
    return json.dumps(content, ensure_ascii=False, default=str)[:MAX_KEPT]


def _lines(text: Any, mark: str) -> str:
    return "".join(mark + ln + "\n" for ln in str(text or "").splitlines())


def _edit_hunks(tool: str, inp: dict) -> list:
    """The (old, new) strings of a file tool's input: Write's content, Edit's / NotebookEdit's
    strings, every edit of a MultiEdit."""
    if tool == "Write":
        return [("", str(inp.get("content") or "")[:MAX_KEPT])]
    if tool == "NotebookEdit":
        return [("", str(inp.get("new_source") or "")[:MAX_KEPT])]
    edits = inp.get("edits") if tool == "MultiEdit" and isinstance(inp.get("edits"), list) else [inp]
    return [(str(e.get("old_string") or "")[:MAX_KEPT], str(e.get("new_string") or "")[:MAX_KEPT])
            for e in edits[:200] if isinstance(e, dict)]


def _patch(call: dict, path: str) -> str:
    """A file tool's call as the apply_patch envelope the Codex importer records for a patch."""
    hunks = call.get("edit") or []
    if call["tool"] == "Write" and not call.get("overwrote"):
        body = f"*** Add File: {path}\n" + "".join(_lines(new, "+") for _, new in hunks)
    else:
        body = f"*** Update File: {path}\n" + "".join("@@\n" + _lines(old, "-") + _lines(new, "+") for old, new in hunks)
    return ("*** Begin Patch\n" + body + "*** End Patch")[:MAX_KEPT]


_json_args = mcp_arguments_json


class ClaudeTranscriptParser:
    """Incremental, like the rollout parser: ``ctx`` (saved with the file) keeps the session ids,
    the cwd, and the tool calls whose result has not been read yet."""

    kind = KIND

    def __init__(self, path: str, context: dict | None, file_index: int, counts: FileCounts):
        self.path = path
        self.counts = counts
        self.file_index = file_index
        ctx = dict(context or {})
        ctx.setdefault("calls", {})
        ctx.setdefault("started", [])  # sessions whose info was given
        ctx.setdefault("model", [])  # sessions whose model was given
        self.ctx = ctx
        self.observations: list[Observation] = []
        self.infos: list[SessionInfo] = []
        self.end_hint: str | None = None
        self.sessions: set[str] = set()
        self.activity: dict[str, int] = {}
        self._unattributed: list[Observation] = []
        self._offset = 0
        self._sub = 0
        self._mapped = False
        if "path_sid" not in ctx:
            sid, agent = session_ids_from_path(path)
            ctx["path_sid"] = child_session_id(sid, agent) if sid and agent else sid

    @property
    def session_id(self) -> str | None:
        return self.ctx.get("session_id")

    # -- helpers --------------------------------------------------------------------------
    def _at(self, ts: Any) -> int:
        t = parse_time_us(ts)
        last = self.ctx.get("last_us")
        if t is None:
            t = (last or 0) + 1
        self.ctx["last_us"] = max(t, last or 0)
        return t

    def _obs(self, sid: str | None, fact: str, kind: str, payload: dict, at: int, *, call_id: str | None = None,
             priority: int = P_CALL) -> None:
        self._sub += 1
        o = Observation(sid or "", fact, kind, payload, at, turn_id=None, tool_call_id=call_id, source=SOURCE,
                        agent=AGENT, agent_version=self.ctx.get("version"), priority=priority,
                        order=(self.file_index, self._offset, self._sub))
        self._mapped = True
        if sid:
            self.observations.append(o)
            self.sessions.add(sid)
            self.activity[sid] = max(self.activity.get(sid, 0), at)
        else:
            self._unattributed.append(o)

    def _session_of(self, entry: dict) -> str | None:
        sid = entry.get("sessionId")
        sid = sid.strip() if isinstance(sid, str) and sid.strip() else None
        if sid and _UUID.fullmatch(sid):
            sid = sid.lower()
        agent = entry.get("agentId")
        if sid and entry.get("isSidechain") is True and isinstance(agent, str) and agent.strip():
            return child_session_id(sid, agent.strip())
        return sid or self.session_id or self.ctx.get("path_sid")

    # -- entry points ---------------------------------------------------------------------
    def feed(self, obj: Any, offset: int, lineno: int) -> None:
        self._offset = offset
        self._mapped = False
        if not isinstance(obj, dict):
            self.counts.not_object += 1
            return
        self.counts.records += 1
        typ = type_name(obj.get("type"))
        at = self._at(obj.get("timestamp"))
        if typ in CONVERSATION:
            self.counts.unknown_keys("entry", obj, KNOWN_ENTRY)  # (an unknown type is counted once, not its fields)
            sid = self._session_of(obj)
            if sid and not self.session_id:
                self.ctx["session_id"] = sid
            if sid:
                self.activity[sid] = max(self.activity.get(sid, 0), at)
                self.sessions.add(sid)
                self._info(sid, obj, at)
            msg = obj.get("message")
            if not isinstance(msg, dict):
                self.counts.bump("unknown_values", f"{typ} entry without message")
            elif typ == "assistant":
                self.end_hint = "completed"
                self._assistant(sid, obj, msg, at)
            else:
                self._user(sid, obj, msg, at)
        elif typ == "permission-mode" and isinstance(obj.get("permissionMode"), str):
            self._permission_mode(obj, at)
        elif typ in BOOKKEEPING:
            self.counts.ignored += 1
        else:
            self.counts.bump("unknown_types", str(typ) if typ is not None else "(no type)")
        if self._mapped:
            self.counts.mapped += 1
        elif typ in CONVERSATION:
            self.counts.ignored += 1  # prompts, answers, thinking: known, not recorded

    def garbage(self, offset: int, lineno: int, raw: bytes, reason: str, length: int | None = None) -> None:
        """A line we cannot use: a gap in the file's session, so the loss shows in its timeline."""
        self._offset = offset
        at = (self.ctx.get("last_us") or 0) + 1
        self._obs(self.session_id or self.ctx.get("path_sid"), f"gap:src:{short_digest(raw, offset, n=20)}", "gap",
                  {"gap_kind": "source_incomplete", "reason": f"{os.path.basename(self.path)} line {lineno}: {reason}",
                   "field": None, "lost_events": None, "lost_bytes": len(raw) if length is None else length,
                   "first_lost_at": None, "last_lost_at": None, "related_seq": None}, at)

    def finish(self, idle: bool) -> None:
        """End of the bytes available now: calls without a result yet are announced (their start),
        and stay open for a later import to complete."""
        sid = self.session_id or self.ctx.get("path_sid")
        if self._unattributed:
            if sid:
                for o in self._unattributed:
                    o.session_id = sid
                self.observations += self._unattributed
                self.sessions.add(sid)
            else:
                self.counts.no_session += sum(1 for o in self._unattributed if o.kind != "gap")
            self._unattributed = []
        calls = self.ctx["calls"]
        if len(calls) > MAX_OPEN_CALLS:
            for k in sorted(calls, key=lambda c: calls[c].get("at", 0))[:len(calls) - MAX_OPEN_CALLS]:
                del calls[k]
        for tid, call in calls.items():
            if not call.get("announced"):
                self._started(tid, call)
                call["announced"] = True
        for key in ("started", "model"):
            if len(self.ctx[key]) > MAX_SESSIONS_KEPT:
                self.ctx[key] = self.ctx[key][-MAX_SESSIONS_KEPT:]

    # -- session --------------------------------------------------------------------------
    def _info(self, sid: str, e: dict, at: int) -> None:
        if isinstance(e.get("version"), str):
            self.ctx["version"] = e["version"]
        if isinstance(e.get("cwd"), str) and e["cwd"]:
            self.ctx.setdefault("cwds", {})
            if sid not in self.ctx["cwds"] and len(self.ctx["cwds"]) < MAX_SESSIONS_KEPT:
                self.ctx["cwds"][sid] = e["cwd"]
        mode = e.get("permissionMode") or self.ctx.get("permission_mode")
        if sid not in self.ctx["started"]:
            self.ctx["started"].append(sid)
            fields: dict[str, Any] = {"agent": AGENT, "cwd": str(e.get("cwd") or "")}
            if e.get("gitBranch"):
                fields["git"] = {"commit": None, "branch": str(e["gitBranch"]), "repository_url": None}
            if mode:
                policy = permission_mode_policy(mode)
                if policy == "unknown":
                    self.counts.unknown_value("permissionMode", mode)
                fields["approval_policy"] = policy
            if ":agent-" in sid:
                fields["originator"] = f"subagent of {sid.split(':agent-', 1)[0]}"
            elif isinstance(e.get("entrypoint"), str):
                fields["originator"] = e["entrypoint"]
            self.infos.append(SessionInfo(sid, at, AGENT, SOURCE, fields, self.ctx.get("version"), 20))
            self._mapped = True
        msg = e.get("message")
        if isinstance(msg, dict) and isinstance(msg.get("model"), str) and sid not in self.ctx["model"] \
                and not msg["model"].startswith("<"):  # "<synthetic>": Claude Code's own messages
            self.ctx["model"].append(sid)
            self.infos.append(SessionInfo(sid, at, AGENT, SOURCE, {"agent": AGENT, "model": msg["model"]},
                                          self.ctx.get("version"), 10))

    def _permission_mode(self, e: dict, at: int) -> None:
        """The permission mode in force. A change after the session started is a permission the
        session was granted mid-way (as a Codex turn context with other policies): who granted it
        is not in the transcript."""
        before, now = self.ctx.get("permission_mode"), e["permissionMode"]
        self.ctx["permission_mode"] = now
        sid = self._session_of(e)
        if before is None or before == now or not sid or sid not in self.ctx["started"]:
            self.counts.ignored += 1
            return
        if permission_mode_policy(now) == "unknown":
            self.counts.unknown_value("permissionMode", now)
        rid = f"policy:{e.get('uuid') or at}"
        subject = f"permission mode changed: {before} -> {now}"
        digest = action_digest("policy", subject)
        loosened = permission_mode_policy(now) == "never"
        self._obs(sid, f"approval_req:{rid}", "approval_requested",
                  {"request_id": rid, "action_kind": "permission", "subject": subject, "action_digest": digest,
                   "risk": "high" if loosened else "low", "justification": "permission-mode entry", "command_id": None},
                  at)
        self._obs(sid, f"approval:{rid}:decided", "approval_decided",
                  {"request_id": rid, "decision": "approved", "decided_by": "unknown", "decider": None,
                   "rule": "permission-mode entry", "latency_ms": None, "action_digest": digest}, at)

    def _cwd(self, sid: str | None) -> str:
        return (self.ctx.get("cwds") or {}).get(sid or "", "") or ""

    # -- assistant: tool calls ------------------------------------------------------------
    def _assistant(self, sid: str | None, e: dict, msg: dict, at: int) -> None:
        content = msg.get("content")
        if not isinstance(content, list):
            return
        for block in content:
            if not isinstance(block, dict):
                self.counts.bump("unknown_types", "assistant/(not an object)")
                continue
            t = type_name(block.get("type"))
            if t == "tool_use":
                self._tool_use(sid, e, block, at)
            elif t not in IGNORED_BLOCKS:
                self.counts.bump("unknown_types", f"assistant/{t}")

    def _tool_use(self, sid: str | None, e: dict, b: dict, at: int) -> None:
        tid, name, inp = b.get("id"), b.get("name"), b.get("input")
        if not isinstance(tid, str) or not tid or not isinstance(name, str):
            self.counts.bump("unknown_values", "tool_use without id or name")
            return
        inp = inp if isinstance(inp, dict) else {}
        cwd = str(e.get("cwd") or self._cwd(sid))
        call: dict[str, Any] = {"tool": name, "at": at, "sid": sid, "cwd": cwd}
        if name in SHELL_TOOLS:
            cmd = inp.get("command")
            if not isinstance(cmd, str) or not cmd.strip():
                self.counts.bump("unknown_values", "Bash without command")
                return
            call["command"] = cmd[:MAX_KEPT]
            call["escalated"] = inp.get("dangerouslyDisableSandbox") is True
            call["description"] = str(inp["description"])[:500] if inp.get("description") else None
        elif name in READ_TOOLS | WRITE_TOOLS:
            path = inp.get("file_path") or inp.get("notebook_path")
            if not isinstance(path, str) or not path:
                self.counts.bump("unknown_values", f"{name} without file_path")
                return
            call["path"] = path[:4000]
            if name in WRITE_TOOLS:
                call["edit"] = _edit_hunks(name, inp)
        elif name in FETCH_TOOLS:
            url = inp.get("url")
            if not isinstance(url, str) or not urls_in(url):
                self.counts.bump("unknown_values", "WebFetch without an http(s) URL")
                return
            call["url"] = url[:4000]
        elif name in SEARCH_TOOLS:
            pass
        elif name in AGENT_TOOLS or (names := mcp_split(name)) is not None:
            call["args"] = _json_args(inp)[:MAX_KEPT]
            if name not in AGENT_TOOLS:
                call["mcp"] = mcp_call(names[0], names[1], inp)  # the digest of the whole input, before any cut
        else:
            call["kind"] = "other"
            if name not in OTHER_TOOLS:
                self.counts.bump("unknown_values", f"tool={name[:40]}")
        self.ctx["calls"][tid] = call
        self._mapped = True

    def _started(self, tid: str, call: dict) -> None:
        """What a call states before its result: a command, a network attempt."""
        sid, at, tool = call.get("sid"), call["at"], call["tool"]
        if tool in SHELL_TOOLS:
            argv, shell = command_argv(call["command"])
            self._obs(sid, f"cmd:{tid}:started", "command_started",
                      {"command_id": tid, "argv": argv, "shell": shell, "cwd": call.get("cwd") or "", "env_names": [],
                       "sandbox_profile": None, "escalated": bool(call.get("escalated"))}, at, call_id=tid)
        elif tool in READ_TOOLS | WRITE_TOOLS:
            path = resolve_path(call["path"], call.get("cwd") or None)
            argv = ["Read", path] if tool in READ_TOOLS else ["apply_patch", _patch(call, path)]
            self._obs(sid, f"cmd:{tid}:started", "command_started",
                      {"command_id": tid, "argv": argv, "shell": None, "cwd": call.get("cwd") or "", "env_names": [],
                       "sandbox_profile": "tool", "escalated": False}, at, call_id=tid)
        elif tool in FETCH_TOOLS:
            scheme, host, port = urls_in(call["url"])[0]
            self._obs(sid, f"net:net-{tid}:attempted", "network_attempted",
                      {"attempt_id": f"net-{tid}", "host": host, "port": port, "protocol": network_protocol(scheme, port),
                       "method": "GET", "url": call["url"], "command_id": None}, at, call_id=tid)
        elif tool in SEARCH_TOOLS:
            self._obs(sid, f"net:net-{tid}:attempted", "network_attempted",
                      {"attempt_id": f"net-{tid}", "host": "(web search)", "port": 443, "protocol": "https",
                       "method": "SEARCH", "url": None, "command_id": None}, at, call_id=tid)
        elif "args" in call:
            payload = {"command_id": tid, "argv": [tool, call["args"]], "shell": None, "cwd": call.get("cwd") or "",
                       "env_names": [], "sandbox_profile": "mcp" if call.get("mcp") else "subagent", "escalated": False}
            if call.get("mcp"):
                payload["mcp"] = call["mcp"]
            self._obs(sid, f"cmd:{tid}:started", "command_started", payload, at, call_id=tid)

    # -- user: tool results ---------------------------------------------------------------
    def _user(self, sid: str | None, e: dict, msg: dict, at: int) -> None:
        content = msg.get("content")
        if isinstance(content, str):
            if content.startswith(_INTERRUPTED):
                self.end_hint = "interrupted"
            return
        if not isinstance(content, list):
            return
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        for block in content:
            if not isinstance(block, dict):
                self.counts.bump("unknown_types", "user/(not an object)")
                continue
            t = type_name(block.get("type"))
            if t == "tool_result":
                extra = e.get("toolUseResult") if len(results) == 1 else None
                self._tool_result(block, extra, at)
            elif t == "text":
                if str(block.get("text") or "").startswith(_INTERRUPTED):
                    self.end_hint = "interrupted"
            elif t not in IGNORED_BLOCKS:
                self.counts.bump("unknown_types", f"user/{t}")

    def _tool_result(self, b: dict, extra: Any, at: int) -> None:
        tid = b.get("tool_use_id")
        call = self.ctx["calls"].pop(tid, None) if isinstance(tid, str) else None
        if call is None:
            self.counts.orphans += 1
            return
        self._mapped = True
        if call.get("kind") == "other":
            return
        text = _text_of(b.get("content"))
        is_error = b.get("is_error") is True
        sid, tool = call.get("sid"), call["tool"]
        dur = max(0, (at - call["at"]) // 1000)
        denial = self._denial(text) if is_error else None
        if tool == "Write" and isinstance(extra, dict) and str(extra.get("type")) == "update":
            call["overwrote"] = True
        if denial == "hook":
            self._decision(tid, call, "policy", "agentledger-hook", text, at, dur)
            return
        self._started(tid, call)  # (if an earlier import announced it: the same fact, recorded once)
        if denial is not None:
            by, decider = {"user": ("user", None), "other_hook": ("hook", "PreToolUse hook")}.get(
                denial, ("policy", "claude-code permissions"))
            self._decision(tid, call, by, decider, text, at, dur)
            if tool in SHELL_TOOLS | READ_TOOLS | WRITE_TOOLS or "args" in call:
                self._finished(sid, tid, None, dur, "declined", "", text, at, mcp=self._mcp_result(call, "declined", text))
            elif tool in FETCH_TOOLS | SEARCH_TOOLS:
                self._obs(sid, f"net:net-{tid}:decided", "network_decided",
                          {"attempt_id": f"net-{tid}", "decision": "deny", "rule": None, "reason": text[:300],
                           "policy_source": "user" if by == "user" else decider, "addresses": []}, at, call_id=tid)
            return
        if tool in SHELL_TOOLS:
            self._bash_result(sid, tid, call, text, is_error, extra, at, dur)
        elif tool in READ_TOOLS | WRITE_TOOLS:
            if is_error:  # a read or write that failed changed or read nothing
                self._finished(sid, tid, 1, dur, "failed", "", text, at)
                return
            info = extra if isinstance(extra, dict) else {}
            read = info.get("file") if isinstance(info.get("file"), dict) else {}
            out = read["content"] if tool in READ_TOOLS and isinstance(read.get("content"), str) else text
            self._finished(sid, tid, 0, dur, "completed", out, "", at)
            path = resolve_path(call["path"], call.get("cwd") or None)
            op = "read" if tool in READ_TOOLS else (
                "create" if isinstance(extra, dict) and str(extra.get("type")) == "create" else "write")
            self._obs(sid, f"file:{tid}:{path}", "file_accessed",
                      {"path": path, "operation": op, "new_path": None, "command_id": None,
                       "inside_workspace": inside(path, call.get("cwd") or None)}, at, call_id=tid, priority=P_RESULT)
        elif tool in FETCH_TOOLS | SEARCH_TOOLS:
            info = extra if isinstance(extra, dict) else {}
            body = info.get("result") if tool in FETCH_TOOLS and "result" in info else text
            status = as_int(info.get("code")) if tool in FETCH_TOOLS else None
            took = as_int(info.get("durationMs"))
            secs = info.get("durationSeconds")
            if took is None and isinstance(secs, (int, float)) and math.isfinite(secs) and abs(secs) < 1e15:
                took = int(secs * 1000)
            self._obs(sid, f"net:net-{tid}:completed", "network_completed",
                      {"attempt_id": f"net-{tid}", "outcome": "error" if is_error else "ok", "status": status,
                       "bytes_in": as_int(info.get("bytes")) if as_int(info.get("bytes")) is not None
                       else len(str(body or "").encode()),
                       "bytes_out": 0, "duration_ms": took if took is not None else dur,
                       "response_digest": output_digest(str(body or ""))["sha256"] if body else None,
                       "error": text[:500] if is_error else None}, at, call_id=tid, priority=P_RESULT)
        elif "args" in call:
            out = text
            code = int(is_error)
            status = "failed" if is_error else "completed"
            if tool in AGENT_TOOLS:
                info = extra if isinstance(extra, dict) else {}
                agent_id = info.get("agentId")
                out = json.dumps({"agentId": agent_id, "status": info.get("status")}) + "\n" + text if agent_id else text
                took = as_int(info.get("totalDurationMs"))
                dur = took if took is not None else dur
            self._finished(sid, tid, code, dur, status, out, "", at,
                           mcp=self._mcp_result(call, "error" if is_error else "ok", text if is_error else None))

    @staticmethod
    def _mcp_result(call: dict, outcome: str, error: str | None) -> dict | None:
        m = call.get("mcp")
        return mcp_result(m["server"], m["tool"], outcome, error) if m else None

    def _denial(self, text: str) -> str | None:
        head = text[:8000]
        if _HOOK_DENIED.search(head):
            return "hook"
        if _USER_DENIED.search(head):
            return "user"
        if _RULE_DENIED.search(head):
            return "policy"
        if _OTHER_HOOK.search(head):
            return "other_hook"
        return None

    def _decision(self, tid: str, call: dict, by: str, decider: str | None, text: str, at: int, dur: int) -> None:
        """A denied tool call: the approval request it made and its denial (the hook's facts)."""
        sid = call.get("sid")
        kind, subject, digest = self._subject(call)
        self._obs(sid, f"approval_req:{tid}", "approval_requested",
                  {"request_id": tid, "action_kind": kind, "subject": subject, "action_digest": digest,
                   "risk": "unknown", "justification": call.get("description"),
                   "command_id": tid if kind == "exec" else None}, call["at"], call_id=tid)
        rule = text.strip().splitlines()[0][:300] if text.strip() else None
        said = {"user": "user rejected", "hook": "PreToolUse hook"}.get(by) or (
            "agentledger hook" if decider == "agentledger-hook" else "permission rules")
        self._obs(sid, f"approval:{tid}:decided", "approval_decided",
                  {"request_id": tid, "decision": "denied", "decided_by": by, "decider": decider,
                   "rule": "rejected by the user" if by == "user" else rule,
                   "latency_ms": dur if by == "user" else None, "action_digest": digest,
                   "scope": "once" if by == "user" else None, "reported_as": said}, at, call_id=tid)

    def _subject(self, call: dict) -> tuple[str, str, str]:
        """(action kind, subject, digest) of a call as an approver sees it (as the hook states them)."""
        tool = call["tool"]
        if tool in SHELL_TOOLS:
            argv, shell = command_argv(call["command"])
            return "exec", (shell or " ".join(argv))[:4000], action_digest(argv, call.get("cwd") or "")
        if tool in WRITE_TOOLS:
            return "patch", call["path"][:4000], action_digest(tool, call["path"])
        if tool in FETCH_TOOLS:
            return "network", call["url"].split("?")[0][:4000], action_digest(call["url"])
        what = call.get("path") or call.get("args") or ""
        return "permission", f"{tool} {what}"[:4000], action_digest(tool, what)

    def _bash_result(self, sid, tid: str, call: dict, text: str, is_error: bool, extra: Any, at: int, dur: int) -> None:
        info = extra if isinstance(extra, dict) else {}
        stdout = info.get("stdout") if isinstance(info.get("stdout"), str) else None
        stderr = info.get("stderr") if isinstance(info.get("stderr"), str) else ""
        if stdout is None:
            stdout = text
        code = as_int(info.get("exitCode", info.get("exit_code")))
        if code is None:
            m = _EXIT.search(text[:2000])
            code = int(m.group(1)) if m else (None if is_error else 0)
            if code is None:
                code = parse_exec_output(text)["exit_code"]
        interrupted = info.get("interrupted") is True or text.startswith(_INTERRUPTED)
        status = "killed" if interrupted else ("failed" if is_error or code not in (None, 0) else "completed")
        if is_error and not stderr and stdout == text:
            stdout, stderr = "", text  # an error result: the text is what the command wrote on failure
        self._finished(sid, tid, code, dur, status, stdout, stderr, at)
        if status == "failed":
            denial = infer_sandbox_denial(code if code is not None else 1, stderr, stdout)
            if denial:
                target = denial["target"] or call["command"]
                self._obs(sid, f"denied:{tid}", "sandbox_denied",
                          {"operation": denial["operation"], "target": str(target)[:1000], "rule": None,
                           "reason": denial["reason"], "command_id": tid, "inferred": True}, at, call_id=tid)

    def _finished(self, sid, tid: str, code: int | None, dur: int, status: str, stdout: str, stderr: str,
                  at: int, mcp: dict | None = None) -> None:
        payload = {"command_id": tid, "exit_code": code, "duration_ms": int(dur), "status": status,
                   "stdout": output_digest(stdout), "stderr": output_digest(stderr)}
        if mcp is not None:
            payload["mcp"] = mcp
        self._obs(sid, f"cmd:{tid}:finished", "command_finished", payload, at, call_id=tid, priority=P_RESULT)
