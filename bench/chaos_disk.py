"""Chaos scenario `disk_full`: a recorder writes sessions to the embedded log while the disk fills up,
writes come back short or fail (ENOSPC, EIO), and space returns; then everything is ingested.

    python bench/chaos_disk.py --seed 1 --size 20
    python bench/chaos.py --scenario disk_full --disk-runs 20 --seed 1

``run(seed, size)`` is the scenario: ``size`` runs, each with its own fault, chosen by the seed:

- ``full``: a size-limited tmpfs is filled up (a real ENOSPC, with the short writes the kernel
  gives when a write only partly fits) for a few flushes, then freed. Needs root to mount; without
  it the same window is injected (every write under the log fails with ENOSPC).
- ``short``: every write is cut to a few bytes (a signal, a pipe-like file): nothing may fail.
- ``enospc_at`` / ``eio_at``: the n-th write under the log (a block, an index entry, a segment
  header: whatever it hits) and every later one fails, for a few flushes.
- ``crash``: a forked producer dies in the middle of its n-th write (half of it on disk, no undo);
  the next run's appenders repair what it left (quarantine files).

The recorder runs in spool mode (as producers do by default): what a flush cannot make durable is
rolled back into a `dropped` gap. The figures (the last line of the CLI is them as JSON):

    runs, crashes, events_acknowledged, flushes_failed, events_refused
    acknowledged_lost          acknowledged events missing from the warehouse (must be 0)
    acknowledged_duplicated    acknowledged events in the warehouse more than once (must be 0)
    unacknowledged_in_log      events reported NOT durable that are in the log anyway (0: a failed
                               append is undone, so the recorder may reuse their seqs safely)
    partitions_unusable        partitions that did not take events again once the fault was over,
                               or that ingest could not read to the end (must be 0)
    sessions_broken            sessions whose chain the warehouse calls broken (must be 0)
    undetected                 the sum of the five above (the chaos runner's must-be-0 figure)
    tracebacks                 runs that raised (must be 0)
    dead_letters, quarantine_files, disk ("tmpfs" or "injected"), seconds

`bench/chaos.py --scenario disk_full --disk-runs N` runs it (bench/chaos_scenarios/disk_full.py).
`FaultyWrites` and `SmallDisk` are also what tests/test_disk_full.py uses.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentledger.consumers.ingest import Ingestor  # noqa: E402
from agentledger.producers.recorder import Recorder  # noqa: E402
from agentledger.schemas.errors import NotDurableError  # noqa: E402
from agentledger.schemas.transport.base import ForwardingSink  # noqa: E402
from agentledger.schemas.transport.local import LocalLog, LocalSink, LocalSource  # noqa: E402
from agentledger.schemas.warehouse import open_warehouse  # noqa: E402

TOPIC = "chaos.disk"


class FaultyWrites:
    """While active, every ``os.write`` to a file under ``root`` (for which ``when(path)``) writes at
    most ``max_chunk`` bytes, and the ``fail_at``-th such call (1-based) and all later ones raise
    ``err``. In-process only; files elsewhere are untouched."""

    def __init__(self, root: Path, *, max_chunk: int | None = None, fail_at: int | None = None,
                 when=lambda path: True, err: int = errno.ENOSPC, crash: bool = False):
        self.root, self.max_chunk, self.fail_at, self.when, self.err = str(root), max_chunk, fail_at, when, err
        self.crash = crash  # at fail_at: write part of the data, then the process dies (no undo can run)
        self.calls = 0
        self._real = None

    def _write(self, fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return self._real(fd, data)
        if not path.startswith(self.root) or not self.when(path):
            return self._real(fd, data)
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            if self.crash:
                self._real(fd, memoryview(data)[:max(1, len(data) // 2)])
                os._exit(70)
            raise OSError(self.err, os.strerror(self.err))
        return self._real(fd, memoryview(data)[:self.max_chunk] if self.max_chunk else data)

    def __enter__(self) -> "FaultyWrites":
        self._real = os.write
        os.write = self._write
        return self

    def __exit__(self, *exc) -> None:
        os.write = self._real


class SmallDisk:
    """A size-limited tmpfs at ``path`` (root only), filled with a filler file to make it full."""

    def __init__(self, path: Path, size: str):
        self.path = Path(path)
        self.filler = self.path / ".filler"
        self.path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise PermissionError(f"cannot mount a tmpfs at {self.path}: {proc.stderr.strip()}")

    def fill(self) -> int:
        """Take every free page (writes into pages files already own still fit)."""
        n = 0
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
                try:
                    while True:
                        n += f.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        return n

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


class TrackingSink(ForwardingSink):
    """Passes everything to ``inner`` and keeps which values its flushes acknowledged or refused."""

    def __init__(self, inner):
        super().__init__(inner)
        self.pending: list[bytes] = []
        self.acked: list[bytes] = []
        self.refused: list[bytes] = []

    def send(self, topic, key, value):
        self.pending.append(value)
        self.inner.send(topic, key, value)

    def flush(self, timeout=None):
        pending, self.pending = self.pending, []
        try:
            self.inner.flush(timeout)
        except NotDurableError as exc:
            lost = {m.value for m in exc.undelivered}
            self.acked += [v for v in pending if v not in lost]
            self.refused += [v for v in pending if v in lost]
            raise
        self.acked += pending


def _crash_run(rng: random.Random, log: LocalLog, figures: dict, clock, ack_file: Path) -> None:
    """A producer process dies in the middle of a write (half a header, block or index entry on disk,
    no undo): what it acknowledged before must survive, and the next appender repairs the rest."""
    fail_at, seed = rng.randint(2, 60), rng.random()
    ack_file.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the producer that dies
        try:
            sink = TrackingSink(LocalSink(LocalLog(log.root, default_partitions=log.default_partitions)))
            crng = random.Random(seed)
            rec = Recorder(sink, topic=TOPIC, clock=clock, rng=crng, mode="spool")
            with open(ack_file, "a") as acks, FaultyWrites(log.root, fail_at=fail_at, crash=True):
                sessions = [rec.session(agent="codex", cwd="/w") for _ in range(3)]
                for r in range(8):
                    if r == 4:
                        sessions.append(rec.session(agent="codex", cwd="/w"))
                    for s in sessions:
                        c = s.command_started(["make", f"r{r}"], "/w")
                        s.command_finished(c, exit_code=0, duration_ms=3, stdout="o" * crng.randint(0, 3000))
                    before = len(sink.acked)
                    rec.flush()
                    acks.write("".join(v[-64:].decode() + "\n" for v in sink.acked[before:]))
                    acks.flush()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    acked = ack_file.read_text().split() if ack_file.exists() else []
    figures["crashes"] += 1
    figures["events_acknowledged"] += len(acked)
    figures["_acked"].extend(acked)


def _one_run(rng: random.Random, log: LocalLog, disk: SmallDisk | None, figures: dict, clock, tmp: Path) -> None:
    kind = rng.choice(["full", "short", "enospc_at", "eio_at", "crash"])
    if kind == "crash":
        return _crash_run(rng, log, figures, clock, tmp / "acked.txt")
    sink = TrackingSink(LocalSink(log))
    rec = Recorder(sink, topic=TOPIC, clock=clock, rng=random.Random(rng.random()), mode="spool")
    sessions = [rec.session(agent="codex", cwd="/w", sandbox_mode="workspace_write")
                for _ in range(rng.randint(2, 5))]
    rounds = rng.randint(6, 10)
    start, stop = rng.randint(1, 3), None
    stop = start + rng.randint(1, 3)
    fault = None
    for r in range(rounds):
        if r == start:
            if kind == "full" and disk is not None:
                disk.fill()
            elif kind == "full":
                fault = FaultyWrites(log.root, fail_at=1).__enter__()
            elif kind == "short":
                fault = FaultyWrites(log.root, max_chunk=rng.randint(1, 64)).__enter__()
            else:
                fault = FaultyWrites(log.root, fail_at=rng.randint(1, 6), max_chunk=rng.choice([None, 40]),
                                     err=errno.ENOSPC if kind == "enospc_at" else errno.EIO).__enter__()
            if r == start and rng.random() < 0.5:  # a session that needs a new segment while it lasts
                sessions.append(rec.session(agent="codex", cwd="/w"))
        if r == stop:
            if disk is not None:
                disk.free()
            if fault is not None:
                fault.__exit__(None, None, None)
                fault = None
        for s in sessions:
            for _ in range(rng.randint(1, 4)):
                c = s.command_started(["make", f"r{r}"], "/w")
                s.command_finished(c, exit_code=0, duration_ms=3, stdout="o" * rng.randint(0, 3000))
        ok = rec.flush()
        figures["flushes_failed"] += not ok
        if not ok and r >= stop:
            figures["flushes_failed_after_fault"] += 1
    if fault is not None:
        fault.__exit__(None, None, None)
    if disk is not None:
        disk.free()
    for s in sessions:
        s.end()
    if not rec.flush():
        figures["flushes_failed_after_fault"] += 1
    figures["events_acknowledged"] += len(sink.acked)
    figures["events_refused"] += len(sink.refused)
    figures["_acked"].extend(v[-64:].decode() for v in sink.acked)
    figures["_refused"].extend(sink.refused)


def run(seed: int, size: int, workdir: Path | None = None) -> dict:
    """The `disk_full` chaos scenario: ``size`` runs (in a temporary directory under ``workdir``);
    returns its figures (see the module doc)."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    figures = {"runs": size, "crashes": 0, "events_acknowledged": 0, "flushes_failed": 0, "flushes_failed_after_fault": 0,
               "events_refused": 0, "tracebacks": 0, "_acked": [], "_refused": []}
    t = [1_700_000_000_000_000 + seed * 1_000_000_000]

    def clock():
        t[0] += 1000
        return t[0]

    with tempfile.TemporaryDirectory(prefix="agentledger-chaos-disk-", dir=workdir) as tmp:
        tmp = Path(tmp)
        disk = None
        if os.geteuid() == 0:
            try:
                disk = SmallDisk(tmp / "disk", "32m")
            except PermissionError:
                disk = None
        root = (disk.path if disk else tmp / "disk") / "log"
        try:
            log = LocalLog(root, default_partitions=3)
            for _ in range(size):
                try:
                    _one_run(rng, log, disk, figures, clock, tmp)
                except Exception:  # noqa: BLE001 -- counted and shown; the next run goes on
                    figures["tracebacks"] += 1
                    traceback.print_exc()
            figures.update(_check(root, tmp / "w.duckdb", figures.pop("_acked"), figures.pop("_refused")))
        finally:
            if disk is not None:
                disk.unmount()
    unusable = figures.pop("flushes_failed_after_fault")
    figures["partitions_unusable"] += unusable
    figures["undetected"] = sum(figures[k] for k in ("acknowledged_lost", "acknowledged_duplicated",
                                                     "unacknowledged_in_log", "partitions_unusable",
                                                     "sessions_broken"))
    figures["disk"] = "tmpfs" if disk is not None else "injected"
    figures["seconds"] = round(time.perf_counter() - t0, 2)
    return figures


