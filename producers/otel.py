"""OpenTelemetry log exports (OTLP/JSON) of Codex and Claude Code as observations.

Accepted layouts: one ``{"resourceLogs": [...]}`` document per file, one per line (the collector's
file exporter), or one bare log record per line; protobuf-JSON camelCase and snake_case keys; the
event name in ``eventName``, the ``event.name`` attribute or the body. Mapping:

* ``codex.conversation_starts`` -> session info (approval policy, sandbox mode, model, version).
* ``codex.tool_decision`` -> approval_decided (every spelling of the decision normalised; source
  Config -> policy, User -> user, AutomatedReviewer -> reviewer; scope once / session /
  persistent from approved / approved_for_session / approved_execpolicy_amendment; the source as
  read in ``reported_as``), request id = ``call_id``, so it
  meets the rollout's facts for the same call (a declined command and its denial become one
  decision).
* ``codex.tool_result`` -> command_started/finished for shell tools (start = end - duration),
  file_accessed for apply_patch; other tools are counted, not recorded.
* ``codex.network_proxy.policy_decision`` -> network_attempted + network_decided.
* ``claude_code.tool_decision`` (accept|reject; source config -> policy, hook -> hook,
  user_permanent -> user with scope persistent, user_temporary -> user with scope once,
  user_abort|user_reject -> user) -> approval_decided; ``claude_code.tool_result`` ->
  commands (Bash) and file writes (Edit/Write/MultiEdit/NotebookEdit); session id = ``session.id``.
* ``gemini_cli.tool_call`` (Gemini CLI; ``function_name``, ``function_args``, ``duration_ms``,
  ``success``, ``decision`` accept|reject|auto_accept|modify, ``error``, ``tool_type`` native|mcp,
  ``mcp_server_name``) -> MCP tool calls (command_started with the ``mcp`` record +
  command_finished: ok / error / declined) and shell commands (``run_shell_command``); a rejected
  call also approval_decided(denied, by the user); other tools are counted, not recorded. The
  records carry no call id: it is a digest of session, time, tool and arguments.

Other event names (prompts, API requests, SSE/token events) are counted as ignored; names we do
not know are counted as unknown types. Records without a session id are counted (``no_session``).
"""

from __future__ import annotations

import re
from typing import Any

from .counts import FileCounts
from .ledger import Observation, SessionInfo
from .normalize import (approval_decision, approval_policy, as_bool, as_int, claude_decision, command_argv,
                        decision_scope, decision_source, first, infer_sandbox_denial, inside, json_items, loads_bounded, looks_declined,
                        mcp_arguments_json, mcp_call, mcp_result, network_decision, network_protocol, parse_exec_output,
                        parse_patch, parse_time_us, resolve_path, sandbox_mode, scalar_text, short_digest)
from .recorder import output_digest

SOURCE = "otel"
P_DECIDED, P_START, P_FINISH, P_FILE, P_NET, P_INFO = 35, 10, 10, 10, 30, 10

CODEX_SHELL = frozenset({"shell", "shell_command", "exec_command", "container.exec", "local_shell", "bash",
                         "unified_exec", "exec", "Bash"})
CODEX_PATCH = frozenset({"apply_patch", "apply-patch"})
CLAUDE_FILE_TOOLS = frozenset({"Edit", "Write", "MultiEdit", "NotebookEdit"})
IGNORED_NAMES = frozenset({
    "codex.user_prompt", "codex.api_request", "codex.sse_event", "codex.websocket_request", "codex.websocket_event",
    "codex.sandbox_outcome", "codex.tool_call", "codex.compaction", "codex.response_completed",
    "claude_code.user_prompt", "claude_code.api_request", "claude_code.api_error", "claude_code.api_refusal",
    "claude_code.session", "claude_code.hook_execution", "claude_code.mcp_server_connection",
    "gemini_cli.config", "gemini_cli.user_prompt", "gemini_cli.api_request", "gemini_cli.api_response",
    "gemini_cli.api_error", "gemini_cli.tool_output_truncated", "gemini_cli.file_operation",
    "gemini_cli.slash_command", "gemini_cli.model_routing", "gemini_cli.chat_compression",
    "gemini_cli.conversation_finished", "gemini_cli.next_speaker_check", "gemini_cli.flash_fallback",
    "gemini_cli.extension_install", "gemini_cli.extension_enable", "gemini_cli.tool_call_decision"})
GEMINI_SHELL = frozenset({"run_shell_command", "shell"})
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


