"""Which configured permission rule decides a tool call: Claude Code's settings rules and Codex's
exec-policy rules, read from the control surface a session recorded (producers/controlsurface.py).

Sources say *that* the configuration decided a call (OTel ``source=config``), never *which* rule.
The rule can be recovered: the session recorded the settings files it started with, and a call is
matched against their rules the way the agent matches them. The answer is an inference from
recorded evidence, and is always reported as one.

Claude Code (``permissions`` of ``~/.claude/settings.json``, ``<repo>/.claude/settings.json``,
``<repo>/.claude/settings.local.json``): ``allow`` / ``ask`` / ``deny`` lists of rules
``Tool`` or ``Tool(specifier)``; deny wins over ask, ask over allow.

===========================  ==================================================================
``Bash``                     every command
``Bash(npm run test:*)``     a command starting with ``npm run test`` (the legacy ``:*`` suffix)
``Bash(git * main)``         ``*`` matches any text
``Bash(npm run build)``      exactly that command
``Read(...)``, ``Edit(...)``  gitignore-style paths: ``//abs`` absolute, ``~/p`` the home, ``/p``
``Write(...)``               relative to the settings file's project, ``./p`` or ``p`` to the
                             working directory; ``**`` any depth, ``*`` one name
``WebFetch(domain:host)``    a fetch of that host (``*.`` prefix: its subdomains too)
``mcp__server``, ``mcp__server__tool``, ``mcp__server__*``  MCP tools
===========================  ==================================================================

A compound command (``a && b``, ``a; b``, ``a | b``) is allowed by rules only when each part is;
a deny or ask rule matching any part decides it.

Codex (``~/.codex/rules/*.rules``, ``<repo>/.codex/rules/*``): ``prefix_rule(pattern = [...],
decision = "allow" | "prompt" | "forbidden")``, where an element of ``pattern`` may itself be a list
of alternatives; the strictest matching decision wins (forbidden, then prompt, then allow).

Everything here reads attacker-written text: bounded sizes, no evaluation, never raises.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass

MAX_RULES = 2000
MAX_TEXT = 256 * 1024
_BEHAVIOURS = ("deny", "ask", "allow")  # Claude Code's precedence
_CODEX = {"forbidden": "deny", "prompt": "ask", "allow": "allow"}
_SPLIT = re.compile(r"\s*(?:&&|\|\||;|\||\n)\s*")
_RULE = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$", re.S)


@dataclass(frozen=True)
class Rule:
    behaviour: str  # deny | ask | allow
    text: str       # as written
    source: str     # the file it was read from (as the control surface names it)
    tool: str = ""
    spec: str | None = None
    prefix: tuple = ()  # Codex: the pattern, each element a tuple of alternatives

    def as_dict(self) -> dict:
        return {"behaviour": self.behaviour, "rule": self.text, "rule_source": self.source}


@dataclass(frozen=True)
class Call:
    """A tool call as the agent's rules see it."""

    tool: str                 # Bash, Read, Edit, Write, WebFetch, mcp__<server>__<tool>, ...
    command: str | None = None
    argv: tuple = ()
    path: str | None = None
    host: str | None = None
    cwd: str = ""
    home: str | None = None


def _settings_rules(path: str, text: str) -> list[Rule]:
    try:
        doc = json.loads(text[:MAX_TEXT])
    except (ValueError, RecursionError):
        return []
    perms = doc.get("permissions") if isinstance(doc, dict) else None
    if not isinstance(perms, dict):
        return []
    out = []
    for behaviour in _BEHAVIOURS:
        items = perms.get(behaviour)
        for item in (items if isinstance(items, list) else [])[:MAX_RULES]:
            if not isinstance(item, str):
                continue
            m = _RULE.match(item)
            if m:
                out.append(Rule(behaviour, item, path, m.group(1), m.group(2)))
    return out


_PREFIX_RULE = re.compile(r"prefix_rule\s*\(")
_RULE_END = re.compile(r"\)[ \t]*(?:$|#)", re.M)
MAX_RULE_BODY = 4096  # characters of one prefix_rule(...) looked at
MAX_WILDCARDS = 16    # `*` in one rule: a rule with more matches nothing (no pattern is worth a slow match)
_PATTERN = re.compile(r"pattern\s*=\s*(\[.*\])", re.S)
_DECISION = re.compile(r"decision\s*=\s*[\"'](\w+)[\"']")


def _codex_rules(path: str, text: str) -> list[Rule]:
    out: list[Rule] = []
    text = text[:MAX_TEXT]
    for m in _PREFIX_RULE.finditer(text):
        if len(out) >= MAX_RULES:
            break
        window = text[m.end():m.end() + MAX_RULE_BODY]
        end = _RULE_END.search(window)
        if end is None:
            continue
        body = window[:end.start()]
        pat, dec = _PATTERN.search(body), _DECISION.search(body)
        if not pat:
            continue
        try:  # a Starlark list of strings (or of lists of strings) is JSON once its quotes are
            raw = json.loads(re.sub(r"'([^'\\]*)'", r'"\1"', re.sub(r",\s*\]", "]", pat.group(1))))
        except (ValueError, RecursionError):
            continue
        if not isinstance(raw, list) or not raw:
            continue
        prefix = tuple(tuple(x) if isinstance(x, list) else (x,) for x in raw)
        if not all(isinstance(a, str) for alts in prefix for a in alts):
            continue
        behaviour = _CODEX.get(dec.group(1) if dec else "allow")
        if behaviour:
            out.append(Rule(behaviour, "prefix_rule(" + " ".join(body.split())[:500] + ")", path, "prefix_rule",
                            prefix=prefix))
    return out


