"""Hook benchmark: N tool uses across S concurrent agent sessions, piped into `agentledger hook`.

    python bench/hook.py --tool-uses 1000 --sessions 10 [--bootstrap 127.0.0.1:9092] [--workdir DIR]

Every session is a worker that runs its hook calls one after another as real subprocesses
(`python -m agentledger hook --policy P`), as an agent does: SessionStart, then per tool use a
PreToolUse and (unless the policy denies it) a PostToolUse, then SessionEnd (Claude Code) or Stop
(Codex). Half the sessions speak Codex (turn_id, model, apply_patch), half Claude Code (Edit,
WebFetch). Then the events are ingested and checked against the inputs: every expected event is
there, in each session's input order (seq order = hook call order), chains intact.

Baseline, same run, same concurrency: a bare `python -c` that reads the same stdin and exits.
Last line, JSON: {"p50_ms", "p99_ms", "max_ms", "baseline_p50_ms", "ratio_p50", "over_1s",
"events", "expected_events", "in_order", "chains", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POLICY = """name = "bench"
[sandbox]
mode = "workspace_write"
writable_roots = ["$WORKSPACE", "/tmp"]
[network]
default = "deny"
[[network.rules]]
id = "registries"
action = "allow"
hosts = ["pypi.org", "registry.npmjs.org", "docs.python.org"]
ports = [443]
[approvals]
default = "allow"
[[approvals.rules]]
id = "no-force-delete"
decision = "forbidden"
prefix = ["rm", "-rf"]
"""

BASH_OK = ["pytest -q", "npm test", "git status --short", "ls -la src", "cargo build", "python -m build",
           "rg -n TODO src", "git diff --stat"]


def session_inputs(sid: str, agent: str, uses: int, rng: random.Random, cwd: str) -> list[tuple[dict, list]]:
    """(hook input, expected events as (kind, tool_call_id)) for one session, in call order."""
    base = {"session_id": sid, "cwd": cwd, "transcript_path": f"/home/dev/.{'codex' if agent == 'codex' else 'claude'}/t/{sid}.jsonl",
            "permission_mode": "default"}
    codex = agent == "codex"
    if codex:
        base["model"] = "gpt-5.2-codex"
    calls: list[tuple[dict, list]] = []
    turn = 0

    def ev(name: str, **kw) -> dict:
        d = {**base, "hook_event_name": name, **kw}
        if codex:
            d["turn_id"] = f"turn-{turn}"
        return d

    # the session's start, and what hooks cannot see (two coverage statements, issue 24)
    calls.append((ev("SessionStart", source="startup"), [("session_started", None), ("gap", None), ("gap", None)]))
    for i in range(uses):
        if i % 25 == 0:
            turn += 1
            calls.append((ev("UserPromptSubmit", prompt=f"task {turn}"), []))
        tid = (f"call_{uuid.UUID(int=rng.getrandbits(128)).hex[:24]}" if codex
               else f"toolu_{uuid.UUID(int=rng.getrandbits(128)).hex[:24]}")
        r = rng.random()
        if r < 0.03:  # the policy denies it: no Post
            inp = {"command": "rm -rf /home/dev/.cache"}
            calls.append((ev("PreToolUse", tool_name="Bash", tool_use_id=tid, tool_input=inp),
                          [("approval_requested", tid), ("approval_decided", tid)]))
            continue
        if r < 0.73:
            cmd = rng.choice(BASH_OK)
            fail = rng.random() < 0.1
            inp = {"command": cmd}
            if codex:
                resp = (f"Exit code: 1\nWall time: 0.1 seconds\nOutput:\n{cmd}: Permission denied\n" if fail
                        else "Exit code: 0\nWall time: 0.2 seconds\nOutput:\nok\n")
            else:
                resp = {"stdout": "" if fail else "ok\n", "stderr": "Permission denied\n" if fail else "",
                        "interrupted": False, "exit_code": 1 if fail else 0}
            calls.append((ev("PreToolUse", tool_name="Bash", tool_use_id=tid, tool_input=inp), [("command_started", tid)]))
            post = [("command_finished", tid)] + ([("sandbox_denied", tid)] if fail else [])
            calls.append((ev("PostToolUse", tool_name="Bash", tool_use_id=tid, tool_input=inp, tool_response=resp), post))
        elif r < 0.88:
            if codex:
                path = f"src/mod_{i}.py"
                inp = {"command": f"*** Begin Patch\n*** Add File: {path}\n+x = {i}\n*** End Patch\n"}
                tool, resp = "apply_patch", "Success. Updated the following files:\nA " + path
            else:
                tool, inp, resp = "Edit", {"file_path": f"{cwd}/src/mod_{i}.ts", "old_string": "a", "new_string": "b"}, \
                    {"filePath": f"{cwd}/src/mod_{i}.ts", "success": True}
            calls.append((ev("PreToolUse", tool_name=tool, tool_use_id=tid, tool_input=inp), []))
            calls.append((ev("PostToolUse", tool_name=tool, tool_use_id=tid, tool_input=inp, tool_response=resp),
                          [("file_accessed", tid)]))
        else:
            if codex:
                inp = {"command": "curl -sSfL https://pypi.org/simple/requests/"}
                calls.append((ev("PreToolUse", tool_name="Bash", tool_use_id=tid, tool_input=inp), [("command_started", tid)]))
                calls.append((ev("PostToolUse", tool_name="Bash", tool_use_id=tid, tool_input=inp,
                                 tool_response="Exit code: 0\nWall time: 0.3 seconds\nOutput:\n<html>"),
                              [("command_finished", tid)]))
            else:
                inp = {"url": "https://docs.python.org/3/library/json.html", "prompt": "summarise"}
                calls.append((ev("PreToolUse", tool_name="WebFetch", tool_use_id=tid, tool_input=inp),
                              [("network_attempted", tid), ("network_decided", tid)]))
                calls.append((ev("PostToolUse", tool_name="WebFetch", tool_use_id=tid, tool_input=inp,
                                 tool_response={"code": 200, "result": "json - JSON encoder and decoder"}),
                              [("network_completed", tid)]))
    if codex:
        calls.append((ev("Stop", stop_hook_active=False), []))
    else:
        calls.append((ev("SessionEnd", reason="exit"), [("session_ended", None)]))
    return calls


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def call(argv: list[str], data: bytes, env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run one hook call as the agent does (JSON on stdin); its wall and CPU time (ms, from wait4)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    out, err = _talk(p, data)
    _, status, usage = os.wait4(p.pid, 0)
    wall = (time.perf_counter() - t0) * 1000
    p.returncode = os.waitstatus_to_exitcode(status)
    return subprocess.CompletedProcess(argv, p.returncode, out, err), wall, (usage.ru_utime + usage.ru_stime) * 1000


def _talk(p: subprocess.Popen, data: bytes) -> tuple[bytes, bytes]:
    # communicate() would reap the child and lose its rusage: feed and drain the pipes by hand.
    err_chunks: list[bytes] = []
    t = threading.Thread(target=lambda: err_chunks.append(p.stderr.read()))
    t.start()
    try:
        p.stdin.write(data)
        p.stdin.close()
    except BrokenPipeError:
        pass
    out = p.stdout.read()
    t.join(60)
    return out, b"".join(err_chunks)


def run_calls(per_session: list[list[tuple[dict, list]]], argv: list[str], env: dict, check=None):
    """Each session's calls in order, sessions concurrently; wall and CPU ms per call."""
    walls: list[float] = []
    cpus: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker(calls):
        lw, lc = [], []
        for inp, _ in calls:
            proc, wall, cpu = call(argv, json.dumps(inp).encode(), env)
            lw.append(wall)
            lc.append(cpu)
            if check is not None:
                problem = check(inp, proc)
                if problem:
                    errors.append(problem)
        with lock:
            walls.extend(lw)
            cpus.extend(lc)

    with ThreadPoolExecutor(max_workers=len(per_session)) as pool:
        list(pool.map(worker, per_session))
    if errors:
        raise SystemExit(f"{len(errors)} hook calls misbehaved, e.g.: {errors[:3]}")
    return walls, cpus


