"""The warehouse retry helper (schemas/retry.py): DuckDB errors classified by type, real errors only.

The old classifier (schemas/warehouse.is_retryable) matched words anywhere in the message, so a
terminal error quoting data ("could not convert string 'busy'") was retried: the terminal cases
below failed on it."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pytest

from agentledger.schemas.errors import WarehouseError
from agentledger.schemas.retry import is_transient, retry_transaction


def error_of(con, sql: str) -> duckdb.Error:
    with pytest.raises(duckdb.Error) as info:
        con.execute(sql)
    return info.value


def conflicting(tmp_path):
    """Two connections to one DuckDB file; the first holds an uncommitted update of the row."""
    db = duckdb.connect(str(tmp_path / "w.duckdb"))
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x INTEGER)")
    db.execute("INSERT INTO t VALUES (1, 0)")
    holder, other = db.cursor(), db.cursor()
    holder.execute("BEGIN")
    holder.execute("UPDATE t SET x = 1 WHERE id = 1")
    return db, holder, other


def test_a_write_conflict_is_transient(tmp_path):
    db, holder, other = conflicting(tmp_path)
    other.execute("BEGIN")
    exc = error_of(other, "UPDATE t SET x = 2 WHERE id = 1")
    assert isinstance(exc, duckdb.TransactionException) and is_transient(exc)


def test_a_file_locked_by_another_process_is_transient(tmp_path):
    path = tmp_path / "locked.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(path)!r}); "
                               "print('ok', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(duckdb.Error) as info:
            duckdb.connect(str(path))
        assert type(info.value) is duckdb.IOException and is_transient(info.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.parametrize("sql", [
    "SELECT 'busy'::INTEGER",                              # the data says "busy": a conversion error
    "SELECT 'a conflict, concurrent and busy'::DATE",
    "SELECT * FROM no_such_table_conflict",                # catalog error naming "conflict"
    "INSERT INTO t VALUES (1, 5)",                         # primary key constraint
    "SELEC 1",                                             # syntax
    "SELECT * FROM read_csv('/nonexistent/busy-conflict.csv')",  # an IO error that is not a lock
])
def test_terminal_errors_are_terminal_whatever_their_text(tmp_path, sql):
    con = duckdb.connect()
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x INTEGER)")
    con.execute("INSERT INTO t VALUES (1, 0)")
    exc = error_of(con, sql)
    assert not is_transient(exc), f"{type(exc).__name__}: {exc}"


def test_retry_redoes_a_lost_race_until_it_wins(tmp_path):
    db, holder, other = conflicting(tmp_path)
    retries = []

    def run():
        other.execute("BEGIN")
        try:
            other.execute("UPDATE t SET x = x + 10 WHERE id = 1")
            other.execute("COMMIT")
        except duckdb.Error:
            other.execute("ROLLBACK")
            raise
        return other.execute("SELECT x FROM t").fetchone()[0]

    def on_retry(attempt, exc):
        retries.append(type(exc).__name__)
        if attempt == 1:
            holder.execute("COMMIT")  # the other writer finishes: the next attempt wins

    assert retry_transaction(run, "test update", attempts=5, on_retry=on_retry, delay=lambda a: 0) == 11
    assert retries == ["TransactionException", "TransactionException"]


def test_retry_gives_up_at_once_on_a_terminal_error_and_after_the_last_transient_one(tmp_path):
    calls = []
    con = duckdb.connect()

    def bad():
        calls.append(1)
        con.execute("SELECT 'busy'::INTEGER")

    with pytest.raises(WarehouseError, match="test query failed: Conversion Error"):
        retry_transaction(bad, "test query", attempts=5, delay=lambda a: 0)
    assert len(calls) == 1

    db, holder, other = conflicting(tmp_path)

    def lose():
        calls.append(1)
        other.execute("BEGIN")
        try:
            other.execute("UPDATE t SET x = 3 WHERE id = 1")
        finally:
            other.execute("ROLLBACK")

    calls.clear()
    with pytest.raises(WarehouseError, match="test update failed"):
        retry_transaction(lose, "test update", attempts=3, delay=lambda a: 0)
    assert len(calls) == 3
