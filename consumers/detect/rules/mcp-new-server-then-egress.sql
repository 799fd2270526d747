/*---
id: mcp-new-server-then-egress
title: An MCP server never seen before appears mid-session, then egress outside the allowlist
severity: high
mitre: [T1195.002, T1071.001, T1041]
owasp: [LLM03, LLM06, ASI04, ASI02]
description: >
  The first call of an MCP server that no earlier session of this warehouse used (by the time of
  its first call elsewhere) comes after the session had already run commands -- a server added
  mid-session (a planted .mcp.json, a config the agent edited, a server a tool told it to add) --
  and within 30 minutes the session reaches a host outside its allowlist (a network attempt, or
  a command or MCP call naming one). A new tool whose output steers the agent to an unknown
  host is the rug-pull / tool-poisoning pattern. On a new warehouse every server is unseen: the
  mid-session and egress conditions carry the rule there. Critical when the egress went through.
---*/
WITH calls AS (
  SELECT session_id, mcp_server, min(seq) AS seq, min(ts) AS ts, arg_min("describe", seq) AS d
  FROM detect_events  -- (a refused call never reached the server)
  WHERE kind = 'command_started' AND mcp_server IS NOT NULL AND mcp_outcome <> 'declined'
  GROUP BY session_id, mcp_server
),
firsts AS (
  SELECT session_id, min(seq) AS first_cmd FROM detect_events WHERE kind = 'command_started' GROUP BY session_id
),
newcomers AS (
  SELECT c.* FROM calls c JOIN firsts f USING (session_id)
  WHERE c.seq > f.first_cmd
    AND NOT EXISTS (SELECT 1 FROM mcp_calls m
                    WHERE m.server = c.mcp_server AND m.session_id <> c.session_id AND m.ts < c.ts)
),
egress AS (
  SELECT session_id, seq, ts, "describe",
         (kind = 'network_attempted' AND net_decision = 'allow')
         OR (kind = 'command_started' AND coalesce(cmd_status, '') = 'completed') AS went_through
  FROM detect_events
  WHERE (kind = 'network_attempted' AND NOT host_allowed)
     OR (kind = 'command_started' AND NOT cmd_refused AND len(cmd_hosts_not_allowed) > 0)
),
hit AS (
  SELECT n.session_id, n.seq AS nseq, e.seq AS eseq, n.d AS nd, e."describe" AS ed, n.mcp_server, e.went_through
  FROM newcomers n JOIN egress e ON e.session_id = n.session_id AND e.seq > n.seq AND e.ts - n.ts <= INTERVAL 30 MINUTE
)
SELECT session_id,
       list_sort(list_distinct(flatten(list([nseq, eseq])))) AS evidence_seqs,
       CASE WHEN bool_or(went_through) THEN 'critical' ELSE 'high' END AS severity,
       'MCP server ' || arg_min(mcp_server, eseq) || ' first used mid-session (' || arg_min(nd, eseq)
       || '), then egress outside the allowlist: ' || arg_min(ed, eseq) AS summary
FROM hit GROUP BY session_id
