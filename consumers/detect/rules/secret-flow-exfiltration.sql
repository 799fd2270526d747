/*---
id: secret-flow-exfiltration
title: A secret read in the session was sent out (its redaction token reappears in a request, URL, command or tool call)
severity: high
mitre: [T1552.001, T1552.004, T1041, T1567]
owasp: [LLM02, LLM06, ASI02, ASI03]
description: >
  Follows the data, not the host. The keyed redaction tokens join one secret across events: a secret
  that came out of a command's or tool's output (a credential file printed, `git credential fill`,
  `gh auth token`, an environment dump, an MCP result) and later appears in a command that reaches
  the network (a URL, curl/gh/python..., nc), in a URL the agent fetched or in an MCP tool's
  arguments is exfiltration -- even through an allowlisted host (a gist, api.github.com, a docs
  search URL). Using a token as what it is for (an `Authorization:` / `X-Api-Key:` header, `-u
  user:token`) does not count. Critical when the sink is outside the allowlist or an MCP tool.
---*/
WITH src AS (  -- secrets that came out of a command's or a tool's output
  SELECT session_id, seq, "describe", unnest(output_secret_ids) AS sid
  FROM detect_events WHERE kind = 'command_started' AND len(output_secret_ids) > 0
),
sink AS (
  SELECT session_id, seq, "describe", kind, tool, cmdline, unnest(secret_ids) AS sid,
         (tool IS NOT NULL OR len(cmd_hosts_not_allowed) > 0
          OR (kind = 'network_attempted' AND NOT coalesce(host_allowed, false))) AS outside
  FROM detect_events
  WHERE len(secret_ids) > 0 AND (
    (kind = 'command_started' AND (tool IS NOT NULL
       OR len(list_filter(cmd_targets, lambda h: NOT is_loopback(h))) > 0
       OR (is_network_programs(program) AND program NOT IN ('python', 'python3', 'node', 'ruby', 'perl', 'php'))))
    OR (kind = 'network_attempted' AND NOT is_loopback(host)))
),
flow AS (
  SELECT k.session_id, k.sid, min(s.seq) AS src_seq, arg_min(s."describe", s.seq) AS src_desc,
         k.seq AS sink_seq, any_value(k."describe") AS sink_desc, bool_or(k.outside) AS outside
  FROM sink k JOIN src s ON s.session_id = k.session_id AND s.sid = k.sid AND s.seq < k.seq
  WHERE k.cmdline IS NULL OR NOT regexp_matches(k.cmdline,
    '(?i)((authorization|x-api-key|api-key|private-token|x-auth-token|cookie)\s*:\s*(bearer\s+|token\s+|basic\s+)?|\s-u\s*[''"]?[^\s:]*:)\[SECRET:[a-z0-9_]+:'
    || k.sid || '\]')
  GROUP BY k.session_id, k.sid, k.seq
)
SELECT session_id,
       list_sort(list_distinct(flatten(list([src_seq, sink_seq])))) AS evidence_seqs,
       CASE WHEN bool_or(outside) THEN 'critical' ELSE 'high' END AS severity,
       'secret …:' || arg_min(sid, sink_seq) || ' read by #' || arg_min(src_seq, sink_seq) || ' (' || arg_min(src_desc, sink_seq)
       || ') was sent by #' || min(sink_seq) || ' (' || arg_min(sink_desc, sink_seq) || ')'
       || CASE WHEN count(*) > 1 THEN '; ' || (count(*) - 1) || ' more flow(s)' ELSE '' END AS summary
FROM flow GROUP BY session_id
