"""Spellings of the same value differ between agents, versions and sources; these map them to the
event contract's enums. Pure functions, no I/O, shared by the importers and the hook.

Every mapper is total: an unknown spelling becomes ``unknown`` (the enums' default) and never
raises, because a new agent version must never stop an import.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import shlex
from typing import Any, Iterable

from agentledger.schemas.envelope import uuid7
# (the policy engine and the producers share how commands and URLs are read: they live in the core)
from agentledger.schemas.policy import network_protocol, urls_in, wrapped_command  # noqa: F401 (network_protocol, urls_in: for the producers)

# -- identifiers ------------------------------------------------------------------------------


def fact_event_id(session_id: str, fact: str, at_us: int) -> str:
    """Deterministic UUIDv7 of an event: the time from the source, the rest from what it states.

    The same fact imported twice (or by two processes) gets the same id, so ingest's event-id
    guard catches any duplicate that slipped past the importer's fact table.
    """
    digest = hashlib.sha256(f"{session_id}\x00{fact}".encode("utf-8", "surrogateescape")).digest()
    return uuid7(max(at_us, 0) // 1000, digest[:10])


def short_digest(*parts: Any, n: int = 24) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogateescape"))
        h.update(b"\x1f")
    return h.hexdigest()[:n]


def _alpha(v: Any) -> str:
    return re.sub(r"[^a-z]", "", str(v).lower())


# -- JSON from untrusted sources ----------------------------------------------------------------

MAX_JSON_DEPTH = 128  # arrays/objects inside each other; real agent records nest a few dozen at most


class JSONTooDeep(ValueError):
    """A JSON text nested deeper than the importers accept."""


def loads_bounded(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for text written by someone else: a document nested deeper than ``max_depth``
    raises `JSONTooDeep` (a ValueError, like any other unusable JSON) instead of a RecursionError
    from Python's parser -- or from any recursive walk of the result later on."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise JSONTooDeep(f"nested deeper than {max_depth} levels") from None
    opening = (text.count("[") + text.count("{")) if isinstance(text, str) else (text.count(b"[") + text.count(b"{"))
    if opening > max_depth and json_depth(obj, max_depth) > max_depth:
        raise JSONTooDeep(f"nested deeper than {max_depth} levels")
    return obj


def json_depth(obj: Any, stop: int | None = None) -> int:
    """How deeply arrays and objects nest in ``obj`` (a scalar: 0), without recursion; stops
    counting once ``stop`` is exceeded."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            items = o.values()
        elif isinstance(o, list):
            items = o
        else:
            continue
        deepest = max(deepest, d)
        if stop is not None and deepest > stop:
            break
        stack.extend((v, d + 1) for v in items if isinstance(v, (dict, list)))
    return deepest


# -- time -------------------------------------------------------------------------------------

_ISO = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?\s*(Z|z|[+-]\d{2}:?\d{2})?\s*$"
)


def parse_time_us(value: Any) -> int | None:
    """Microseconds since the epoch from ISO-8601 (any number of fraction digits, Z or offset,
    naive = UTC) or from epoch numbers (s, ms, us or ns, guessed by magnitude). None if unparseable,
    and for a time after the year 9999 (not finite, or beyond what an event id can hold)."""
    t = _time_us(value)
    return t if t is None or t <= MAX_TIME_US else None


MAX_TIME_US = 253402300799_999999  # 9999-12-31T23:59:59.999999Z


def _time_us(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = _num(value)  # (as a float, as always: the same value gives the same time as before)
        return _epoch_us(x) if x is not None else None
    if not isinstance(value, str):
        return None
    s = value.strip()
    if not s:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", s):
        if "." not in s:
            return _epoch_us_int(int(s))
        x = _num(s)
        return _epoch_us(x) if x is not None else None
    m = _ISO.match(s)
    if not m:
        return None
    y, mo, d, h, mi, sec, frac, tz = m.groups()
    try:
        base = dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec or 0), tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    us = int((frac or "0")[:6].ljust(6, "0"))
    offset = 0
    if tz and tz not in ("Z", "z"):
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:4]) * 60)
    return int(base.timestamp() - offset) * 1_000_000 + us


