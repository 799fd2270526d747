"""Warehouse transactions that lost a race: DuckDB errors classified once, and the one retry loop.

Transient (redo the whole transaction): what another writer causes -- a DuckLake commit that lost
to a concurrent one, a write-write conflict, a catalog database or file locked for a moment.
Terminal (report it): everything else -- bad SQL, a missing table, a constraint, a value that does
not convert, a full disk. Retrying those only delays the error; and since their messages quote the
data ("could not convert string 'busy'"), they are never classified by their text.

By type: `duckdb.TransactionException` is transient (DuckDB raises it for commit conflicts and for
DuckLake commits that could not flush into a locked catalog). Two cases carry no telling type, so
their text is read, here only: an `IOException` that is a lock ("Could not set lock on file": a
DuckDB catalog file another process holds), and the bare `duckdb.Error` DuckLake raises when two
processes initialise one catalog at once ("Failed to initialize DuckLake ... database is locked"; on a
Postgres catalog the loser creates a table the winner just made: "Failed to initialize DuckLake ... duplicate
key value violates unique constraint" or "... already exists", read only together with the DuckLake initialisation wording).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

import duckdb

from .errors import WarehouseError

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_TYPES: tuple[type[BaseException], ...] = (duckdb.TransactionException,)
# Only for errors whose type says nothing (see the module doc): the lock wordings of DuckDB, SQLite and
# Postgres catalogs. Never single words ("busy", "conflict"): messages quote paths and data.
UNTYPED_TRANSIENT_TEXT = ("could not set lock on file", "database is locked", "could not serialize access")


# Two processes creating one new DuckLake catalog in Postgres: both create its tables, one loses, either
# while the winner's transaction is open (a unique-constraint error) or after it committed ("already
# exists"). Read only together with DuckLake's initialisation wording; the retry attaches the catalog.
INIT_RACE = "failed to initialize ducklake"
INIT_RACE_LOSER = ("duplicate key value violates unique constraint", "already exists")


def is_transient(exc: BaseException) -> bool:
    """Whether redoing the transaction may succeed: it lost a race with another writer."""
    if isinstance(exc, TRANSIENT_TYPES):
        return True
    text = str(exc).lower()
    if isinstance(exc, duckdb.Error) and INIT_RACE in text and any(m in text for m in INIT_RACE_LOSER):
        return True
    if type(exc) in (duckdb.IOException, duckdb.Error):
        return any(m in text for m in UNTYPED_TRANSIENT_TEXT)
    return False


def backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: 50 ms growing 1.5x, at most 2 s."""
    return min(2.0, 0.05 * 1.5 ** attempt)


def retry_transaction(run: Callable[[], T], what: str, *, attempts: int = 20,
                      on_retry: Callable[[int, BaseException], None] | None = None,
                      transient: Callable[[BaseException], bool] = is_transient,
                      delay: Callable[[int], float] = backoff) -> T:
    """``run()`` (one whole transaction, which must leave nothing behind when it raises), redone while
    it fails transiently, at most ``attempts`` times. A terminal error, or the last transient one, is a
    `WarehouseError` "``what`` failed: ...". ``on_retry(attempt, exc)`` is called before each redo."""
    for attempt in range(attempts):
        try:
            return run()
        except duckdb.Error as exc:
            if not transient(exc) or attempt == attempts - 1:
                raise WarehouseError(f"{what} failed: {str(exc).strip()}") from exc
            log.info("%s: transient error, attempt %d of %d: %s", what, attempt + 1, attempts, exc)
            if on_retry is not None:
                on_retry(attempt, exc)
            time.sleep(delay(attempt))
    raise AssertionError("unreachable")  # attempts >= 1