def _check(root: Path, wh_path: Path, hashes: list[str], refused: list[bytes]) -> dict:
    log = LocalLog(root)
    ends = {p: log.end_offset(TOPIC, p) for p in range(log.partition_count(TOPIC))}
    in_log = set()
    unusable = 0
    for p in ends:
        off = 0
        while True:
            msgs = log.read(TOPIC, p, off, 10_000)
            if not msgs:
                break
            in_log.update(m.value for m in msgs if m.damaged is None)
            off = msgs[-1].offset + 1
        unusable += off != ends[p]
    with open_warehouse(str(wh_path)) as wh:
        src = LocalSource(log)
        try:
            stats = Ingestor(wh, src, TOPIC).run()
        finally:
            src.close()
        stored = dict(wh.con.execute('SELECT "partition", next_offset FROM ingest_offsets').fetchall())
        unusable += sum(1 for p, e in ends.items() if e and stored.get(p) != e)
        counts = dict(wh.con.execute("SELECT hash, count(*) FROM events GROUP BY 1").fetchall())
        broken = wh.con.execute("SELECT count(*) FROM chain_status WHERE status = 'broken'").fetchone()[0]
    quarantined = sum(1 for p in root.rglob("*.quarantine-*") if p.suffix != ".json")
    return {"acknowledged_lost": sum(1 for h in hashes if h not in counts),
            "acknowledged_duplicated": sum(1 for h in hashes if counts.get(h, 0) > 1),
            "unacknowledged_in_log": sum(1 for v in refused if v in in_log),
            "partitions_unusable": unusable, "sessions_broken": broken,
            "dead_letters": stats.dead_letters, "quarantine_files": quarantined}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=20, help="runs, each with its own fault")
    args = ap.parse_args(argv)
    out = run(args.seed, args.size)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
