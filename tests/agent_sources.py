"""Counting what Codex / Claude Code source files state, independently of the importers.

Used by the import tests to check the warehouse against the sources. Deliberately written from
the format notes (shared/notes/codex-formats.md), not from producers/: it must not share the
importers' mistakes.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

SHELL = {"shell", "shell_command", "exec_command", "container.exec", "local_shell"}
PATCH_LINE = re.compile(r"^\*\*\* (?:Add|Update|Delete) File: (.+)$")
CLAUDE_FILES = {"Edit", "Write", "MultiEdit", "NotebookEdit"}


def _abs(p: str, cwd: str) -> str:
    return os.path.normpath(p if p.startswith("/") else os.path.join(cwd, p))


def _patch_paths(text: str) -> list[str]:
    return [m.group(1).strip() for m in map(PATCH_LINE.match, text.splitlines()) if m]


def new_counts() -> dict:
    return {"commands": set(), "files": set(), "decisions": set(), "network": 0, "declined_patches": set()}


def _turn_policy(p: dict) -> tuple:
    """What a turn context says the session may do: approval policy, sandbox type, network access."""
    ap = p.get("approval_policy")
    ap = next(iter(ap)) if isinstance(ap, dict) and ap else ap
    sb = p.get("sandbox_policy")
    kind = (sb.get("type") or sb.get("mode")) if isinstance(sb, dict) else sb
    net = (p.get("network") or {}).get("allowed_domains") or (sb.get("network_access") if isinstance(sb, dict) else None)
    return ap, kind, str(net)


def count_rollout(path: Path, into: dict) -> None:
    sid, cwd, policy = None, "", None
    for raw in path.read_bytes().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(line, dict):
            continue
        if "payload" not in line and "id" in line and sid is None:  # legacy first line
            sid = line["id"]
            continue
        typ, p = line.get("type"), line.get("payload")
        if not isinstance(p, dict):  # legacy bare response item
            typ, p = "response_item", line
        if typ == "session_meta" and sid is None:
            sid, cwd = p["id"], p.get("cwd", "")
            continue
        if typ == "turn_context":
            cwd = p.get("cwd", cwd)
            now = _turn_policy(p)
            if policy is not None and now != policy:  # permissions changed mid-session: one granted request
                into[sid]["decisions"].add(f"policy:{p.get('turn_id')}")
            policy = now
            continue
        c = into[sid]
        t = p.get("type")
        if typ == "response_item":
            if t == "function_call" and p.get("name") in SHELL:
                c["commands"].add(p["call_id"])
            elif t == "local_shell_call":
                c["commands"].add(p.get("call_id") or p.get("id"))
            elif t == "custom_tool_call" and p.get("name") == "apply_patch":  # a patch is a command and its files
                c["commands"].add(p["call_id"])
                c["files"].update((p["call_id"], _abs(x, cwd)) for x in _patch_paths(p["input"]))
            elif t == "function_call" and p.get("name") == "apply_patch":
                c["commands"].add(p["call_id"])
                args = json.loads(p["arguments"])
                c["files"].update((p["call_id"], _abs(x, cwd)) for x in _patch_paths(args["input"]))
            elif t == "function_call" and "__" in str(p.get("name")):  # an MCP tool: <server>__<tool>
                c["commands"].add(p["call_id"])
            elif t == "function_call_output" and "rejected by user" in str(p.get("output")):
                c["decisions"].add(p["call_id"])
        elif typ == "event_msg":
            if t in ("exec_command_end", "exec_command_begin"):
                c["commands"].add(p["call_id"])
                if p.get("status") == "declined":
                    c["decisions"].add(p["call_id"])
            elif t in ("patch_apply_end", "patch_apply_begin"):
                if p.get("status") == "declined":
                    c["declined_patches"].add(p["call_id"])
                    c["decisions"].add(p["call_id"])
                else:
                    c["files"].update((p["call_id"], _abs(k, cwd)) for k in p.get("changes", {}))
            elif t == "guardian_assessment" and p.get("status") not in ("in_progress", None, ""):
                c["decisions"].add(p["id"])


def _attrs(rec: dict) -> dict:
    out = {}
    for kv in rec.get("attributes", []):
        v = kv["value"]
        out[kv["key"]] = next(iter(v.values())) if v else None
    return out


def count_otel(path: Path, into: dict) -> None:
    text = path.read_text()
    try:
        docs = [json.loads(text)]
    except ValueError:
        docs = [json.loads(x) for x in text.splitlines() if x.strip()]
    for doc in docs:
        for rl in doc.get("resourceLogs", doc.get("resource_logs", [])):
            for sl in rl.get("scopeLogs", rl.get("scope_logs", [])):
                for i, rec in enumerate(sl.get("logRecords", sl.get("log_records", []))):
                    a = _attrs(rec)
                    name = a.get("event.name")
                    sid = a.get("conversation.id") or a.get("session.id")
                    c = into[sid]
                    if name == "codex.tool_decision":
                        c["decisions"].add(a["call_id"])
                    elif name == "codex.tool_result" and a.get("tool_name") in SHELL:
                        c["commands"].add(a["call_id"])
                    elif name == "codex.tool_result" and a.get("tool_name") == "apply_patch":
                        c["files"].update((a["call_id"], x) for x in _patch_paths(json.loads(a["arguments"])["input"]))
                    elif name == "codex.network_proxy.policy_decision":
                        c["network"] += 1
                    elif name == "claude_code.tool_decision":
                        c["decisions"].add(a.get("tool_use_id") or f"{path}:{a.get('event.timestamp')}:{i}")
                    elif name == "claude_code.tool_result" and a.get("tool_name") == "Bash":
                        c["commands"].add(a["tool_use_id"])
                    elif (name == "claude_code.tool_result" and a.get("tool_name") in CLAUDE_FILES
                          and a.get("success") == "true"):
                        c["files"].add((a["tool_use_id"], json.loads(a["tool_parameters"])["file_path"]))


def count_sources(paths: list[Path]) -> dict[str, dict[str, int]]:
    """{session_id: {commands, files, decisions, network}} stated by the files, each fact once."""
    into: dict = defaultdict(new_counts)
    for p in paths:
        head = p.read_bytes()[:65536]
        if b"resourceLogs" in head or b"resource_logs" in head:
            count_otel(p, into)
        else:
            count_rollout(p, into)
    out = {}
    for sid, c in into.items():
        files = {f for f in c["files"] if f[0] not in c["declined_patches"]}
        out[sid] = {"commands": len(c["commands"]), "files": len(files), "decisions": len(c["decisions"]),
                    "network": c["network"]}
    return out
