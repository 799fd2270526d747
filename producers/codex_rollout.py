"""Codex rollout files (``$CODEX_HOME/sessions/YYYY/MM/DD/rollout-<ts>-<uuid>.jsonl``) as observations.

One JSON object a line, ``{"timestamp", "type", "payload"}``; also the legacy layout of early
Codex versions (a bare session-meta first line, then bare response items). Mapping:

* ``session_meta`` + the first ``turn_context`` -> session_started (cwd, git, originator,
  approval policy, sandbox mode, writable roots, network policy, model); the session id is the
  Codex session id. Until a turn context (or any mapped record) arrives the start is held back
  in the file's context, so a session imported while waiting for its first prompt still gets its
  policies.
* shell ``function_call`` (``shell`` with an argv array, ``shell_command`` / ``exec_command``
  with a string, ``container.exec``), ``local_shell_call``, ``exec_command_begin/end`` ->
  command_started / command_finished (exit code, duration, status, output digest + excerpt);
  ``sandbox_permissions: require_escalated`` (or ``with_escalated_permissions``) + justification
  -> approval_requested; a declined command -> command_finished(declined) + approval_decided
  (denied, by the user); a failed command whose output reads like a sandbox denial ->
  sandbox_denied(inferred).
* ``apply_patch`` (``custom_tool_call`` or ``function_call``) and ``patch_apply_end`` -> one
  file_accessed per changed path (create / write / delete / rename); the call itself is also a
  command_started ``["apply_patch", <patch text>]`` (+ command_finished from its output), the
  shape Codex gives a patch run through the shell tool, so what a patch wrote is recorded (and
  redacted) like any command line and detection can judge a patch by its content.
* MCP tool calls (``function_call`` named ``<server>__<tool>`` or ``mcp__<server>__<tool>``, or
  with a ``namespace``; ``mcp_tool_call`` / ``mcp_tool_call_output`` response items;
  ``mcp_tool_call_begin/end``) -> command_started ``["mcp__<server>__<tool>", <arguments JSON>]``
  with ``sandbox_profile = "mcp"`` and its ``mcp`` record (server, tool, digest of the arguments'
  canonical JSON), and command_finished with the result's text and ``mcp`` outcome: ``error``
  when the server said ``isError`` or the call failed (``Err``), ``declined`` when Codex refused
  it ("user rejected MCP tool call": also approval_decided(denied, by the user), as a declined
  command), else ``ok``. Malformed MCP items are skipped and counted (``unknown_values``, with
  the reason).
* ``web_search_call`` opening a page (``open_page`` / ``find_in_page`` with a URL) ->
  network_attempted (GET of that URL; no decision is recorded in rollouts).
* a later ``turn_context`` whose approval policy, sandbox mode or network access differs from the
  turn before -> approval_requested(permission, "policy changed: approval_policy on_request ->
  never; …") + approval_decided(approved, by ``unknown``): the permissions the session ran with
  changed mid-session, and the change took effect.
* ``guardian_assessment`` -> approval_requested + approval_decided(decided_by=reviewer).
* turn ids and call ids go to ``turn_id`` / ``tool_call_id`` of every event.

Everything else is counted (`FileCounts`): known-but-unrecorded records, unknown types, unknown
fields, unknown enum spellings. ``compacted.replacement_history`` replays old items and is never
re-imported.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

from .counts import FileCounts
from .ledger import Observation, SessionInfo
from .normalize import (approval_decision, approval_policy, as_int, command_argv, duration_ms, first,
                        infer_sandbox_denial, inside, loads_bounded, looks_declined, looks_timed_out, mcp_arguments_json,
                        mcp_call, mcp_refused, mcp_result, mcp_split, network_policy, parse_exec_output, parse_patch, parse_time_us,
                        patch_changes, resolve_path, risk, sandbox_details, sandbox_mode, scalar_text, short_digest, type_name)
from .recorder import action_digest, output_digest

SOURCE = "codex_rollout"
AGENT = "codex"

SHELL_TOOLS = frozenset({"shell", "shell_command", "exec_command", "container.exec", "local_shell", "bash",
                         "unified_exec", "exec"})
PATCH_TOOLS = frozenset({"apply_patch", "apply-patch", "applypatch"})

# Priorities among observations of one fact in one import (higher wins).
P_START_CALL, P_START_EXEC, P_FINISH_EXEC, P_FINISH_OUTPUT = 30, 20, 40, 30
P_FILE_END, P_FILE_CALL = 30, 20
P_REQ_ESCALATION, P_REQ_GUARDIAN = 30, 20
P_DECIDED_GUARDIAN, P_DECIDED_DECLINED = 40, 10
P_INFO = 20
MAX_OPEN_CALLS = 5000

_UUID = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", re.I)

KNOWN_TOP = frozenset({"timestamp", "type", "payload"})
KNOWN_META = frozenset({"id", "timestamp", "cwd", "originator", "cli_version", "instructions", "source",
                        "model_provider", "git", "base_instructions", "forked_from_id", "agent_nickname",
                        "agent_role", "dynamic_tools", "memory_mode", "model", "meta", "thread_source",
                        "agent_path", "user_instructions", "environment_context"})
KNOWN_TURN = frozenset({"turn_id", "cwd", "approval_policy", "sandbox_policy", "network", "model", "effort",
                        "summary", "user_instructions", "developer_instructions", "final_output_json_schema",
                        "truncation_policy", "personality", "collaboration_mode", "current_date", "timezone",
                        "realtime_active", "reasoning_effort", "trace_id", "permission_profile", "shell",
                        "file_system_sandbox_policy", "network_sandbox_policy", "environment", "windows_sandbox_level"})
RESPONSE_TYPES = frozenset({"message", "reasoning", "function_call", "function_call_output", "custom_tool_call",
                            "custom_tool_call_output", "local_shell_call", "web_search_call", "tool_search_call",
                            "tool_search_output", "image_generation_call", "compaction", "compaction_summary",
                            "ghost_snapshot", "other", "mcp_tool_call", "mcp_tool_call_output"})
IGNORED_EVENTS = frozenset({
    "user_message", "agent_message", "agent_reasoning", "agent_reasoning_raw_content", "agent_reasoning_section_break",
    "token_count", "entered_review_mode", "exited_review_mode", "context_compacted", "thread_rolled_back",
    "undo_started", "undo_completed", "stream_error", "warning", "background_event", "plan_update",
    "web_search_begin", "web_search_end", "view_image_tool_call",
    "item_started", "item_completed", "agent_message_delta", "agent_message_content_delta", "reasoning_content_delta",
    "turn_diff", "session_configured", "mcp_startup_update", "mcp_startup_complete", "deprecation_notice",
    "exec_command_output_delta", "terminal_interaction", "turn_started", "shutdown_complete", "image_generation_end",
    "collab_agent_spawn_begin", "collab_agent_spawn_end", "collab_agent_interaction_begin",
    "collab_agent_interaction_end", "collab_waiting_begin", "collab_waiting_end", "hook_started", "hook_completed",
    "raw_response_item", "list_skills_response", "realtime_conversation_started", "model_reroute",
    "thread_name_updated", "request_user_input", "elicitation_request", "dynamic_tool_call_request",
    "dynamic_tool_call_response", "patch_apply_begin_delta", "plan_delta"})
IGNORED_TOP = frozenset({"compacted", "state"})
# event_msg types Codex writes only in its extended persistence mode (the default, limited mode writes
# no *_begin events and no exec_command_end): they tell the two apart (coverage statements).
EXTENDED_EVENTS = frozenset({"exec_command_begin", "exec_command_end", "patch_apply_begin", "mcp_tool_call_begin"})


_HEREDOC_PATCH = re.compile(r"(?:^|[;&|]\s*|\s)apply_patch\s*<<-?\s*['\"]?(\w+)['\"]?\s*\n(.*?)\n\1\s*$", re.S)


def shell_patch(argv: list[str], shell: str | None) -> str | None:
    """The patch of an ``apply_patch`` run through the shell tool -- ``["apply_patch", patch]`` or
    ``bash -lc "[cd dir &&] apply_patch <<'EOF' … EOF"`` (the forms Codex intercepts) -- else None."""
    if len(argv) == 2 and os.path.basename(argv[0]) in PATCH_TOOLS and "*** Begin Patch" in argv[1]:
        return argv[1]
    if shell and "apply_patch" in shell and "*** Begin Patch" in shell:
        m = _HEREDOC_PATCH.search(shell.strip())
        if m:
            return m.group(2)
    return None


MAX_TOOL_ARGUMENTS = 64_000
_MCP_NAME = re.compile(r"^(?:mcp__)?([A-Za-z0-9][A-Za-z0-9_.-]*?)__([A-Za-z0-9_.-]+)$")


def mcp_tool(name: str, namespace: Any = None) -> str | None:
    """``mcp__<server>__<tool>`` for a function call that is an MCP tool call (Codex names them
    ``<server>__<tool>``, newer versions and Claude Code ``mcp__<server>__<tool>``), else None."""
    if isinstance(namespace, str) and namespace and "__" not in name and name:
        return f"mcp__{namespace.removeprefix('mcp__')}__{name}"
    m = _MCP_NAME.match(name or "")
    return f"mcp__{m[1]}__{m[2]}" if m else None


def _tool_failed(output: Any) -> bool | None:
    """An MCP result's ``isError`` (also inside a JSON string), else None."""
    obj = output
    if isinstance(output, str) and output.lstrip().startswith("{"):
        try:
            obj = loads_bounded(output)
        except ValueError:
            return None
    if isinstance(obj, dict):
        for k in ("isError", "is_error"):
            if k in obj:
                return bool(obj[k])
        if obj.get("success") is not None:
            return not bool(obj["success"])
    return None


