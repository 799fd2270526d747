"""What every part of the application layer shares: settings, progress reports, rows."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from agentledger.schemas.config import Settings, from_env
from agentledger.schemas.homes import restrict_umask, secure_home


def settings(*, home: str | Path | None = None, bootstrap_servers: str | None = None, warehouse: str | None = None,
             topic: str | None = None, env: Mapping[str, str] | None = None, private: bool = True) -> Settings:
    """The configuration: the environment (``env``, default ``os.environ``: AGENTLEDGER_HOME,
    AGENTLEDGER_BOOTSTRAP_SERVERS, AGENTLEDGER_WAREHOUSE, AGENTLEDGER_TOPIC, ...) with these
    overrides, as the CLI's global flags do it.

    ``private`` (as every agentledger entry point does): from here on this process creates files
    owner-only (umask 077), and an existing home open to group/others is tightened (a warning says
    what could not be)."""
    e = dict(os.environ if env is None else env)
    for var, value in (("AGENTLEDGER_HOME", home), ("AGENTLEDGER_BOOTSTRAP_SERVERS", bootstrap_servers),
                       ("AGENTLEDGER_WAREHOUSE", warehouse), ("AGENTLEDGER_TOPIC", topic)):
        if value is not None:
            e[var] = str(value)
    s = from_env(e)
    if private:
        restrict_umask()
        msg = secure_home(s.home)
        if msg:
            warnings.warn(msg.strip(), stacklevel=2)
    return s


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report: ``completed`` of ``total`` (None: unknown) units of ``task``."""

    task: str
    completed: int
    total: int | None = None


ProgressCallback = Callable[[ProgressUpdate], None]


class Counter:
    """Counts units of a task and reports them to an optional callback."""

    def __init__(self, progress: ProgressCallback | None, task: str, total: int | None = None):
        self.progress, self.task, self.total, self.completed = progress, task, total, 0
        self.report()

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self.report()

    def set(self, completed: int, total: int | None = None) -> None:
        self.completed = completed
        if total is not None:
            self.total = total
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(ProgressUpdate(self.task, self.completed, self.total))


@dataclass
class Rows:
    """A query's result: column names and rows (tuples)."""

    columns: list[str]
    rows: list[Sequence[Any]] = field(default_factory=list)

    def as_dicts(self) -> list[dict]:
        return [dict(zip(self.columns, r)) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)
