"""What every detector reads: ``detect_events``, one row per event of the sessions in scope, with
the related events joined in and the usual questions (is this host allowlisted? is this a
credential file?) answered once.

The relation is a TEMP table on the detection connection, rebuilt for each detection pass from the
warehouse's ``events`` (always whole sessions: a sequence that started in an earlier batch is seen
with the events that complete it). Rules are SQL over it; the model's features are polars over it.
Its columns are a contract for rule authors, documented in docs/detection.md.

The named lists of ``rules/lists.yaml`` (plus a user directory's ``lists.yaml``) become SQL macros
``is_<name>(x)``. Nothing here writes to the warehouse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import yaml

from agentledger.schemas.errors import AgentLedgerError
from agentledger.schemas.sql import literal

from .decode import _PREFILTER as DECODE_PREFILTER
from .decode import register as register_decoder

BUILTIN_DIR = Path(__file__).resolve().parent / "rules"
LIST_KINDS = ("domains", "values", "regex")


class RuleError(AgentLedgerError):
    """A rule or list file is invalid (the message names the file and what is wrong)."""


@dataclass
class NamedList:
    name: str
    kind: str
    values: list = field(default_factory=list)
    doc: str = ""
    sources: list[str] = field(default_factory=list)


def load_lists(dirs: list[Path]) -> dict[str, NamedList]:
    """Lists from ``lists.yaml`` of each directory, in order; later files extend earlier lists."""
    out: dict[str, NamedList] = {}
    checker: list = []  # one DuckDB connection checks every pattern (a connection per pattern took seconds)
    try:
        _load_lists(dirs, out, checker)
    finally:
        for c in checker:
            c.close()
    return out


def _load_lists(dirs: list[Path], out: dict[str, NamedList], checker: list) -> None:
    for d in dirs:
        p = Path(d) / "lists.yaml"
        if not p.exists():
            continue
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RuleError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise RuleError(f"{p}: expected a mapping of list names")
        for name, spec in data.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise RuleError(f"{p}: list name {name!r} must be an identifier")
            if not isinstance(spec, dict) or not isinstance(spec.get("values", []), list):
                raise RuleError(f"{p}: list {name} needs `values: [...]`")
            kind = spec.get("kind") or (out[name].kind if name in out else None)
            if kind not in LIST_KINDS:
                raise RuleError(f"{p}: list {name}: kind must be one of {', '.join(LIST_KINDS)}")
            nl = out.setdefault(name, NamedList(name, kind, [], spec.get("doc", "")))
            if nl.kind != kind:
                raise RuleError(f"{p}: list {name} is {nl.kind} elsewhere, not {kind}")
            for v in spec.get("values", []):
                if kind == "regex":
                    _check_regex(p, name, str(v), checker)
                nl.values.append(v)
            nl.sources.append(str(p))


def _check_regex(path: Path, name: str, pattern: str, checker: list) -> None:
    if not checker:
        checker.append(duckdb.connect())
    try:
        checker[0].execute("SELECT regexp_matches('', ?)", [pattern]).fetchone()
    except duckdb.Error as exc:
        raise RuleError(f"{path}: list {name}: bad RE2 pattern {pattern!r}: {str(exc).splitlines()[0]}") from exc


def macro_sql(lists: dict[str, NamedList]) -> list[str]:
    """TEMP macros: one per list, plus the helpers the relation and the rules use."""
    out = []
    for nl in lists.values():
        if nl.kind == "domains":
            arr = "[" + ", ".join(literal(str(v).lower()) for v in nl.values) + "]::VARCHAR[]"
            out.append(f"CREATE OR REPLACE TEMP MACRO is_{nl.name}(x) AS x IS NOT NULL AND "
                       f"len(list_filter({arr}, lambda d: lower(x) = d OR ends_with(lower(x), '.' || d))) > 0")
        elif nl.kind == "values":
            vals = ", ".join(literal(v) for v in nl.values) or "NULL"
            cast = "::VARCHAR" if not all(isinstance(v, int) for v in nl.values) else ""
            out.append(f"CREATE OR REPLACE TEMP MACRO is_{nl.name}(x) AS coalesce(x{cast} IN ({vals}), false)")
        else:
            pattern = "(?i)(?:" + "|".join(f"(?:{v})" for v in nl.values) + ")" if nl.values else "(?!)"
            out.append(f"CREATE OR REPLACE TEMP MACRO is_{nl.name}(x) AS coalesce(regexp_matches(x, {literal(pattern)}), false)")
    default_allowed = "[" + ", ".join(literal(str(v).lower()) for v in lists["default_allowed_domains"].values) + "]::VARCHAR[]" \
        if "default_allowed_domains" in lists else "[]::VARCHAR[]"
    out += [
        "CREATE OR REPLACE TEMP MACRO is_loopback(h) AS coalesce(lower(h) IN ('localhost', '::1', '[::1]', '0.0.0.0') "
        "OR regexp_matches(h, '^127\\.\\d+\\.\\d+\\.\\d+$') OR ends_with(lower(h), '.localhost'), false)",
        "CREATE OR REPLACE TEMP MACRO is_raw_ip(h) AS coalesce(regexp_matches(h, '^\\[?(\\d{1,3}(\\.\\d{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:]+)\\]?$'), false)",
        "CREATE OR REPLACE TEMP MACRO is_private_ip(h) AS coalesce(regexp_matches(h, "
        "'^(10\\.|192\\.168\\.|172\\.(1[6-9]|2\\d|3[01])\\.|169\\.254\\.|127\\.|fc|fd)'), false)",
        # the session's own allowlist when it declares one, else the default list
        f"CREATE OR REPLACE TEMP MACRO effective_allowlist(l) AS CASE WHEN len(coalesce(l, [])) > 0 "
        f"THEN list_transform(l, lambda d: lower(d)) ELSE {default_allowed} END",
        "CREATE OR REPLACE TEMP MACRO host_allowed(h, l) AS h IS NOT NULL AND (is_loopback(h) OR "
        "len(list_filter(effective_allowlist(l), lambda d: lower(h) = d OR ends_with(lower(h), '.' || d))) > 0)",
        "CREATE OR REPLACE TEMP MACRO url_hosts(t) AS list_distinct(list_transform(regexp_extract_all(coalesce(t, ''), "
        "'(?i)\\b(?:https?|ftp|stratum\\+(?:tcp|ssl|tls)|wss?)://(?:[^/\\s@''\"]*@)?(\\[[0-9a-fA-F:]+\\]|[^/\\s:''\"|;)?#]+)', 1), "
        "lambda h: lower(h)))",
        # the keyed HMAC part of each redaction token ([SECRET:<detector>:<hmac>]): one secret, whatever detector named it
        "CREATE OR REPLACE TEMP MACRO secret_ids(r) AS list_distinct(list_filter(list_transform(coalesce(r, []), "
        "lambda x: regexp_extract(x.token, ':([0-9a-f]{6,64})\\]$', 1)), lambda t: t <> ''))",
        # hosts a command line talks to: URL hosts, /dev/tcp|udp/HOST, nc/ncat/telnet/socat HOST
        "CREATE OR REPLACE TEMP MACRO net_targets(t) AS list_distinct(list_concat(url_hosts(t), "
        "list_transform(regexp_extract_all(coalesce(t, ''), '/dev/(?:tcp|udp)/([^/\\s]+)/', 1), lambda h: lower(h)), "
        "list_transform(regexp_extract_all(coalesce(t, ''), '(?i)\\b(?:nc|ncat|netcat|telnet)\\s+(?:-\\S+\\s+)*"
        "([a-z0-9][a-z0-9.-]*\\.[a-z]{2,}|\\d+\\.\\d+\\.\\d+\\.\\d+)', 1), lambda h: lower(h)), "
        "list_transform(regexp_extract_all(coalesce(t, ''), '(?i)\\btcp[46]?:([a-z0-9][a-z0-9.-]*):\\d+', 1), lambda h: lower(h))))",
        # file paths a text names (absolute, ~/ or ./ relative), e.g. in a command line or an MCP call's arguments
        "CREATE OR REPLACE TEMP MACRO path_tokens(t) AS list_distinct(list_filter(regexp_extract_all(coalesce(t, ''), "
        "'(?:~|\\.{1,2})?/[A-Za-z0-9_.@%+~-]+(?:/[A-Za-z0-9_.@%+~-]+)*'), lambda p: length(p) >= 5))",
        "CREATE OR REPLACE TEMP MACRO normalize_action(s) AS "
        "trim(regexp_replace(regexp_replace(lower(coalesce(s, '')), '\\s#.*$', ''), '\\s+', ' ', 'g'))",
    ]
    return out


# The relation. `e` is every event of the sessions in `detect_scope`.
DETECT_EVENTS_SQL = r"""
CREATE OR REPLACE TEMP TABLE detect_events AS
WITH e AS (
  SELECT * FROM events WHERE session_id IN (SELECT session_id FROM detect_scope)
),
sess AS (
  SELECT session_id, any_value(session_started.cwd) AS session_cwd,
         any_value(session_started.network_policy.allowed_domains) AS declared_allowlist,
         any_value(session_started.network_policy.mode) AS network_mode
  FROM e WHERE kind = 'session_started' GROUP BY session_id
),
who AS (
  SELECT session_id, any_value(producer.agent_name) AS agent, any_value(producer."user") AS "user",
         any_value(producer.host) AS machine
  FROM e GROUP BY session_id
),
fin AS (
  SELECT session_id, command_finished.command_id AS command_id, any_value(command_finished.exit_code) AS exit_code,
         any_value(command_finished.status) AS cmd_status, any_value(command_finished.stdout.excerpt) AS stdout,
         any_value(command_finished.duration_ms) AS duration_ms,
         any_value(len(list_filter(redactions, lambda r: starts_with(r.field, 'payload.stdout')
                                                      OR starts_with(r.field, 'payload.stderr')))) AS output_secrets,
         any_value(secret_ids(e.redactions)) AS output_secret_ids,
         any_value(command_finished.mcp.outcome) AS mcp_outcome_recorded
  FROM e WHERE kind = 'command_finished' GROUP BY ALL
),
nd AS (
  SELECT session_id, network_decided.attempt_id AS attempt_id, any_value(network_decided.decision) AS net_decision
  FROM e WHERE kind = 'network_decided' GROUP BY ALL
),
nc AS (
  SELECT session_id, network_completed.attempt_id AS attempt_id, any_value(network_completed.outcome) AS net_outcome,
         any_value(network_completed.bytes_out) AS bytes_out, any_value(network_completed.bytes_in) AS bytes_in
  FROM e WHERE kind = 'network_completed' GROUP BY ALL
),
ad AS (
  SELECT session_id, approval_decided.request_id AS request_id, any_value(approval_decided.decision) AS decision,
         any_value(approval_decided.decided_by) AS decided_by, any_value(seq) AS decision_seq
  FROM e WHERE kind = 'approval_decided' GROUP BY ALL
),
den AS (  -- commands refused: by the sandbox, or by a refused approval naming them
  SELECT DISTINCT session_id, sandbox_denied.command_id AS command_id
  FROM e WHERE kind = 'sandbox_denied' AND sandbox_denied.command_id IS NOT NULL
  UNION
  SELECT e.session_id, e.approval_requested.command_id
  FROM e JOIN ad ON ad.session_id = e.session_id AND ad.request_id = e.approval_requested.request_id
  WHERE e.kind = 'approval_requested' AND e.approval_requested.command_id IS NOT NULL
    AND ad.decision IN ('denied', 'aborted', 'timed_out')
),
base AS (
  SELECT
    e.session_id, e.seq, e.occurred_at AS ts, e.kind, e.family,
    w.agent, w."user", w.machine,
    s.session_cwd, effective_allowlist(s.declared_allowlist) AS allowed_domains, s.network_mode,
    coalesce(e.command_started.command_id, e.command_finished.command_id, e.file_accessed.command_id,
             e.sandbox_denied.command_id, e.network_attempted.command_id, e.approval_requested.command_id) AS command_id,
    e.command_started.command_id AS started_id, e.command_started.argv AS argv,
    CASE WHEN e.kind = 'command_started' THEN
      CASE WHEN e.command_started.argv[1] IN ('bash', 'sh', 'zsh', 'dash', 'ksh', '/bin/bash', '/bin/sh', '/bin/zsh',
                                             '/usr/bin/bash', '/usr/bin/env')
                AND regexp_matches(coalesce(e.command_started.argv[2], ''), '^-[a-z]*c$') AND len(e.command_started.argv) >= 3
           THEN e.command_started.argv[3]
           ELSE coalesce(e.command_started.shell, array_to_string(e.command_started.argv, ' ')) END
    END AS raw_cmdline,
    CASE WHEN starts_with(e.command_started.argv[1], 'mcp__') THEN e.command_started.argv[1] END AS tool,
    -- MCP calls: the v3 `mcp` record, else (events of earlier schemas) the tool's mcp__<server>__<tool> name
    CASE WHEN e.kind = 'command_started' THEN coalesce(e.command_started.mcp.server,
      nullif(regexp_extract(e.command_started.argv[1], '^mcp__(.+?)__(.+)$', 1), '')) END AS mcp_server,
    CASE WHEN e.kind = 'command_started' THEN coalesce(e.command_started.mcp.tool,
      nullif(regexp_extract(e.command_started.argv[1], '^mcp__(.+?)__(.+)$', 2), '')) END AS mcp_tool,
    CASE WHEN starts_with(e.command_started.argv[1], 'mcp__') THEN coalesce(e.command_started.argv[2], '') END AS mcp_args,
    e.command_started.mcp.arguments_digest AS mcp_args_digest,
    e.command_started.cwd AS cwd, e.command_started.escalated AS escalated,
    e.file_accessed.path AS path, e.file_accessed.operation AS file_op, e.file_accessed.new_path AS new_path,
    e.file_accessed.mode AS mode, e.file_accessed.inside_workspace AS declared_inside,
    e.network_attempted.attempt_id AS attempt_id, lower(e.network_attempted.host) AS host, e.network_attempted.port AS port,
    e.network_attempted.protocol AS protocol, upper(e.network_attempted.method) AS method, e.network_attempted.url AS url,
    e.approval_requested.request_id AS request_id, e.approval_requested.action_kind AS action_kind,
    e.approval_requested.subject AS subject, e.approval_requested.risk AS risk,
    e.approval_decided.decision AS decided,
    e.sandbox_denied.operation AS denied_op, e.sandbox_denied.target AS target,
    e.command_finished.status AS finished_status, e.command_finished.exit_code AS finished_exit,
    e.network_decided.decision AS decided_net, e.network_completed.outcome AS completed_outcome,
    e.gap.gap_kind AS gap_kind,
    len(e.redactions) AS redactions, list_distinct(list_transform(e.redactions, lambda r: r.detector)) AS secret_detectors,
    secret_ids(e.redactions) AS secret_ids
  FROM e LEFT JOIN sess s USING (session_id) LEFT JOIN who w USING (session_id)
),
j AS (
  SELECT b.*,
         -- an obfuscated command is judged with what it decodes to (consumers/detect/decode.py)
         CASE WHEN b.raw_cmdline IS NOT NULL AND regexp_matches(b.raw_cmdline, $prefilter$)
              THEN al_decode(b.raw_cmdline) END AS decoded,
         b.raw_cmdline || coalesce(chr(10) || decoded, '') AS cmdline,
         f.exit_code, f.cmd_status, f.stdout, f.duration_ms, coalesce(f.output_secrets, 0) AS output_secrets,
         coalesce(f.output_secret_ids, []::VARCHAR[]) AS output_secret_ids,
         CASE WHEN b.mcp_server IS NOT NULL THEN coalesce(f.mcp_outcome_recorded,
           CASE f.cmd_status WHEN 'completed' THEN 'ok' WHEN 'declined' THEN 'declined'
                WHEN 'failed' THEN 'error' WHEN 'timed_out' THEN 'error' WHEN 'killed' THEN 'error' END,
           'pending') END AS mcp_outcome,
         (b.started_id IS NOT NULL AND (f.cmd_status = 'declined' OR dn.command_id IS NOT NULL)) AS cmd_refused,
         d.net_decision, c.net_outcome, c.bytes_out, c.bytes_in, a.decision, a.decided_by, a.decision_seq
  FROM base b
  -- equality keys only (a constant condition in ON turns the hash join into a nested loop);
  -- the keys are set on the rows of one kind only
  LEFT JOIN fin f ON f.session_id = b.session_id AND f.command_id = b.started_id
  LEFT JOIN nd d ON d.session_id = b.session_id AND d.attempt_id = b.attempt_id
  LEFT JOIN nc c ON c.session_id = b.session_id AND c.attempt_id = b.attempt_id
  LEFT JOIN ad a ON a.session_id = b.session_id AND a.request_id = b.request_id
  LEFT JOIN den dn ON dn.session_id = b.session_id AND dn.command_id = b.started_id
),
k AS (
  SELECT j.*,
    lower(regexp_replace(regexp_extract(coalesce(cmdline, ''),
      '^[\s({]*(?:(?:sudo|env|nohup|time|exec|command|nice|timeout|stdbuf)\s+(?:-\S+\s+)*(?:\d+\s+)?)*(?:\w+=\S*\s+)*([^\s;|&()<>]+)', 1),
      '^.*/', '')) AS program,
    coalesce(declared_inside, CASE WHEN path IS NULL OR session_cwd IS NULL THEN NULL
                                   ELSE starts_with(path, session_cwd || '/') OR path = session_cwd END) AS inside_ws,
    url_hosts(cmdline) AS cmd_hosts,
    net_targets(cmdline) AS cmd_targets,
    -- hosts an install names as its package index (flags, environment, config)
    CASE WHEN kind = 'command_started' AND regexp_matches(cmdline,
      '\b(pip[0-9.]*|pipx|uv|poetry|pipenv|pdm|conda|mamba|micromamba|npm|pnpm|yarn|bun|gem|cargo|easy_install)\b')
    THEN list_distinct(list_transform(list_filter(regexp_extract_all(cmdline,
      '(?:--(?:extra-)?index-url|--index|--registry|--source|--find-links|--trusted-host|\s-i|\s-f|'
      || '(?:PIP_(?:EXTRA_)?INDEX_URL|PIP_TRUSTED_HOST|NPM_CONFIG_REGISTRY|npm_config_registry|UV_(?:EXTRA_)?INDEX_URL|YARN_REGISTRY)=|'
      || 'config\s+set\s+(?:global\.)?(?:extra-)?(?:index-url|registry|trusted-host))[\s=]+[''"]?([^\s''";|&]+)', 1),
      lambda u: u <> '' AND u <> '-'),
      lambda u: lower(regexp_extract(u, '^(?:[a-zA-Z+]+://)?(?:[^/@]*@)?(\[[0-9a-fA-F:]+\]|[^/:?#]+)', 1))))
    END AS index_hosts
  FROM j
),
cmd AS (
  SELECT session_id, command_id, any_value(program) AS by_program, any_value(cmdline) AS by_cmdline
  FROM k WHERE kind = 'command_started' GROUP BY ALL
)
SELECT k.* EXCLUDE (declared_inside, started_id),
  cmd.by_program, cmd.by_cmdline,
  CASE WHEN kind = 'network_attempted' THEN host_allowed(host, allowed_domains) END AS host_allowed,
  CASE WHEN kind = 'network_attempted' THEN is_raw_ip(host) END AS host_raw_ip,
  list_filter(cmd_hosts, lambda h: NOT host_allowed(h, allowed_domains)) AS cmd_hosts_not_allowed,
  coalesce(
    (kind = 'file_accessed' AND file_op = 'read'
      AND (is_credential_paths(path) OR (is_env_files(path) AND NOT is_env_templates(path))))
    OR (kind = 'command_started' AND NOT is_key_tools(program) AND is_credential_paths(cmdline)), false) AS credential_access,
  coalesce(kind = 'command_started' AND is_env_dump_commands(cmdline) AND NOT is_env_filtered(cmdline)
           AND NOT regexp_matches(cmdline, '^\s*(env|printenv)\s+[^|;&>\s]'), false) AS env_dump,
  coalesce(kind = 'command_started' AND regexp_matches(cmdline,
    '(?i)\b(curl|wget|fetch|aria2c)\b[^|;&]*\|\s*(sudo\s+(-\S+\s+)*)?(env\s+\S+\s+)?(ba|z|da|k|fi)?sh\b|\b(curl|wget)\b[^|;&]*\|\s*(sudo\s+)?(python[0-9.]*|perl|ruby|node)\b|\b(ba|z)?sh\s+<\(\s*(curl|wget)\b|\b(ba|z)?sh\s+-c\s+"?\$\(\s*(curl|wget)\b'),
    false) AS pipe_to_shell,
  CASE kind
    WHEN 'command_started' THEN 'ran `' || left(raw_cmdline, 160) || CASE WHEN length(raw_cmdline) > 160 THEN '…' ELSE '' END || '`'
         || coalesce(' decoded to `' || left(decoded, 200) || CASE WHEN length(decoded) > 200 THEN '…' ELSE '' END || '`', '')
         || CASE WHEN escalated THEN ' (escalated)' ELSE '' END
         || CASE WHEN cmd_status IS NOT NULL AND cmd_status <> 'completed' THEN ' → ' || cmd_status ELSE '' END
    WHEN 'file_accessed' THEN file_op || ' ' || path || coalesce(' → ' || new_path, '')
    WHEN 'network_attempted' THEN trim(coalesce(method, '') || ' ' || host || ':' || port) || ' (' || protocol || ') → '
         || coalesce(net_decision, 'undecided') || coalesce(', ' || net_outcome, '')
         || CASE WHEN coalesce(bytes_out, 0) > 0 THEN ', ' || bytes_out || ' bytes out' ELSE '' END
    WHEN 'approval_requested' THEN action_kind || ' approval for `' || left(subject, 120) || '` → ' || coalesce(decision, 'pending')
    WHEN 'approval_decided' THEN 'approval ' || decided
    WHEN 'sandbox_denied' THEN 'sandbox denied ' || denied_op || ' ' || target
    WHEN 'command_finished' THEN 'command ' || finished_status || coalesce(' (exit ' || finished_exit || ')', '')
    WHEN 'network_decided' THEN 'network ' || decided_net
    WHEN 'network_completed' THEN 'network ' || completed_outcome
    WHEN 'gap' THEN 'gap: ' || gap_kind
    ELSE kind END AS describe
