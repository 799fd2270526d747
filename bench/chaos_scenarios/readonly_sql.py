"""Read-only SQL: statements an auditor's query (or a hostile notebook cell) could use to change the
warehouse, write or read files, load code or loosen the settings, run through `agentledger sql` (the
real CLI, a subprocess per statement) and through `open_for_query`, the connection notebooks use, on a
DuckDB file warehouse and on a DuckLake (SQLite catalog) warehouse.

A statement counts as refused when it fails with an error (the CLI: exit 1, one error line, no
traceback) AND left no trace: no file created or changed anywhere under the scenario's directory
(warehouse, lake data, home, the "outside" directory), the planted secret's text not in its output.
Harmless controls (ordinary queries, temp tables) must still work. Figures: tried, refused, allowed
(must be 0; listed), controls_ok, per path and warehouse kind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from chaos_scenarios import agentledger_cmd, scenario

REPO = Path(__file__).resolve().parents[2]
PLANTED = "chaos-planted-secret-8c1f2e"

# (category, statement); {out}: a directory outside the warehouse holding secret.csv/.parquet/.json
STATEMENTS = [
    ("write", "INSERT INTO events (session_id, seq) VALUES ('x', 0)"),
    ("write", "INSERT INTO dead_letters (dead_letter_id) VALUES ('x')"),
    ("write", "UPDATE chain_heads SET head_seq = 0"),
    ("write", "DELETE FROM events"),
    ("write", "DELETE FROM dead_letters"),
    ("write", "DROP TABLE dead_letters"),
    ("write", "DROP VIEW events"),
    ("write", "CREATE TABLE stolen AS SELECT * FROM events"),
    ("write", "CREATE VIEW v AS SELECT 1"),
    ("write", "CREATE OR REPLACE VIEW events AS SELECT 1 AS x"),
    ("write", "CREATE MACRO evil(x) AS x"),
    ("write", "CREATE SEQUENCE s"),
    ("write", "CREATE SCHEMA evil"),
    ("write", "ALTER TABLE dead_letters ADD COLUMN evil INTEGER"),
    ("write", "ALTER TABLE dead_letters RENAME TO dl2"),
    ("write", "TRUNCATE dead_letters"),
    ("write", "COMMENT ON TABLE dead_letters IS 'evil'"),
    ("write", "SELECT 1; DELETE FROM dead_letters"),
    ("write", "BEGIN; DELETE FROM dead_letters; COMMIT"),
    ("write", "CREATE INDEX i ON dead_letters (reason)"),
    ("copy", "COPY dead_letters TO '{out}/dl.csv'"),
    ("copy", "COPY (SELECT * FROM events) TO '{out}/events.parquet' (FORMAT parquet)"),
    ("copy", "COPY (SELECT 1) TO '{lake}/evil.parquet' (FORMAT parquet)"),
    ("copy", "COPY dead_letters FROM '{out}/secret.csv'"),
    ("copy", "EXPORT DATABASE '{out}/export'"),
    ("copy", "IMPORT DATABASE '{out}/export'"),
    ("attach", "ATTACH '{out}/new.duckdb' AS evil"),
    ("attach", "ATTACH '{wh}' AS again"),
    ("attach", "ATTACH ':memory:' AS mem"),
    ("attach", "ATTACH '{out}/x.sqlite' AS sq (TYPE sqlite)"),
    ("attach", "ATTACH 'ducklake:sqlite:{out}/lake2.sqlite' AS dl (DATA_PATH '{out}/lake2')"),
    ("attach", "DETACH warehouse"),
    ("extension", "INSTALL httpfs"),
    ("extension", "FORCE INSTALL httpfs"),
    ("extension", "LOAD httpfs"),
    ("extension", "LOAD '{out}/evil.duckdb_extension'"),
    ("extension", "INSTALL '{out}/evil.duckdb_extension'"),
    ("file", "SELECT * FROM read_csv('{out}/secret.csv')"),
    ("file", "SELECT * FROM read_csv_auto('{out}/secret.csv')"),
    ("file", "SELECT * FROM '{out}/secret.csv'"),
    ("file", "SELECT * FROM read_text('{out}/secret.csv')"),
    ("file", "SELECT * FROM read_blob('{out}/secret.csv')"),
    ("file", "SELECT * FROM read_parquet('{out}/secret.parquet')"),
    ("file", "SELECT * FROM parquet_metadata('{out}/secret.parquet')"),
    ("file", "SELECT * FROM parquet_schema('{out}/secret.parquet')"),
    ("file", "SELECT * FROM read_json('{out}/secret.json')"),
    ("file", "SELECT * FROM read_json_auto('{out}/secret.json')"),
    ("file", "SELECT * FROM read_ndjson_objects('{out}/secret.json')"),
    ("file", "SELECT * FROM sniff_csv('{out}/secret.csv')"),
    ("file", "SELECT * FROM glob('{out}/*')"),
    ("file", "SELECT * FROM glob('/etc/*')"),
    ("file", "SELECT * FROM read_text('/etc/passwd')"),
    ("file", "SELECT * FROM read_text('/proc/self/environ')"),
    ("file", "SELECT * FROM read_blob('{home}/keys/*')"),
    ("file", "SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')"),
    ("file", "SELECT * FROM read_parquet('{lake}/../secret.parquet')"),
    ("file", "SELECT * FROM read_text('{lake}/../../out/secret.csv')"),
    ("file", "SELECT * FROM read_text('{wh}')"),
    ("file", "CREATE TEMP TABLE t AS SELECT * FROM read_csv('{out}/secret.csv')"),
    ("settings", "SET enable_external_access = true"),
    ("settings", "SET lock_configuration = false"),
    ("settings", "RESET lock_configuration"),
    ("settings", "SET allowed_directories = ['/']"),
    ("settings", "SET allowed_paths = ['{out}/secret.csv']"),
    ("settings", "SET autoinstall_known_extensions = true"),
    ("settings", "SET allow_unsigned_extensions = true"),
    ("settings", "SET custom_extension_repository = 'http://127.0.0.1:9'"),
    ("settings", "SET temp_directory = '{out}/tmp'"),
    ("settings", "SET profiling_output = '{out}/profile.json'"),
    ("settings", "SET GLOBAL threads = 1"),
    ("settings", "SET memory_limit = '1TB'"),
    ("settings", "RESET ALL"),
    ("settings", "PRAGMA threads = 1"),
    ("settings", "PRAGMA memory_limit = '1TB'"),
    ("settings", "SELECT * FROM duckdb_secrets()"),
    ("settings", "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')"),
    ("call", "CALL ducklake_expire_snapshots('warehouse', older_than => now())"),
    ("call", "CALL ducklake_merge_adjacent_files('warehouse')"),
    ("call", "CALL ducklake_cleanup_old_files('warehouse', cleanup_all => true)"),
    ("call", "CALL ducklake_set_option('warehouse', 'data_inlining_row_limit', 10)"),
    ("call", "CALL ducklake_add_data_files('warehouse', 'dead_letters', '{out}/secret.parquet')"),
    ("call", "CALL enable_logging(storage => 'file', storage_path => '{out}/log')"),
    ("call", "SELECT * FROM pragma_storage_info('dead_letters') WHERE 0; CHECKPOINT; VACUUM"),
    ("call", "SELECT * FROM checkpoint()"),
    ("call", "SELECT * FROM force_checkpoint()"),
    ("call", "SELECT * FROM enable_logging(storage => 'file', storage_path => '{out}/log')"),
    ("call", "SELECT * FROM ducklake_expire_snapshots('warehouse', older_than => now())"),
    ("call", "EXPLAIN ANALYZE SELECT * FROM checkpoint()"),
    ("call", "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/e.csv'"),
]
# what got through before `Warehouse.check_query` (the lake: files written, a catalog created); always tried
FOUND = {
    "COPY (SELECT 1) TO '{lake}/evil.parquet' (FORMAT parquet)",
    "ATTACH 'ducklake:sqlite:{out}/lake2.sqlite' AS dl (DATA_PATH '{out}/lake2')",
    "ATTACH '{out}/x.sqlite' AS sq (TYPE sqlite)",
    "SELECT * FROM pragma_storage_info('dead_letters') WHERE 0; CHECKPOINT; VACUUM",
    "CALL enable_logging(storage => 'file', storage_path => '{out}/log')",
    "SELECT * FROM duckdb_secrets()",
}
CONTROLS = [
    "SELECT count(*) FROM events",
    "SELECT family, count(*) FROM events GROUP BY 1",
    "WITH x AS (SELECT session_id, seq, lag(seq) OVER (PARTITION BY session_id ORDER BY seq) p FROM events) "
    "SELECT count(*) FROM x",
        "SELECT * FROM chain_status LIMIT 3",
    "EXPLAIN SELECT count(*) FROM events",
    "DESCRIBE events",
]


def _env(home: Path, warehouse: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "HOME": str(home.parent), "PYTHONPATH": str(REPO), "NO_COLOR": "1",
                "COLUMNS": "200", "AGENTLEDGER_WAREHOUSE": warehouse})
    return env


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with a digest of its bytes (what a refused statement must not change)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith((".wal", "-shm", "-wal", "-journal")) and "/cli-out" not in str(p):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _setup(work: Path, kind: str) -> tuple[Path, str, dict]:
    import duckdb

    home = work / kind / "home"
    home.mkdir(parents=True)
    out = work / kind / "out"
    out.mkdir()
    warehouse = str(home / "warehouse.duckdb") if kind == "file" else f"ducklake:sqlite:{home / 'lake' / 'meta.sqlite'}"
    from agentledger import api
    from agentledger.schemas.config import from_env

    settings = from_env(_env(home, warehouse))
    api.simulate(settings, 2, 3)
    api.ingest(settings)
    (out / "secret.csv").write_text(f"token\n{PLANTED}\n")
    (out / "secret.json").write_text(f'{{"token": "{PLANTED}"}}\n')
    con = duckdb.connect()
    con.execute(f"COPY (SELECT '{PLANTED}' AS token) TO '{out / 'secret.parquet'}' (FORMAT parquet)")
    con.close()
    lake = home / "lake" / "meta.sqlite.files" if kind == "lake" else home
    fills = {"out": str(out), "home": str(home), "wh": str(home / "warehouse.duckdb") if kind == "file"
             else str(home / "lake" / "meta.sqlite"), "lake": str(lake)}
    return home, warehouse, fills


class _Library:
    """Statements through `open_for_query`, as a notebook would: one connection, reopened if a statement
    left it unusable. ``__call__`` returns (raised an error, output text)."""

    def __init__(self, home: Path, warehouse: str):
        from agentledger.schemas.config import from_env

        self.settings = from_env(_env(home, warehouse))
        self.wh = None

    def __call__(self, home: Path, warehouse: str, stmt: str) -> tuple[bool, str]:
        from agentledger.schemas.errors import AgentLedgerError
        from agentledger.schemas.warehouse import open_for_query

        import duckdb

        if self.wh is not None:
            try:
                self.wh.con.execute("SELECT 1").fetchall()
            except duckdb.Error:
                self.close()
        if self.wh is None:
            self.wh = open_for_query(self.settings)
        try:
            cur = self.wh.query(stmt)
            rows = cur.fetchall() if cur.description else []
            return False, repr(rows)
        except (duckdb.Error, AgentLedgerError) as exc:
            return True, str(exc)

    def close(self) -> None:
        if self.wh is not None:
            self.wh.close()
            self.wh = None


def _cli(home: Path, warehouse: str, stmt: str) -> tuple[bool, str]:
    proc = subprocess.run([*agentledger_cmd(), "sql", stmt, "--format", "csv"], cwd=REPO,
                          env=_env(home, warehouse), capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    if "Traceback" in proc.stderr:
        return False, "traceback: " + proc.stderr[-500:]
    return proc.returncode != 0, text


@scenario("readonly_sql")
def run(args, workdir: Path) -> dict:
    figures: dict = {}
    undetected = 0
    for kind in args.sql_warehouses.split(","):
        home, warehouse, fills = _setup(workdir, kind)
        root = workdir / kind
        cli_every = max(1, args.sql_cli_every)
        library = _Library(home, warehouse)
        for path, runner in (("library", library), ("cli", _cli)):
            tried = refused = 0
            allowed = []
            for n, (cat, template) in enumerate(STATEMENTS):
                if n % (cli_every if path == "cli" else max(1, args.sql_sample)) and (path == "cli" or template not in FOUND):
                    continue
                stmt = template.format(**fills)
                before = _tree(root)
                failed, text = runner(home, warehouse, stmt)
                after = _tree(root)
                changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                leaked = PLANTED in text
                tried += 1
                if failed and not changed and not leaked:
                    refused += 1
                else:
                    allowed.append({"category": cat, "statement": template, "error": failed, "changed": changed[:3],
                                    "leaked": leaked, "output": text[:200]})
            controls_ok = sum(1 for c in CONTROLS if not runner(home, warehouse, c)[0]) if path == "library" else \
                sum(1 for c in CONTROLS[:2] if not runner(home, warehouse, c)[0])
            figures[f"{kind}_{path}"] = {"tried": tried, "refused": refused, "allowed": allowed,
                                         "controls_ok": controls_ok,
                                         "controls": len(CONTROLS) if path == "library" else 2}
            undetected += len(allowed) + (figures[f"{kind}_{path}"]["controls"] - controls_ok)
            library.close()
    figures["tried"] = sum(v["tried"] for v in figures.values())
    figures["refused"] = sum(v["refused"] for k, v in figures.items() if isinstance(v, dict))
    figures["undetected"] = undetected
    figures["tracebacks"] = sum(1 for v in figures.values() if isinstance(v, dict)
                                for a in v["allowed"] if str(a["output"]).startswith("traceback"))
    return figures
