"""Sandbox benchmark: what observation costs. The same workload, same run, five ways:

    python bench/sandbox.py --runs 7 --files 300 --procs 20

1. plain           the workload as an ordinary process (baseline)
2. bwrap           inside our bubblewrap sandbox, not traced
3. strace_bpf      + strace -f with --seccomp-bpf (what the sandbox uses)
4. strace_ptrace   + strace -f stopping on every syscall (without --seccomp-bpf), for comparison
5. recorded        a full `SandboxSession.run`: approvals, workspace snapshots before/after, the
                   recording store, the egress proxy, trace parsing and events to the local log

The workload writes, reads and renames files in the workspace, starts sub-processes and imports a
few modules (many openat calls), i.e. the syscalls the sandbox traces. Each variant runs --runs
times; medians are reported. The last line is JSON with seconds per variant and the ratios
``strace_overhead`` = strace_bpf / bwrap and ``recorded_overhead`` = recorded / bwrap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentledger.producers.sandbox import strace as st  # noqa: E402
from agentledger.producers.sandbox.runner import LAUNCHER, Tools, runtime_dirs  # noqa: E402

WORKLOAD = """
import json, os, subprocess, sys, email.mime.text, http.client, xml.dom.minidom
n, procs = int(sys.argv[1]), int(sys.argv[2])
os.makedirs("out", exist_ok=True)
for i in range(n):
    with open(f"out/f{i}.txt", "w") as f:
        f.write(str(i) * 100)
for i in range(n):
    open(f"out/f{i}.txt").read()
for i in range(0, n, 2):
    os.rename(f"out/f{i}.txt", f"out/g{i}.txt")
for _ in range(procs):
    subprocess.run(["true"])
print(sum(len(open(os.path.join("out", x)).read()) for x in os.listdir("out")))
"""


def bwrap_prefix(tools: Tools, ws: str) -> list[str]:
    return [tools.bwrap, "--unshare-user", "--cap-drop", "ALL", "--die-with-parent", "--unshare-pid", "--unshare-net",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            *[x for d in runtime_dirs(sys.executable) for x in ("--ro-bind", d, d)],  # an install under /tmp
            "--bind", ws, ws, "--chdir", ws, "--"]


def timed(argv: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{argv[:3]}... failed: {p.stderr[-2000:]}")
    return dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--procs", type=int, default=20)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    tools = Tools.find()
    tools.require(True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="agentledger-bench-sandbox-"))
    ws = work / "ws"
    py = os.path.realpath(sys.executable)
    cmd = [py, "workload.py", str(args.files), str(args.procs)]  # in the workspace: /tmp is private inside
    trace = str(work / "trace")

    def fresh():
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
        (ws / "workload.py").write_text(WORKLOAD)

    def launcher(marker):
        return [py, "-I", "-S", LAUNCHER, json.dumps({"marker": marker}), "--"]

    variants = {
        "plain": lambda: cmd,
        "bwrap": lambda: bwrap_prefix(tools, str(ws)) + launcher("/.m") + cmd,
        "strace_bpf": lambda: st.strace_argv(tools.strace, trace, seccomp_bpf=True) + bwrap_prefix(tools, str(ws))
        + launcher("/.m") + cmd,
        "strace_ptrace": lambda: st.strace_argv(tools.strace, trace, seccomp_bpf=False) + bwrap_prefix(tools, str(ws))
        + launcher("/.m") + cmd,
    }
    times: dict[str, list[float]] = {k: [] for k in [*variants, "recorded"]}

    from agentledger.producers.sandbox import SandboxSession
    from agentledger.schemas.config import from_env

    settings = from_env({"AGENTLEDGER_HOME": str(work / "home")})
    for _ in range(args.runs):
        for name, make in variants.items():  # interleaved, so machine noise hits every variant alike
            fresh()
            times[name].append(timed(make(), str(ws)))
        fresh()
        sess = SandboxSession.open(settings, session_id=f"bench-{uuid.uuid4().hex[:8]}", workspace=str(ws),
                                   interactive=False, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        try:
            t0 = time.perf_counter()
            r = sess.run(cmd, cwd=str(ws))
            times["recorded"].append(time.perf_counter() - t0)
            if r.exit_code != 0:
                raise SystemExit(f"recorded run failed: {r}")
            events = r.events
        finally:
            sess.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "runs": args.runs, "files": args.files, "procs": args.procs,
        **{f"{k}_s": round(v, 4) for k, v in med.items()},
        "strace_overhead": round(med["strace_bpf"] / med["bwrap"], 3),
        "ptrace_all_overhead": round(med["strace_ptrace"] / med["bwrap"], 3),
        "recorded_overhead": round(med["recorded"] / med["bwrap"], 3),
        "bwrap_overhead": round(med["bwrap"] / med["plain"], 3),
        "events_per_recorded_run": events,
    }
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
