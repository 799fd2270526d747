"""The one DuckDB transaction block (schemas/warehouse.py `transaction`, `run_transaction`): commit,
rollback on any exception, and a transaction that lost a race to a real second connection redone
until it wins. Real DuckDB files, two connections; no mocks."""

from __future__ import annotations

import duckdb
import pytest

from agentledger.schemas.errors import WarehouseError
from agentledger.schemas.warehouse import run_transaction, transaction


@pytest.fixture
def db(tmp_path):
    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x INTEGER)")
    con.execute("INSERT INTO t VALUES (1, 0)")
    yield con
    con.close()


def rows(con) -> list[tuple[int, int]]:
    return con.execute("SELECT id, x FROM t ORDER BY id").fetchall()


def test_the_body_commits_and_another_connection_sees_it(db):
    other = db.cursor()
    with transaction(db) as con:
        assert con is db
        con.execute("INSERT INTO t VALUES (2, 20)")
        assert rows(other) == [(1, 0)]  # not yet committed: the other connection does not see it
    assert rows(other) == [(1, 0), (2, 20)]


@pytest.mark.parametrize("error", [ValueError("in the body"), KeyboardInterrupt()])
def test_any_exception_rolls_back_and_propagates_unchanged(db, error):
    with pytest.raises(type(error)) as info:
        with transaction(db):
            db.execute("INSERT INTO t VALUES (2, 20)")
            db.execute("UPDATE t SET x = 5 WHERE id = 1")
            raise error
    assert info.value is error
    assert rows(db) == [(1, 0)]
    with transaction(db):  # no transaction left open: a new one starts
        db.execute("INSERT INTO t VALUES (3, 30)")
    assert rows(db) == [(1, 0), (3, 30)]


def test_a_failed_statement_rolls_back_what_came_before_it(db):
    with pytest.raises(duckdb.ConstraintException):
        with transaction(db):
            db.execute("INSERT INTO t VALUES (2, 20)")
            db.execute("INSERT INTO t VALUES (1, 99)")  # duplicate key: DuckDB aborts the transaction
    assert rows(db) == [(1, 0)]


def test_a_write_conflict_with_a_second_connection_is_redone_until_it_wins(db):
    holder = db.cursor()
    writer = db.cursor()
    holder.execute("BEGIN")
    holder.execute("UPDATE t SET x = 1 WHERE id = 1")  # uncommitted: the writer's first attempt conflicts
    attempts: list[str] = []

    def body(con):
        con.execute("INSERT INTO t VALUES (2, 20)")
        try:
            con.execute("UPDATE t SET x = x + 10 WHERE id = 1")
        except duckdb.TransactionException as exc:
            attempts.append(type(exc).__name__)
            holder.execute("COMMIT")  # the other writer finishes; the redo sees its row
            raise
        attempts.append("ok")
        return len(attempts)

    assert run_transaction(writer, body, "the test update") == 2
    assert attempts == ["TransactionException", "ok"]
    assert rows(db) == [(1, 11), (2, 20)]  # the insert of the lost attempt was rolled back, not doubled


def test_a_terminal_error_is_not_redone_and_leaves_nothing(db):
    calls = []

    def body(con):
        calls.append(1)
        con.execute("INSERT INTO t VALUES (2, 20)")
        con.execute("SELECT CAST('busy conflict' AS INTEGER)")  # terminal, whatever words it quotes

    with pytest.raises(WarehouseError, match="the test insert failed: Conversion Error"):
        run_transaction(db, body, "the test insert")
    assert calls == [1]
    assert rows(db) == [(1, 0)]


def test_the_last_transient_error_is_reported_after_the_attempts(db):
    holder = db.cursor()
    holder.execute("BEGIN")
    holder.execute("UPDATE t SET x = 1 WHERE id = 1")  # never committed during the test
    calls = []

    def body(con):
        calls.append(1)
        con.execute("UPDATE t SET x = 2 WHERE id = 1")

    with pytest.raises(WarehouseError, match="the test update failed") as info:
        run_transaction(db.cursor(), body, "the test update", attempts=3)
    assert isinstance(info.value.__cause__, duckdb.TransactionException)
    assert calls == [1, 1, 1]
    holder.execute("ROLLBACK")
    assert rows(db) == [(1, 0)]
