"""The read-only SQL guard (`Warehouse.check_query`, `check_read_only`) of `agentledger sql`, the
console's SQL page, notebooks and the what-if's session query: table functions are allowed by name
(generators and the catalog's descriptions), so SQL given as text to query() / query_table() /
json_execute_serialized_sql() is refused (the guard never saw it: `query('select * from
enable_logging(...)')` aborted the console's process), and so is a query with nothing to run.
(bench/chaos.py's readonly_sql scenario tries the guard's other refusals on real warehouses.)"""

from __future__ import annotations

import pytest

from agentledger.schemas.errors import WarehouseError


@pytest.fixture(scope="module")
def wh():
    from agentledger.schemas.warehouse import open_warehouse

    w = open_warehouse(":memory:")
    w.lock_down()
    try:
        yield w
    finally:
        w.close()


DYNAMIC = [
    "select * from query('select * from checkpoint()')",
    "SELECT * FROM Query('select 1')",
    "from query_table('chain_heads')",
    "select * from json_execute_serialized_sql(json_serialize_sql('select 1'))",
    "select (select count(*) from query('select 1')) as n",
    "with x as (select * from query('select 1')) select * from x",
    "select * from chain_heads, lateral (select * from query('select 1'))",
    "explain select * from query('select 1')",
    "explain analyze select * from query_table('chain_heads')",
    "select * from system.main.query('select 1')",
]


@pytest.mark.parametrize("sql", DYNAMIC)
def test_sql_given_as_text_to_a_table_function_is_refused(wh, sql):
    with pytest.raises(WarehouseError, match=r"refused: the table function (query|query_table|"
                                             r"json_execute_serialized_sql)\(\)"):
        wh.query(sql)


@pytest.mark.parametrize("sql", ["select * from read_text('/etc/passwd')", "select * from glob('/*')",
                                 "select * from read_duckdb('/x.duckdb')", "select * from test_all_types()"])
def test_table_functions_not_on_the_list_are_refused(wh, sql):
    with pytest.raises(WarehouseError, match="is not allowed in read-only SQL"):
        wh.check_query(sql)


@pytest.mark.parametrize("sql", [
    "select count(*) from chain_heads", "select * from range(3)", "select * from generate_series(1, 3)",
    "select unnest([1, 2])", "select * from chain_heads, unnest([1])", "select count(*) from duckdb_tables()",
    "select * from duckdb_views() limit 1", "select * from pragma_table_info('chain_heads')", "pragma version",
    "pragma show_tables", "describe chain_heads", "summarize chain_heads", "show tables",
    "explain select count(*) from chain_heads", "select * from repeat(1, 2)",
])
def test_ordinary_read_only_queries_still_run(wh, sql):
    wh.query(sql).fetchall()


@pytest.mark.parametrize("sql", ["", "   ", "\x00", ";", " ; ;", "-- only a comment", "/* nothing */"])
def test_a_query_with_nothing_to_run_says_so(wh, sql):
    with pytest.raises(WarehouseError, match="nothing to run"):
        wh.query(sql)


def test_the_whatif_session_query_goes_through_the_guard(wh):
    from agentledger.replay.whatif import session_ids

    with pytest.raises(WarehouseError, match=r"query\(\)"):
        session_ids(wh.con, "select * from query('select * from checkpoint()')")
    with pytest.raises(WarehouseError, match="changes state"):
        session_ids(wh.con, "select * from checkpoint()")
    with pytest.raises(WarehouseError, match="not allowed here"):
        session_ids(wh.con, "select 'a' as session_id; delete from chain_heads")
    assert session_ids(wh.con, "select 'a' as x, 'b' as session_id union all select 'c', null") == ["b"]
    assert session_ids(wh.con, None) is None
