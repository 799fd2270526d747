"""SQL quoting: the one way to put a name or a value into SQL text that DuckDB parses.

Prefer parameters (``?``) for values; these are for what cannot be a parameter (identifiers, the
path given to ``read_avro``, macro bodies). Both double the quote character, so no name or value
can end the quoted token early.
"""

from __future__ import annotations

from typing import Any, Iterable


def ident(name: str) -> str:
    """``name`` as a quoted identifier: ``a"b`` -> ``"a""b"``."""
    return '"' + str(name).replace('"', '""') + '"'


def idents(names: Iterable[str]) -> str:
    """Quoted identifiers, comma-separated (a select list)."""
    return ", ".join(ident(n) for n in names)


def literal(value: Any) -> str:
    """``value`` as a SQL literal: ints and floats as numbers, anything else as a string (``'it''s'``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"
