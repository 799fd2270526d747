"""Rendering rows for humans (rich tables) and machines (JSON, CSV)."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import re
import sys
import uuid
from contextlib import contextmanager
from enum import Enum
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from agentledger.schemas.terminal import printable


class _Console(Console):
    """A rich console that shows recorded text's control characters instead of sending them to the
    terminal (`printable`): every string printed, or put in a table cell, is rendered through
    `render_str`. Rich's own styling is added after, so colours still work."""

    def render_str(self, text: str, **kwargs: Any):
        return super().render_str(printable(text), **kwargs)


console = _Console()
err_console = _Console(stderr=True)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def jsonable(v: Any) -> Any:
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(obj), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def render_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: Format, title: str | None = None) -> None:
    rows = list(rows)
    if fmt is Format.json:
        print_json([dict(zip(columns, r)) for r in rows])
    elif fmt is Format.csv:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if v is None else (json.dumps(jsonable(v)) if isinstance(v, (dict, list)) else jsonable(v))
                        for v in r])
        sys.stdout.write(buf.getvalue())
    else:
        _render_table([str(c) for c in columns], [["" if v is None else str(jsonable(v)) for v in r] for r in rows],
                      title)


MIN_FREE_TEXT = 12  # narrowest a long free-text column is folded to
SHORT = 14  # columns no wider than this keep their width


def _is_ident(column: str) -> bool:
    return column.endswith("_id") or column in ("hash", "prev_hash", "head_hash")


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_HEX = re.compile(r"^[0-9a-f]{32,}$")


def _shorten(value: str) -> str:
    """A UUID to its first 13 characters (a uuid7's time prefix: replay/export accept a unique
    prefix), a long hex digest to 16; anything else as it is."""
    if _UUID.match(value):
        return value[:13] + "…"
    if _HEX.match(value):
        return value[:16] + "…"
    return value


def _plain(value: str) -> Text:
    """A cell as the text it is: recorded text is never rich markup (``[link=...]``, ``[/]``) and its
    control characters are shown (`printable`)."""
    return Text(printable(value))


def _render_table(columns: list[str], cells: list[list[str]], title: str | None) -> None:
    """A table that reads on this terminal: as it is when it fits; else ids and hashes shortened
    (JSON/CSV give them whole), short columns kept, long text folded; and when even that cannot fit,
    one block of "column  value" lines per row (psql's expanded display)."""
    width = console.width

    def widths(rows: list[list[str]]) -> list[int]:
        return [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]

    def total(ws) -> int:
        return sum(w + 3 for w in ws) + 1

    ident = [_is_ident(c) for c in columns]
    full = cells
    widest = widths(cells)
    if total(widest) > width and any(ident):
        cells = [[_shorten(v) if idn else v for v, idn in zip(r, ident)] for r in cells]
        widest = widths(cells)
    floor = [w if w <= SHORT or idn else min(w, MIN_FREE_TEXT) for w, idn in zip(widest, ident)]
    if total(floor) > width and len(columns) > 2:
        _render_expanded(columns, full, title)
        return
    t = Table(title=title, show_lines=False)
    fits = total(widest) <= width
    for c, _w, f, idn in zip(columns, widest, floor, ident):
        t.add_column(_plain(c), overflow="fold", no_wrap=idn, min_width=None if fits else f)
    for r in cells:
        t.add_row(*map(_plain, r))
    console.print(t)


def _render_expanded(columns: list[str], cells: list[list[str]], title: str | None) -> None:
    if title:
        console.print(f"[bold]{title}[/]", highlight=False)
    label = max(len(c) for c in columns)
    for n, r in enumerate(cells, 1):
        console.print(f"[dim]─[ row {n} ]{'─' * max(0, min(console.width, 60) - 10 - len(str(n)))}[/]")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(min_width=label, style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for c, v in zip(columns, r):
            grid.add_row(_plain(c), _plain(v))
        console.print(grid)
    if not cells:
        console.print("[dim](no rows)[/]")


@contextmanager
def progress_bar(enabled: bool = True, *, text: str = "[bold]{task.description}", elapsed: bool = True):
    """A transient progress display on stderr, one bar per task, and the application layer's
    progress callback that drives it (``progress=`` of agentledger.api's functions)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn(text), BarColumn(), MofNCompleteColumn(), *([TimeElapsedColumn()] if elapsed else [])]
    with Progress(*columns, console=err_console, disable=not enabled, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(u) -> None:
            if u.task not in tasks:
                tasks[u.task] = bar.add_task(u.task, total=u.total, completed=u.completed)
            else:
                bar.update(tasks[u.task], completed=u.completed, total=u.total)

        yield update