def _k(d: dict, *names: str) -> Any:
    for n in names:
        if n in d:
            return d[n]
    return None


def attr_value(v: Any) -> Any:
    """An OTLP AnyValue (camelCase or snake_case) as a Python value; plain values pass through."""
    if not isinstance(v, dict):
        return v
    for key in ("stringValue", "string_value"):
        if key in v:
            return v[key]
    for key in ("intValue", "int_value"):
        if key in v:
            return as_int(v[key]) if as_int(v[key]) is not None else v[key]
    for key in ("doubleValue", "double_value"):
        if key in v:
            return v[key]
    for key in ("boolValue", "bool_value"):
        if key in v:
            return as_bool(v[key])
    for key in ("arrayValue", "array_value"):
        if key in v:
            return [attr_value(x) for x in (v[key] or {}).get("values", [])]
    for key in ("kvlistValue", "kvlist_value"):
        if key in v:
            return attrs_dict((v[key] or {}).get("values", []))
    for key in ("bytesValue", "bytes_value"):
        if key in v:
            return v[key]
    return None if not v else v


def attrs_dict(attrs: Any) -> dict:
    if isinstance(attrs, dict):
        return {str(k): attr_value(v) for k, v in attrs.items()}
    out = {}
    for kv in json_items(attrs):
        if isinstance(kv, dict) and "key" in kv:
            out[str(kv["key"])] = attr_value(kv.get("value"))
    return out


_PREFIXED = re.compile(r"^(codex|claude_code|gemini_cli)\.")


def _event_name(rec: dict, a: dict, body: Any, scope: str) -> str | None:
    """The event name, prefixed. Claude Code puts the bare name in the ``event.name`` attribute
    (``tool_decision``) and the prefixed one in the body (``claude_code.tool_decision``), and some
    pipelines drop the body: then the prefix comes from the scope / service name or the id
    attribute only that agent sets (``session.id`` for Claude Code, ``conversation.id`` for Codex)."""
    named = [n for n in (_k(rec, "eventName", "event_name"), a.get("event.name")) if isinstance(n, str) and n.strip()]
    for n in named + ([body] if isinstance(body, str) else []):
        if _PREFIXED.match(n):
            return n
    if not named:
        return None
    bare = named[0].strip()
    if "." in bare:  # another namespace: counted as an unknown type under its own name
        return bare
    if "gemini" in scope.lower():
        return f"gemini_cli.{bare}"
    if "claude" in scope.lower() or ("session.id" in a and "conversation.id" not in a):
        return f"claude_code.{bare}"
    if "codex" in scope.lower() or "conversation.id" in a:
        return f"codex.{bare}"
    return bare