FROM k LEFT JOIN cmd ON cmd.session_id = k.session_id AND cmd.command_id = k.command_id
"""

def prepare(con: duckdb.DuckDBPyConnection, lists: dict[str, NamedList], sessions: list[str] | None) -> int:
    """(Re)build ``detect_events`` for ``sessions`` (None: every session). Returns its row count."""
    for sql in macro_sql(lists):
        con.execute(sql)
    register_decoder(con)
    if sessions is None:
        con.execute("CREATE OR REPLACE TEMP TABLE detect_scope AS SELECT DISTINCT session_id FROM chain_heads")
    else:
        con.register("_scope", pa.table({"session_id": pa.array(sorted(set(sessions)), pa.string())}))
        try:
            con.execute("CREATE OR REPLACE TEMP TABLE detect_scope AS SELECT DISTINCT session_id FROM _scope")
        finally:
            con.unregister("_scope")
    con.execute(DETECT_EVENTS_SQL.replace("$prefilter$", literal(DECODE_PREFILTER)))
    return con.execute("SELECT count(*) FROM detect_events").fetchone()[0]


def columns(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in con.execute("DESCRIBE detect_events").fetchall()]


def drop(con: duckdb.DuckDBPyConnection) -> None:
    for t in ("detect_events", "detect_scope"):
        con.execute(f"DROP TABLE IF EXISTS temp.{t}")
