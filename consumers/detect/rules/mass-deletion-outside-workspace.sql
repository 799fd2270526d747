/*---
id: mass-deletion-outside-workspace
title: Many files deleted outside the workspace
severity: high
mitre: [T1485, T1070.004]
owasp: [LLM06, ASI02, ASI10]
description: >
  Ten or more files deleted outside the workspace within ten minutes (temporary directories do
  not count), or a recursive rm aimed at the home directory, the root or a system directory.
  Critical from 50 files, or when the target is the home directory or the root itself. Deleting
  build output inside the workspace (build/, dist/, target/, node_modules/.cache) never matches.
---*/
WITH del AS (
  SELECT session_id, seq, ts FROM detect_events
  WHERE kind = 'file_accessed' AND file_op = 'delete' AND NOT coalesce(inside_ws, false)
    AND NOT regexp_matches(path, '^/(tmp|var/tmp|private/tmp|dev/shm)/')
),
bursts AS (
  SELECT session_id, n, seqs FROM (
    SELECT session_id, count(*) OVER w AS n, list(seq) OVER w AS seqs
    FROM del WINDOW w AS (PARTITION BY session_id ORDER BY ts RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW))
  WHERE n >= 10
),
rm AS (
  SELECT session_id, seq, cmdline, list_filter(
           regexp_extract_all(cmdline, '\s(/[^\s;|&]*|~[^\s;|&]*|\$HOME[^\s;|&]*)', 1),
           lambda t: NOT starts_with(t, coalesce(session_cwd, '/nonexistent') || '/') AND t <> session_cwd
                     AND NOT regexp_matches(t, '^/(tmp|var/tmp|private/tmp|dev/shm)(/|$)')) AS targets
  FROM detect_events
  WHERE kind = 'command_started' AND program = 'rm' AND regexp_matches(cmdline, '\s-[a-zA-Z]*[rR]')
),
wide AS (  -- home, the root or a system directory itself (or one level under home)
  SELECT session_id, seq, targets FROM rm
  WHERE len(list_filter(targets, lambda t: regexp_matches(t,
    '^(/|/\*|~/?|~/\*|\$HOME/?|/home/[^/]+/?|/home/[^/]+/[^/]+/?|/root/?|/(etc|usr|var|opt|srv|boot|lib|bin|sbin|var/lib/[^/]+)/?)$'))) > 0
),
root AS (
  SELECT session_id, seq FROM rm
  WHERE len(list_filter(targets, lambda t: regexp_matches(t, '^(/|/\*|~/?|~/\*|\$HOME/?|/home/[^/]+/?|/root/?)$'))) > 0
),
hits AS (
  SELECT session_id, seqs, n, 'burst' AS how FROM bursts
  UNION ALL SELECT session_id, [seq], 0, 'rm' FROM wide
)
SELECT h.session_id,
       list_sort(list_distinct(flatten(list(h.seqs)))) AS evidence_seqs,
       CASE WHEN max(h.n) >= 50 OR any_value(r.session_id) IS NOT NULL THEN 'critical' ELSE 'high' END AS severity,
       CASE WHEN max(h.n) > 0 THEN max(h.n) || ' files deleted outside the workspace within 10 minutes'
            ELSE 'recursive rm outside the workspace' END
       || coalesce(' after `' || any_value(w.cmdline) || '`', '') AS summary
FROM hits h
LEFT JOIN (SELECT DISTINCT session_id FROM root) r USING (session_id)
LEFT JOIN (SELECT session_id, arg_min(cmdline, seq) AS cmdline FROM rm WHERE len(targets) > 0 GROUP BY 1) w USING (session_id)
GROUP BY h.session_id