def _epoch_us_int(n: int) -> int | None:
    if n <= 0:
        return None
    if n > 10**17:  # ns
        return n // 1000
    if n > 10**14:  # us
        return n
    if n > 10**11:  # ms
        return n * 1000
    return n * 1_000_000


def _epoch_us(x: float) -> int | None:
    if x <= 0:
        return None
    if x > 1e17:
        return int(x / 1000)
    if x > 1e14:
        return int(x)
    if x > 1e11:
        return int(x * 1000)
    return int(x * 1_000_000)


def duration_ms(value: Any) -> int | None:
    """Codex durations: ``{"secs": s, "nanos": n}`` (Rust Duration), a number of ms, or "1.5s".
    None for anything else, and for a value no event can hold (not finite, beyond a 64-bit ms count)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, dict):
        secs = _num(value.get("secs", value.get("seconds", 0))) or 0
        nanos = _num(value.get("nanos", value.get("nanoseconds", 0))) or 0
        return _ms(secs * 1000 + nanos / 1e6)
    if isinstance(value, (int, float)):
        # A whole number is milliseconds (Codex's `duration_ms`); a fractional one is seconds, as
        # written by tools that serialise a Rust Duration with `as_secs_f64`.
        x = _num(value)
        if x is None:
            return None
        return _ms(x) if x.is_integer() else _ms(round(x * 1000))
    if not isinstance(value, str):
        return None
    s = value.strip().lower()
    m = re.fullmatch(r"([\d.]+)\s*(ms|s|sec|secs|seconds)?", s)
    if not m:
        return None
    x = _num(m.group(1))
    if x is None:
        return None
    if m.group(2):
        return _ms(x) if m.group(2) == "ms" else _ms(round(x * 1000))
    return _ms(x) if x.is_integer() else _ms(round(x * 1000))


MAX_MS = 2**63 - 1  # an Avro long


def _ms(x: float) -> int | None:
    return int(x) if math.isfinite(x) and abs(x) < MAX_MS else None


def _num(v: Any) -> float | None:
    """A finite number from a number or its text; None for anything else (NaN, infinities and
    integers too large for a float included: JSON allows them, no duration or count is one)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        x = float(v if isinstance(v, (int, float)) else v.strip())
    except (ValueError, OverflowError):
        return None
    return x if math.isfinite(x) else None


def type_name(v: Any) -> str | None:
    """A record's or block's ``type`` as a name to look up: a string or None as written; any other
    JSON value (a list or object is no key of a set) as a name that matches no known type."""
    return v if v is None or isinstance(v, str) else f"(type of JSON {type(v).__name__})"


def scalar_text(v: Any) -> str | None:
    """A name (a commit, a branch, a model) as text: a JSON string or number as written, None for
    nothing or for an array or object (no name is one)."""
    if v is None or v == "" or isinstance(v, (list, dict)):
        return None
    return str(v)


def json_items(v: Any) -> list:
    """The items of a JSON array; nothing for any other value (a source may write anything)."""
    return v if isinstance(v, list) else []


def as_int(v: Any) -> int | None:
    x = _num(v)
    if x is None or x != x or abs(x) > 2**31 - 1:
        return None
    return int(x)


def as_bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "ok", "success", "succeeded"):
        return True
    if s in ("false", "0", "no", "failed", "failure", "error"):
        return False
    return None


# -- policies ---------------------------------------------------------------------------------

def approval_policy(value: Any) -> str:
    """Codex AskForApproval in any spelling: untrusted|unless-trusted, on-failure, on-request,
    never, granular (also {granular: …} / {reject: …} objects)."""
    if isinstance(value, dict):
        keys = {_alpha(k) for k in value}
        if keys & {"granular", "reject"}:
            return "granular"
        for k in ("type", "mode", "policy"):
            if k in value:
                return approval_policy(value[k])
        return "unknown"
    a = _alpha(value)
    if a.startswith("granular") or a.startswith("reject"):
        return "granular"
    return {
        "untrusted": "untrusted", "unlesstrusted": "untrusted", "unlessallowlisted": "untrusted",
        "onfailure": "on_failure", "onrequest": "on_request", "never": "never",
    }.get(a, "unknown")


