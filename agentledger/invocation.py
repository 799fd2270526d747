"""How to spell agentledger commands we print (the demo's "Try next", doctor's fixes) so that they
work when copied: `agentledger` only when that name on PATH is this very installation; otherwise the
path of the program that was run (``.venv/bin/agentledger`` from a clone's root, where
``./scripts/demo`` leaves no `agentledger` on PATH)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

NAME = "agentledger"


def short_path(path: str) -> str:
    """``path`` relative to the current directory when it lies below it (``.venv/bin/agentledger``),
    else absolute; symbolic links are kept as the user sees them."""
    p = os.path.abspath(path)
    try:
        rel = os.path.relpath(p, os.getcwd())
    except ValueError:
        return p
    return rel if not rel.startswith("..") and os.sep in rel else p


def prog(argv0: str | None = None, path: str | None = None) -> str:
    """The words that run this agentledger from the current directory (see the module doc)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if Path(argv0).name == NAME:  # the console script
        script = argv0 if os.sep in argv0 else (shutil.which(argv0, path=path) or argv0)
    else:  # python -m agentledger: the console script next to this Python, when there is one
        beside = Path(sys.executable).parent / NAME
        script = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else ""
    found = shutil.which(NAME, path=path)
    if script and found and os.path.realpath(found) == os.path.realpath(script):
        return NAME
    if script:
        return shlex.quote(short_path(script))
    return f"{shlex.quote(short_path(sys.executable))} -m {NAME}"


def clone_root() -> Path | None:
    """The root of the source clone this agentledger runs from (it has scripts/bootstrap), if any."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "scripts" / "bootstrap").is_file() else None
