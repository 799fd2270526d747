/*---
id: mcp-declined-then-other-route
title: MCP calls refused, then the same target reached another way
severity: high
mitre: [T1562.001, T1218, T1567]
owasp: [LLM06, ASI02, ASI09, ASI10]
description: >
  Two or more MCP tool calls refused (by the user or a policy) within 30 minutes, then within 30
  minutes of the last refusal a different route that went through -- a shell command, another
  MCP tool, a network request -- to the same host or file path, or another tool called with the
  very same arguments (equal argument digests). The agent worked around the refusal instead of
  stopping. Critical when the other route reaches a host outside the allowlist.
---*/
WITH declined AS (
  SELECT session_id, seq, ts, "describe", tool, mcp_args_digest,
         list_filter(cmd_targets, lambda h: NOT is_loopback(h)) AS targets,
         list_filter(path_tokens(mcp_args), lambda p: p <> session_cwd AND NOT starts_with(session_cwd || '/', p || '/')) AS paths
  FROM detect_events WHERE kind = 'command_started' AND mcp_outcome = 'declined'
),
runs AS (  -- declined calls with at least one other within the 30 minutes before them
  SELECT d.* FROM declined d
  WHERE EXISTS (SELECT 1 FROM declined o WHERE o.session_id = d.session_id AND o.seq < d.seq
                AND d.ts - o.ts <= INTERVAL 30 MINUTE)
),
route AS (
  SELECT session_id, seq, ts, "describe", tool, mcp_args_digest,
         CASE WHEN kind = 'network_attempted' THEN [host] ELSE cmd_targets END AS targets,
         CASE WHEN kind = 'command_started' THEN coalesce(path_tokens(cmdline), []) ELSE [] END AS paths,
         (kind = 'network_attempted' AND NOT coalesce(host_allowed, false))
         OR len(coalesce(cmd_hosts_not_allowed, [])) > 0 AS outside
  FROM detect_events
  WHERE (kind = 'command_started' AND NOT cmd_refused AND coalesce(cmd_status, 'completed') = 'completed'
         AND coalesce(mcp_outcome, 'ok') = 'ok')
     OR (kind = 'network_attempted' AND coalesce(net_decision, 'allow') <> 'deny')
),
hit AS (
  SELECT r.session_id, r.seq AS rseq, d.seq AS dseq, r."describe" AS rd, d."describe" AS dd, r.outside
  FROM route r JOIN declined d ON d.session_id = r.session_id AND d.seq < r.seq AND r.ts - d.ts <= INTERVAL 60 MINUTE
  WHERE coalesce(r.tool, '') <> d.tool
    AND EXISTS (SELECT 1 FROM runs x WHERE x.session_id = r.session_id AND x.seq < r.seq
                AND r.ts - x.ts <= INTERVAL 30 MINUTE)
    AND (len(list_intersect(r.targets, d.targets)) > 0 OR len(list_intersect(r.paths, d.paths)) > 0
         OR (r.mcp_args_digest IS NOT NULL AND r.mcp_args_digest = d.mcp_args_digest))
)
SELECT session_id,
       list_sort(list_distinct(flatten(list([dseq, rseq])))) AS evidence_seqs,
       CASE WHEN bool_or(outside) THEN 'critical' ELSE 'high' END AS severity,
       'refused MCP call(s) (' || arg_min(dd, dseq) || '), then another route: ' || arg_min(rd, rseq)
       || ' (' || count(DISTINCT dseq) || ' refused MCP call(s) share its target)' AS summary
FROM hit GROUP BY session_id
