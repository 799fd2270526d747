"""Importer memory against hostile lines: peak RSS of `agentledger import codex-rollout` on a rollout
holding one huge line (and, separately, one deeply nested line) among ordinary ones.

    python bench/import_memory.py [--line-mb 150] [--code DIR] [--workdir DIR]

Each import is a fresh process (`python -m agentledger import codex-rollout FILE --dry-run`); its
peak resident set comes from wait4(), so it is that process's own. ``--code DIR`` runs another
checkout's code (e.g. the main branch) for a before/after comparison.

Baseline, same run: the same import of the same rollout without the huge line. Last line, JSON:
{"line_mb", "baseline_kib", "huge_line_kib", "extra_kib", "huge_line_seconds", "huge_line_exit",
"deep_line_exit", "deep_line_traceback", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROLLOUT = next((REPO / "tests" / "fixtures" / "codex").glob("rollout-*0199a1b2*.jsonl"))


def run(code: Path, path: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "PYTHONPATH": str(code), "HOME": str(home)})
    t0 = time.perf_counter()
    with open(home.parent / f"{home.name}.out", "w+") as out, open(home.parent / f"{home.name}.err", "w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "agentledger", "import", "codex-rollout", str(path), "--dry-run",
                              "--format", "json"], stdout=out, stderr=err, env=env, cwd=code)
        _, status, usage = os.wait4(p.pid, 0)
        err.seek(0)
        stderr = err.read()
    return {"kib": usage.ru_maxrss, "seconds": round(time.perf_counter() - t0, 2),
            "exit": os.waitstatus_to_exitcode(status), "traceback": "Traceback" in stderr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--line-mb", type=float, default=150.0, help="size of the huge line (MB)")
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose code runs the import")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="import-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = ROLLOUT.read_bytes().splitlines(keepends=True)
    plain = work / "plain" / ROLLOUT.name
    huge = work / "huge" / ROLLOUT.name
    deep = work / "deep" / ROLLOUT.name
    for p in (plain, huge, deep):
        p.parent.mkdir(exist_ok=True)
    plain.write_bytes(b"".join(lines))
    with open(huge, "wb") as f:
        f.writelines(lines[:6])
        f.write(b'{"timestamp":"2025-09-14T10:02:30.000Z","type":"event_msg","payload":{"type":"agent_message",'
                b'"message":"')
        left = int(a.line_mb * 1e6)
        block = b"A" * (1 << 20)
        while left > 0:
            f.write(block[:left])
            left -= len(block)
        f.write(b'"}}\n')
        f.writelines(lines[6:])
    deep.write_bytes(b"".join(lines[:6]) + b"[" * 250_000 + b"]" * 250_000 + b"\n" + b"".join(lines[6:]))
    base = run(a.code, plain, work / "h-plain")
    big = run(a.code, huge, work / "h-huge")
    nested = run(a.code, deep, work / "h-deep")
    print(json.dumps({"line_mb": a.line_mb, "code": str(a.code), "baseline_kib": base["kib"],
                      "huge_line_kib": big["kib"], "extra_kib": big["kib"] - base["kib"],
                      "huge_line_seconds": big["seconds"], "huge_line_exit": big["exit"],
                      "huge_line_traceback": big["traceback"], "deep_line_exit": nested["exit"],
                      "deep_line_traceback": nested["traceback"], "deep_line_seconds": nested["seconds"]}))


if __name__ == "__main__":
    main()
