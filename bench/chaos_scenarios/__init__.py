"""Chaos scenarios (bench/chaos.py): each module here registers a ``run(args, workdir) -> dict`` of
figures with `scenario`; the runner imports every module of this package."""

from __future__ import annotations

from typing import Callable

SCENARIOS: dict[str, Callable] = {}


def scenario(name: str):
    def add(fn):
        SCENARIOS[name] = fn
        return fn

    return add
