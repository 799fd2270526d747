"""Ingest with the native decoder (agentledger-avro2arrow --ingest) gives exactly what the Python
path gives: the same events, the same quarantine with the same reasons, the same chain heads --
on clean batches and on randomly tampered ones (issue 18). Without the decoder, ingest still works."""

from __future__ import annotations

import hashlib
import random

import pytest

import agentledger.consumers.ingest.native_path as I  # where NATIVE_MIN_MESSAGES is read
from agentledger.consumers.ingest import Ingestor
from agentledger.schemas import native
from agentledger.schemas.transport.base import Message
from agentledger.schemas.warehouse import open_warehouse
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
    with open_warehouse(str(tmp_path / f"{name}.duckdb")) as wh:
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
