"""Scale-out: ingest rate of 1, 2 and 3 `ingest --group` members on a 3-broker Kafka cluster, against
1 member on a single broker (the baseline), the same data in the same run; the warehouse is a DuckLake
on a PostgreSQL catalog with its data in S3 (S3Proxy). `--e2e` runs issue 13's end-to-end drill
instead, at full size with `--events 100000`: 3 members following, one broker and one member SIGKILLed
and restarted while events are produced, then the exact-set checks and `agentledger verify`.

Every server is started here (scripts/kafka start, scripts/kafka cluster, scripts/lakestack) in a
temporary directory and stopped in a `finally`, whatever happens -- unless servers already running are
named (`--bootstrap`, `--cluster` with `--cluster-dir`, `--lake-dir`): those are used and left running
(the test suite's smoke runs on the servers its scale-out tests started).

    python bench/scale.py [--events 30000] [--batch 5000]
    python bench/scale.py --e2e --events 100000

Last line (rates): {"one_broker", "cluster_1", "cluster_2", "cluster_3", "scaling", "events", "cpus", ...}
with rates in events/s (wall time from starting the members until every one of them exited caught up,
process start and group join included); scaling = cluster_3 / cluster_1. On a machine with fewer cores
than members the members share the cores, so scaling measures CPU contention, not the design
(docs/scale.md has the arithmetic for separate machines).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KAFKA, LAKESTACK = REPO / "scripts" / "kafka", REPO / "scripts" / "lakestack"
PARTITIONS = 6
# topics and catalog databases of this run: servers that are reused (--cluster ...) may hold an earlier run's
RUN = uuid.uuid4().hex[:8]
EVENTS_PER_SESSION = 34  # about, for the simulator's default mix (the exact count is what it reports)


def log(msg: str) -> None:
    print(f"scale: {msg}", file=sys.stderr, flush=True)


def script(*args: object, timeout: float = 600) -> str:
    env = {**os.environ, "AGENTLEDGER_PYTHON": sys.executable}
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(str(a) for a in args[:3])} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = shlex.split(v)[0] if v else ""
    return out


class Servers:
    """The single broker, the cluster and the lake backends, all under ``root``; `close` stops them all."""

    def __init__(self, root: Path, single: bool = True, given: argparse.Namespace | None = None):
        self.root = root
        self.single_dir, self.cluster_dir, self.lake_dir = root / "broker", root / "cluster", root / "lake"
        self.started: list[tuple[object, ...]] = []
        self.single = self.cluster = ""
        self.lake_env: dict[str, str] = {}
        self.want_single = single
        self.given = given

    def start(self) -> None:
        t0 = time.time()
        jobs: dict[str, str] = {}
        g = self.given
        if g is not None and g.cluster:  # main() made sure the rest of the set was named too
            # servers someone else started and stops: use them as they are
            self.cluster, self.single = g.cluster, g.bootstrap or ""
            self.cluster_dir, self.lake_dir = Path(g.cluster_dir), Path(g.lake_dir)
            self.lake_env = read_env_file(self.lake_dir / "lakestack.env")
            log(f"using running servers: cluster {self.cluster}, single {self.single or '-'}")
            return

        def run(name: str, *args: object) -> None:
            try:
                jobs[name] = script(*args)
            except Exception as exc:  # re-raised below, after every start returned
                jobs[name] = f"ERROR {exc}"

        threads = [threading.Thread(target=run, args=("cluster", KAFKA, "cluster", "start", "--brokers", 3,
                                                      "--partitions", PARTITIONS, "--dir", self.cluster_dir)),
                   threading.Thread(target=run, args=("lake", LAKESTACK, "start", "--dir", self.lake_dir))]
        self.started += [(KAFKA, "cluster", "stop", "--dir", self.cluster_dir), (LAKESTACK, "stop", "--dir", self.lake_dir)]
        if self.want_single:
            port = script(sys.executable, "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); "
                                                "t=socket.socket(); t.bind(('127.0.0.1', 0)); "
                                                "print(s.getsockname()[1], t.getsockname()[1])").split()
            threads.append(threading.Thread(target=run, args=("single", KAFKA, "start", "--port", port[0],
                                                              "--controller-port", port[1], "--dir",
                                                              self.single_dir, "--partitions", PARTITIONS)))
            self.started.append((KAFKA, "stop", "--dir", self.single_dir))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = {k: v for k, v in jobs.items() if v.startswith("ERROR")}
        if bad:
            raise RuntimeError("; ".join(f"{k}: {v}" for k, v in bad.items()))
        self.cluster, self.single = jobs["cluster"], jobs.get("single", "")
        self.lake_env = read_env_file(Path(jobs["lake"]))
        log(f"servers up in {time.time() - t0:.0f}s: cluster {self.cluster}, single {self.single or '-'}")

    def lake(self, name: str) -> dict[str, str]:
        """A fresh catalog database and data prefix for one scenario."""
        url = script(LAKESTACK, "createdb", "--dir", self.lake_dir, f"{name}_{RUN}")
        return {**self.lake_env, "AGENTLEDGER_WAREHOUSE": url, "AGENTLEDGER_LAKE_DATA_PATH": f"s3://agentledger/{name}_{RUN}/"}

    def close(self) -> None:
        for args in reversed(self.started):
            try:
                script(*args, timeout=300)
            except Exception as exc:
                log(f"stopping: {exc}")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "PYTHONPATH": str(REPO), "HOME": str(home / "user"),
                "XDG_DATA_HOME": str(home / "user" / "share"), "AGENTLEDGER_PARTITIONS": str(PARTITIONS)})
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], timeout: float = 3600) -> str:
    proc = subprocess.run([sys.executable, "-m", "agentledger", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"agentledger {args[0]} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return proc.stdout


def simulate(env: dict[str, str], sessions: int, seed: int) -> int:
    out = cli("simulate", "--sessions", str(sessions), "--seed", str(seed), "--format", "json", env=env)
    return int(json.loads(out.strip().splitlines()[-1])["events"])


def query(env: dict[str, str], sql: str) -> dict:
    return json.loads(cli("sql", sql, "--format", "json", env=env))[0]


# sessions that are not a prefix 0..k of their chain
GAPS = "(select count(*) from (select session_id from events group by 1 having min(seq) <> 0 or max(seq) <> count(*) - 1)) gaps"

# The auditor's query during the drill (as tests/test_scale_out.py): events + dead letters equal the
# offsets committed with them, and every session is a prefix 0..k of its chain.
AUDIT = """select (select count(*) from events) n,
  (select count(*) from dead_letters) dl,
  (select coalesce(sum(next_offset), 0) from ingest_offsets) o,
  """ + GAPS

CHECK = """select count(*) n, count(distinct event_id) ids,
  """ + GAPS + """,
  (select count(*) from chain_status where status <> 'ok') not_ok,
  (select count(*) from dead_letters where reason <> 'duplicate') bad from events"""


def ingest_rate(servers: Servers, work: Path, name: str, bootstrap: str, topic: str, members: int, events: int,
                batch: int) -> dict:
    lake = servers.lake(name)
    envs = [cli_env(work / name / f"member{i}", AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap, AGENTLEDGER_TOPIC=topic,
                    **lake) for i in range(members)]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "agentledger", "ingest", "--until-caught-up", "--group",
                               f"g-{name}", "--batch", str(batch), "--format", "json"], env=e, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in envs]
    try:
        outs = [p.communicate(timeout=3600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    seconds = time.time() - t0
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"{name}: a member exited {p.returncode}: {err[-3000:]}")
    per_member = [json.loads(o).get("events", 0) for o, _ in outs]
    check = query(envs[0], CHECK)
    if check != {"n": events, "ids": events, "gaps": 0, "not_ok": 0, "bad": 0}:
        raise RuntimeError(f"{name}: warehouse does not hold exactly the produced set: {check}")
    rate = events / seconds
    log(f"{name}: {members} member(s), {events} events in {seconds:.1f}s = {rate:,.0f} ev/s (per member {per_member})")
    return {"rate": round(rate), "seconds": round(seconds, 2), "per_member": per_member}


def rates(args: argparse.Namespace, work: Path) -> dict:
    servers = Servers(work / "servers", given=args)
    try:
        servers.start()
        sessions = max(2, args.events // EVENTS_PER_SESSION)
        produced = {}
        for target, bootstrap in (("one_broker", servers.single), ("cluster", servers.cluster)):
            env = cli_env(work / f"producer-{target}", AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap,
                          AGENTLEDGER_TOPIC=f"bench.scale.{RUN}.{target}")
            produced[target] = simulate(env, sessions, 7)  # the same seed: the same events on both
        if produced["one_broker"] != produced["cluster"]:
            raise RuntimeError(f"the two topics got different data: {produced}")
        events = produced["cluster"]
        log(f"{events} events ({sessions} sessions) on each of the two Kafka setups")
        out: dict = {"events": events, "sessions": sessions, "partitions": PARTITIONS, "cpus": os.cpu_count(),
                     "batch": args.batch}
        runs = [("one_broker", servers.single, f"bench.scale.{RUN}.one_broker", 1)] + [
            (f"cluster_{m}", servers.cluster, f"bench.scale.{RUN}.cluster", m) for m in args.members]
        for name, bootstrap, topic, members in runs:
            r = ingest_rate(servers, work, name, bootstrap, topic, members, events, args.batch)
            out[name] = r["rate"]
            out[f"{name}_detail"] = r
        top = f"cluster_{max(args.members)}"
        out["scaling"] = round(out[top] / out["cluster_1"], 3)
        out["cluster_vs_one_broker"] = round(out["cluster_1"] / out["one_broker"], 3)
        return out
    finally:
        servers.close()


def e2e(args: argparse.Namespace, work: Path) -> dict:
    """Issue 13's drill at any size: 3 members following, a broker and a member killed and restarted."""
    servers = Servers(work / "servers", single=False, given=args)
    members: list[subprocess.Popen] = []
    try:
        servers.start()
        lake = servers.lake("e2e")
        base = {**lake, "AGENTLEDGER_BOOTSTRAP_SERVERS": servers.cluster, "AGENTLEDGER_TOPIC": f"bench.scale.{RUN}.e2e"}
        homes = [work / "e2e" / f"machine{i}" for i in range(5)]
        envs = [cli_env(h, **base) for h in homes]
        logs = [open(work / f"member{i}.log", "a") for i in range(3)]

        def member(i: int) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "agentledger", "-v", "ingest", "--follow", "--group", f"g-{RUN}-e2e",
                                     "--batch", str(args.batch)], env=envs[i], cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=logs[i])

        sessions = max(3, args.events // EVENTS_PER_SESSION)
        rounds = [sessions * 4 // 10, sessions * 3 // 10]
        rounds.append(sessions - sum(rounds))
        t0 = time.time()
        produced = simulate(envs[3], rounds[0], 41)
        members = [member(i) for i in range(3)]

        seen: list[dict] = []  # what the auditor (a 5th machine, a new `sql` process each time) saw

        def count() -> int:
            try:
                seen.append(query(envs[4], AUDIT))
            except RuntimeError:
                return -1
            return int(seen[-1]["n"])

        deadline = time.time() + args.timeout
        while count() < produced // 5:
            if time.time() > deadline or any(m.poll() is not None for m in members):
                raise RuntimeError("the members did not start ingesting")
            time.sleep(1)
        log(f"{time.time() - t0:.0f}s: killing broker 2 and member 1")
        script(KAFKA, "cluster", "kill", "--dir", servers.cluster_dir, "--node", 2)
        result: list[int] = []
        producing = threading.Thread(target=lambda: result.append(simulate(envs[3], rounds[1], 42)))
        producing.start()
        time.sleep(1)
        members[1].send_signal(signal.SIGKILL)
        members[1].wait(30)
        script(KAFKA, "cluster", "start", "--dir", servers.cluster_dir)
        members[1] = member(1)
        producing.join()
        if not result:
            raise RuntimeError("the producer failed while a broker was down")
        produced += result[0]
        log(f"{time.time() - t0:.0f}s: broker 2 and member 1 are back; producing the last round")
        produced += simulate(envs[3], rounds[2], 43)
        deadline = time.time() + args.timeout
        while (n := count()) != produced and time.time() < deadline:
            time.sleep(2)
        seconds = time.time() - t0
        time.sleep(3)
        check = query(envs[4], CHECK)
        trusted = [a for h in homes[:3] for a in ("--operator-key", str(h / "keys" / "operator"))]
        t_verify = time.time()
        verify = json.loads(cli("verify", *trusted, "--format", "json", env=envs[4]))
        verify_seconds = time.time() - t_verify
        lost, duplicated = produced - check["ids"], check["n"] - check["ids"]
        # one query, one snapshot: a reader that saw half a commit breaks one of these
        torn = [x for x in seen if x["n"] + x["dl"] != x["o"] or x["gaps"] != 0]
        counts = [x["n"] for x in seen]
        backwards = sum(1 for a, b in zip(counts, counts[1:]) if b < a)
        out = {"mode": "e2e", "events": produced, "stored": check["n"], "lost": lost, "duplicated": duplicated,
               "gaps": check["gaps"], "chains_not_ok": check["not_ok"], "dead_letters_not_duplicate": check["bad"],
               "verify_ok": bool(verify.get("ok")), "verify_sessions": verify.get("sessions"),
               "verify_seconds": round(verify_seconds, 1), "auditor_queries": len(seen),
               "auditor_torn_snapshots": len(torn), "auditor_count_went_back": backwards, "seconds": round(seconds, 1),
               "events_per_s": round(produced / seconds), "cpus": os.cpu_count(), "last_count": n}
        if lost or duplicated or check["gaps"] or check["not_ok"] or not verify.get("ok") or torn or backwards:
            print(json.dumps(out))
            raise SystemExit("scale: e2e FAILED (see the JSON above)")
        return out
    except BaseException:
        for i in range(3):  # the work directory goes away: show what the members said
            f = work / f"member{i}.log"
            if f.exists():
                log(f"--- member {i}:\n" + f.read_text()[-2000:])
        raise
    finally:
        for p in members:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in members:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        servers.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=30_000, help="about how many events (whole sessions)")
    ap.add_argument("--batch", type=int, default=5_000, help="ingest --batch")
    ap.add_argument("--members", default="1,2,3", help="member counts on the cluster (rates mode)")
    ap.add_argument("--e2e", action="store_true", help="the end-to-end drill with the kills instead of rates")
    ap.add_argument("--timeout", type=float, default=1800, help="e2e: longest wait for the last event")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--bootstrap", default=None, help="a running single broker to use (rates mode), left running")
    ap.add_argument("--cluster", default=None, help="a running 3-broker cluster's bootstrap list, left running")
    ap.add_argument("--cluster-dir", default=None, help="its scripts/kafka cluster --dir (e2e kills a broker in it)")
    ap.add_argument("--lake-dir", default=None, help="a running scripts/lakestack --dir to use, left running")
    args = ap.parse_args()
    if args.cluster and not (args.cluster_dir and args.lake_dir and (args.bootstrap or args.e2e)):
        ap.error("--cluster needs --cluster-dir, --lake-dir and (for the rates) --bootstrap: the servers are "
                 "used together")
    args.members = sorted({int(m) for m in str(args.members).split(",")} | {1})
    with tempfile.TemporaryDirectory(prefix="agentledger-scale-", dir=args.workdir) as tmp:
        out = e2e(args, Path(tmp)) if args.e2e else rates(args, Path(tmp))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
