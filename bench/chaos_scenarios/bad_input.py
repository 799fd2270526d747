"""Bad input: hostile messages interleaved with valid sessions, written straight onto a Kafka topic
and into the embedded local log (as an attacker with write access to either would), then the real
`agentledger ingest` (a subprocess, with a timeout) takes both in.

Hostile kinds: random bytes, truncated records, unknown fingerprint, wrong magic, broken chain
(a re-sealed record whose prev_hash is wrong), duplicate seq (an identical copy, and a different,
correctly sealed record claiming a seq already used), skipped seq, oversized, empty (and a Kafka
tombstone), valid Avro with absurd values, deep nesting. Into the local log, what its `append`
refuses (anything that is not single-object encoded under a known schema) is written at file level
instead: raw bytes after the last block with an index entry pointing at them.

Every message is followed by its (partition, offset). Figures: hostile messages quarantined in
``dead_letters`` with a reason (%), valid ones stored in ``events`` (%), hostile ones stored
(must be 0), crashes (non-zero exit or a traceback) and hangs (the timeout), per transport.
``undetected`` sums what must be 0.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

from chaos_scenarios import agentledger_cmd, scenario

REPO = Path(__file__).resolve().parents[2]
TOPIC = "agentledger.events"
KINDS = ("random_bytes", "truncated", "unknown_fingerprint", "wrong_magic", "broken_chain", "duplicate",
         "conflicting_seq", "skipped_seq", "oversized", "empty", "absurd_values", "deep_nesting")


def cli_env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "HOME": str(home.parent), "PYTHONPATH": str(REPO), "NO_COLOR": "1",
                "COLUMNS": "200", "AGENTLEDGER_HOOK_DAEMON": "0"})
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, timeout: float = 600, **extra: str) -> tuple[subprocess.CompletedProcess | None, bool]:
    """(completed process, hung): the real CLI in a subprocess; a hang is killed at ``timeout``."""
    try:
        return subprocess.run([*agentledger_cmd(), *args], capture_output=True, text=True,
                              env=cli_env(home, **extra), cwd=REPO, timeout=timeout), False
    except subprocess.TimeoutExpired:
        return None, True


def valid_sessions(n_sessions: int, seed: int) -> list[list[bytes]]:
    """Chained sessions recorded by the real Recorder (2 to 12 events each)."""
    from agentledger.producers.recorder import Recorder
    from agentledger.schemas.transport.base import MemorySink

    rng = random.Random(seed)
    t = [1_700_000_000_000_000]

    def clock():
        t[0] += 1000
        return t[0]

    sink = MemorySink()
    rec = Recorder(sink, clock=clock, rng=random.Random(seed), transforms=[], signer=None)
    for i in range(n_sessions):
        with rec.session(agent="codex", cwd="/w", sandbox_mode="workspace_write") as s:
            for j in range(rng.randint(0, 5)):
                c = s.command_started(["echo", str(i), str(j)], "/w")
                s.command_finished(c, exit_code=0, duration_ms=3, stdout=f"{j}\n")
    sessions: dict[str, list[bytes]] = {}
    for _, key, value in sink.sent:
        sessions.setdefault(key.decode(), []).append(value)
    return list(sessions.values())


class Hostile:
    """Makes hostile messages; ``store`` decodes and re-seals valid ones."""

    def __init__(self, rng: random.Random, oversize: int):
        from agentledger.schemas.contract import load_store
        from agentledger.schemas.envelope import Sealer

        self.rng = rng
        self.store = load_store()
        self.sealer = Sealer(self.store)
        self.oversize = oversize

    def _reseal(self, value: bytes, **changes) -> bytes:
        rec = self.store.decode(value)
        rec.update(changes)
        return self.sealer.seal(rec).value

    def make(self, kind: str, pool: list[bytes], sent: list[bytes]) -> tuple[bytes | None, bytes | None]:
        """(key, value) for ``kind``; ``pool``: valid values of one session, ``sent``: those already sent."""
        rng = self.rng
        v = rng.choice(pool)
        rec = self.store.decode(v)
        key = rec["session_id"].encode()
        fresh = str(uuid.UUID(int=rng.getrandbits(128)))
        if kind == "random_bytes":
            return fresh.encode(), rng.randbytes(rng.randint(1, 3000))
        if kind == "truncated":
            return key, v[:rng.randint(1, len(v) - 1)]
        if kind == "unknown_fingerprint":
            return key, v[:2] + rng.randbytes(8) + v[10:]
        if kind == "wrong_magic":
            magic = rng.choice([b"\x00\x00", b"\xc3\x00", b"\x01\xc3", b"Ob", b"{\""])
            return key, magic + v[2:]
        if kind == "broken_chain":
            return key, self._reseal(v, prev_hash=rng.randbytes(32).hex())
        if kind == "duplicate":
            return key, rng.choice(sent) if sent else None
        if kind == "conflicting_seq":
            if not sent:
                return key, None
            return key, self._reseal(rng.choice(sent), turn_id="forged-" + fresh)
        if kind == "skipped_seq":
            last = self.store.decode(pool[-1])
            return key, self._reseal(pool[-1], seq=last["seq"] + rng.randint(2, 10**6), prev_hash=last["hash"],
                                     event_id=fresh)
        if kind == "oversized":
            body = rng.randbytes(self.oversize)
            return key, v[:10] + body
        if kind == "empty":
            return fresh.encode(), rng.choice([b"", b"\xc3", b"\xc3\x01", v[:10]])
        if kind == "absurd_values":
            # valid Avro, correctly sealed, extending the chain at its head's place: only the values are absurd
            change = rng.choice([
                {"seq": -rng.randint(1, 2**63 - 1)}, {"seq": 2**63 - 1}, {"occurred_at": 2**63 - 1},
                {"occurred_at": -2**63}, {"session_id": ""}, {"session_id": "\x00" * 40},
                {"session_id": "é" * 20_000}, {"event_id": "not-a-uuid"}, {"event_id": ""},
                {"prev_hash": "zz" * 32}, {"prev_hash": ""},
            ])
            return key, self._reseal(v, **change)
        if kind == "deep_nesting":
            depth = rng.randint(10_000, 200_000)
            nested = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
            if rng.random() < 0.5:  # a sealed record (broken chain) carrying it
                return key, self._reseal(v, turn_id=nested, prev_hash=rng.randbytes(32).hex())
            return key, v[:10] + nested.encode()  # the nesting as the Avro body itself
        raise ValueError(kind)


def plan(args, seed: int, n_hostile: int, oversize: int) -> list[tuple[str, bytes | None, bytes | None]]:
    """[(kind or 'valid', key, value)] in send order: the valid sessions in order, hostile ones between."""
    rng = random.Random(seed)
    sessions = valid_sessions(max(4, n_hostile // 8), seed)
    hostile = Hostile(rng, oversize)
    cursors = [0] * len(sessions)
    out = []
    kinds = [KINDS[i % len(KINDS)] for i in range(n_hostile)]
    rng.shuffle(kinds)
    total_valid = sum(len(s) for s in sessions)
    every = max(1, total_valid // max(1, n_hostile))
    live = list(range(len(sessions)))
    while live or kinds:
        for _ in range(every):
            if not live:
                break
            i = rng.choice(live)
            value = sessions[i][cursors[i]]
            out.append(("valid", hostile.store.decode(value)["session_id"].encode(), value))
            cursors[i] += 1
            if cursors[i] == len(sessions[i]):
                live.remove(i)
        if kinds:
            kind = kinds.pop()
            i = rng.randrange(len(sessions))
            key, value = hostile.make(kind, sessions[i], sessions[i][:cursors[i]])
            if value is None:  # duplicate of nothing sent yet: try again later
                kinds.insert(0, kind)
                continue
            out.append((kind, key, value))
    return out


# --- writing ---------------------------------------------------------------------------------

def write_kafka(bootstrap: str, topic: str, messages, partitions: int) -> list[tuple[int, int]]:
    """Sends in order (one idempotent producer, acks=all) onto a new topic; returns (partition, offset)."""
    from agentledger.schemas.transport.kafka import ensure_topic
    from rawkafka import send_exact

    ensure_topic(bootstrap, topic, partitions)
    return send_exact(bootstrap, topic, [(k, v) for _, k, v in messages])


def _raw_local_append(log, topic: str, partition: int, blob: bytes) -> int:
    """What an attacker with write access does: bytes after the last block, an index entry at them."""
    from agentledger.schemas.transport.local import IDX_ENTRY

    base = log.segments(topic, partition)[-1]
    path = log.segment_path(topic, partition, base)
    with open(path, "ab") as f:
        pos = f.tell()
        f.write(blob)
    with open(path.with_suffix(".idx"), "ab") as f:
        f.write(IDX_ENTRY.pack(pos, int(time.time() * 1000)))
    return log.end_offset(topic, partition) - 1


def write_local(home: Path, topic: str, messages, partitions: int) -> tuple[list[tuple[int, int]], Counter]:
    """Appends through `LocalLog.append`; what it refuses goes in at file level. Returns
    (partition, offset) per message and the count of refusals by the append API."""
    from agentledger.schemas.errors import AgentLedgerError
    from agentledger.schemas.transport.local import LocalLog

    log = LocalLog(home / "log", fsync=False)
    log.ensure_topic(topic, partitions)
    where, refused = [], Counter()
    pending: list[tuple[int, str, bytes | None]] = []  # raw blobs for partitions without a segment yet
    for idx, (kind, key, value) in enumerate(messages):
        p = log.partition_for(topic, key or b"")
        try:
            if not value:
                raise AgentLedgerError("empty")
            off = log.append(topic, p, [value])
        except AgentLedgerError:
            refused[kind] += 1
            if not log.segments(topic, p):
                p = next((q for q in range(partitions) if log.segments(topic, q)), None)
                if p is None:
                    where.append(None)
                    pending.append((idx, kind, value))
                    continue
            off = _raw_local_append(log, topic, p, value or b"")
        where.append((p, off))
    for idx, _kind, value in pending:
        p = next(q for q in range(partitions) if log.segments(topic, q))
        where[idx] = (p, _raw_local_append(log, topic, p, value or b""))
    return where, refused


# --- checking --------------------------------------------------------------------------------

def check(home: Path, topic: str, messages, where, timeout: float, **env: str) -> dict:
    import duckdb

    t0 = time.perf_counter()
    proc, hung = run_cli(home, "ingest", "--format", "json", timeout=timeout, **env)
    seconds = round(time.perf_counter() - t0, 1)
    crashed = proc is not None and (proc.returncode != 0 or "Traceback" in proc.stderr)
    figures = {"ingest_seconds": seconds, "hangs": int(hung), "crashes": int(crashed)}
    if proc is None or not (home / "warehouse.duckdb").exists():
        figures["crash_output"] = "" if proc is None else proc.stderr[-2000:]
        return figures
    if crashed:
        figures["crash_output"] = proc.stderr[-2000:]
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    stored = set(con.execute("SELECT source_partition, source_offset FROM events WHERE source_topic = ?",
                             [topic]).fetchall())
    dead = {(p, o): r for p, o, r in con.execute(
        """SELECT "partition", "offset", reason FROM dead_letters WHERE topic = ? AND reason IS NOT NULL
           AND reason <> ''""", [topic]).fetchall()}
    con.close()
    valid = [w for (k, _, _), w in zip(messages, where) if k == "valid"]
    hostile = [(k, w) for (k, _, _), w in zip(messages, where) if k != "valid"]
    valid_stored = sum(1 for w in valid if w in stored)
    q = Counter(k for k, w in hostile if w in dead)
    stored_hostile = Counter(k for k, w in hostile if w in stored)
    lost = Counter(k for k, w in hostile if w not in dead and w not in stored)
    reasons = Counter(dead[w] for _, w in hostile if w in dead)
    figures.update({
        "valid": len(valid), "valid_stored": valid_stored,
        "valid_stored_pct": round(100 * valid_stored / max(1, len(valid)), 3),
        "hostile": len(hostile), "quarantined": sum(q.values()),
        "quarantined_pct": round(100 * sum(q.values()) / max(1, len(hostile)), 3),
        "hostile_stored": sum(stored_hostile.values()), "hostile_unaccounted": sum(lost.values()),
        "hostile_stored_by_kind": dict(stored_hostile), "unaccounted_by_kind": dict(lost),
        "reasons": dict(reasons.most_common()),
    })
    return figures


@scenario("bad_input")
def run(args, workdir: Path) -> dict:
    n = args.hostile
    out: dict = {"hostile_per_transport": n}
    undetected = 0
    kinds = Counter()
    transports = ["local"] + (["kafka"] if args.bootstrap else [])
    for t, transport in enumerate(transports):
        messages = plan(args, args.seed + t, n, oversize=(1_000_000 if transport == "kafka" else 1_200_000))
        kinds.update(k for k, _, _ in messages if k != "valid")
        home = workdir / transport / "home"
        home.mkdir(parents=True)
        if transport == "kafka":
            topic = f"chaos-bad-input-{uuid.uuid4().hex[:12]}"
            where = write_kafka(args.bootstrap, topic, messages, 3)
            figures = check(home, topic, messages, where, args.timeout, AGENTLEDGER_BOOTSTRAP_SERVERS=args.bootstrap,
                            AGENTLEDGER_TOPIC=topic)
        else:
            where, refused = write_local(home, TOPIC, messages, 3)
            figures = check(home, TOPIC, messages, where, args.timeout)
            figures["refused_by_append"] = sum(refused.values())
        out[transport] = figures
        undetected += (figures.get("hangs", 0) + figures.get("crashes", 0) + figures.get("hostile_stored", 0)
                       + figures.get("hostile_unaccounted", 0) + figures.get("valid", 0)
                       - figures.get("valid_stored", 0))
    out["kinds"] = dict(sorted(kinds.items()))
    out["undetected"] = undetected
    out["tracebacks"] = sum(out[t].get("crashes", 0) for t in transports)
    return out
