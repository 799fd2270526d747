"""Chaos scenarios (bench/chaos.py): each module here registers a ``run(args, workdir) -> dict`` of
figures with `scenario`; the runner imports every module of this package."""

from __future__ import annotations

import sys
from typing import Callable

from agentledger.schemas import envvars

SCENARIOS: dict[str, Callable] = {}


def scenario(name: str):
    def add(fn):
        SCENARIOS[name] = fn
        return fn

    return add


def agentledger_cmd() -> list[str]:
    """How a scenario runs the CLI: `python -m agentledger`, or AGENTLEDGER_BENCH_CLI (an executable
    that behaves as `agentledger`: the tests' smokes pass the fork server's shim, conftest.cli_shim,
    which saves each run the interpreter's start and agentledger's imports, ~0.5 CPU-s)."""
    exe = envvars.get("AGENTLEDGER_BENCH_CLI")
    return [str(exe)] if exe else [sys.executable, "-m", "agentledger"]
