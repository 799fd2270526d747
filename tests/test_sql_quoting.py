"""One SQL quoting helper (schemas/sql.py): names and values that contain quotes stay one token.

consumers/detect/rules.py had its own identifier quoting that did not double the quote
(`"a"b"`): this test failed on it."""

from __future__ import annotations

import re
import subprocess

import duckdb
import pytest

from conftest import REPO
from agentledger.schemas.sql import ident, idents, literal

HOSTILE = ["plain", 'a"b', 'x" FROM evil --', "it's", "'; DROP TABLE events; --", "Upper Case", "", "ünï"]


@pytest.mark.parametrize("text", HOSTILE)
def test_identifier_and_literal_round_trip_through_duckdb(text):
    con = duckdb.connect()
    if text:  # DuckDB has no zero-length identifier
        cur = con.execute(f"SELECT 1 AS {ident(text)}")
        assert cur.description[0][0] == text
    assert con.execute(f"SELECT {literal(text)}").fetchone()[0] == text


def test_numbers_and_lists():
    con = duckdb.connect()
    assert con.execute(f"SELECT {literal(3)}, {literal(2.5)}, {literal(True)}").fetchone() == (3, 2.5, "True")
    a, c = "a b", 'c"d'
    con.execute(f"CREATE TABLE t ({ident(a)} INT, {ident(c)} INT)")
    con.execute("INSERT INTO t VALUES (1, 2)")
    assert con.execute(f"SELECT {idents([c, a])} FROM t").fetchone() == (2, 1)


# Modules allowed to keep a quoting helper of their own: none.
PENDING: set[str] = set()


def test_no_module_quotes_sql_by_hand():
    hand = re.compile(r"""replace\(\s*(?:"'",\s*"''"|'"',\s*'""')\s*\)|f'"\{\w+\}"'""")
    offenders = []
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel in PENDING or rel.startswith("tests/") or rel == "schemas/sql.py" or (REPO / rel).is_symlink():
            continue
        for i, line in enumerate((REPO / rel).read_text().splitlines(), 1):
            if hand.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "use agentledger.schemas.sql.ident / literal:\n" + "\n".join(offenders)
