"""Ingest with the native decoder (agentledger-avro2arrow --ingest) gives exactly what the Python
path gives: the same events, the same quarantine with the same reasons, the same chain heads --
on clean batches and on randomly tampered ones (issue 18). Without the decoder, ingest still works."""

from __future__ import annotations

import hashlib
import random

import pytest

import agentledger.consumers.ingest.native_path as I  # where NATIVE_MIN_MESSAGES is read
from agentledger.consumers.ingest import Batch, Ingestor
from agentledger.schemas import native
from agentledger.schemas.transport.base import Message
from agentledger.schemas.warehouse import open_warehouse
from conftest import new_warehouse
from test_native import _every_kind_session

TOPIC = "agentledger.events"

pytestmark = pytest.mark.skipif(native.decoder() is None, reason="needs agentledger-avro2arrow (scripts/bootstrap)")


@pytest.fixture(scope="module")
def values() -> list[bytes]:
    out: list[bytes] = []
    for seed in range(2):
        out += _every_kind_session(n_rounds=12, seed=seed)[1]
    return out


def _reseal(v: bytes) -> bytes:
    """The hash field made right again for whatever the bytes before it now say (a producer that
    sealed bad bytes: only decoding and the chain can tell)."""
    body = v[:-64]
    return body + hashlib.sha256(v[:-66]).hexdigest().encode()


def _tamper(rng: random.Random, vals: list[bytes]) -> list[bytes]:
    vals = list(vals)
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(vals))
        v = vals[i]
        op = rng.choice(["flip", "flip_reseal", "flip_reseal", "flip_reseal", "cut", "dup", "swap", "drop", "fp"])
        if op in ("flip", "flip_reseal"):
            b = bytearray(v)
            j = rng.randrange(10, len(b) - 66)
            b[j] = rng.choice([b[j] ^ (1 << rng.randrange(8)), rng.randrange(256)])
            vals[i] = _reseal(bytes(b)) if op == "flip_reseal" else bytes(b)
        elif op == "cut":
            vals[i] = v[: rng.randrange(len(v))]
        elif op == "dup":
            vals.insert(rng.randrange(len(vals)), v)
        elif op == "swap":
            j = rng.randrange(len(vals))
            vals[i], vals[j] = vals[j], vals[i]
        elif op == "drop":
            del vals[i]
        else:  # an unknown writer schema
            vals[i] = v[:2] + bytes(8) + v[10:]
    return vals


def _ingest(tmp_path, name: str, batches: list[list[bytes]], use_native: bool, monkeypatch) -> tuple[dict, list[str]]:
    monkeypatch.setattr(I, "NATIVE_MIN_MESSAGES", 0)
    if not use_native:
        monkeypatch.setenv(native.ENV, "off")
    decoders = []
    off = 0
    with open_warehouse(new_warehouse(tmp_path / f"{name}.duckdb")) as wh:
        ing = Ingestor(wh, None, TOPIC)
        for vals in batches:
            r = ing.ingest_batch([Message(TOPIC, 0, off + k, None, v) for k, v in enumerate(vals)])
            off += len(vals)
            decoders.append(r.decoder)
        got = {
            "events": wh.con.execute("SELECT * EXCLUDE (ingested_at) FROM events ORDER BY source_offset").fetchall(),
            "dead": wh.con.execute("""SELECT "offset", reason, detail, session_id, seq, event_id, raw,
                                             resolved_at IS NULL, resolution
                                      FROM dead_letters ORDER BY "offset", reason""").fetchall(),
            "heads": wh.con.execute("SELECT * EXCLUDE (updated_at) FROM chain_heads ORDER BY ALL").fetchall(),
            "offsets": wh.con.execute("SELECT topic, \"partition\", next_offset FROM ingest_offsets").fetchall(),
        }
    monkeypatch.undo()
    return got, decoders