def check_answer(inp: dict, proc: subprocess.CompletedProcess) -> str | None:
    denied = inp.get("hook_event_name") == "PreToolUse" and str((inp.get("tool_input") or {}).get("command", "")).startswith("rm -rf")
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}"
    if denied:
        try:
            out = json.loads(proc.stdout)
            if out["hookSpecificOutput"]["permissionDecision"] != "deny":
                return "not denied"
        except (ValueError, KeyError):
            return f"no deny answer: {proc.stdout[:200]!r}"
    elif proc.stdout.strip():
        return f"unexpected answer {proc.stdout[:200]!r}"
    return None


def verify(settings, per_session: list[list[tuple[dict, list]]]) -> dict:
    from agentledger.schemas.contract import load_store
    from agentledger.schemas.envelope import ChainVerifier
    from agentledger.schemas.rows import iter_session_values
    from agentledger.schemas.warehouse import open_warehouse

    store = load_store()
    expected_total = sum(len(e) for calls in per_session for _, e in calls)
    in_order, mismatches = True, []
    with open_warehouse(settings.warehouse, read_only=True) as wh:
        con = wh.con
        events = con.execute("SELECT count(*) FROM events").fetchone()[0]
        dead = con.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        chains = dict(con.execute("SELECT status, count(*) FROM chain_status GROUP BY 1").fetchall())
        reverified = 0
        for calls in per_session:
            sid = calls[0][0]["session_id"]
            want = [x for _, e in calls for x in e]
            got = [(k, t) for k, t in con.execute(
                "SELECT kind, tool_call_id FROM events WHERE session_id = ? ORDER BY seq", [sid]).fetchall()]
            if got != want:
                in_order = False
                mismatches.append({"session": sid, "expected": len(want), "got": len(got),
                                   "first_diff": next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)})
            v = ChainVerifier(sid)
            for value, rec, _ in iter_session_values(con, store, sid):
                if v.check(value, rec) is None:
                    reverified += 1
    return {"events": events, "expected_events": expected_total, "in_order": in_order, "mismatches": mismatches[:5],
            "dead_letters": dead, "chains": chains, "reverified_from_warehouse": reverified}