def sandbox_mode(value: Any) -> str:
    """Codex SandboxPolicy in any spelling: tagged object, kebab/snake/Camel string, or Debug text."""
    if isinstance(value, dict):
        for k in ("type", "mode", "sandbox", "sandbox_mode"):
            if k in value:
                return sandbox_mode(value[k])
        return "unknown"
    a = _alpha(value)
    for prefix, mode in (("readonly", "read_only"), ("workspacewrite", "workspace_write"),
                         ("dangerfullaccess", "danger_full_access"), ("externalsandbox", "external_sandbox"),
                         ("dangerouslyfullaccess", "danger_full_access"), ("fullaccess", "danger_full_access")):
        if a.startswith(prefix):
            return mode
    return "unknown"


def sandbox_details(value: Any) -> tuple[list[str], bool | None]:
    """Writable roots and network access stated by a sandbox policy, when it states them."""
    roots: list[str] = []
    network: bool | None = None
    if isinstance(value, dict):
        r = value.get("writable_roots")
        if isinstance(r, list):
            roots = [str(x) for x in r if isinstance(x, (str, int, float))]
        na = value.get("network_access")
        if isinstance(na, str):
            network = _alpha(na) in ("enabled", "true", "full", "allowed")
        elif na is not None:
            network = as_bool(na)
    elif isinstance(value, str):
        m = re.search(r"network_access:\s*(true|false|enabled|restricted)", value, re.I)
        if m:
            network = m.group(1).lower() in ("true", "enabled")
    return roots, network


def network_policy(mode: str, sandbox_network: bool | None, network: Any) -> dict:
    """NetworkPolicySummary from a turn's sandbox policy and its `network` settings."""
    allowed: list[str] = []
    denied: list[str] = []
    if isinstance(network, dict):
        allowed = [str(x) for x in json_items(network.get("allowed_domains")) if isinstance(x, str)]
        denied = [str(x) for x in json_items(network.get("denied_domains")) if isinstance(x, str)]
    if allowed:
        nmode = "allowlist"
    elif mode == "danger_full_access" or sandbox_network is True:
        nmode = "enabled"
    elif sandbox_network is False or mode == "read_only":
        nmode = "disabled"
    else:
        nmode = "unknown"
    return {"mode": nmode, "allowed_domains": allowed, "denied_domains": denied}


def permission_mode_policy(value: Any) -> str:
    """Claude Code / Codex hook ``permission_mode`` as the closest approval policy."""
    return {"default": "on_request", "bypasspermissions": "never", "dontask": "never",
            "acceptedits": "granular", "plan": "on_request"}.get(_alpha(value), "unknown")


# -- decisions --------------------------------------------------------------------------------

def approval_decision(value: Any) -> str:
    """Every spelling of a review decision: approved, approved_for_session / approvedforsession /
    acceptForSession, approved_execpolicy_amendment, network_policy_amendment, denied, abort,
    timed_out, Claude's accept / reject."""
    if isinstance(value, dict):
        for k in ("decision", "type", "value"):
            if k in value:
                return approval_decision(value[k])
        keys = " ".join(value)
        return approval_decision(keys)
    if value is None:
        return "unknown"
    a = _alpha(value)
    if not a:
        return "unknown"
    if a == "no":
        return "denied"
    if "forsession" in a or "execpolicyamendment" in a or "always" in a or "permanent" in a:
        return "approved_for_session"
    if "networkpolicyamendment" in a:
        return "denied" if "deny" in a else "approved_for_session"
    if a.startswith(("approve", "accept", "allow", "yes")):
        return "approved"
    if a.startswith(("timedout", "timeout", "expired")):
        return "timed_out"
    if a.startswith(("abort", "cancel", "interrupt")):
        return "aborted"
    if a.startswith(("denied", "deny", "reject", "decline", "block", "forbid", "refuse")):
        return "denied"
    return "unknown"


def decision_source(value: Any) -> str:
    """Who decided: Config / config -> policy, hook -> hook, User / user_* -> user,
    AutomatedReviewer / guardian -> reviewer."""
    a = _alpha(value)
    if not a:
        return "unknown"
    if a.startswith("hook"):
        return "hook"
    if a.startswith(("config", "policy", "execpolicy", "rule", "settings", "managed")):
        return "policy"
    if a.startswith(("automatedreviewer", "reviewer", "guardian", "autoreviewer", "classifier", "auto")):
        return "reviewer"
    if a.startswith("user"):
        return "user"
    return "unknown"


