"""Benchmark: verify + project one big session from an evidence bundle.

Records one session of N events (default 1,000,000) with the real Recorder (commands, file
writes and reads, approvals, network attempts), exports it as a bundle, then times what
`agentledger verify-bundle` + `agentledger replay` do with it:

  read     the file and its header
  verify   header digest, block framing, SHA-256 chain over the raw bytes of every event (no
           decoding), in a forked child process
  load     meanwhile, native decode of the bundle into the in-memory warehouse table (DuckDB's avro
           reader, on parts cut at sync markers; the cuts are checked against the child's framing)
  project  the full session state (processes, files, approvals, network, ...) and its digest

With the native decoder (replay/native.py; scripts/bootstrap builds it when cargo is present)
verify and load are one process on three threads; without it, a forked child verifies in Python
while DuckDB's avro reader decodes (docs/replay.md, "How fast, and what limits it").

Baselines measured in the same run, on the same bytes:
  sha256   hashlib over each event's bytes alone (the floor of any verification)
  fastavro Python-level decoding of the events (what a pure-Python replay would pay)
  python   the same replay without the native decoder (skip with --no-fallback-baseline)

The last line is JSON. Target: >= 300k events/s for verify + load + project.

    .venv/bin/python bench/replay.py --events 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentledger.producers.recorder import ProducerIdentity, Recorder  # noqa: E402
import agentledger.replay.session as session_module_ref  # noqa: E402
from agentledger.replay import native  # noqa: E402
from agentledger.replay.bundle import write_bundle  # noqa: E402
from agentledger.replay.session import replay  # noqa: E402
from agentledger.replay.sources import BundleSource  # noqa: E402
from agentledger.schemas.contract import load_store  # noqa: E402
from agentledger.schemas.transport.base import MemorySink  # noqa: E402

TARGET = 300_000


def record(n: int, seed: int) -> tuple[str, list[bytes]]:
    rng = random.Random(seed)
    t = [1_767_225_600_000_000]

    def clock() -> int:
        t[0] += rng.randint(1000, 500_000)
        return t[0]

    sink = MemorySink()
    rec = Recorder(sink, identity=ProducerIdentity("codex", "0.63.0", "devbox-1", "dev"), clock=clock, rng=rng)
    s = rec.session(agent="codex", cwd="/w", model="gpt-5.1-codex", sandbox_mode="workspace_write")
    files = [f"/w/src/m{i}.py" for i in range(200)]
    hosts = [("pypi.org", 443), ("github.com", 443), ("files.pythonhosted.org", 443), ("203.0.113.9", 80)]
    i = 0
    while s.seq < n - 4:
        r = rng.random()
        i += 1
        if r < 0.35:
            c = s.command_started(["pytest", "-q", f"tests/test_{i % 50}.py"], "/w", command_id=f"c{i}")
            s.command_finished(c, exit_code=0 if rng.random() < 0.9 else 1, duration_ms=rng.randint(5, 9000),
                               stdout="12 passed")
        elif r < 0.65:
            p = rng.choice(files)
            if rng.random() < 0.5:
                s.file_accessed(p, "write", digest_before=f"{i:064x}", digest_after=f"{i + 1:064x}", size_after=i)
            else:
                s.file_accessed(p, "read", digest_after=f"{i:064x}")
        elif r < 0.8:
            req = s.approval_requested("exec", "make deploy", f"{i:064x}", request_id=f"r{i}")
            s.approval_decided(req, "approved" if rng.random() < 0.8 else "denied", "user", latency_ms=900)
        else:
            host, port = rng.choice(hosts)
            a = s.network_attempted(host, port, "https", method="GET", attempt_id=f"a{i}")
            ok = host != "203.0.113.9"
            s.network_decided(a, "allow" if ok else "deny", rule="r")
            s.network_completed(a, "ok" if ok else "blocked", bytes_in=1000, bytes_out=200)
    while s.seq < n - 1:
        s.file_accessed(rng.choice(files), "read", digest_after=f"{s.seq:064x}")
    s.end("completed")
    return s.session_id, sink.values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--decode-sample", type=int, default=50_000, help="events decoded by the fastavro baseline")
    ap.add_argument("--no-fallback-baseline", action="store_true", help="skip the run without the native decoder")
    ap.add_argument("--big-bundle-bytes", type=int, default=None,
                    help="treat bundles from this size as big (default: replay's own threshold; 0 for smoke runs)")
    args = ap.parse_args()
    if args.big_bundle_bytes is not None:
        session_module_ref.PARALLEL_MIN_BYTES = args.big_bundle_bytes
    work = args.workdir or Path(tempfile.mkdtemp(prefix="agentledger-bench-replay-"))
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    sid, values = record(args.events, args.seed)
    t_record = time.perf_counter() - t0
    store = load_store()
    path = work / "session.avro"
    write_bundle(path, session_id=sid, values=values, writer_schema=store.current.schema, checkpoints=[])
    n = len(values)
    print(f"recorded {n} events in {t_record:.1f}s; bundle {path.stat().st_size / 1e6:.1f} MB", file=sys.stderr)

    # baseline 1: SHA-256 over every event's bytes, nothing else
    t0 = time.perf_counter()
    sha = hashlib.sha256
    for v in values:
        sha(v).digest()
    t_sha = time.perf_counter() - t0
    # baseline 2: Python-level Avro decoding (a sample, extrapolated)
    sample = values[: min(n, args.decode_sample)]
    t0 = time.perf_counter()
    for v in sample:
        store.decode(v)
    t_fastavro = (time.perf_counter() - t0) * n / len(sample)
    del values

    decoder = native.decoder()
    used = []

    def run() -> tuple[float, dict, object]:
        """What verify-bundle + replay do, from the file: (seconds, phases, state)."""
        t0 = time.perf_counter()
        raw = BundleSource(path).read()  # as `agentledger replay FILE` does: the header only, no framing yet
        t_read = time.perf_counter() - t0
        r = replay(raw, store=store)
        t_verify_load = time.perf_counter() - t0 - t_read
        used.append(r.workset.decoder)
        v = r.verification
        t1 = time.perf_counter()
        state = r.state(materialize=False)
        t_project = time.perf_counter() - t1
        total = time.perf_counter() - t0
        r.close()
        assert v.status == "ok", v.as_dict()
        assert state.counts["events"] == n
        return total, {"read_file": round(t_read, 3), "verify_and_load": round(t_verify_load, 3),
                       "project_and_digest": round(t_project, 3)}, state

    total, phases, state = run()
    path_taken = used[0]  # "native", or "duckdb" (its avro reader, with the chain checked in Python)
    fallback = None
    if decoder is not None and not args.no_fallback_baseline:
        os.environ[native.ENV] = "off"
        fb_total, fb_phases, fb_state = run()
        del os.environ[native.ENV]
        assert used[-1] == "duckdb", used
        assert fb_state.digest == state.digest, "the two paths disagree on the state"
        fallback = {"events_per_s": round(n / fb_total), "seconds": round(fb_total, 3), "phases_s": fb_phases}
    rate = n / total
    result = {
        "events": n,
        "seconds": round(total, 3),
        "events_per_s": round(rate),
        "decoder": path_taken,
        "phases_s": phases,
        "state_digest": state.digest,
        "processes": state.sections["processes"]["rows"], "network_attempts": state.sections["network"]["rows"],
        "baseline_sha256_events_per_s": round(n / t_sha),
        "baseline_fastavro_decode_events_per_s": round(n / t_fastavro),
        "ratio_vs_sha256": round(rate / (n / t_sha), 3),
        "ratio_vs_fastavro": round(rate / (n / t_fastavro), 2),
        "baseline_without_native": fallback,
        "ratio_vs_without_native": round(rate / fallback["events_per_s"], 2) if fallback else None,
        "target_events_per_s": TARGET,
        "meets_target": rate >= TARGET,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
