"""The MCP tool-definition store: what each MCP server's ``tools/list`` answered, as
`agentledger mcp proxy` (producers/mcpproxy.py) saw it, so that every MCP call can name the
definition in force when it was made (``McpCall.definition_digest``) and a definition that changed
after the user approved the tool ("rug pull", tool poisoning) shows (`agentledger mcp drift`).

``<home>/mcp/definitions.jsonl``, append-only, one JSON object a line::

    {"server", "tool", "definition_digest", "description_digest", "input_schema_digest",
     "description" (redacted, at most 4,000 characters), "first_seen", "listed_at"}

(times in microseconds since the epoch). A line is appended only when the definition of
(server, tool) differs from its latest line: ``listed_at`` is the listing that introduced it,
``first_seen`` the first listing of this definition ever (earlier when it came back). Writers
hold an exclusive ``flock`` on ``definitions.lock``; readers skip lines that are too long or no
JSON object (a damaged line never hides the others).

Digests are ``sha256:<hex>`` of canonical JSON (`canonical_json_utf8`): the definition over
``{"name", "description", "inputSchema", "annotations"}`` (absent ones as null), the description
over its string, the input schema over ``inputSchema``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from agentledger.schemas.canonical import canonical_json_utf8

log = logging.getLogger(__name__)

DESCRIPTION_MAX = 4000  # characters of a description kept (redacted)
REDACT_WINDOW = 2 * DESCRIPTION_MAX  # characters redacted before the cut (a secret across the cut is redacted whole)
NAME_MAX = 200  # characters of a server or tool name (as normalize.MCP_NAME_MAX)
LINE_MAX = 64 * 1024  # bytes of one store line read (longer ones are skipped)
STORE_MAX = 64 * 1024 * 1024  # bytes of the store read at most (the newest ones)
TOOLS_MAX = 10_000  # tools of one tools/list page recorded
SESSION_TOOLS_MAX = 1000  # definitions in a session_started (the event's size is bounded)
SESSION_DESCRIPTIONS_MAX = 300_000  # characters of descriptions in a session_started; beyond: digests only


def store_path(home: Path | str) -> Path:
    return Path(home) / "mcp" / "definitions.jsonl"


def _digest(obj: Any) -> str:
    try:
        data = canonical_json_utf8(obj)
    except (TypeError, ValueError):  # NaN / Infinity: digest their text
        data = canonical_json_utf8(repr(obj))
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tool_digests(tool: dict) -> dict:
    """definition_digest, description_digest and input_schema_digest of one tools/list entry."""
    return {"definition_digest": _digest({k: tool.get(k) for k in ("name", "description", "inputSchema", "annotations")}),
            "description_digest": _digest(tool.get("description")),
            "input_schema_digest": _digest(tool.get("inputSchema"))}


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def name_key(name: str) -> str:
    """A server or tool name as the agents spell it in ``mcp__<server>__<tool>`` (Claude Code and
    Codex replace characters other than letters, digits, ``_`` and ``-`` by ``_``)."""
    return _NAME_CHARS.sub("_", str(name)[:NAME_MAX])


def definition_entries(server: str, tools: Any, listed_at_us: int,
                       redact: Callable[[str], str] | None = None) -> list[dict]:
    """Store entries of one tools/list page (``result.tools``): tools without a string name are skipped."""
    out: list[dict] = []
    if not isinstance(tools, list):
        return out
    for tool in tools[:TOOLS_MAX]:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            continue
        desc = tool.get("description")
        text: str | None = None
        if desc is not None:  # redact returns None when descriptions cannot be redacted (then not kept)
            text = desc[:REDACT_WINDOW] if isinstance(desc, str) else \
                json.dumps(desc, ensure_ascii=False, default=str)[:REDACT_WINDOW]
            text = redact(text) if redact is not None else text
            text = text[:DESCRIPTION_MAX] if isinstance(text, str) else None
        out.append({"server": str(server)[:NAME_MAX], "tool": tool["name"][:NAME_MAX], **tool_digests(tool),
                    "description": text, "first_seen": listed_at_us, "listed_at": listed_at_us})
    return out


def read_entries(home: Path | str) -> list[dict]:
    """Every well-formed line of the store, in file order (none when there is no store)."""
    path = store_path(home)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > STORE_MAX:
                f.seek(size - STORE_MAX)
                f.readline()  # a partial line
            data = f.read(STORE_MAX)
    except OSError:
        return []
    out = []
    for raw in data.split(b"\n"):
        if not raw.strip() or len(raw) > LINE_MAX:
            continue
        try:
            e = json.loads(raw)
        except ValueError:
            continue
        if (isinstance(e, dict) and isinstance(e.get("server"), str) and isinstance(e.get("tool"), str)
                and isinstance(e.get("definition_digest"), str) and isinstance(e.get("listed_at"), int)):
            out.append(e)
    return out


def append_changed(home: Path | str, entries: Iterable[dict]) -> list[dict]:
    """Append the entries whose definition differs from the latest one of their (server, tool),
    under the store's lock; the appended ones."""
    import fcntl

    entries = list(entries)
    if not entries:
        return []
    path = store_path(home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name("definitions.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        latest: dict[tuple[str, str], str] = {}
        first: dict[tuple[str, str, str], int] = {}
        for e in read_entries(home):
            latest[(e["server"], e["tool"])] = e["definition_digest"]
            k3 = (e["server"], e["tool"], e["definition_digest"])
            first.setdefault(k3, int(e.get("first_seen") or e["listed_at"]))
        new = []
        for e in entries:
            key = (e["server"], e["tool"])
            if latest.get(key) == e["definition_digest"]:
                continue
            e = {**e, "first_seen": first.get((*key, e["definition_digest"]), e["first_seen"])}
            latest[key] = e["definition_digest"]
            new.append(e)
        if new:
            data = b"".join(json.dumps(e, ensure_ascii=False, sort_keys=True).encode() + b"\n" for e in new)
            out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(out, data)
            finally:
                os.close(out)
        return new
    finally:
        os.close(fd)  # releases the lock


class Definitions:
    """The store, read once: the definition in force for a call, the definitions in force now."""

    def __init__(self, entries: list[dict]):
        self.by_key: dict[tuple[str, str], list[dict]] = {}
        for e in sorted(entries, key=lambda e: e["listed_at"]):
            self.by_key.setdefault((name_key(e["server"]), name_key(e["tool"])), []).append(e)

    @classmethod
    def load(cls, home: Path | str) -> "Definitions":
        return cls(read_entries(home))

    def __bool__(self) -> bool:
        return bool(self.by_key)

    def in_force(self, server: str, tool: str, at_us: int) -> dict | None:
        """The latest entry of (server, tool) listed at or before ``at_us``, else None."""
        found = None
        for e in self.by_key.get((name_key(server), name_key(tool)), ()):
            if e["listed_at"] > at_us:
                break
            found = e
        return found

    def digest_at(self, server: str, tool: str, at_us: int) -> str | None:
        e = self.in_force(server, tool, at_us)
        return e["definition_digest"] if e else None

    def current(self, at_us: int | None = None) -> list[dict]:
        """Every (server, tool)'s definition in force at ``at_us`` (now), as session_started.mcp_tools items."""
        at_us = time.time_ns() // 1000 if at_us is None else at_us
        out = []
        budget = SESSION_DESCRIPTIONS_MAX
        for (_s, _t), lst in sorted(self.by_key.items()):
            e = self.in_force(lst[0]["server"], lst[0]["tool"], at_us)
            if e is not None and len(out) < SESSION_TOOLS_MAX:
                d = as_tool_definition(e)
                budget -= len(d["description"] or "")
                if budget < 0:  # the event stays well below its size bound: digests only from here on
                    d["description"] = None
                out.append(d)
        return out

    def description(self, digest: str) -> str | None:
        for lst in self.by_key.values():
            for e in lst:
                if e["definition_digest"] == digest and e.get("description") is not None:
                    return e["description"]
        return None


def as_tool_definition(e: dict) -> dict:
    """A store entry as a McpToolDefinition record."""
    desc = e.get("description")
    return {"server": str(e["server"])[:NAME_MAX], "tool": str(e["tool"])[:NAME_MAX],
            "definition_digest": str(e["definition_digest"]),
            "description_digest": str(e.get("description_digest") or ""),
            "input_schema_digest": str(e.get("input_schema_digest") or ""),
            "description": desc[:DESCRIPTION_MAX] if isinstance(desc, str) else None,
            "listed_at": int(e["listed_at"])}


def current_definitions(home: Path | str, at_us: int) -> list[dict]:
    """`Definitions.current` of the store; none when it cannot be read (never fails a producer)."""
    try:
        return Definitions.load(home).current(at_us)
    except Exception as exc:  # noqa: BLE001
        log.warning("MCP tool definitions not read from %s: %s", store_path(home), exc)
        return []


def definition_at(home: Path | str, server: str, tool: str, at_us: int) -> str | None:
    """`Definitions.digest_at` of the store; None when it cannot be read (never fails a producer)."""
    try:
        return Definitions.load(home).digest_at(server, tool, at_us)
    except Exception as exc:  # noqa: BLE001
        log.warning("MCP tool definitions not read from %s: %s", store_path(home), exc)
        return None


def link_calls(home: Path | str, observations: Iterable) -> int:
    """Set ``mcp.definition_digest`` of the command_started observations of MCP calls that have
    none to the definition in force at the call's time; the number linked. Reads the store only
    when there is an MCP call."""
    defs = None
    n = 0
    for o in observations:
        mcp = o.payload.get("mcp") if o.kind == "command_started" else None
        if not isinstance(mcp, dict) or mcp.get("definition_digest"):
            continue
        if defs is None:
            try:
                defs = Definitions.load(home)
            except Exception as exc:  # noqa: BLE001 - never fails an import
                log.warning("MCP tool definitions not read from %s: %s", store_path(home), exc)
                return n
        d = defs.digest_at(mcp.get("server") or "", mcp.get("tool") or "", o.at_us)
        if d:
            mcp["definition_digest"] = d
            n += 1
    return n