def session_id_from_path(path: str) -> str | None:
    m = _UUID.findall(os.path.basename(path))
    return m[-1].lower() if m else None


class RolloutParser:
    """Incremental: ``context`` (from the previous import of this file) carries what later lines
    need -- session id, current turn, cwd, calls still open -- so a grown file is read from its
    stored offset only."""

    kind = SOURCE

    def __init__(self, path: str, context: dict | None, file_index: int, counts: FileCounts):
        self.path = path
        self.counts = counts
        self.file_index = file_index
        ctx = dict(context or {})
        ctx.setdefault("session_id", None)
        ctx.setdefault("calls", {})
        ctx.setdefault("guardian", {})
        self.ctx = ctx
        self.observations: list[Observation] = []
        self.infos: list[SessionInfo] = []
        self.end_hint: str | None = None
        self._unattributed: list[Observation] = []
        self._sub = 0
        self._offset = 0
        self._mapped = False

    # -- helpers --------------------------------------------------------------------------
    @property
    def session_id(self) -> str | None:
        return self.ctx["session_id"]

    def _at(self, ts: Any) -> int:
        t = parse_time_us(ts)
        last = self.ctx.get("last_us")
        if t is None:
            # No timestamp (legacy lines): keep source order, just after the previous record.
            t = (last or 0) + 1
        self.ctx["last_us"] = max(t, last or 0)
        return t

    def _obs(self, fact: str, kind: str, payload: dict, at: int, *, turn_id=None, call_id=None, priority=0) -> None:
        self._sub += 1
        o = Observation(self.session_id or "", fact, kind, payload, at, turn_id=turn_id or self.ctx.get("turn_id"),
                        tool_call_id=call_id, source=SOURCE, agent=AGENT, agent_version=self.ctx.get("version"),
                        priority=priority, order=(self.file_index, self._offset, self._sub))
        self._mapped = True
        if self.session_id:
            self.observations.append(o)
        else:
            self._unattributed.append(o)

    def _cwd(self) -> str:
        return self.ctx.get("cwd") or ""

    # -- entry points ---------------------------------------------------------------------
    def feed(self, obj: Any, offset: int, lineno: int) -> None:
        self._offset = offset
        self._mapped = False
        if not isinstance(obj, dict):
            self.counts.not_object += 1
            return
        self.counts.records += 1
        typ = type_name(obj.get("type"))
        payload = obj.get("payload")
        if typ is None and "record_type" in obj:
            self.counts.ignored += 1
            return
        if typ is None and ("id" in obj and ("timestamp" in obj or "instructions" in obj)) and not self.ctx.get("meta_seen"):
            self._session_meta(obj, obj.get("timestamp"))  # legacy first line
        elif isinstance(typ, str) and not isinstance(payload, dict) and typ in RESPONSE_TYPES:
            self._response_item(obj, self._at(obj.get("timestamp")))  # legacy bare response item
        elif not isinstance(payload, dict):
            self.counts.bump("unknown_types", f"{typ}" if typ else "(no type)")
            return
        else:
            self.counts.unknown_keys("line", obj, KNOWN_TOP)
            at = self._at(obj.get("timestamp"))
            if typ == "session_meta":
                self._session_meta(payload, obj.get("timestamp"))
            elif typ == "turn_context":
                self._turn_context(payload, at)
            elif typ == "response_item":
                self._response_item(payload, at)
            elif typ == "event_msg":
                self._event_msg(payload, at)
            elif typ in IGNORED_TOP:
                self.counts.ignored += 1
            else:
                self.counts.bump("unknown_types", str(typ))
        if self._mapped:
            self.counts.mapped += 1

    def garbage(self, offset: int, lineno: int, raw: bytes, reason: str, length: int | None = None) -> None:
        """A line we cannot use: a gap in the session so the loss shows in its timeline. ``raw`` may
        be only the start of the line (an over-long one); ``length`` is then its full size."""
        self._offset = offset
        at = (self.ctx.get("last_us") or 0) + 1
        self._obs(f"gap:src:{short_digest(raw, offset, n=20)}", "gap",
                  {"gap_kind": "source_incomplete", "reason": f"{os.path.basename(self.path)} line {lineno}: {reason}",
                   "field": None, "lost_events": None, "lost_bytes": len(raw) if length is None else length,
                   "first_lost_at": None,
                   "last_lost_at": None, "related_seq": None}, at)

    def coverage_mode(self) -> str | None:
        """The persistence mode this rollout was written in, from what it holds (producers/coverage.py):
        "extended" once any exec_command_end / *_begin line was read, "limited" once a tool
        output or the file's end was read without one, None while it cannot be told yet."""
        if self.ctx.get("extended"):
            return "extended"
        return "limited" if self.ctx.get("outputs_seen") or self.ctx.get("idle_seen") else None

    def finish(self, idle: bool) -> None:
        """End of the bytes available now. ``idle``: the source looks finished, so a session start
        held back for lack of a turn context is released with what is known."""
        if idle:
            self.ctx["idle_seen"] = True
        if not self.session_id:
            sid = session_id_from_path(self.path)
            if sid and (self._unattributed or self.ctx.get("meta")):
                self.ctx["session_id"] = sid
        if self._unattributed:
            if self.session_id:
                for o in self._unattributed:
                    o.session_id = self.session_id
                self.observations += self._unattributed
            else:  # (a gap stands for a line already counted as unusable: not counted twice)
                self.counts.no_session += sum(1 for o in self._unattributed if o.kind != "gap")
            self._unattributed = []
        calls = self.ctx["calls"]
        if len(calls) > MAX_OPEN_CALLS:  # calls never answered: keep the most recent ones
            for k in sorted(calls, key=lambda c: calls[c].get("at", 0))[:len(calls) - MAX_OPEN_CALLS]:
                del calls[k]
        declined = set(self.ctx.pop("declined_patches", []))
        if declined:
            # A declined patch changed nothing: drop the file events its call announced in this import.
            self.observations = [o for o in self.observations
                                 if not (o.kind == "file_accessed" and o.tool_call_id in declined)]
        if self.session_id and self.ctx.get("meta") is not None and not self.ctx.get("info_done"):
            if self.observations or idle:
                self._emit_info(None, self.ctx["meta"].get("at") or self.ctx.get("last_us") or 0)

    # -- session --------------------------------------------------------------------------
    def _session_meta(self, p: dict, ts: Any) -> None:
        if isinstance(p.get("meta"), dict):  # SessionMetaLine { meta, git } in some versions
            p = {**p["meta"], **{k: v for k, v in p.items() if k != "meta"}}
        self.counts.unknown_keys("session_meta", p, KNOWN_META)
        sid = p.get("id") or p.get("session_id") or p.get("conversation_id")
        if self.ctx.get("meta_seen"):
            # A resumed or forked rollout may repeat its meta (or carry its parent's): the first one
            # names this file's session.
            self.counts.ignored += 1
            return
        if not isinstance(sid, str) or not sid.strip():
            sid = session_id_from_path(self.path)
        at = parse_time_us(p.get("timestamp")) or parse_time_us(ts) or self.ctx.get("last_us") or 0
        self.ctx["last_us"] = max(at, self.ctx.get("last_us") or 0)
        self.ctx["meta_seen"] = True
        self.ctx["session_id"] = sid.strip().lower() if isinstance(sid, str) and _UUID.fullmatch(sid.strip()) else sid
        self.ctx["version"] = str(p["cli_version"]) if p.get("cli_version") else None
        if p.get("cwd"):
            self.ctx["cwd"] = str(p["cwd"])
        git = p.get("git") if isinstance(p.get("git"), dict) else None
        source = p.get("source")
        if isinstance(source, dict):
            originator = "subagent" if any("subagent" in str(k).lower() for k in source) else json.dumps(source)[:60]
        elif isinstance(source, str) and source:
            originator = source
        else:
            originator = p.get("originator")
        self.ctx["meta"] = {
            "at": at,
            "cwd": str(p.get("cwd") or ""),
            "originator": str(originator) if originator else None,
            "git": ({"commit": scalar_text(first(git, ("commit_hash", "commit", "sha"))),
                     "branch": scalar_text(git.get("branch")),
                     "repository_url": scalar_text(first(git, ("repository_url", "remote_url", "url")))}
                    if git else None),
            "model": scalar_text(p.get("model")),
        }
        self._mapped = True

    def _turn_context(self, p: dict, at: int) -> None:
        self.counts.unknown_keys("turn_context", p, KNOWN_TURN)
        if p.get("turn_id"):
            self.ctx["turn_id"] = str(p["turn_id"])
        if p.get("cwd"):
            self.ctx["cwd"] = str(p["cwd"])
        mode = sandbox_mode(p.get("sandbox_policy")) if "sandbox_policy" in p else "unknown"
        if "sandbox_policy" in p and mode == "unknown":
            self.counts.unknown_value("sandbox_policy", p.get("sandbox_policy"))
        policy = approval_policy(p.get("approval_policy")) if "approval_policy" in p else "unknown"
        if "approval_policy" in p and policy == "unknown":
            self.counts.unknown_value("approval_policy", p.get("approval_policy"))
        roots, net = sandbox_details(p.get("sandbox_policy"))
        self.ctx["sandbox"] = mode
        turn = {"cwd": str(p.get("cwd") or ""), "sandbox_mode": mode, "approval_policy": policy,
                "writable_roots": roots, "network_policy": network_policy(mode, net, p.get("network")),
                "model": scalar_text(p.get("model"))}
        now = {"approval_policy": policy, "sandbox_mode": mode, "network": turn["network_policy"]["mode"]}
        before = self.ctx.get("policy")
        self.ctx["policy"] = {k: v if v != "unknown" else (before or {}).get(k, v) for k, v in now.items()}
        if self.session_id and not self.ctx.get("info_done"):
            self._emit_info(turn, at)
        elif before is not None and self.session_id:
            self._policy_change(before, now, at)
        else:
            self.counts.ignored += 1

    def _policy_change(self, before: dict, now: dict, at: int) -> None:
        """A turn that runs under other permissions than the turn before: a permission request that
        was granted (who granted it -- the user, a config reload -- is not in the rollout)."""
        changes = [f"{k} {before.get(k, 'unknown')} -> {v}" for k, v in now.items()
                   if v != "unknown" and before.get(k, "unknown") != v]
        if not changes:
            self.counts.ignored += 1
            return
        subject = "policy changed: " + "; ".join(changes)
        rid = f"policy:{self.ctx.get('turn_id') or at}"
        loosened = now["approval_policy"] == "never" or now["sandbox_mode"] == "danger_full_access" \
            or (now["network"] == "enabled" and before.get("network") != "enabled")
        digest = action_digest("policy", subject)
        self._obs(f"approval_req:{rid}", "approval_requested",
                  {"request_id": rid, "action_kind": "permission", "subject": subject, "action_digest": digest,
                   "risk": "high" if loosened else "low", "justification": "turn context", "command_id": None},
                  at, priority=P_REQ_ESCALATION)
        self._obs(f"approval:{rid}:decided", "approval_decided",
                  {"request_id": rid, "decision": "approved", "decided_by": "unknown", "decider": None,
                   "rule": "turn context", "latency_ms": None, "action_digest": digest},
                  at, priority=P_DECIDED_GUARDIAN)

    def _emit_info(self, turn: dict | None, at: int) -> None:
        meta = self.ctx.get("meta") or {}
        fields = {k: v for k, v in meta.items() if k != "at"}
        if turn:
            for k, v in turn.items():
                if v not in (None, "", "unknown", []) and not (k == "cwd" and fields.get("cwd")):
                    fields[k] = v
        fields["agent"] = AGENT
        start_at = meta.get("at") or at
        self.infos.append(SessionInfo(self.session_id, start_at, AGENT, SOURCE, fields, self.ctx.get("version"), P_INFO))
        self.ctx["info_done"] = True
        self.ctx.pop("meta", None)
        self._mapped = True

    # -- response items -------------------------------------------------------------------
    def _response_item(self, p: dict, at: int) -> None:
        t = type_name(p.get("type"))
        if t == "function_call":
            name = str(p.get("name") or "")
            args = p.get("arguments")
            if isinstance(args, str):
                try:
                    args = loads_bounded(args) if args.strip() else {}
                except ValueError:
                    args = {"input": args} if name in PATCH_TOOLS else {"command": args}
            call_id = str(p.get("call_id") or p.get("id") or "")
            if not isinstance(args, dict):
                args = {"command": args}
            if name in SHELL_TOOLS or name.endswith((".shell", "__shell")):
                self._exec_call(call_id, args, at)
            elif name in PATCH_TOOLS:
                self._patch_call(call_id, str(args.get("input") or args.get("patch") or args.get("command") or ""), at)
            elif (tool := mcp_tool(name, p.get("namespace"))) is not None:
                self._tool_call(call_id, tool, args, at)
            else:
                self.counts.ignored += 1
                if call_id:  # its output is then known, not an orphan
                    self.ctx["calls"][call_id] = {"kind": "other", "at": at}
        elif t == "local_shell_call":
            action = p.get("action") if isinstance(p.get("action"), dict) else {}
            call_id = str(p.get("call_id") or p.get("id") or "")
            self._exec_call(call_id, {"command": action.get("command"), "workdir": action.get("working_directory"),
                                      "timeout_ms": action.get("timeout_ms"), "env": action.get("env")}, at)
        elif t == "custom_tool_call":
            name = str(p.get("name") or "")
            if name in PATCH_TOOLS:
                self._patch_call(str(p.get("call_id") or p.get("id") or ""), str(p.get("input") or ""), at)
            else:
                self.counts.ignored += 1
                if p.get("call_id"):
                    self.ctx["calls"][str(p["call_id"])] = {"kind": "other", "at": at}
        elif t in ("function_call_output", "custom_tool_call_output"):
            self._call_output(str(p.get("call_id") or ""), p.get("output"), at)
        elif t == "mcp_tool_call":
            self._mcp_item(p, at)
        elif t == "mcp_tool_call_output":
            call_id = str(p.get("call_id") or "")
            if not call_id:
                self.counts.bump("unknown_values", "mcp_tool_call_output without call_id")
            else:
                out = p.get("output")
                if str(p.get("status") or "").lower() in ("failed", "error", "incomplete") and _tool_failed(out) is None:
                    out = {"content": [{"type": "text", "text": parse_exec_output(out)["text"] or ""}], "isError": True}
                self._call_output(call_id, out, at)
        elif t == "web_search_call":
            self._web(p, at)
        elif t in RESPONSE_TYPES:
            self.counts.ignored += 1
        else:
            self.counts.bump("unknown_types", f"response_item/{t}")

    def _exec_call(self, call_id: str, args: dict, at: int) -> None:
        cmd = first(args, ("command", "cmd", "argv", "script"))
        parsed = command_argv(cmd)
        if parsed is None or not call_id:
            self.counts.bump("unknown_values", "shell call without a command or call_id")
            return
        argv, shell = parsed
        cwd = resolve_path(str(args.get("workdir") or args.get("cwd") or ""), self._cwd()) or self._cwd()
        perm = str(args.get("sandbox_permissions") or "")
        escalated = perm in ("require_escalated", "with_additional_permissions") or bool(
            args.get("with_escalated_permissions") is True)
        justification = args.get("justification")
        env = args.get("env")
        env_names = sorted(str(k) for k in env)[:200] if isinstance(env, dict) else []  # names only, never values
        self._obs(f"cmd:{call_id}:started", "command_started",
                  {"command_id": call_id, "argv": argv, "shell": shell, "cwd": cwd, "env_names": env_names,
                   "sandbox_profile": self.ctx.get("sandbox") if not escalated else "escalated",
                   "escalated": escalated},
                  at, call_id=call_id, priority=P_START_CALL)
        if escalated:
            subject = shell or " ".join(argv)
            self._obs(f"approval_req:{call_id}", "approval_requested",
                      {"request_id": call_id, "action_kind": "exec" if perm != "with_additional_permissions" else "permission",
                       "subject": subject[:4000], "action_digest": action_digest(argv, cwd), "risk": "unknown",
                       "justification": str(justification) if justification else None, "command_id": call_id},
                      at, call_id=call_id, priority=P_REQ_ESCALATION)
        self.ctx["calls"][call_id] = {"kind": "exec", "at": at, "argv": argv[:50], "shell": (shell or "")[:2000],
                                      "cwd": cwd, "turn": self.ctx.get("turn_id")}
        patch = shell_patch(argv, shell)
        if patch is not None:
            # Codex intercepts `apply_patch` run through the shell tool and applies it as a patch:
            # the files it names change like those of an apply_patch call.
            self.ctx["calls"][call_id]["patch"] = True
            self._file_ops(call_id, parse_patch(patch), at, P_FILE_CALL, cwd=cwd)

    def _patch_call(self, call_id: str, patch: str, at: int) -> None:
        ops = parse_patch(patch)
        if not call_id:
            self.counts.bump("unknown_values", "apply_patch without call_id")
            return
        # the patch is the action: recorded as the command Codex runs for a patch given to its shell tool
        argv = ["apply_patch", patch]
        self._obs(f"cmd:{call_id}:started", "command_started",
                  {"command_id": call_id, "argv": argv, "shell": None, "cwd": self._cwd(), "env_names": [],
                   "sandbox_profile": self.ctx.get("sandbox"), "escalated": False},
                  at, call_id=call_id, priority=P_START_CALL)
        self.ctx["calls"][call_id] = {"kind": "exec", "at": at, "argv": ["apply_patch"], "shell": "", "cwd": self._cwd(),
                                      "turn": self.ctx.get("turn_id"), "patch": True}
        self._file_ops(call_id, ops, at, P_FILE_CALL)
        if not ops:
            self.counts.bump("unknown_values", "apply_patch without file operations")

    def _tool_call(self, call_id: str, tool: str, args: Any, at: int, priority: int = P_START_CALL,
                   names: tuple[str, str] | None = None) -> None:
        """An MCP tool call: a command named after the tool, its arguments as JSON (see the module doc)."""
        if not call_id:
            self.counts.bump("unknown_values", "tool call without call_id")
            return
        names = names or mcp_split(tool)
        if names is None:
            self.counts.bump("unknown_values", "MCP tool call without server or tool")
            return
        arguments = mcp_arguments_json(args)
        self._obs(f"cmd:{call_id}:started", "command_started",
                  {"command_id": call_id, "argv": [tool, arguments[:MAX_TOOL_ARGUMENTS]], "shell": None, "cwd": self._cwd(),
                   "env_names": [], "sandbox_profile": "mcp", "escalated": False,
                   "mcp": mcp_call(names[0], names[1], args)},
                  at, call_id=call_id, priority=priority)
        if self.ctx["calls"].get(call_id, {}).get("kind") != "done":
            self.ctx["calls"][call_id] = {"kind": "exec", "at": at, "argv": [tool], "shell": "", "cwd": self._cwd(),
                                          "turn": self.ctx.get("turn_id"), "tool": True, "mcp": list(names)}

    def _mcp_item(self, p: dict, at: int) -> None:
        """A ``mcp_tool_call`` response item (newer rollouts): ``name`` (maybe ``<server>__<tool>``),
        the server in ``server`` / ``server_label`` / ``namespace``, ``arguments`` (object or JSON string)."""
        call_id = str(p.get("call_id") or p.get("id") or "")
        name = p.get("name") if isinstance(p.get("name"), str) else p.get("tool")
        server = next((p[k] for k in ("server", "server_label", "namespace") if isinstance(p.get(k), str) and p[k]), None)
        if not call_id or not isinstance(name, str) or not name:
            self.counts.bump("unknown_values", "mcp_tool_call without call_id or name")
            return
        tool = mcp_tool(name, server) if server else mcp_tool(name)
        if tool is None:
            self.counts.bump("unknown_values", "mcp_tool_call without a server")
            return
        args = p.get("arguments", p.get("input"))
        if isinstance(args, str) and len(args) > MAX_TOOL_ARGUMENTS * 4:
            self.counts.bump("unknown_values", "mcp_tool_call arguments too long")
            args = args[:MAX_TOOL_ARGUMENTS]
        if isinstance(args, str):
            try:
                args = loads_bounded(args) if args.strip() else {}
            except ValueError:
                pass  # kept as the string it is (and digested as one)
        self._tool_call(call_id, tool, args if args is not None else {}, at)

    def _web(self, p: dict, at: int) -> None:
        """A page the web tool opened: a GET of its URL (searches carry no destination: not recorded)."""
        action = p.get("action") if isinstance(p.get("action"), dict) else {}
        url = action.get("url") if isinstance(action.get("url"), str) else None
        parsed = urlsplit(url) if url else None
        if not parsed or parsed.scheme not in ("http", "https") or not parsed.hostname:
            self.counts.ignored += 1
            return
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError:
            port = 443 if parsed.scheme == "https" else 80
        attempt = str(p.get("call_id") or p.get("id") or short_digest(url, at))
        self._obs(f"net:{attempt}:attempted", "network_attempted",
                  {"attempt_id": attempt, "host": parsed.hostname, "port": port, "protocol": parsed.scheme,
                   "method": "GET", "url": url[:4000], "command_id": None},
                  at, call_id=attempt, priority=P_START_CALL)

    def _file_ops(self, call_id: str, ops: list[dict], at: int, priority: int, turn_id: str | None = None,
                  cwd: str | None = None) -> None:
        base = cwd or self._cwd()
        for op in ops:
            path = resolve_path(op["path"], base)
            new_path = resolve_path(op["new_path"], base) if op.get("new_path") else None
            self._obs(f"file:{call_id}:{path}", "file_accessed",
                      {"path": path, "operation": op["operation"], "new_path": new_path, "command_id": None,
                       "inside_workspace": inside(path, self._cwd())},
                      at, call_id=call_id, priority=priority, turn_id=turn_id)

    def _call_output(self, call_id: str, output: Any, at: int) -> None:
        self.ctx["outputs_seen"] = True
        call = self.ctx["calls"].get(call_id)
        if call is None:
            self.counts.orphans += 1
            return
        if call.get("kind") == "done":
            self.counts.ignored += 1  # already finished by its exec_command_end
            self.ctx["calls"].pop(call_id, None)
            return
        if call["kind"] != "exec":
            self.counts.ignored += 1
            self.ctx["calls"].pop(call_id, None)
            return
        res = parse_exec_output(output)
        text = res["text"] or ""
        if call.get("tool"):
            failed = _tool_failed(output)
            # Codex answers a refused MCP call with a bare text ("user rejected MCP tool call"), not a result
            declined = failed is None and mcp_refused(text)
            status = "declined" if declined else "failed" if failed else "completed"
            server, tool = (call.get("mcp") or [None, None])[:2]
            mcp = mcp_result(server, tool, "declined" if declined else "error" if failed else "ok",
                             text if (failed or declined) else None) if server else None
            self._finished(call_id, None if failed is None else int(failed), max(0, (at - call["at"]) // 1000),
                           status, text, "", at, P_FINISH_OUTPUT, call.get("turn"), None, infer_denial=False, mcp=mcp)
            self.ctx["calls"].pop(call_id, None)
            return
        declined = looks_declined(text)
        status = "declined" if declined else ("timed_out" if looks_timed_out(text) else None)
        code = res["exit_code"]
        if status is None:
            if res["success"] is False or (code not in (None, 0)):
                status = "failed"
            else:
                status = "completed"
        dur = res["duration_ms"] if res["duration_ms"] is not None else max(0, (at - call["at"]) // 1000)
        self._finished(call_id, code, dur, status, text, "", at, P_FINISH_OUTPUT, call.get("turn"), call)
        self.ctx["calls"].pop(call_id, None)

    def _finished(self, call_id: str, code: int | None, dur: int, status: str, stdout: str, stderr: str, at: int,
                  priority: int, turn_id: str | None, call: dict | None, infer_denial: bool = True,
                  mcp: dict | None = None) -> None:
        payload = {"command_id": call_id, "exit_code": code, "duration_ms": int(dur), "status": status,
                   "stdout": output_digest(stdout), "stderr": output_digest(stderr)}
        if mcp is not None:
            payload["mcp"] = mcp
        self._obs(f"cmd:{call_id}:finished", "command_finished", payload,
                  at, call_id=call_id, priority=priority, turn_id=turn_id)
        if status == "declined":
            self._obs(f"approval:{call_id}:decided", "approval_decided",
                      {"request_id": call_id, "decision": "denied", "decided_by": "user", "decider": None,
                       "rule": "command declined", "latency_ms": None, "action_digest": None,
                       "scope": "once", "reported_as": "declined"},
                      at, call_id=call_id, priority=P_DECIDED_DECLINED, turn_id=turn_id)
            if (call or {}).get("patch"):
                self.ctx.setdefault("declined_patches", []).append(call_id)
        elif status == "failed" and infer_denial:
            denial = infer_sandbox_denial(code if code is not None else 1, stderr, stdout)
            if denial:
                target = denial["target"] or (call or {}).get("shell") or " ".join((call or {}).get("argv") or []) or call_id
                self._obs(f"denied:{call_id}", "sandbox_denied",
                          {"operation": denial["operation"], "target": str(target)[:1000], "rule": None,
                           "reason": denial["reason"], "command_id": call_id, "inferred": True},
                          at, call_id=call_id, priority=priority, turn_id=turn_id)

    # -- event messages -------------------------------------------------------------------
    def _event_msg(self, p: dict, at: int) -> None:
        t = type_name(p.get("type"))
        turn = str(p["turn_id"]) if p.get("turn_id") else None
        if t in EXTENDED_EVENTS:
            self.ctx["extended"] = True  # written only in extended persistence mode (coverage statements)
        if t == "exec_command_end":
            self._exec_end(p, at, turn)
        elif t == "exec_command_begin":
            call_id = str(p.get("call_id") or "")
            parsed = command_argv(p.get("command"))
            if call_id and parsed:
                argv, shell = parsed
                cwd = resolve_path(str(p.get("cwd") or ""), self._cwd()) or self._cwd()
                self._obs(f"cmd:{call_id}:started", "command_started",
                          {"command_id": call_id, "argv": argv, "shell": shell, "cwd": cwd, "env_names": [],
                           "sandbox_profile": self.ctx.get("sandbox"), "escalated": False},
                          at, call_id=call_id, priority=P_START_EXEC, turn_id=turn)
        elif t in ("mcp_tool_call_begin", "mcp_tool_call_end"):
            self._mcp_event(t, p, at, turn)
        elif t in ("patch_apply_end", "patch_apply_begin"):
            call_id = str(p.get("call_id") or "")
            status = str(p.get("status") or "").lower()
            if status == "declined":
                self._obs(f"approval:{call_id}:decided", "approval_decided",
                          {"request_id": call_id, "decision": "denied", "decided_by": "user", "decider": None,
                           "rule": "patch declined", "latency_ms": None, "action_digest": None,
                           "scope": "once", "reported_as": "declined"},
                          at, call_id=call_id, priority=P_DECIDED_DECLINED, turn_id=turn)
                self.ctx.setdefault("declined_patches", []).append(call_id)
            elif call_id:
                self._file_ops(call_id, patch_changes(p.get("changes")), at, P_FILE_END, turn)
        elif t == "guardian_assessment":
            self._guardian(p, at, turn)
        elif t in ("exec_approval_request", "apply_patch_approval_request", "request_permissions"):
            call_id = str(p.get("call_id") or p.get("id") or "")
            if call_id:
                parsed = command_argv(p.get("command"))
                subject = (parsed[1] or " ".join(parsed[0])) if parsed else ", ".join(map(str, (p.get("changes") or {})))
                self._obs(f"approval_req:{call_id}", "approval_requested",
                          {"request_id": call_id, "action_kind": "exec" if t == "exec_approval_request" else
                           ("patch" if t == "apply_patch_approval_request" else "permission"),
                           "subject": (subject or t)[:4000], "action_digest": action_digest(subject, p.get("cwd") or ""),
                           "risk": "unknown", "justification": p.get("reason"), "command_id": call_id},
                          at, call_id=call_id, priority=P_REQ_ESCALATION, turn_id=turn)
        elif t in ("task_started", "turn_started"):
            if turn:
                self.ctx["turn_id"] = turn
            self.counts.ignored += 1
        elif t in ("task_complete", "turn_complete"):
            self.end_hint = "completed"
            self.counts.ignored += 1
        elif t == "turn_aborted":
            self.end_hint = "interrupted"
            self.counts.ignored += 1
        elif t == "error":
            self.end_hint = "error"
            self.counts.ignored += 1
        elif t in IGNORED_EVENTS:
            self.counts.ignored += 1
        else:
            self.counts.bump("unknown_types", f"event_msg/{t}")

    def _mcp_event(self, t: str, p: dict, at: int, turn: str | None) -> None:
        call_id = str(p.get("call_id") or "")
        inv = p.get("invocation") if isinstance(p.get("invocation"), dict) else {}
        server, name = inv.get("server"), inv.get("tool") or inv.get("tool_name")
        if not call_id or not isinstance(server, str) or not isinstance(name, str):
            self.counts.bump("unknown_values", f"{t} without call_id, server or tool")
            return
        if not server.strip() or not name.strip():
            self.counts.bump("unknown_values", f"{t} with an empty server or tool name")
            return
        tool = f"mcp__{server}__{name}"
        if t == "mcp_tool_call_begin":
            self._tool_call(call_id, tool, inv.get("arguments") or {}, at, priority=P_START_EXEC, names=(server, name))
            return
        dur = duration_ms(p.get("duration"))
        start = at - (dur or 0) * 1000
        self._tool_call(call_id, tool, inv.get("arguments") or {}, start, priority=P_START_EXEC, names=(server, name))
        result = p.get("result")
        ok = result.get("Ok", result.get("ok")) if isinstance(result, dict) else None
        err = result.get("Err", result.get("err")) if isinstance(result, dict) else None
        if isinstance(ok, dict):
            text, failed = parse_exec_output(ok)["text"] or "", bool(ok.get("isError") or ok.get("is_error"))
        else:
            text = (err if isinstance(err, str) else json.dumps(err, default=str)[:MAX_TOOL_ARGUMENTS]) if err is not None else ""
            failed = err is not None
            if err is None and ok is None:
                self.counts.bump("unknown_values", "mcp_tool_call_end without an Ok or Err result")
        declined = err is not None and mcp_refused(text)
        outcome = "declined" if declined else "error" if failed else "ok"
        self._finished(call_id, None if declined else int(failed), dur or 0,
                       "declined" if declined else "failed" if failed else "completed", text, "", at,
                       P_FINISH_EXEC, turn, None, infer_denial=False,
                       mcp=mcp_result(server, name, outcome, text if outcome != "ok" else None))
        self.ctx["calls"][call_id] = {"kind": "done", "at": at}

    def _exec_end(self, p: dict, at: int, turn: str | None) -> None:
        call_id = str(p.get("call_id") or "")
        if not call_id:
            self.counts.bump("unknown_values", "exec_command_end without call_id")
            return
        call = self.ctx["calls"].pop(call_id, None)
        if call is not None and call.get("kind") == "exec":
            # The model's function_call_output for this call usually follows: expected, not an orphan.
            self.ctx["calls"][call_id] = {"kind": "done", "at": at}
        dur = duration_ms(p.get("duration"))
        if dur is None:
            dur = as_int(p.get("duration_ms"))
        if dur is None:
            dur = max(0, (at - call["at"]) // 1000) if call else 0
        parsed = command_argv(p.get("command"))
        if parsed:
            argv, shell = parsed
            cwd = resolve_path(str(p.get("cwd") or ""), self._cwd()) or self._cwd()
            self._obs(f"cmd:{call_id}:started", "command_started",
                      {"command_id": call_id, "argv": argv, "shell": shell, "cwd": cwd, "env_names": [],
                       "sandbox_profile": self.ctx.get("sandbox"), "escalated": False},
                      max(0, at - dur * 1000), call_id=call_id, priority=P_START_EXEC, turn_id=turn)
        elif call is None:
            self.counts.orphans += 1
            return
        code = as_int(p.get("exit_code"))
        status = str(p.get("status") or "").lower()
        stdout = p.get("stdout") if isinstance(p.get("stdout"), str) else ""
        stderr = p.get("stderr") if isinstance(p.get("stderr"), str) else ""
        if not stdout and not stderr and isinstance(p.get("aggregated_output"), str):
            stdout = p["aggregated_output"]
        if status not in ("completed", "failed", "declined", "timed_out", "killed"):
            if status:
                self.counts.unknown_value("exec_command_end.status", status)
            text = stdout + "\n" + stderr + "\n" + str(p.get("formatted_output") or "")
            status = ("declined" if looks_declined(text) else "timed_out" if looks_timed_out(text)
                      else "completed" if code == 0 else "failed")
        self._finished(call_id, code, dur, status, stdout, stderr, at, P_FINISH_EXEC, turn or (call or {}).get("turn"),
                       call or {"argv": parsed[0] if parsed else [], "shell": parsed[1] if parsed else None})

    def _guardian(self, p: dict, at: int, turn: str | None) -> None:
        action = p.get("action") if isinstance(p.get("action"), dict) else {}
        call_id = str(first(p, ("call_id", "target_call_id")) or first(action, ("call_id",)) or p.get("id") or "")
        if not call_id:
            self.counts.bump("unknown_values", "guardian_assessment without id")
            return
        status = str(p.get("status") or "").lower()
        atype = str(action.get("type") or "").lower()
        kind = {"command": "exec", "execve": "exec", "exec": "exec", "shell": "exec", "apply_patch": "patch",
                "patch": "patch", "network_access": "network", "network": "network"}.get(atype, "permission")
        parsed = command_argv(first(action, ("command", "argv", "cmd")))
        subject = ((parsed[1] or " ".join(parsed[0])) if parsed else
                   str(first(action, ("host", "target", "path", "url", "files")) or atype or "action"))
        digest = action_digest(parsed[0] if parsed else subject, action.get("cwd") or "")
        g = self.ctx["guardian"].setdefault(call_id, {"at": at})
        self._obs(f"approval_req:{call_id}", "approval_requested",
                  {"request_id": call_id, "action_kind": kind, "subject": subject[:4000], "action_digest": digest,
                   "risk": risk(p.get("risk_level")), "justification": p.get("justification") or action.get("justification"),
                   "command_id": call_id if kind == "exec" else None},
                  g["at"], call_id=call_id, priority=P_REQ_GUARDIAN, turn_id=turn)
        if status in ("in_progress", "pending", "started", ""):
            return
        decision = approval_decision(status)
        if decision == "unknown":
            self.counts.unknown_value("guardian_assessment.status", status)
        rationale = p.get("rationale")
        self._obs(f"approval:{call_id}:decided", "approval_decided",
                  {"request_id": call_id, "decision": decision, "decided_by": "reviewer", "decider": "guardian",
                   "rule": (f"guardian: {rationale}"[:500] if rationale else None),
                   "latency_ms": max(0, (at - g["at"]) // 1000) if g["at"] < at else None, "action_digest": digest,
                   "scope": "once", "reported_as": "guardian_assessment"},
                  at, call_id=call_id, priority=P_DECIDED_GUARDIAN, turn_id=turn)
        self.ctx["guardian"].pop(call_id, None)