def decision_scope(decision: Any, source: Any = None) -> str | None:
    """How far a decision reaches, where the source says it (else None): Codex ``approved`` ->
    once, ``approved_for_session`` -> session, ``approved_execpolicy_amendment`` (a rule written to
    the exec policy) -> persistent; Claude Code ``user_permanent`` -> persistent,
    ``user_temporary`` -> once."""
    s = _alpha(source)
    if s == "userpermanent":
        return "persistent"
    if s == "usertemporary":
        return "once"
    raw = decision
    for _ in range(4):  # {"decision": {"approved_execpolicy_amendment": {...}}}: bounded
        if not isinstance(raw, dict):
            break
        raw = next((raw[k] for k in ("decision", "type", "value") if k in raw), None) or " ".join(map(str, raw))
    a = _alpha(raw) if raw is not None else ""
    if not a:
        return None
    if "execpolicyamendment" in a or "always" in a or "permanent" in a:
        return "persistent"
    if "forsession" in a:
        return "session"
    if a in ("approved", "approve", "accept", "allow", "yes"):
        return "once"
    return None


def claude_decision(decision: Any, source: Any) -> str:
    d = approval_decision(decision)
    s = _alpha(source)
    if d == "approved" and s == "userpermanent":
        return "approved_for_session"
    if s == "userabort":
        return "aborted"
    return d


def risk(value: Any) -> str:
    a = _alpha(value)
    return a if a in ("low", "medium", "high", "critical") else "unknown"


def network_decision(value: Any) -> str:
    a = _alpha(value)
    if a.startswith(("allow", "approve", "accept")):
        return "allow"
    if a.startswith(("deny", "denied", "block", "reject")):
        return "deny"
    if a.startswith(("ask", "prompt")):
        return "ask"
    return "unknown"


# -- commands ---------------------------------------------------------------------------------

def split_shell(command: str) -> list[str]:
    """Tokens of a shell string, for `argv`; the string itself goes to `shell`. Never raises."""
    try:
        parts = shlex.split(command, posix=True)
    except ValueError:
        parts = command.split()
    return parts or [command]


def command_argv(cmd: Any) -> tuple[list[str], str | None] | None:
    """(argv, shell string) from a command given as an argv list or a shell string."""
    if isinstance(cmd, list) and cmd and all(isinstance(x, (str, int, float)) for x in cmd):
        argv = [str(x) for x in cmd]
        # Codex wraps shell strings as [bash, -lc, "..."]: keep argv, expose the string too.
        return argv, wrapped_command(argv)
    if isinstance(cmd, str) and cmd.strip():
        return split_shell(cmd), cmd
    return None


_EXIT = [re.compile(p, re.I | re.M) for p in (r"^\s*exit code:?\s*(-?\d+)", r"process exited with code\s*(-?\d+)",
                                       r"exited with (?:exit )?code\s*(-?\d+)", r"^\s*exit status:?\s*(-?\d+)")]
_WALL = re.compile(r"wall time:\s*([\d.]+)\s*(?:seconds|s)\b", re.I)


def parse_exec_output(output: Any) -> dict:
    """Codex tool output in its known shapes: JSON ``{"output", "metadata": {"exit_code",
    "duration_seconds"}}``, an object ``{"content", "success"}``, or text with "Exit code: N" /
    "Process exited with code N" and "Wall time: X seconds" lines. Returns text, exit_code,
    duration_ms, success (each may be None)."""
    res: dict[str, Any] = {"text": "", "exit_code": None, "duration_ms": None, "success": None}
    obj = output
    if isinstance(output, str):
        s = output.strip()
        if s.startswith("{"):
            try:
                obj = loads_bounded(s)
            except ValueError:
                obj = output
    if isinstance(obj, dict):
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        text = obj.get("output", obj.get("content", obj.get("aggregated_output", "")))
        if isinstance(text, list):  # content items
            text = "\n".join(str(i.get("text", "")) if isinstance(i, dict) else str(i) for i in text)
        res["text"] = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        res["exit_code"] = as_int(meta.get("exit_code", obj.get("exit_code")))
        secs = _num(meta.get("duration_seconds", obj.get("duration_seconds")))
        if secs is not None:
            res["duration_ms"] = int(secs * 1000)
        res["success"] = as_bool(obj["success"]) if "success" in obj else None
    elif obj is not None:
        res["text"] = str(obj)
    text = res["text"]
    if res["exit_code"] is None:
        head = text[:2000]
        for rx in _EXIT:
            m = rx.search(head)
            if m:
                res["exit_code"] = int(m.group(1))
                break
    if res["duration_ms"] is None:
        m = _WALL.search(text[:2000])
        if m:
            res["duration_ms"] = int(float(m.group(1)) * 1000)
    return res