class OtelParser:
    kind = SOURCE

    def __init__(self, path: str, context: dict | None, file_index: int, counts: FileCounts):
        self.path = path
        self.counts = counts
        self.file_index = file_index
        self.ctx = dict(context or {})
        self.observations: list[Observation] = []
        self.infos: list[SessionInfo] = []
        self.end_hint = None
        self.sessions: set[str] = set()
        self.activity: dict[str, int] = {}
        self._offset = 0
        self._n = 0
        self._seen_keys: dict[str, int] = {}
        self._last_at = 0

    # -- entry points ---------------------------------------------------------------------
    def feed(self, obj: Any, offset: int, lineno: int) -> None:
        self._offset = offset
        if not isinstance(obj, dict):
            self.counts.not_object += 1
            return
        resource_logs = _k(obj, "resourceLogs", "resource_logs")
        if resource_logs is None and ("attributes" in obj or "eventName" in obj or "event_name" in obj):
            self._record(obj, {})  # a bare log record per line
            return
        if not isinstance(resource_logs, list):
            self.counts.bump("unknown_types", "(document without resourceLogs)")
            return
        for rl in resource_logs:
            if not isinstance(rl, dict):
                self.counts.not_object += 1
                continue
            res = rl.get("resource")
            resource = attrs_dict(res.get("attributes") if isinstance(res, dict) else None)
            for sl in json_items(_k(rl, "scopeLogs", "scope_logs", "instrumentationLibraryLogs")):
                if not isinstance(sl, dict):
                    self.counts.not_object += 1
                    continue
                scope = _k(sl, "scope", "instrumentationLibrary")
                scope_name = str(scope.get("name") or "") if isinstance(scope, dict) else ""
                if not scope_name:
                    scope_name = str(resource.get("service.name") or "")
                for rec in json_items(_k(sl, "logRecords", "log_records")):
                    if isinstance(rec, dict):
                        self._record(rec, resource, scope_name)
                    else:
                        self.counts.not_object += 1

    def garbage(self, offset: int, lineno: int, raw: bytes, reason: str, length: int | None = None) -> None:
        pass  # without a session to attach a gap to, a bad line is only counted and kept in rejects

    def finish(self, idle: bool) -> None:
        pass

    # -- records --------------------------------------------------------------------------
    def _record(self, rec: dict, resource: dict, scope: str = "") -> None:
        self.counts.records += 1
        self._n += 1
        a = attrs_dict(rec.get("attributes"))
        body = attr_value(rec.get("body"))
        name = _event_name(rec, a, body, scope)
        if not name:
            self.counts.bump("unknown_types", "(log record without event name)")
            return
        # A record with no usable time (OTLP sends "0" for unset) follows the one before it.
        at = (parse_time_us(_k(rec, "timeUnixNano", "time_unix_nano")) or parse_time_us(a.get("event.timestamp"))
              or parse_time_us(_k(rec, "observedTimeUnixNano", "observed_time_unix_nano")) or self._last_at)
        self._last_at = at
        sid = first(a, ("conversation.id", "session.id", "thread.id", "session_id")) or \
            first(resource, ("conversation.id", "session.id"))
        if name in IGNORED_NAMES:
            self.counts.ignored += 1
            return
        handler = {
            "codex.conversation_starts": self._conversation_starts,
            "codex.tool_decision": self._codex_decision,
            "codex.tool_result": self._codex_result,
            "codex.network_proxy.policy_decision": self._network_decision,
            "claude_code.tool_decision": self._claude_decision,
            "claude_code.tool_result": self._claude_result,
            "gemini_cli.tool_call": self._gemini_call,
        }.get(name)
        if handler is None:
            self.counts.bump("unknown_types", name)
            return
        if not sid:
            self.counts.no_session += 1
            return
        sid = str(sid).strip()
        sid = sid.lower() if _UUID.match(sid) else sid
        agent = "claude-code" if name.startswith("claude_code.") else "gemini-cli" if name.startswith("gemini_cli.") \
            else "codex"
        version = first(a, ("app.version",)) or first(resource, ("service.version",))
        self.sessions.add(sid)
        self.activity[sid] = max(self.activity.get(sid, 0), at)
        before = len(self.observations) + len(self.infos)
        handler(sid, agent, str(version) if version else None, at, a, rec)
        if len(self.observations) + len(self.infos) > before:
            self.counts.mapped += 1

    def _obs(self, sid, agent, version, fact, kind, payload, at, *, call_id=None, turn_id=None, priority=0):
        self.observations.append(Observation(sid, fact, kind, payload, at, turn_id=scalar_text(turn_id),
                                             tool_call_id=call_id,
                                             source=SOURCE, agent=agent, agent_version=version, priority=priority,
                                             order=(self.file_index, self._offset, self._n)))

    def _conversation_starts(self, sid, agent, version, at, a, rec):
        mode = sandbox_mode(a.get("sandbox_policy")) if a.get("sandbox_policy") is not None else "unknown"
        policy = approval_policy(a.get("approval_policy")) if a.get("approval_policy") is not None else "unknown"
        if a.get("sandbox_policy") is not None and mode == "unknown":
            self.counts.unknown_value("sandbox_policy", a.get("sandbox_policy"))
        if a.get("approval_policy") is not None and policy == "unknown":
            self.counts.unknown_value("approval_policy", a.get("approval_policy"))
        fields = {"agent": agent, "sandbox_mode": mode, "approval_policy": policy,
                  "model": scalar_text(a.get("model") or a.get("slug")),
                  "originator": scalar_text(a.get("originator") or a.get("source"))}
        self.infos.append(SessionInfo(sid, at, agent, SOURCE, fields, version, P_INFO))

    def _codex_decision(self, sid, agent, version, at, a, rec):
        call_id = str(a.get("call_id") or "")
        raw = a.get("decision")
        decision = approval_decision(raw)
        if decision == "unknown":
            self.counts.unknown_value("codex.tool_decision.decision", raw)
        by = decision_source(a.get("source"))
        if by == "unknown" and a.get("source") is not None:
            self.counts.unknown_value("codex.tool_decision.source", a.get("source"))
        request = call_id or "otel:" + short_digest(sid, at, a.get("tool_name"), raw)
        src = str(a.get("source"))[:200] if a.get("source") is not None else None
        self._obs(sid, agent, version, f"approval:{request}:decided", "approval_decided",
                  {"request_id": request, "decision": decision, "decided_by": by, "decider": src,
                   "rule": f"tool {a.get('tool_name')}"[:300] if a.get("tool_name") else None, "latency_ms": None,
                   "action_digest": None, "scope": decision_scope(raw), "reported_as": src},
                  at, call_id=call_id or None, turn_id=a.get("turn_id") or a.get("turn.id"), priority=P_DECIDED)

    def _codex_result(self, sid, agent, version, at, a, rec):
        tool = str(a.get("tool_name") or "")
        call_id = str(a.get("call_id") or "")
        args = a.get("arguments")
        if isinstance(args, str):
            try:
                args = loads_bounded(args) if args.strip().startswith(("{", "[")) else {"input": args}
            except ValueError:
                args = {"input": args}
        if not isinstance(args, dict):
            args = {"command": args}
        if not call_id:
            self.counts.orphans += 1
            return
        turn = a.get("turn_id") or a.get("turn.id")
        dur = as_int(a.get("duration_ms")) or 0
        if tool in CODEX_SHELL:
            parsed = command_argv(first(args, ("command", "cmd", "argv")))
            cwd = str(args.get("workdir") or args.get("cwd") or "")
            if parsed:
                argv, shell = parsed
                self._obs(sid, agent, version, f"cmd:{call_id}:started", "command_started",
                          {"command_id": call_id, "argv": argv, "shell": shell, "cwd": cwd, "env_names": [],
                           "sandbox_profile": None,
                           "escalated": str(args.get("sandbox_permissions") or "") == "require_escalated"},
                          max(0, at - dur * 1000), call_id=call_id, turn_id=turn, priority=P_START)
            res = parse_exec_output(a.get("output"))
            success = as_bool(a.get("success"))
            code = res["exit_code"]
            text = res["text"] or ""
            status = ("declined" if looks_declined(text) else
                      "completed" if (success is True and code in (None, 0)) or (success is None and code == 0) else "failed")
            self._obs(sid, agent, version, f"cmd:{call_id}:finished", "command_finished",
                      {"command_id": call_id, "exit_code": code, "duration_ms": dur, "status": status,
                       "stdout": output_digest(text), "stderr": output_digest("")},
                      at, call_id=call_id, turn_id=turn, priority=P_FINISH)
            if status == "failed":
                denial = infer_sandbox_denial(code if code is not None else 1, text)
                if denial:
                    target = denial["target"] or (parsed[1] or " ".join(parsed[0]) if parsed else call_id)
                    self._obs(sid, agent, version, f"denied:{call_id}", "sandbox_denied",
                              {"operation": denial["operation"], "target": str(target)[:1000], "rule": None,
                               "reason": denial["reason"], "command_id": call_id, "inferred": True},
                              at, call_id=call_id, turn_id=turn, priority=P_FINISH)
        elif tool in CODEX_PATCH:
            if as_bool(a.get("success")) is False:
                self.counts.ignored += 1  # a patch that did not apply changed no file
                return
            patch = str(args.get("input") or args.get("patch") or args.get("command") or "")
            for op in parse_patch(patch):
                path = op["path"]
                self._obs(sid, agent, version, f"file:{call_id}:{resolve_path(path, None)}", "file_accessed",
                          {"path": path, "operation": op["operation"], "new_path": op["new_path"], "command_id": None,
                           "inside_workspace": None},
                          at, call_id=call_id, turn_id=turn, priority=P_FILE)
        else:
            self.counts.ignored += 1

    def _network_decision(self, sid, agent, version, at, a, rec):
        host = str(first(a, ("server.address", "network.peer.address", "host", "url.domain")) or "")
        if not host:
            # Still a decision: recorded with the host unknown rather than dropped (and counted).
            self.counts.bump("unknown_values", "network policy decision without server.address")
            m = re.match(r"^[a-z][a-z0-9+.-]*://(?:[^/@]*@)?(\[[^\]]+\]|[^/:?#]+)", str(a.get("url.full") or ""), re.I)
            host = m.group(1).strip("[]") if m else "(unknown)"
        port = as_int(first(a, ("server.port", "network.peer.port", "port")))
        proto = network_protocol(first(a, ("network.transport.protocol", "network.protocol.name", "protocol")), port)
        if port is None:
            port = {"https": 443, "http": 80}.get(proto, 0)
        method = first(a, ("http.request.method", "http.method"))
        raw = first(a, ("network.policy.decision", "decision"))
        decision = network_decision(raw)
        if decision == "unknown":
            self.counts.unknown_value("network.policy.decision", raw)
        key = short_digest(sid, at, host, port, proto, method, raw)
        n = self._seen_keys.get(key, 0)
        self._seen_keys[key] = n + 1
        attempt = f"net-{key}" + (f"-{n}" if n else "")
        call_id = a.get("call_id")
        url = a.get("url.full")
        self._obs(sid, agent, version, f"net:{attempt}:attempted", "network_attempted",
                  {"attempt_id": attempt, "host": host, "port": int(port), "protocol": proto,
                   "method": str(method) if method else None, "url": str(url).split("?")[0] if url else None,
                   "command_id": str(call_id) if call_id else None},
                  at, call_id=str(call_id) if call_id else None, priority=P_NET)
        self._obs(sid, agent, version, f"net:{attempt}:decided", "network_decided",
                  {"attempt_id": attempt, "decision": decision,
                   "rule": str(a["network.policy.scope"]) if a.get("network.policy.scope") else None,
                   "reason": str(a["network.policy.reason"]) if a.get("network.policy.reason") else None,
                   "policy_source": str(a["network.policy.source"]) if a.get("network.policy.source") else None},
                  at, call_id=str(call_id) if call_id else None, priority=P_NET)

    def _gemini_call(self, sid, agent, version, at, a, rec):
        """A Gemini CLI tool call, reported once it ended (its args as a JSON string)."""
        name = a.get("function_name")
        if not isinstance(name, str) or not name.strip():
            self.counts.bump("unknown_values", "gemini_cli.tool_call without function_name")
            return
        raw_args = a.get("function_args")
        args: Any = raw_args if raw_args is not None else {}
        if isinstance(args, str):
            try:
                args = loads_bounded(args) if args.strip() else {}
            except ValueError:
                pass  # kept (and digested) as the string it is
        server = a.get("mcp_server_name")
        is_mcp = str(a.get("tool_type") or "").lower() == "mcp" or (isinstance(server, str) and bool(server.strip()))
        if not is_mcp and name not in GEMINI_SHELL:
            self.counts.ignored += 1
            return
        call_id = "gemini:" + short_digest(sid, at, name, a.get("prompt_id"), raw_args, n=20)
        dur = as_int(a.get("duration_ms")) or 0
        start = parse_time_us(a.get("start_time")) if a.get("start_time") is not None else None
        start = start if start is not None and start <= at else max(0, at - dur * 1000)
        decision = str(a.get("decision") or "").lower()
        declined = decision == "reject"
        success = as_bool(a.get("success"))
        error = str(a.get("error") or "")[:4000]
        if is_mcp:
            if not isinstance(server, str) or not server.strip():
                self.counts.bump("unknown_values", "gemini_cli.tool_call of an MCP tool without mcp_server_name")
                return
            tool = name
            for prefix in (f"mcp_{server}_", f"{server}__"):  # the names Gemini CLI gives MCP tools
                if tool.startswith(prefix) and len(tool) > len(prefix):
                    tool = tool[len(prefix):]
            argv = [f"mcp__{server}__{tool}", mcp_arguments_json(args)[:64_000]]
            started = {"command_id": call_id, "argv": argv, "shell": None, "cwd": "", "env_names": [],
                       "sandbox_profile": "mcp", "escalated": False, "mcp": mcp_call(server, tool, args)}
            outcome = "declined" if declined else "ok" if success is not False else "error"
            finish_extra = {"mcp": mcp_result(server, tool, outcome, error or ("rejected by the user" if declined else None))}
        else:
            parsed = command_argv(args.get("command") if isinstance(args, dict) else None)
            if parsed is None:
                self.counts.bump("unknown_values", "gemini_cli.tool_call run_shell_command without command")
                return
            argv, shell = parsed
            started = {"command_id": call_id, "argv": argv, "shell": shell,
                       "cwd": str(args.get("directory") or "") if isinstance(args, dict) else "", "env_names": [],
                       "sandbox_profile": None, "escalated": False}
            finish_extra = {}
        status = "declined" if declined else "completed" if success is not False else "failed"
        self._obs(sid, agent, version, f"cmd:{call_id}:started", "command_started", started, start,
                  call_id=call_id, priority=P_START)
        self._obs(sid, agent, version, f"cmd:{call_id}:finished", "command_finished",
                  {"command_id": call_id, "exit_code": None if declined else int(success is False), "duration_ms": dur,
                   "status": status, "stdout": output_digest(""), "stderr": output_digest(error), **finish_extra},
                  at, call_id=call_id, priority=P_FINISH)
        if declined:
            self._obs(sid, agent, version, f"approval:{call_id}:decided", "approval_decided",
                      {"request_id": call_id, "decision": "denied", "decided_by": "user", "decider": None,
                       "rule": f"tool {name}"[:300], "latency_ms": None, "action_digest": None},
                      at, call_id=call_id, priority=P_DECIDED)
        elif decision and decision not in ("accept", "auto_accept", "modify"):
            self.counts.unknown_value("gemini_cli.tool_call.decision", decision)

    def _claude_id(self, sid, at, a) -> str:
        tid = first(a, ("tool_use_id", "tool.use_id", "tool_call_id", "call_id"))
        return str(tid) if tid else "cc:" + short_digest(sid, at, a.get("tool_name"), a.get("event.sequence"), n=20)

    def _claude_decision(self, sid, agent, version, at, a, rec):
        request = self._claude_id(sid, at, a)
        raw, src = a.get("decision"), a.get("source")
        decision = claude_decision(raw, src)
        if decision == "unknown":
            self.counts.unknown_value("claude_code.tool_decision.decision", raw)
        by = decision_source(src)
        if by == "unknown" and src is not None:
            self.counts.unknown_value("claude_code.tool_decision.source", src)
        said = str(src)[:200] if src is not None else None
        self._obs(sid, agent, version, f"approval:{request}:decided", "approval_decided",
                  {"request_id": request, "decision": decision, "decided_by": by, "decider": said,
                   "rule": f"tool {a.get('tool_name')}"[:300] if a.get("tool_name") else None, "latency_ms": None,
                   "action_digest": None, "scope": decision_scope(raw, src), "reported_as": said},
                  at, call_id=request if not request.startswith("cc:") else None, priority=P_DECIDED)

    def _claude_result(self, sid, agent, version, at, a, rec):
        tool = str(a.get("tool_name") or "")
        params = a.get("tool_parameters") or a.get("tool_input")
        if isinstance(params, str):
            try:
                params = loads_bounded(params)
            except ValueError:
                params = {}
        params = params if isinstance(params, dict) else {}
        call_id = self._claude_id(sid, at, a)
        dur = as_int(a.get("duration_ms")) or 0
        success = as_bool(a.get("success"))
        if tool == "Bash":
            cmd = first(params, ("full_command", "bash_command", "command"))
            parsed = command_argv(cmd)
            if parsed is None:
                self.counts.bump("unknown_values", "claude_code.tool_result Bash without command")
                return
            argv, shell = parsed
            self._obs(sid, agent, version, f"cmd:{call_id}:started", "command_started",
                      {"command_id": call_id, "argv": argv, "shell": shell, "cwd": "", "env_names": [],
                       "sandbox_profile": None, "escalated": False},
                      max(0, at - dur * 1000), call_id=call_id, priority=P_START)
            error = str(a.get("error") or "")
            code = 0 if success else parse_exec_output(error)["exit_code"]
            self._obs(sid, agent, version, f"cmd:{call_id}:finished", "command_finished",
                      {"command_id": call_id, "exit_code": code,
                       "duration_ms": dur, "status": "completed" if success is not False else "failed",
                       "stdout": output_digest(""), "stderr": output_digest(error)},
                      at, call_id=call_id, priority=P_FINISH)
            denial = infer_sandbox_denial(code if code is not None else 1, error) if success is False else None
            if denial:
                self._obs(sid, agent, version, f"denied:{call_id}", "sandbox_denied",
                          {"operation": denial["operation"], "target": str(denial["target"] or shell or " ".join(argv))[:1000],
                           "rule": None, "reason": denial["reason"], "command_id": call_id, "inferred": True},
                          at, call_id=call_id, priority=P_FINISH)
        elif tool in CLAUDE_FILE_TOOLS:
            path = first(params, ("file_path", "notebook_path", "path"))
            if not path or success is False:
                self.counts.ignored += 1
                return
            path = resolve_path(str(path), None)
            self._obs(sid, agent, version, f"file:{call_id}:{path}", "file_accessed",
                      {"path": path, "operation": "write", "new_path": None, "command_id": None,
                       "inside_workspace": inside(path, None)},
                      at, call_id=call_id, priority=P_FILE)
        else:
            self.counts.ignored += 1
