"""A small run of the sandbox benchmark, so it keeps working (the real run: bench/sandbox.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_bench_sandbox_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/sandbox.py", "--runs", "1", "--files", "20", "--procs", "2",
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in ("plain_s", "bwrap_s", "strace_bpf_s", "strace_ptrace_s", "recorded_s"):
        assert result[k] > 0
    assert result["strace_overhead"] > 0 and result["recorded_overhead"] > 0
    assert result["events_per_recorded_run"] > 20  # files written, read, renamed, processes started
