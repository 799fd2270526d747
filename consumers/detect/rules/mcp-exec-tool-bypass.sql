/*---
id: mcp-exec-tool-bypass
title: A refused action run again through a shell-like MCP tool
severity: high
mitre: [T1218, T1562.001, T1059.004]
owasp: [LLM06, ASI02, ASI05]
description: >
  An MCP server that runs commands (a shell, terminal, process or exec tool) executes outside the
  agent's sandbox and approval flow. A command the user, the reviewer or the sandbox refused (or
  a denied connection), then within 30 minutes an MCP exec tool whose command line names the same
  host or file path, is the refused action done by the back door. So is an MCP exec command that
  reaches a non-loopback host in a session whose sandbox has the network switched off. Critical
  when the MCP call succeeded.
---*/
WITH x AS (  -- shell-like MCP calls that were not themselves refused
  SELECT session_id, seq, ts, "describe", cmd_targets, path_tokens(mcp_args) AS paths, mcp_outcome, network_mode,
         session_cwd
  FROM detect_events
  WHERE kind = 'command_started' AND mcp_server IS NOT NULL AND is_mcp_exec_tools(tool) AND NOT cmd_refused
),
refused AS (
  SELECT session_id, seq, ts, "describe",
         list_concat(coalesce(cmd_targets, []), CASE WHEN host IS NULL THEN [] ELSE [host] END) AS targets,
         CASE WHEN kind = 'command_started' THEN path_tokens(cmdline) ELSE [] END AS paths
  FROM detect_events
  WHERE (kind = 'command_started' AND cmd_refused AND mcp_server IS NULL)
     OR (kind = 'network_attempted' AND net_decision = 'deny' AND NOT is_loopback(host))
),
bypass AS (
  SELECT x.session_id, x.seq, r.seq AS refused_seq, x."describe" AS xd, r."describe" AS rd, x.mcp_outcome
  FROM x JOIN refused r ON r.session_id = x.session_id AND r.seq < x.seq AND x.ts - r.ts <= INTERVAL 30 MINUTE
  WHERE len(list_intersect(list_filter(x.cmd_targets, lambda h: NOT is_loopback(h)), r.targets)) > 0
     OR len(list_intersect(list_filter(x.paths, lambda p: p <> x.session_cwd AND NOT starts_with(x.session_cwd || '/', p || '/')),
                           r.paths)) > 0
  UNION ALL
  SELECT session_id, seq, NULL, "describe", 'the sandbox has no network', mcp_outcome
  FROM x WHERE network_mode = 'disabled' AND len(list_filter(cmd_targets, lambda h: NOT is_loopback(h))) > 0
)
SELECT session_id,
       list_sort(list_distinct(list_filter(flatten(list([seq, refused_seq])), lambda s: s IS NOT NULL))) AS evidence_seqs,
       CASE WHEN bool_or(mcp_outcome = 'ok') THEN 'critical' ELSE 'high' END AS severity,
       'refused: ' || arg_min(rd, seq) || '; then through an MCP exec tool: ' || arg_min(xd, seq)
       || CASE WHEN count(*) > 1 THEN '; ' || (count(*) - 1) || ' more' ELSE '' END AS summary
FROM bypass GROUP BY session_id
