"""The log-wide Merkle tree on the ingest side: leaves in the same transaction as the events, no
leaf index collisions with two writers on one DuckLake, signed heads rate-limited while following,
and publishing that survives a failed publish."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from conftest import new_warehouse
from agentledger.consumers.ingest import Ingestor
from agentledger.schemas import merkle, signing, treelog
from agentledger.schemas.transport.base import Message
from agentledger.schemas.warehouse import open_warehouse
from test_envelope import record_session


_calls = iter(range(10**9))


def _msgs(values, start=0, topic=None):
    """Messages on a partition of their own (offsets need not continue another call's)."""
    topic = topic or f"t{next(_calls)}"
    return [Message(topic, 0, start + i, None, v) for i, v in enumerate(values)]


def _leaves(con) -> list[tuple]:
    return con.execute("SELECT leaf_index, session_id, head_seq, event_count FROM tree_leaves "
                       "ORDER BY leaf_index").fetchall()


def test_every_path_that_accepts_events_appends_leaves_in_its_transaction(tmp_path):
    sid, good = record_session(n_commands=4, seed=31)
    with open_warehouse(new_warehouse(tmp_path / "w.duckdb")) as wh:
        ing = Ingestor(wh, None, "t")
        ing.ingest_batch(_msgs(good[:3] + good[5:7]))  # 3, 4 late: 5, 6 parked
        assert [(r[2], r[3]) for r in _leaves(wh.con)] == [(2, 3)]
        ing.ingest_batch(_msgs(good[3:5], start=5))  # the late ones arrive, the parked ones heal
        assert [(r[2], r[3]) for r in _leaves(wh.con)] == [(2, 3), (4, 5), (6, 7)]
        ing.ingest_batch(_msgs(good[7:], start=7))
        leaves = _leaves(wh.con)
        assert [r[0] for r in leaves] == list(range(len(leaves))) and leaves[-1][2:] == (len(good) - 1, len(good))
        rep = treelog.check_tree(wh.con, signing.Keyring())
        assert rep.ok and rep.size == len(leaves), rep.problems
        # a failed transaction leaves no leaf behind
        before = _leaves(wh.con)
        ing.ingest_batch(_msgs(good[:2], start=100))  # duplicates only: nothing accepted
        assert _leaves(wh.con) == before


def test_two_writers_on_one_ducklake_never_share_a_leaf_index(tmp_path):
    url = f"ducklake:sqlite:{tmp_path / 'meta.sqlite'}"
    open_warehouse(url).close()
    sessions = [record_session(n_commands=3, seed=100 + i) for i in range(4)]
    errors = []

    def writer(k: int) -> None:
        try:
            with open_warehouse(url) as wh:
                ing = Ingestor(wh, None, f"t{k}", max_retries=60)
                for i in range(k, len(sessions), 2):  # each writer its own sessions, batch by batch
                    _, vals = sessions[i]
                    for j in range(0, len(vals), 7):
                        ing.ingest_batch(_msgs(vals[j:j + 7], start=j, topic=f"t{k}-{i}"))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with open_warehouse(url, read_only=True) as wh:
        leaves = _leaves(wh.con)
        assert [r[0] for r in leaves] == list(range(len(leaves)))  # 0..n-1, each exactly once
        assert len(leaves) == sum((len(v) + 6) // 7 for _, v in sessions)
        rep = treelog.check_tree(wh.con, signing.Keyring())
        assert rep.ok, rep.problems
        n = wh.con.execute("SELECT count(*) FROM events").fetchone()[0]
        assert n == sum(len(v) for _, v in sessions)


class _Flaky:
    """A real heads file whose appends fail while ``down`` is set (a destination that is away)."""

    def __init__(self, path: Path):
        self.file = treelog.HeadsFile(path)
        self.label = self.file.label
        self.down = False

    def last(self):
        return self.file.last()

    def read(self):
        return self.file.read()

    def append(self, doc):
        if self.down:
            raise OSError("destination unreachable")
        self.file.append(doc)


def test_signed_heads_are_rate_limited_while_following_and_a_failed_publish_is_retried(tmp_path):
    signer = signing.generate()
    keyring = signing.Keyring([signer.public_key])
    dest = _Flaky(tmp_path / "heads.jsonl")
    sessions = [record_session(n_commands=2, seed=200 + i) for i in range(4)]
    with open_warehouse(new_warehouse(tmp_path / "w.duckdb")) as wh:
        pub = treelog.HeadsPublisher([dest])
        ing = Ingestor(wh, None, "t", tree_heads=treelog.TreeHeads(signer, pub, every_s=3600))
        ing.ingest_batch(_msgs(sessions[0][1]))  # not following: every commit is signed and published
        assert len(treelog.stored_heads(wh.con)) == 1 and pub.published == 1
        ing._follow = True  # while following: at most one head per every_s ...
        ing._last_signed = float("-inf")
        dest.down = True
        for k in (1, 2):
            ing.ingest_batch(_msgs(sessions[k][1], start=100 * k))
        assert [h.tree_size for h in treelog.stored_heads(wh.con)] == [1, 2]  # the first one only
        assert pub.failures == 1 and pub.published == 1
        dest.down = False
        ing.finish_tree()  # ... and always at the end: size 3, published with a proof from size 1
        ing.ingest_batch(_msgs(sessions[3][1], start=300))
        ing.finish_tree()
        heads, problems = dest.read()
        assert not problems and [h.head.tree_size for h in heads] == [1, 3, 4]
        assert [h.prev_size for h in heads] == [None, 1, 3] and all(h.check_consistency() is None for h in heads)
        rep = treelog.check_tree(wh.con, keyring, [dest.file])
        assert rep.ok and rep.published_valid == 3 and rep.covered_size == 4, rep.problems
        # a later run that finds a signed head newer than the last published one publishes it first
        dest.down = True
        ing.ingest_batch(_msgs(record_session(n_commands=1, seed=299)[1], start=400))
        ing.finish_tree()
        dest.down = False
        fresh = treelog.HeadsPublisher([dest])
        fresh.publish(wh.con)
        assert [h.head.tree_size for h in dest.read()[0]] == [1, 3, 4, 5]
    # the published lines are what an auditor reads: plain JSON with the RFC 9162 proof in hex
    line = json.loads((tmp_path / "heads.jsonl").read_text().splitlines()[1])
    assert line["format"] == "agentledger.tree-head/1" and line["prev_tree_size"] == 1
    merkle.verify_consistency(1, 3, bytes.fromhex(line["prev_root_hash"]), bytes.fromhex(line["root_hash"]),
                              [bytes.fromhex(h) for h in line["consistency"]])
