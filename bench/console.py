"""Benchmark: page load times of the web console (`agentledger serve`) over a big warehouse.

Simulates sessions until about N events (default 1,000,000; ~30 events a session), ingests them
with detection, starts `agentledger serve` as a subprocess and times HTTP GETs of whole pages
(server time + transfer, as a browser's HTML request sees it):

  list         the first page of sessions (50), unfiltered and with each filter (agent, severity,
               text in commands/hosts), and pages deep in the list by following "older" links
  session      a session page, first view (reads, verifies and replays the session) and stepping
               (?at=SEQ: the state at another seq of a session already open)
  alerts       the triage queue

Baseline, same run, same warehouse: the obvious query for a page of the list,
``select * from sessions order by started_at desc limit 50 offset K`` (the `sessions` view
aggregates every event; OFFSET scans past K rows), through `agentledger.api.sql`.

The last line is JSON. Target: p95 <= 300 ms for every kind of page (`meets_target`).

    .venv/bin/python bench/console.py --events 1000000
    .venv/bin/python bench/console.py --home /tmp/al-1m --events 1000000   # keeps the data for a re-run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentledger import api  # noqa: E402

TARGET_MS = 300.0
EVENTS_PER_SESSION = 30  # about what the simulator records per session


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": round(pct(xs, 50), 1), "p95_ms": round(pct(xs, 95), 1),
            "max_ms": round(max(xs), 1)}


def get(url: str) -> tuple[float, str]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read().decode()
    return (time.perf_counter() - t) * 1000, body


def prepare(home: Path, events: int, seed: int) -> dict:
    s = api.settings(home=home, env={})
    if (home / "warehouse.duckdb").exists():
        n = api.sql(s, "select count(*) from events").rows[0][0]
        return {"events": n, "reused": True}
    t = time.perf_counter()
    sim = api.simulate(s, max(2, events // EVENTS_PER_SESSION), seed, attack_rate=0.05, force_attack_first=True)
    t_sim = time.perf_counter() - t
    t = time.perf_counter()
    api.ingest(s, detect=True)
    return {"events": sim.events, "sessions": sim.sessions, "simulate_s": round(t_sim, 1),
            "ingest_detect_s": round(time.perf_counter() - t, 1), "reused": False}


def start(home: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen([sys.executable, "-m", "agentledger", "serve", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"(http://\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"serve printed no URL: {line!r} {proc.stderr.read()[-2000:]}")
    base = m.group(1).rstrip("/")
    for _ in range(300):
        try:
            get(base + "/whatif")
            return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("serve did not answer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--home", type=Path, help="keep (or reuse) the simulated home here")
    ap.add_argument("--repeat", type=int, default=10, help="timed loads of each page")
    ap.add_argument("--sessions-viewed", type=int, default=8, help="different sessions opened (first views)")
    a = ap.parse_args()
    tmp = None
    if a.home is None:
        tmp = tempfile.TemporaryDirectory(prefix="agentledger-bench-console-")
        a.home = Path(tmp.name) / "home"
    data = prepare(a.home, a.events, a.seed)
    s = api.settings(home=a.home, env={})
    ids = [r[0] for r in api.sql(s, "select session_id from chain_heads order by first_at desc").rows]
    suspect = api.sql(s, "select session_id from alerts order by severity = 'critical' desc, created_at limit 1").rows
    agent = api.sql(s, "select any_value(session_started.agent) from events where kind = 'session_started'").rows[0][0]
    proc, base = start(a.home)
    out: dict = {"benchmark": "console", **data, "sessions_in_warehouse": len(ids)}
    try:
        get(base + "/sessions")  # warm the server process (imports)
        lists = {"first_page": "/sessions", "agent": "/sessions?" + urllib.parse.urlencode({"agent": agent}),
                 "severity_high": "/sessions?severity=high", "text": "/sessions?text=curl"}
        times: dict[str, list[float]] = {}
        for name, path in lists.items():
            times[name] = [get(base + path)[0] for _ in range(a.repeat)]
        # deep pages: follow "older" links
        deep, path = [], "/sessions"
        for _ in range(a.repeat):
            ms, body = get(base + path)
            deep.append(ms)
            m = re.search(r'href="([^"]+)" id="next-page"', body)
            if not m:
                break
            path = m.group(1).replace("&amp;", "&")
        times["following_pages"] = deep
        viewed = ([suspect[0][0]] if suspect else []) + ids[1:a.sessions_viewed]
        first, steps = [], []
        for sid in viewed:
            first.append(get(f"{base}/sessions/{sid}")[0])
            last = api.sql(s, f"select head_seq from chain_heads where session_id = '{sid}'").rows[0][0]
            for at in range(max(0, last - 3), last):
                steps.append(get(f"{base}/sessions/{sid}?at={at}")[0])
        times["session_first_view"] = first
        times["session_step"] = steps
        times["alerts"] = [get(base + "/alerts")[0] for _ in range(max(2, a.repeat // 2))]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # baseline: the obvious query of a page (sessions view + OFFSET), in-process, same warehouse
    base_times = []
    for k in (0, len(ids) // 2):
        for _ in range(max(2, a.repeat // 3)):
            t = time.perf_counter()
            api.sql(s, f"select * from sessions order by started_at desc limit 50 offset {k}")
            base_times.append((time.perf_counter() - t) * 1000)
    out["pages"] = {k: summary(v) for k, v in times.items() if v}
    out["baseline_sessions_view_offset"] = summary(base_times)
    lists_all = [x for k in ("first_page", "agent", "severity_high", "text", "following_pages") for x in times[k]]
    out["list_p95_ms"] = round(pct(lists_all, 95), 1)
    out["list_p50_ms"] = round(pct(lists_all, 50), 1)
    out["session_p95_ms"] = round(pct(times["session_first_view"] + times["session_step"], 95), 1)
    out["session_first_view_p95_ms"] = round(pct(times["session_first_view"], 95), 1)
    out["session_step_p95_ms"] = round(pct(times["session_step"], 95), 1)
    out["list_speedup_vs_baseline_p50"] = round(pct(base_times, 50) / max(out["list_p50_ms"], 0.001), 2)
    out["target_ms"] = TARGET_MS
    # every kind of page on its own: a first view must not hide behind the many cheap steps
    out["meets_target"] = all(v["p95_ms"] <= TARGET_MS for v in out["pages"].values())
    print(json.dumps(out))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
