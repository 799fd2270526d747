"""Declarative sequence rules: YAML files compiled to SQL, or SQL files, over ``detect_events``.

A rule looks at one session's ordered events. A YAML rule is a sequence of steps::

    id: credential-read-then-egress          # [a-z0-9-], unique; a user file with the same id replaces it
    title: Credentials read, then egress to a host outside the allowlist
    severity: high                           # low | medium | high | critical
    mitre: [T1552.001, T1041]                # ATT&CK technique ids
    owasp: [LLM02, ASI02]                    # OWASP Top 10 for LLM Applications 2025 (LLM01-LLM10)
                                             # and for Agentic Applications 2026 (ASI01-ASI10) ids
    description: Longer text for `agentledger rules list` and the docs.
    steps:
      - as: cred                             # alias, used by later steps and the explanation
        where: credential_access             # SQL over one detect_events row
      - as: egress
        where: kind = 'network_attempted' AND NOT host_allowed
        after: cred                          # strictly later in the session (default: the previous step)
        within: 1 hour                       # at most this long after it (optional)
        join: egress.port <> 22              # extra SQL relating this step to earlier ones (optional)
    escalate:                                # severity raised when ANY match satisfies `when`
      - severity: critical
        when: egress.net_decision = 'allow'
    explain: "read {cred.describe}, then {egress.describe}"   # {alias.column} of the first match,
                                                             # {alias.count}: events of that step, {matches}

A step may instead need ``count: N`` matching events ``within`` a window (``key: <SQL>`` to count
per value, e.g. per normalised approval subject); steps that declare a ``key`` must agree on it.
The evidence of a match is every event of every step (all N of a counted step).

A SQL rule (``*.sql``) starts with the same metadata as YAML between ``/*---`` and ``---*/`` and
is a SELECT over ``detect_events`` returning ``session_id``, ``evidence_seqs`` (BIGINT[]) and
optionally ``severity`` and ``summary``, one row per session (several rows are merged).

Rules see only events (never labels or anything outside the warehouse) and whole sessions, so a
sequence split across ingest batches is matched as if it had arrived at once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from agentledger.schemas import envvars
from agentledger.schemas.canonical import canonical_json_spaced
from agentledger.schemas.sql import ident, literal

from .prepare import BUILTIN_DIR, RuleError

SEVERITIES = ("low", "medium", "high", "critical")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,63}$")
_MITRE = re.compile(r"^T\d{4}(\.\d{3})?$")
_OWASP = re.compile(r"^(LLM|ASI)(0[1-9]|10)$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_INTERVAL = re.compile(r"^\s*(\d+)\s*(s|sec|second|seconds|m|min|minute|minutes|h|hour|hours|d|day|days)\s*$", re.I)
_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]*)(?:\.([a-z_][a-z0-9_]*))?\}")
_FRONT = re.compile(r"^\s*/\*---\s*\n(.*?)\n---\*/\s*\n", re.S)
_META_KEYS = {"id", "title", "severity", "mitre", "owasp", "description", "enabled", "explain", "tags"}
_YAML_KEYS = _META_KEYS | {"steps", "escalate"}
_STEP_KEYS = {"as", "where", "after", "within", "count", "key", "join"}
# detect_events columns a step alias must not shadow (it becomes a struct column of the matches)
RESERVED = {"session_id", "seq", "ts", "kind", "family", "path", "host", "port", "m", "match", "evidence_seqs"}


@dataclass
class Rule:
    id: str
    title: str
    severity: str
    mitre: list[str]
    sql: str
    source: str
    description: str = ""
    enabled: bool = True
    kind: str = "yaml"
    escalations: list[str] = field(default_factory=list)
    owasp: list[str] = field(default_factory=list)  # OWASP LLM (2025) / Agentic (2026) Top 10 ids; not in the digest

    @property
    def digest(self) -> str:
        """Changes whenever what the rule raises could change (its SQL, severity, title, tags)."""
        body = canonical_json_spaced([self.id, self.title, self.severity, self.mitre, self.sql])
        return hashlib.sha256(body).hexdigest()[:16]


def _interval(text, where: str) -> str:
    m = _INTERVAL.match(str(text))
    if not m:
        raise RuleError(f"{where}: `{text}` is not a duration such as 30s, 10 minutes, 1 hour")
    unit = m[2].lower()
    unit = {"s": "second", "sec": "second", "m": "minute", "min": "minute", "h": "hour", "d": "day"}.get(unit, unit)
    return f"INTERVAL '{int(m[1])} {unit.rstrip('s')}'"


def _meta(data: dict, path: Path) -> dict:
    where = str(path)
    if not isinstance(data, dict):
        raise RuleError(f"{where}: a rule is a mapping")
    rid = data.get("id")
    if not isinstance(rid, str) or not _ID.match(rid):
        raise RuleError(f"{where}: `id` must match {_ID.pattern}")
    if data.get("enabled", True) is False and set(data) <= {"id", "enabled"}:
        return {"id": rid, "enabled": False}
    title = data.get("title")
    if not isinstance(title, str) or not title.strip():
        raise RuleError(f"{where}: rule {rid} needs a `title`")
    sev = data.get("severity")
    if sev not in SEVERITIES:
        raise RuleError(f"{where}: rule {rid}: severity must be one of {', '.join(SEVERITIES)}")
    mitre = data.get("mitre") or []
    if not isinstance(mitre, list) or not all(isinstance(t, str) and _MITRE.match(t) for t in mitre):
        raise RuleError(f"{where}: rule {rid}: `mitre` is a list of ATT&CK technique ids such as T1552.001")
    owasp = data.get("owasp") or []
    if not isinstance(owasp, list) or not all(isinstance(t, str) and _OWASP.match(t) for t in owasp):
        raise RuleError(f"{where}: rule {rid}: `owasp` is a list of OWASP Top 10 ids: LLM01..LLM10 (LLM "
                        "Applications 2025), ASI01..ASI10 (Agentic Applications 2026)")
    return {"id": rid, "title": title.strip(), "severity": sev, "mitre": list(mitre), "owasp": list(owasp),
            "description": str(data.get("description") or "").strip(), "enabled": bool(data.get("enabled", True))}


@lru_cache(maxsize=1)
def _keywords() -> frozenset[str]:
    import duckdb

    return frozenset(r[0].lower() for r in duckdb.connect().execute("SELECT keyword_name FROM duckdb_keywords() WHERE keyword_category <> 'unreserved'").fetchall())


def compile_yaml(data: dict, path: Path) -> tuple[str, list[str]]:
    """SQL returning (session_id, evidence_seqs, severity, summary) for a YAML sequence rule."""
    where = f"{path} (rule {data.get('id')})"
    unknown = set(data) - _YAML_KEYS
    if unknown:
        raise RuleError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_YAML_KEYS)}")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise RuleError(f"{where}: `steps` must be a non-empty list")
    aliases: list[str] = []
    ctes: list[str] = []
    joins: list[str] = []
    keyed: str | None = None
    for i, st in enumerate(steps):
        if not isinstance(st, dict):
            raise RuleError(f"{where}: step {i + 1} must be a mapping")
        bad = set(st) - _STEP_KEYS
        if bad:
            raise RuleError(f"{where}: step {i + 1}: unknown keys {sorted(bad)}; allowed: {sorted(_STEP_KEYS)}")
        alias = st.get("as") or f"step{i + 1}"
        if not _ALIAS.match(alias) or alias in RESERVED or alias in aliases or alias in _keywords():
            raise RuleError(f"{where}: step alias {alias!r} must be a new lower-case identifier, not a column name "
                            "or an SQL keyword")
        cond = st.get("where")
        if not isinstance(cond, str) or not cond.strip():
            raise RuleError(f"{where}: step {alias} needs `where`")
        key = st.get("key")
        count = st.get("count")
        within = _interval(st["within"], f"{where}: step {alias}") if "within" in st else None
        key_sql = f", ({key}) AS _key" if key else ""
        if count is not None:
            if not isinstance(count, int) or count < 2:
                raise RuleError(f"{where}: step {alias}: `count` must be an integer >= 2")
            if within is None:
                raise RuleError(f"{where}: step {alias}: a counted step needs `within` (the window)")
            part = "session_id" + (", _key" if key else "")
            ctes.append(
                f"{ident(alias)} AS (SELECT * FROM (\n"
                f"    SELECT c.*, count(*) OVER w AS _n, list(c.seq) OVER w AS _seqs\n"
                f"    FROM (SELECT *{key_sql} FROM detect_events WHERE {cond}) c\n"
                f"    WINDOW w AS (PARTITION BY {part} ORDER BY ts RANGE BETWEEN {within} PRECEDING AND CURRENT ROW))\n"
                f"  WHERE _n >= {count})")
        else:
            ctes.append(f"{ident(alias)} AS (SELECT *, 1 AS _n, [seq] AS _seqs{key_sql} FROM detect_events WHERE {cond})")
        if i == 0:
            if "after" in st or ("within" in st and count is None):
                raise RuleError(f"{where}: the first step has nothing to be `after`/`within` of")
            joins.append(f"FROM {ident(alias)}")
        else:
            prev = st.get("after", aliases[-1])
            if prev not in aliases:
                raise RuleError(f"{where}: step {alias}: `after: {prev}` names no earlier step")
            on = [f"{ident(alias)}.session_id = {ident(aliases[0])}.session_id", f"{ident(alias)}.seq > {ident(prev)}.seq"]
            if within is not None and count is None:
                on.append(f"{ident(alias)}.ts <= {ident(prev)}.ts + {within}")
            if key and keyed:
                on.append(f"{ident(alias)}._key = {ident(keyed)}._key")
            if st.get("join"):
                on.append(f"({st['join']})")
            joins.append(f"JOIN {ident(alias)} ON " + " AND ".join(on))
        if key and not keyed:
            keyed = alias
        aliases.append(alias)
    first = ident(aliases[0])
    structs = ", ".join(f"{ident(a)} AS {ident(a)}" for a in aliases)
    seqs = "list_concat(" + ", ".join(f"{ident(a)}._seqs" for a in aliases) + ")" if len(aliases) > 1 else f"{first}._seqs"
    escal = []
    esc_list = data.get("escalate") or []
    if not isinstance(esc_list, list):
        raise RuleError(f"{where}: `escalate` is a list of {{severity, when}}")
    for e in esc_list:
        if not isinstance(e, dict) or e.get("severity") not in SEVERITIES or not isinstance(e.get("when"), str):
            raise RuleError(f"{where}: each `escalate` entry needs severity ({'/'.join(SEVERITIES)}) and when (SQL)")
        escal.append((e["severity"], e["when"]))
    escal.sort(key=lambda x: -SEVERITIES.index(x[0]))
    sev = "CASE " + " ".join(f"WHEN bool_or(({w})) THEN '{s}'" for s, w in escal) + f" ELSE '{data['severity']}' END" \
        if escal else f"'{data['severity']}'"
    summary = _template(str(data.get("explain") or data.get("title")), aliases, where, order=f"{first}.seq")
    sql = ("WITH " + ",\n".join(ctes) + ",\n"
           f"_m AS (SELECT {structs}, {seqs} AS _seqs\n" + "\n".join(joins) + ")\n"
           f"SELECT {first}.session_id AS session_id, list_sort(list_distinct(flatten(list(_seqs)))) AS evidence_seqs,\n"
           f"  {sev} AS severity,\n  {summary} AS summary\nFROM _m GROUP BY 1")
    return sql, [s for s, _ in escal]


def _template(text: str, aliases: list[str], where: str, order: str) -> str:
    parts: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        parts.append(literal(text[pos:m.start()]))
        name, col = m[1], m[2]
        if name == "matches" and col is None:
            parts.append("CAST(count(*) AS VARCHAR)")
        elif name in aliases and col == "count":
            parts.append(f"CAST(len(list_distinct(flatten(list({ident(name)}._seqs)))) AS VARCHAR)")
        elif name in aliases and col:
            parts.append(f"coalesce(CAST(arg_min({ident(name)}.{col}, {order}) AS VARCHAR), '?')")
        else:
            raise RuleError(f"{where}: explanation placeholder {m[0]} must be {{alias.column}}, {{alias.count}} "
                            "or {matches}")
        pos = m.end()
    parts.append(literal(text[pos:]))
    return "concat(" + ", ".join(parts) + ")"


def load_file(path: Path, parser=None) -> Rule:
    """One rule file; ``parser``: the DuckDB connection its SQL is checked with (see `_check_sql`)."""
    text = path.read_text()
    if path.suffix == ".sql":
        m = _FRONT.match(text)
        if not m:
            raise RuleError(f"{path}: a SQL rule starts with its metadata between /*--- and ---*/")
        try:
            data = yaml.safe_load(m[1]) or {}
        except yaml.YAMLError as exc:
            raise RuleError(f"{path}: metadata is not valid YAML: {exc}") from exc
        unknown = set(data) - _META_KEYS
        if unknown:
            raise RuleError(f"{path}: unknown metadata keys {sorted(unknown)}")
        meta = _meta(data, path)
        sql = text[m.end():].strip().rstrip(";")
        if not meta.get("enabled", True) and not sql:
            return Rule(meta["id"], "", "low", [], "", str(path), enabled=False, kind="sql")
        if not re.match(r"^\s*(WITH|SELECT)\b", sql, re.I):
            raise RuleError(f"{path}: the body of a SQL rule is one SELECT (or WITH ... SELECT)")
        _check_sql(sql, path, parser)
        return Rule(sql=sql, source=str(path), kind="sql", **meta)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"{path}: not valid YAML: {exc}") from exc
    meta = _meta(data, path)
    if not meta.get("enabled", True) and "steps" not in data:
        return Rule(meta["id"], "", "low", [], "", str(path), enabled=False)
    sql, escal = compile_yaml(data, path)
    _check_sql(sql, path, parser)
    return Rule(sql=sql, source=str(path), escalations=escal, **meta)


def _check_sql(sql: str, path: Path, parser=None) -> None:
    """A rule is one SELECT over the warehouse, with no file or network access, wherever it runs
    (`agentledger detect` also runs rules on a locked-down connection; `ingest --detect` cannot:
    ingest itself reads files)."""
    from agentledger.schemas.warehouse import check_select_only
    from agentledger.schemas.errors import WarehouseError

    try:
        check_select_only(sql, parser)
    except WarehouseError as exc:
        raise RuleError(f"{path}: {exc}") from None


def rule_files(d: Path) -> list[Path]:
    return sorted(p for p in Path(d).iterdir()
                  if p.suffix in (".yaml", ".yml", ".sql") and p.name not in ("lists.yaml", "lists.yml")
                  and not p.name.startswith((".", "_")))


def load_rules(dirs: list[Path]) -> list[Rule]:
    """Rules of every directory in order (the built-in one first); a later file with the same id
    replaces an earlier one, and ``enabled: false`` switches a rule off."""
    from agentledger.schemas.warehouse import parser_connection

    by_id: dict[str, Rule] = {}
    parser = parser_connection()  # one for every rule's check
    try:
        for d in dirs:
            d = Path(d)
            if not d.is_dir():
                raise RuleError(f"rules directory {d} does not exist")
            seen: dict[str, Path] = {}
            for p in rule_files(d):
                r = load_file(p, parser)
                if r.id in seen:
                    raise RuleError(f"{p}: rule id {r.id} is also defined in {seen[r.id]}")
                seen[r.id] = p
                by_id[r.id] = r
    finally:
        parser.close()
    return [r for r in by_id.values() if r.enabled]


def rule_dirs(extra: list[Path] | None = None, env: dict | None = None) -> list[Path]:
    """The built-in rules, then AGENTLEDGER_RULES_DIR (os.pathsep-separated), then ``extra``."""
    import os

    env = os.environ if env is None else env
    dirs = [BUILTIN_DIR]
    dirs += [Path(p) for p in (envvars.raw("AGENTLEDGER_RULES_DIR", env) or "").split(os.pathsep) if p]
    dirs += [Path(p) for p in extra or []]
    return dirs
