-- Producer-side state of agentledger (SQLite, $AGENTLEDGER_HOME/state/producers.db), shared by the
-- importers (codex-rollout, otel) and the agent hook. Loaded only by producers/importstate.py.
-- Bump PRAGMA user_version in importstate.py when this changes; statements are idempotent.

-- One row per session any producer on this host appended to: the chain head to continue from.
CREATE TABLE IF NOT EXISTS sessions (
  session_id  TEXT PRIMARY KEY,
  next_seq    INTEGER NOT NULL,
  head_hash   TEXT NOT NULL,
  agent       TEXT,
  first_at    INTEGER,            -- occurred_at (us) of the earliest event recorded
  last_at     INTEGER,            -- occurred_at (us) of the latest event recorded
  ended       INTEGER NOT NULL DEFAULT 0,
  end_hint    TEXT,               -- how the last turn ended, when a source said so
  updated_at  INTEGER
);

-- Facts already recorded, by their semantic key (e.g. cmd:<call_id>:started). The same fact seen
-- again -- a re-import, the other source of the same session, a retried hook -- is not recorded twice.
CREATE TABLE IF NOT EXISTS facts (
  session_id  TEXT NOT NULL,
  fact        TEXT NOT NULL,
  seq         INTEGER NOT NULL,
  event_id    TEXT NOT NULL,
  PRIMARY KEY (session_id, fact)
) WITHOUT ROWID;

-- Sealed events whose seq is assigned but that are not yet known to be durable in the transport.
-- Written (and committed) before sending; removed in the transaction that advances the head.
-- Whoever next locks the session re-sends them first, byte for byte.
CREATE TABLE IF NOT EXISTS outbox (
  session_id  TEXT NOT NULL,
  seq         INTEGER NOT NULL,
  value       BLOB NOT NULL,
  fact        TEXT NOT NULL,
  event_id    TEXT NOT NULL,
  occurred_at INTEGER NOT NULL,
  PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;

-- Tool calls the hook saw start and not yet finish (for durations).
CREATE TABLE IF NOT EXISTS open_calls (
  session_id  TEXT NOT NULL,
  call_id     TEXT NOT NULL,
  started_at  INTEGER NOT NULL,
  info        TEXT,
  PRIMARY KEY (session_id, call_id)
) WITHOUT ROWID;

-- Source files imported: how far (a byte offset at a line boundary), which file it was (device,
-- inode, digest of its head, to notice replaced or truncated files), the parser context needed to
-- continue from the offset, the sessions it holds and the cumulative counts of what was found.
CREATE TABLE IF NOT EXISTS files (
  path        TEXT PRIMARY KEY,
  kind        TEXT NOT NULL,
  dev         INTEGER,
  inode       INTEGER,
  size        INTEGER,
  mtime_ns    INTEGER,
  offset      INTEGER NOT NULL,
  head_len    INTEGER NOT NULL DEFAULT 0,
  head_sha    TEXT,
  context     TEXT,
  sessions    TEXT,
  counts      TEXT,
  updated_at  INTEGER
);

-- Source lines that could not be used (garbage, not JSON, not an object ...), with where they are.
CREATE TABLE IF NOT EXISTS rejects (
  path        TEXT NOT NULL,
  offset      INTEGER NOT NULL,
  line        INTEGER,
  reason      TEXT NOT NULL,
  excerpt     BLOB,
  seen_at     INTEGER,
  PRIMARY KEY (path, offset)
) WITHOUT ROWID;
