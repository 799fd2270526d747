/*---
id: control-surface-changed-after-trust
title: A trusted workspace's agent configuration changed, then an MCP server or hook it adds runs
severity: high
mitre: [T1546, T1195.002, T1562.001]
owasp: [LLM03, LLM06, ASI04, ASI05]
description: >
  "Approve once, exploit forever": a control file of the agent (MCP servers -- .mcp.json, a
  config.toml's mcp_servers --, settings with hooks or permissions, hook scripts, git hooks) changed
  in a workspace the agent's own configuration marked trusted -- written in a session (a
  file_accessed write, create, delete or rename of the path), or found with another digest than in
  the previous session that observed it (the `control_surface` view, read at each session start by
  the hook, the sandbox or an import) -- and afterwards, in that session or a later one of the same
  user and workspace, an MCP server that the new content names and the old did not is called, or a
  command runs whose command line contains a `"command"` the new content adds (a hook, a server's
  launcher) -- the first use after the change: sessions using the server later are not raised
  again. A write's new content is not recorded: after a write, any server not named anywhere
  in the session's starting control surface counts as added. A change the user made on purpose
  matches too (a server they added, then used): triage by the change's session and path.
---*/
WITH changes AS (
  SELECT c.session_id AS change_session, c.seq AS change_seq, c.occurred_at AS changed_at, c.host, c."user",
         c.cwd, c.path, c.role, c.row_kind, c.content AS new_content, p.content AS old_content,
         c.previous_session_id
  FROM control_surface c
  LEFT JOIN control_surface p ON c.row_kind = 'snapshot' AND p.row_kind = 'snapshot'
   AND p.session_id = c.previous_session_id AND p.path = c.path
  WHERE c.changed AND c.workspace_trusted
    AND c.role IN ('hooks', 'mcp_config', 'permissions', 'agent_config', 'git_hooks')
),
-- MCP server names a text names: JSON `mcpServers` keys, TOML [mcp_servers.<name>] tables
named AS (
  SELECT *,
         list_distinct(
           coalesce(CASE WHEN json_valid(new_content) THEN json_keys(new_content, '$.mcpServers') END, [])
           || regexp_extract_all(coalesce(new_content, ''), '(?m)^\s*\[mcp_servers\.["'']?([^\]"''.]+)', 1))
           AS new_servers,
         list_distinct(
           coalesce(CASE WHEN json_valid(old_content) THEN json_keys(old_content, '$.mcpServers') END, [])
           || regexp_extract_all(coalesce(old_content, ''), '(?m)^\s*\[mcp_servers\.["'']?([^\]"''.]+)', 1))
           AS old_servers,
         list_filter(list_distinct(regexp_extract_all(coalesce(new_content, ''), '"command"\s*:\s*"((?:[^"\\]|\\.)*)"', 1)),
                     x -> length(x) >= 4) AS new_commands,
         list_distinct(regexp_extract_all(coalesce(old_content, ''), '"command"\s*:\s*"((?:[^"\\]|\\.)*)"', 1))
           AS old_commands
  FROM changes
),
-- every server any file of the changing session's starting snapshot names (a write's "before")
known AS (
  SELECT session_id,
         list_distinct(flatten(list(
           coalesce(CASE WHEN json_valid(content) THEN json_keys(content, '$.mcpServers') END, [])
           || regexp_extract_all(coalesce(content, ''), '(?m)^\s*\[mcp_servers\.["'']?([^\]"''.]+)', 1)))) AS servers
  FROM control_surface WHERE row_kind = 'snapshot' GROUP BY session_id
),
added AS (
  SELECT n.*, CASE WHEN n.row_kind = 'write' THEN NULL
                   ELSE list_filter(n.new_servers, s -> NOT list_contains(n.old_servers, s)) END AS added_servers,
         coalesce(k.servers, []) AS servers_before_write,
         list_filter(n.new_commands, x -> NOT list_contains(n.old_commands, x)) AS added_commands
  FROM named n LEFT JOIN known k ON k.session_id = n.change_session
),
sessions AS (
  SELECT DISTINCT session_id, agent, "user", machine, session_cwd FROM detect_events
),
runs AS (
  SELECT d.session_id, d.seq, d.ts, d."describe", d.mcp_server, a.change_session, a.change_seq, a.path,
         a.row_kind, a.changed_at
  FROM detect_events d
  JOIN sessions s ON s.session_id = d.session_id
  JOIN added a ON a."user" IS NOT DISTINCT FROM s."user" AND a.host IS NOT DISTINCT FROM s.machine
   AND (starts_with(a.path, '~/') OR starts_with(s.session_cwd, a.cwd) OR starts_with(a.cwd, s.session_cwd))
   AND CASE WHEN d.session_id = a.change_session THEN a.row_kind = 'snapshot' OR d.seq > a.change_seq
            ELSE d.ts > a.changed_at END
  WHERE d.kind = 'command_started'
    AND ((d.mcp_server IS NOT NULL AND coalesce(d.mcp_outcome, '') <> 'declined'
          AND CASE WHEN a.row_kind = 'write' THEN NOT list_contains(a.servers_before_write, d.mcp_server)
                   ELSE list_contains(a.added_servers, d.mcp_server) END
          -- its first use after the change: the sessions that use it afterwards are not raised again
          AND NOT EXISTS (SELECT 1 FROM mcp_calls m
                          WHERE m.server = d.mcp_server AND m.session_id <> d.session_id
                            AND m."user" IS NOT DISTINCT FROM s."user" AND m.host IS NOT DISTINCT FROM s.machine
                            AND m.ts > a.changed_at AND m.ts < d.ts AND m.outcome <> 'declined'))
      OR (d.mcp_server IS NULL AND len(a.added_commands) > 0
          AND len(list_filter(a.added_commands, x -> position(x IN coalesce(d.cmdline, '')) > 0)) > 0))
)
SELECT session_id,
       list_sort(list_distinct(flatten(list(
         CASE WHEN change_session = session_id AND row_kind = 'write' THEN [change_seq, seq] ELSE [seq] END))))
         AS evidence_seqs,
       'high' AS severity,
       arg_min(path, seq) || ' changed in a trusted workspace ('
         || arg_min(CASE WHEN row_kind = 'write' THEN 'written at #' || change_seq || ' of session ' || change_session
                         ELSE 'new digest when session ' || change_session || ' started' END, seq)
         || '), then what it adds ran: ' || arg_min("describe", seq) AS summary
FROM runs GROUP BY session_id
