"""Rendering rows for humans (rich tables) and machines (JSON, CSV)."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import sys
import uuid
from enum import Enum
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


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
        cells = [["" if v is None else str(jsonable(v)) for v in r] for r in rows]
        t = Table(title=title, show_lines=False)
        widest = [max([len(str(c)), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        ident = [str(c).endswith("_id") or str(c) in ("hash", "prev_hash") for c in columns]
        keep = [w <= 14 or idn for w, idn in zip(widest, ident)]
        if sum(w + 3 for w, k in zip(widest, keep) if k) + 1 > console.width:
            keep = ident  # too wide for this terminal: only ids keep their width, the rest fold
        for c, w, idn, k in zip(columns, widest, ident, keep):
            # short columns keep their width; long free text folds; ids never wrap
            t.add_column(str(c), overflow="fold", no_wrap=idn, min_width=w if k else None)
        for r in cells:
            t.add_row(*r)
        console.print(t)