def import_ms(env: dict) -> dict:
    """Import time of the hook path, and whether heavy libraries stay out of it."""
    inp = json.dumps({"session_id": "import-probe", "hook_event_name": "PreToolUse", "cwd": "/tmp", "tool_name": "Bash",
                      "tool_use_id": "probe", "tool_input": {"command": "true"}}).encode()
    with tempfile.TemporaryDirectory() as probe_home:  # the in-process path: what a call costs without a server
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "agentledger", "hook"], input=inp,
                              capture_output=True, env={**env, "AGENTLEDGER_HOME": probe_home, "AGENTLEDGER_HOOK_DAEMON": "0"},
                              cwd=REPO, timeout=60)
    total, modules = 0, set()
    for line in proc.stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = line.split("|")
            name = parts[2].rstrip()
            modules.add(name.strip().split(".")[0])
            if not name.startswith("  "):  # top level: its cumulative time includes its children
                try:
                    total += int(parts[1])
                except ValueError:
                    pass
    heavy = sorted(modules & {"duckdb", "pyarrow", "polars", "typer", "rich", "pandas", "kafka"})
    return {"import_ms": round(total / 1000, 1), "heavy_modules": heavy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tool-uses", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (default: the embedded local log)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--mode", choices=("server", "inprocess"), default="server",
                    help="server: calls go to the warm per-home hook server (the default in production); "
                         "inprocess: AGENTLEDGER_HOOK_DAEMON=0, every call does all the work itself")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="agentledger-bench-hook-"))
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    policy = work / "policy.toml"
    policy.write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_") and k != "PYTHONDONTWRITEBYTECODE"}
    # Installed packages have their bytecode compiled; give this run a private bytecode cache so the
    # hook is measured as users run it (not recompiling sources on every call), without writing in REPO.
    env.update({"AGENTLEDGER_HOME": str(home), "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(work / "pycache"),
                "AGENTLEDGER_HOOK_DAEMON": "1" if args.mode == "server" else "0", "AGENTLEDGER_HOOK_DAEMON_IDLE": "120"})
    if args.bootstrap:
        env["AGENTLEDGER_BOOTSTRAP_SERVERS"] = args.bootstrap
        env["AGENTLEDGER_TOPIC"] = f"bench.hook.{uuid.uuid4().hex[:10]}"
    from agentledger.schemas.config import from_env

    settings = from_env(env)
    rng = random.Random(args.seed)
    per = [args.tool_uses // args.sessions + (1 if i < args.tool_uses % args.sessions else 0) for i in range(args.sessions)]
    sessions = []
    for i, n in enumerate(per):
        sid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        sessions.append(session_inputs(sid, "codex" if i % 2 == 0 else "claude-code", n, rng, f"/home/dev/proj-{i}"))
    calls = sum(len(c) for c in sessions)
    baseline, baseline_cpu = run_calls(sessions, [sys.executable, "-c", "import sys; sys.stdin.buffer.read()"], env)
    t0 = time.perf_counter()
    try:
        times, cpu = run_calls(sessions, [sys.executable, "-m", "agentledger", "hook", "--policy", str(policy)], env,
                               check_answer)
    finally:
        if args.mode == "server":  # we started it (the first call did): stop it
            subprocess.run([sys.executable, "-m", "agentledger", "hook", "--stop-server"], env=env, cwd=REPO,
                           capture_output=True, timeout=60)
    wall = time.perf_counter() - t0
    ing = subprocess.run([sys.executable, "-m", "agentledger", "ingest", "--format", "json"], capture_output=True,
                         env=env, cwd=REPO, text=True, timeout=600)
    if ing.returncode != 0:
        raise SystemExit(f"ingest failed: {ing.stderr[-2000:]}")
    result = {
        "transport": "kafka" if args.bootstrap else "local", "mode": args.mode,
        "tool_uses": args.tool_uses, "sessions": args.sessions, "invocations": calls,
        "p50_ms": round(statistics.median(times), 1), "p99_ms": round(pct(times, 99), 1), "max_ms": round(max(times), 1),
        "baseline_p50_ms": round(statistics.median(baseline), 1), "baseline_p99_ms": round(pct(baseline, 99), 1),
        "ratio_p50": round(statistics.median(times) / max(statistics.median(baseline), 0.001), 2),
        "over_1s": sum(1 for t in times if t >= 1000), "calls_per_s": round(calls / wall, 1),
        "cpu_p50_ms": round(statistics.median(cpu), 1), "cpu_p99_ms": round(pct(cpu, 99), 1),
        "baseline_cpu_p50_ms": round(statistics.median(baseline_cpu), 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **verify(settings, sessions), **import_ms(env), "workdir": str(work),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