def test_a_clean_batch_goes_through_the_decoder_and_lands_as_the_python_path_lands_it(tmp_path, values, monkeypatch):
    py, d_py = _ingest(tmp_path, "py", [values[:100], values[100:]], False, monkeypatch)
    nat, d_nat = _ingest(tmp_path, "nat", [values[:100], values[100:]], True, monkeypatch)
    assert d_py == ["python", "python"] and d_nat == ["native", "native"]
    assert len(nat["events"]) == len(values) and not nat["dead"]
    assert nat == py


@pytest.mark.parametrize("seed", range(6))
def test_random_tamperings_get_the_python_paths_verdicts(tmp_path, values, monkeypatch, seed):
    rng = random.Random(seed)
    vals = _tamper(rng, values)
    cut = rng.randrange(1, len(vals))
    batches = [vals[:cut], vals[cut:]]
    py, _ = _ingest(tmp_path, "py", batches, False, monkeypatch)
    nat, _ = _ingest(tmp_path, "nat", batches, True, monkeypatch)
    assert nat == py


def test_reordered_and_duplicated_events_are_vouched_for_and_quarantined_as_python_does(tmp_path, values,
                                                                                          monkeypatch):
    """Sound bytes out of order: the decoder vouches for all of them, the chain guard parks and heals."""
    vals = list(values)
    late = vals.pop(5)  # its successors wait for it (seq_gap), then heal when it comes
    vals[9], vals[12] = vals[12], vals[9]  # reordered within a batch: accepted
    vals.insert(20, vals[3])  # an identical copy: duplicate
    batches = [vals[:100], [*vals[100:], late]]
    py, _ = _ingest(tmp_path, "py", batches, False, monkeypatch)
    nat, d = _ingest(tmp_path, "nat", batches, True, monkeypatch)
    assert d == ["native", "native"]
    assert {r[1] for r in nat["dead"]} == {"seq_gap", "duplicate"}
    assert all(not open_ for _, reason, *_, open_, _ in nat["dead"] if reason == "seq_gap")  # healed
    assert nat == py


@pytest.mark.parametrize("script", ["exit 2", 'echo \'{"records": 1, "rows": 1, "punted": 0, "chunks": [1], '
                                              '"kinds": {"0": 1}}\'; : > "$5/punted.bin"'])
def test_a_broken_or_lying_decoder_changes_nothing_but_the_path(tmp_path, values, monkeypatch, script):
    """A decoder that fails, or reports rows it did not write, leaves the batch to the Python path."""
    fake = tmp_path / "fake-decoder"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    py, _ = _ingest(tmp_path, "py", [values], False, monkeypatch)
    monkeypatch.setenv(native.ENV, str(fake))
    got, d = _ingest(tmp_path, "fake", [values], True, monkeypatch)
    assert d == ["python"] and got == py


# --- the embedded log: raw segment ranges handed to the decoder (LocalSource.poll_raw, native.chunks_frame)

def _log_with(tmp_path, name: str, values: list[bytes], segment_bytes: int):
    from agentledger.schemas.transport.local import LocalLog

    log = LocalLog(tmp_path / name, default_partitions=2, segment_bytes=segment_bytes, fsync=False)
    log.ensure_topic(TOPIC, 2)
    from agentledger.schemas.envelope import peek

    by: dict[int, list[bytes]] = {}
    sessions: dict[str, int] = {}
    for v in values:  # each session on a partition of its own, in order
        by.setdefault(sessions.setdefault(peek(v).session_id, len(sessions) % 2), []).append(v)
    for p, vals in by.items():
        for k in range(0, len(vals), 37):
            log.append(TOPIC, p, vals[k:k + 37])
    return log