_DECLINED = re.compile(r"(rejected by (the )?user|declined by (the )?user|user (denied|declined|rejected)|"
                       r"exec command rejected|patch rejected by user|not approved by (the )?user|"
                       r"aborted by (the )?user|command was declined)", re.I)
_TIMEOUT = re.compile(r"(command timed out|timed out after|execution timed out)", re.I)


def looks_declined(text: str) -> bool:
    return bool(_DECLINED.search(text[:4000] if text else ""))


def looks_timed_out(text: str) -> bool:
    return bool(_TIMEOUT.search(text[:4000] if text else ""))


# Codex's own heuristic for "likely a sandbox denial" (codex-rs core `is_likely_sandbox_denied`),
# widened with the network messages a disabled-network sandbox produces.
_DENIAL = [
    (re.compile(r"read-only file system", re.I), "file_write"),
    (re.compile(r"failed to write file|cannot create .*: permission denied|can't create", re.I), "file_write"),
    (re.compile(r"operation not permitted", re.I), "permission"),
    (re.compile(r"permission denied", re.I), "permission"),
    (re.compile(r"\b(seccomp|landlock|sandbox-exec|sandbox(ed)? denied|denied by (the )?sandbox)\b", re.I), "permission"),
    (re.compile(r"(could not resolve host|temporary failure in name resolution|network is unreachable|"
                r"name or service not known)", re.I), "network"),
]
_PATH_IN = re.compile(r"(?:'|\"|`|\s|^)(/[^\s'\"`:]+|~/[^\s'\"`:]+|\.{1,2}/[^\s'\"`:]+)")


def infer_sandbox_denial(exit_code: int | None, *texts: str) -> dict | None:
    """A likely sandbox denial from a failed command's output, as the fields of sandbox_denied
    (operation, target or None, reason); None when nothing suggests one. Always marked inferred."""
    if exit_code is None or exit_code == 0:
        return None
    for text in texts:
        if not text:
            continue
        for line in text[:20000].splitlines():
            for rx, op in _DENIAL:
                if rx.search(line):
                    m = _PATH_IN.search(line)
                    return {"operation": op, "target": m.group(1) if m else None, "reason": line.strip()[:300]}
    return None


# -- patches ----------------------------------------------------------------------------------

_PATCH_OP = re.compile(r"^\*\*\* (Add|Update|Delete) File:\s*(.+?)\s*$")
_PATCH_MOVE = re.compile(r"^\*\*\* Move to:\s*(.+?)\s*$")


def parse_patch(text: str) -> list[dict]:
    """File operations of a Codex apply_patch envelope (``*** Begin Patch`` … ``*** End Patch``):
    [{"path", "operation": create|write|delete|rename, "new_path"}], in patch order."""
    ops: list[dict] = []
    for line in (text or "").splitlines():
        m = _PATCH_OP.match(line)
        if m:
            verb, path = m.groups()
            ops.append({"path": path, "operation": {"Add": "create", "Update": "write", "Delete": "delete"}[verb],
                        "new_path": None})
            continue
        m = _PATCH_MOVE.match(line)
        if m and ops and ops[-1]["operation"] in ("write", "rename"):
            ops[-1]["operation"] = "rename"
            ops[-1]["new_path"] = m.group(1)
    return ops