def rules_from_surface(files: list[dict] | None) -> list[Rule]:
    """The permission rules of the control-surface files a session recorded (their redacted
    contents; a file without content gives none)."""
    out: list[Rule] = []
    for f in files or []:
        path, text = f.get("path") or "", f.get("content")
        if not isinstance(text, str):
            continue
        name = posixpath.basename(path)
        if name in ("settings.json", "settings.local.json") and "/.claude/" in path:
            out += _settings_rules(path, text)
        elif "/.codex/rules/" in path or f.get("role") == "exec_rules":
            out += _codex_rules(path, text)
    return out[:MAX_RULES]


def _glob(pattern: str) -> re.Pattern:
    i, out = 0, []
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.S)


def _wildcard(spec: str, text: str) -> bool:
    """``text`` matches ``spec``, whose ``*`` match any text: the pieces between them found leftmost,
    in order (linear; a regular expression of many ``.*`` backtracks without bound on a hostile rule)."""
    parts = spec.split("*")
    if len(parts) == 1:
        return text == spec
    first, last = parts[0], parts[-1]
    if len(parts) > MAX_WILDCARDS + 1 or not text.startswith(first) or not text.endswith(last):
        return False
    pos, end = len(first), len(text) - len(last)
    if end < pos:
        return False
    for piece in parts[1:-1]:
        i = text.find(piece, pos, end)
        if i < 0:
            return False
        pos = i + len(piece)
    return True


def _command_matches(spec: str, command: str) -> bool:
    command = command.strip()
    if spec.endswith(":*"):
        return command.startswith(spec[:-2])  # literally a prefix, as the agent matches it
    return _wildcard(spec, command)


def _project_of(source: str, home: str | None) -> str:
    """The directory a settings file's ``/p`` paths are relative to: its project."""
    path = source
    if home and path.startswith("~/"):
        path = home.rstrip("/") + path[1:]
    d = posixpath.dirname(posixpath.dirname(path))  # <project>/.claude/settings.json -> <project>
    return d


def _path_matches(spec: str, rule: Rule, call: Call) -> bool:
    if not call.path:
        return False
    path = posixpath.normpath(call.path if posixpath.isabs(call.path) else posixpath.join(call.cwd, call.path))
    if spec.startswith("//"):
        pattern = spec[1:]
    elif spec.startswith("~/"):
        if not call.home:
            return False
        pattern = call.home.rstrip("/") + spec[1:]
    elif spec.startswith("/"):
        pattern = _project_of(rule.source, call.home).rstrip("/") + spec
    else:
        pattern = posixpath.join(call.cwd or "/", spec[2:] if spec.startswith("./") else spec)
    if pattern.endswith("/"):
        pattern += "**"
    if pattern.count("*") > MAX_WILDCARDS:
        return False
    return _glob(pattern).match(path) is not None


def _host_matches(spec: str, host: str | None) -> bool:
    if not host or not spec.startswith("domain:"):
        return False
    want = spec[len("domain:"):].strip().lower()
    host = host.lower()
    if want.startswith("*."):
        return host.endswith(want[1:]) or host == want[2:]
    return host == want


_EDIT_TOOLS = {"Edit", "Write", "MultiEdit", "NotebookEdit"}


def _claude_matches(rule: Rule, call: Call, command: str | None = None) -> bool:
    if rule.tool.startswith("mcp__"):
        if not call.tool.startswith("mcp__"):
            return False
        if rule.tool.endswith("__*"):
            return call.tool.startswith(rule.tool[:-1])
        return call.tool == rule.tool or call.tool.startswith(rule.tool + "__") and rule.tool.count("__") == 1
    same = rule.tool == call.tool or (rule.tool == "Edit" and call.tool in _EDIT_TOOLS)
    if not same:
        return False
    if rule.spec is None or rule.spec in ("", "*"):
        return True
    if call.tool == "Bash":
        return _command_matches(rule.spec, command if command is not None else call.command or "")
    if call.tool == "WebFetch":
        return _host_matches(rule.spec, call.host)
    return _path_matches(rule.spec, rule, call)


def _codex_matches(rule: Rule, argv: tuple) -> bool:
    return len(argv) >= len(rule.prefix) and all(a in alts for a, alts in zip(argv, rule.prefix))


def decide(rules: list[Rule], call: Call) -> Rule | None:
    """The rule that decides ``call``, deny before ask before allow; None when no rule does (the
    agent then falls back to its mode, or asks)."""
    codex = [r for r in rules if r.tool == "prefix_rule"]
    claude = [r for r in rules if r.tool != "prefix_rule"]
    if call.tool == "Bash" and call.command and claude:
        parts = [p for p in _SPLIT.split(call.command.strip()) if p]
        for behaviour in ("deny", "ask"):
            for part in parts:
                hit = next((r for r in claude if r.behaviour == behaviour and _claude_matches(r, call, part)), None)
                if hit:
                    return hit
        hits = [next((r for r in claude if r.behaviour == "allow" and _claude_matches(r, call, p)), None)
                for p in parts]
        if parts and all(hits):
            return hits[0]
    elif claude:
        for behaviour in _BEHAVIOURS:
            hit = next((r for r in claude if r.behaviour == behaviour and _claude_matches(r, call)), None)
            if hit:
                return hit
    if codex and call.argv:
        argv = tuple(call.argv)
        if call.command and len(argv) >= 3 and argv[1] in ("-lc", "-c"):
            try:
                argv = tuple(shlex.split(call.command))
            except ValueError:
                pass
        for behaviour in _BEHAVIOURS:
            hit = next((r for r in codex if r.behaviour == behaviour and _codex_matches(r, argv)), None)
            if hit:
                return hit
    return None