def _tamper_log(rng: random.Random, root) -> list[str]:
    """Random damage to segment and index bytes: flipped bytes (in a block header, a body, a sync
    marker), a segment cut short, an index entry moved, overwritten with another's, or cut."""
    done = []
    files = sorted(p for p in root.rglob("*") if p.suffix in (".avro", ".idx"))
    for _ in range(rng.randint(1, 4)):
        f = rng.choice(files)
        b = bytearray(f.read_bytes())
        if not b:
            continue
        op = rng.choice(["flip", "flip", "cut", "entry", "copy_entry"] if f.suffix == ".idx"
                        else ["flip", "flip", "flip", "cut", "sync"])
        if op == "flip":
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
        elif op == "cut":
            b = b[: rng.randrange(len(b))]
        elif op == "sync" and len(b) > 16:
            j = rng.randrange(len(b) - 16)
            b[j:j + 16] = bytes(16)
        elif op == "entry" and len(b) >= 16:
            k = rng.randrange(len(b) // 16)
            pos = int.from_bytes(b[16 * k:16 * k + 8], "little") + rng.choice([-3, -1, 1, 2, 40])
            b[16 * k:16 * k + 8] = max(0, pos).to_bytes(8, "little")
        elif op == "copy_entry" and len(b) >= 32:
            k, j = rng.randrange(len(b) // 16), rng.randrange(len(b) // 16)
            b[16 * k:16 * k + 8] = b[16 * j:16 * j + 8]
        f.write_bytes(bytes(b))
        done.append(f"{op} {f.name}")
    return done


def _ingest_log(tmp_path, name: str, log_root, use_native: bool, monkeypatch, batch: int) -> tuple[dict, list[str]]:
    from agentledger.schemas.transport.local import LocalLog, LocalSource

    monkeypatch.setattr(I, "NATIVE_MIN_MESSAGES", 0)
    if not use_native:
        monkeypatch.setenv(native.ENV, "off")
    decoders: list[str] = []
    with open_warehouse(new_warehouse(tmp_path / f"{name}.duckdb")) as wh:
        src = LocalSource(LocalLog(log_root, fsync=False))
        Ingestor(wh, src, TOPIC, batch_records=batch).run(on_batch=lambda r, _s: decoders.append(r.decoder))
        src.close()
        got = {
            "events": wh.con.execute("SELECT * EXCLUDE (ingested_at) FROM events ORDER BY source_partition, "
                                     "source_offset").fetchall(),
            "dead": wh.con.execute("""SELECT "partition", "offset", reason, detail, session_id, seq, event_id, raw,
                                             fingerprint, resolved_at IS NULL, resolution
                                      FROM dead_letters ORDER BY "partition", "offset", reason""").fetchall(),
            "heads": wh.con.execute("SELECT * EXCLUDE (updated_at) FROM chain_heads ORDER BY ALL").fetchall(),
            "offsets": wh.con.execute("SELECT topic, \"partition\", next_offset FROM ingest_offsets "
                                      "ORDER BY ALL").fetchall(),
        }
    monkeypatch.undo()
    return got, decoders


def test_an_embedded_log_goes_to_the_decoder_as_segment_bytes_and_lands_as_the_python_path_lands_it(
        tmp_path, values, monkeypatch):
    """Several segments per partition, batches that cut across them: every batch native, same rows."""
    _log_with(tmp_path, "log", values, segment_bytes=20_000)
    assert len(list((tmp_path / "log").rglob("*.avro"))) > 4
    py, d_py = _ingest_log(tmp_path, "py", tmp_path / "log", False, monkeypatch, batch=150)
    nat, d_nat = _ingest_log(tmp_path, "nat", tmp_path / "log", True, monkeypatch, batch=150)
    assert set(d_py) == {"python"} and set(d_nat) == {"native"}
    assert len(nat["events"]) == len(values) and not nat["dead"]
    assert nat == py


@pytest.mark.parametrize("seed", range(8))
def test_random_damage_to_the_embedded_log_gets_the_python_paths_verdicts(tmp_path, values, monkeypatch, seed):
    """Whatever the decoder makes of damaged segment or index bytes, ingest quarantines and stores
    exactly what the Python path does (log_damaged letters with the same bytes and details)."""
    rng = random.Random(seed)
    _log_with(tmp_path, "log", values, segment_bytes=rng.choice([30_000, 1 << 20]))
    what = _tamper_log(rng, tmp_path / "log")
    batch = rng.choice([40, 120, 1000])
    py, _ = _ingest_log(tmp_path, "py", tmp_path / "log", False, monkeypatch, batch)
    nat, _ = _ingest_log(tmp_path, "nat", tmp_path / "log", True, monkeypatch, batch)
    assert nat == py, what


@pytest.mark.parametrize("seed", range(10))
def test_the_decoders_chain_summary_finds_the_sessions_the_sql_chain_check_finds(tmp_path, values, monkeypatch, seed):
    """The decoder's per-session ``linked`` / first seq and prev_hash (sessions.arrow) and its
    ``dup_event_ids`` flag stand in for the chain guard's window query and in-batch id check on
    native batches: on sound events reordered, duplicated and dropped at random, against an empty
    and a non-empty chain_heads, both name the same sessions."""
    rng = random.Random(seed)
    monkeypatch.setattr(I, "NATIVE_MIN_MESSAGES", 0)
    head = rng.randrange(0, 60)
    first, vals = values[:head], list(values[head:])
    for _ in range(rng.randint(0, 5)):
        i, j = rng.randrange(len(vals)), rng.randrange(len(vals))
        op = rng.choice(["swap", "dup", "drop", "none"])
        if op == "swap":
            vals[i], vals[j] = vals[j], vals[i]
        elif op == "dup":
            vals.insert(j, vals[i])
        elif op == "drop" and len(vals) > 2:
            del vals[i]
    with open_warehouse(str(tmp_path / "w.duckdb")) as wh:
        ing = Ingestor(wh, None, TOPIC)
        if first:
            ing.ingest_batch([Message(TOPIC, 0, k, None, v) for k, v in enumerate(first)])
        batch = Batch.of([Message(TOPIC, 0, len(first) + k, None, v) for k, v in enumerate(vals)])
        st = ing._native(batch)
        assert st is not None and st.sessions is not None
        st.stage(wh.con)
        try:
            by_sql = sorted(ing._bad_sessions())
            by_decoder = sorted(ing._bad_sessions_native(st))
            ids = [r[0] for r in wh.con.execute("SELECT event_id FROM stage").fetchall()]
        finally:
            st.unstage(wh.con)
    assert by_decoder == by_sql
    assert st.dup_event_ids == (len(set(ids)) != len(ids))


# --- from Kafka: each partition's fetch goes to the decoder as the broker sent it ------------------

def _produce(bootstrap: str, topic: str, vals: list[bytes], partitions: int = 3, **overrides) -> None:
    from agentledger.schemas.transport.kafka import ensure_topic
    from agentledger.schemas.transport.kafka.clients import producer_client

    ensure_topic(bootstrap, topic, partitions)
    p = producer_client(bootstrap, **overrides)
    for k, v in enumerate(vals):
        p.send(topic, key=str(k % 5).encode(), value=v, partition=k % partitions)
    p.flush()
    p.close()


def _ingest_kafka(tmp_path, name: str, bootstrap: str, topic: str, use_native: bool, monkeypatch,
                  batch: int = 100_000) -> tuple[dict, list[str], list[str]]:
    """Ingest the whole topic; also returns the types of chunks the source handed out."""
    from agentledger.schemas.transport.kafka import KafkaSource

    monkeypatch.setattr(I, "NATIVE_MIN_MESSAGES", 0)
    if not use_native:
        monkeypatch.setenv(native.ENV, "off")
    kinds: list[str] = []
    decoders: list[str] = []
    src = KafkaSource(bootstrap)
    poll_raw = src.poll_raw

    def spy(n, t):
        got = poll_raw(n, t)
        kinds.extend(type(c).__name__ for c in got)
        return got

    src.poll_raw = spy
    with open_warehouse(new_warehouse(tmp_path / f"{name}.duckdb")) as wh:
        Ingestor(wh, src, topic, batch_records=batch, after_commit=lambda b: decoders.append(b.decoder)).run()
        got = {
            "events": wh.con.execute("SELECT * EXCLUDE (ingested_at) FROM events ORDER BY source_partition, "
                                     "source_offset").fetchall(),
            "dead": wh.con.execute("""SELECT "partition", "offset", reason, detail, session_id, seq, event_id, raw,
                                             resolved_at IS NULL, resolution
                                      FROM dead_letters ORDER BY "partition", "offset", reason""").fetchall(),
            "heads": wh.con.execute("SELECT * EXCLUDE (updated_at) FROM chain_heads ORDER BY ALL").fetchall(),
            "offsets": wh.con.execute('SELECT topic, "partition", next_offset FROM ingest_offsets ORDER BY ALL').fetchall(),
        }
    src.close()
    monkeypatch.undo()
    return got, decoders, kinds


def test_kafka_fetches_go_to_the_decoder_as_sent_and_land_as_the_python_path_lands_them(
        tmp_path, values, monkeypatch, bootstrap, topic):
    _produce(bootstrap, topic, values)
    py, d_py, k_py = _ingest_kafka(tmp_path, "py", bootstrap, topic, False, monkeypatch)
    nat, d_nat, k_nat = _ingest_kafka(tmp_path, "nat", bootstrap, topic, True, monkeypatch)
    assert set(d_py) == {"python"} and set(d_nat) == {"native"}
    assert "KafkaRaw" in k_nat and "KafkaRaw" not in k_py
    assert len(nat["events"]) == len(values) and not nat["dead"]
    assert nat == py


@pytest.mark.parametrize("seed", range(3))
def test_random_tamperings_through_kafka_get_the_python_paths_verdicts(tmp_path, values, monkeypatch, bootstrap,
                                                                        topic, seed):
    _produce(bootstrap, topic, _tamper(random.Random(100 + seed), values))
    py, _, _ = _ingest_kafka(tmp_path, "py", bootstrap, topic, False, monkeypatch)
    nat, _, k_nat = _ingest_kafka(tmp_path, "nat", bootstrap, topic, True, monkeypatch)
    assert "KafkaRaw" in k_nat
    assert nat == py


def test_raw_polls_return_what_polls_return_whole_or_cut_at_the_bound(bootstrap, topic):
    """poll_raw's chunks hold exactly poll's messages, uncompressed or LZ4; a small bound is exact
    (a fetch bigger than it is read record by record, the rest at the next poll)."""
    from agentledger.schemas.transport.kafka import KafkaSource
    from agentledger.schemas.transport.kafka.source import KafkaRaw

    vals = [bytes([k % 251]) * (50 + k % 300) for k in range(3000)]
    _produce(bootstrap, topic, vals[:1500], partitions=2, compression_type=None)
    _produce(bootstrap, topic, vals[1500:], partitions=2)  # lz4 (the producers' setting)

    def read(raw: bool, bound: int) -> tuple[list[tuple], list[int], list[str]]:
        src = KafkaSource(bootstrap)
        src.assign(topic, {})
        out, sizes, kinds = [], [], []
        for _ in range(200):
            if len(out) >= len(vals):
                break
            chunks = src.poll_raw(bound, 0.5) if raw else [src.poll(bound, 0.5)]
            msgs = [m for c in chunks for m in (c.messages() if isinstance(c, KafkaRaw) else c)]
            kinds += [type(c).__name__ for c in chunks]
            if msgs:
                sizes.append(len(msgs))
            out += [(m.partition, m.offset, m.key, m.value, m.timestamp_ms) for m in msgs]
        src.close()
        return sorted(out), sizes, kinds

    want, _, _ = read(False, 100_000)
    assert len(want) == len(vals) and sorted(v for *_, v, _ in want) == sorted(vals)
    whole, _, kinds = read(True, 100_000)
    assert whole == want and "KafkaRaw" in kinds
    cut, sizes, _ = read(True, 70)
    assert cut == want and max(sizes) <= 70