def patch_changes(changes: Any) -> list[dict]:
    """File operations of a ``patch_apply_*`` ``changes`` map, in either serde tagging:
    {path: {"type": "add"|"delete"|"update", "move_path": …}} or {path: {"add": {…}}}."""
    ops = []
    if not isinstance(changes, dict):
        return ops
    for path, ch in changes.items():
        kind, move = None, None
        if isinstance(ch, dict):
            if "type" in ch:
                kind = _alpha(ch.get("type"))
                move = ch.get("move_path") or ch.get("movePath")
            else:
                for k in ch:
                    if _alpha(k) in ("add", "delete", "update"):
                        kind = _alpha(k)
                        inner = ch[k] if isinstance(ch[k], dict) else {}
                        move = inner.get("move_path") or inner.get("movePath")
                        break
        elif isinstance(ch, str):
            kind = _alpha(ch)
        op = {"add": "create", "delete": "delete", "update": "write"}.get(kind or "", "write")
        if op == "write" and move:
            ops.append({"path": str(path), "operation": "rename", "new_path": str(move)})
        else:
            ops.append({"path": str(path), "operation": op, "new_path": None})
    return ops


def resolve_path(path: str, cwd: str | None, home: str | None = None) -> str:
    """An absolute, normalised path: relative to ``cwd``, ``~`` the home of the user who ran the
    session (``home``; this process's user's when None)."""
    if not path:
        return path
    if home and (path == "~" or path.startswith("~/")):
        p = home.rstrip("/") + path[1:]
    else:
        p = os.path.expanduser(path) if path.startswith("~") else path
    if not os.path.isabs(p) and cwd:
        p = os.path.join(cwd, p)
    return os.path.normpath(p) if os.path.isabs(p) else p


def inside(path: str, root: str | None) -> bool | None:
    if not root or not os.path.isabs(path):
        return None
    root = os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def first(d: dict, keys: Iterable[str], default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] not in (None, ""):
            return d[k]
    return default


# -- MCP tool calls ---------------------------------------------------------------------------

MCP_NAME_MAX = 200  # characters of a server or tool name kept (names come from the agent's config)
MCP_ERROR_MAX = 2000
_MCP_PREFIXED = re.compile(r"^mcp__(.+?)__(.+)$", re.S)


_MCP_CANCELLED = re.compile(r"user cancell?ed (the )?MCP tool call", re.I)


def mcp_refused(text: str) -> bool:
    """An MCP call's answer saying it never ran because the user refused or cancelled its approval
    (Codex: "user rejected MCP tool call", "user cancelled MCP tool call")."""
    head = (text or "")[:300]
    return looks_declined(head) or bool(_MCP_CANCELLED.search(head))


def mcp_split(name: Any) -> tuple[str, str] | None:
    """(server, tool) of a tool named ``mcp__<server>__<tool>`` (Claude Code, newer Codex), else None."""
    m = _MCP_PREFIXED.match(name) if isinstance(name, str) else None
    return (m[1], m[2]) if m and m[1].strip() and m[2].strip() else None


def mcp_arguments_json(args: Any) -> str:
    """The arguments as the command's second argv item (the form every importer and the hook record)."""
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False, sort_keys=True, default=str)


def mcp_call(server: str, tool: str, args: Any) -> dict:
    """The ``mcp`` record of a command_started: names (bounded) and the digest of the arguments as
    canonical JSON (`canonical_json_utf8`). Arguments given as a JSON string are parsed first, so the
    rollout's string and the hook's object of one call have one digest; a string that is no JSON
    is digested as a JSON string."""
    from agentledger.schemas.canonical import canonical_json_utf8

    if isinstance(args, str):
        try:
            args = loads_bounded(args) if args.strip() else {}
        except ValueError:
            pass
    try:
        data = canonical_json_utf8(args)
    except (TypeError, ValueError):  # NaN / Infinity / objects JSON has no form for: digest their text
        data = canonical_json_utf8(repr(args))
    return {"server": str(server)[:MCP_NAME_MAX], "tool": str(tool)[:MCP_NAME_MAX],
            "arguments_digest": "sha256:" + hashlib.sha256(data).hexdigest(), "arguments_size": len(data)}


def mcp_result(server: str, tool: str, outcome: str, error: Any = None) -> dict:
    """The ``mcp`` record of a command_finished: outcome ok / error / declined (else unknown)."""
    text = None if error is None or outcome == "ok" else str(error).strip()[:MCP_ERROR_MAX] or None
    return {"server": str(server)[:MCP_NAME_MAX], "tool": str(tool)[:MCP_NAME_MAX],
            "outcome": outcome if outcome in ("ok", "error", "declined") else "unknown", "error": text}
