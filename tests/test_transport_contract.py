"""One Sink/Source contract, run over every transport: memory, the embedded local log, Kafka, Kafka
with its client in a child process, and the producers' spooling sink (Kafka, with the spool behind
it). Real components only: the local log on disk, the real broker (unique topics).

The contract (schemas/transport/base.py): per key, order is kept and every message lands in the
partition `partition_for` names (the sink's and the source's answers agree); a message is in flight
until acknowledged, and flush acknowledges everything; `abort` stops at once and `unacknowledged`
hands back exactly what may not have landed, later sends are refused; `scan` reads one partition from
an offset (by key, or all) without moving the source, `seek` moves it; a closed sink's messages stay,
and a reopened one appends after them."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import pytest

from agentledger.producers.sinks import open_producer_sink
from agentledger.schemas.config import from_env
from agentledger.schemas.errors import NotDurableError
from agentledger.schemas.transport import (MemorySink, MemorySource, Sink, Source, kafka_sink, kafka_source,
                                           local_sink, local_source)
from test_envelope import record_session

PARTITIONS = 3


@dataclass
class Backend:
    name: str
    topic: str
    open_sink: Callable[[], Sink]
    open_source: Callable[[], Source]


def _memory(tmp_path, topic, bootstrap):
    store = MemorySink(PARTITIONS)
    return Backend("memory", topic, store.reopen, lambda: MemorySource(store))


def _local(tmp_path, topic, bootstrap):
    log_dir = tmp_path / "log"
    return Backend("local", topic, lambda: local_sink(log_dir, PARTITIONS), lambda: local_source(log_dir, PARTITIONS))


def _kafka(process):
    def make(tmp_path, topic, bootstrap):
        return Backend("kafka_process" if process else "kafka", topic,
                       lambda: kafka_sink(bootstrap, PARTITIONS, process=process), lambda: kafka_source(bootstrap))
    return make


def _spooling(tmp_path, topic, bootstrap):
    from agentledger.schemas.transport.kafka import ensure_topic

    ensure_topic(bootstrap, topic, PARTITIONS)  # the spooling sink creates topics in the background
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home"), "AGENTLEDGER_BOOTSTRAP_SERVERS": bootstrap,
                         "AGENTLEDGER_PARTITIONS": str(PARTITIONS)})

    def open_sink():
        sink = open_producer_sink(settings, env={})
        assert sink.wait_direct(60), f"the spooling sink did not reach Kafka: {sink.last_error}"
        return sink

    return Backend("spooling", topic, open_sink, lambda: kafka_source(bootstrap))


BACKENDS = [
    pytest.param(_memory, id="memory"),
    pytest.param(_local, id="local"),
    pytest.param(_kafka(False), id="kafka", marks=pytest.mark.kafka),
    pytest.param(_kafka(True), id="kafka_process", marks=pytest.mark.kafka),
    pytest.param(_spooling, id="spooling", marks=pytest.mark.kafka),
]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path, topic) -> Backend:
    needs_kafka = any(m.name == "kafka" for m in request.node.iter_markers())
    bootstrap = request.getfixturevalue("bootstrap") if needs_kafka else None
    return request.param(tmp_path, topic, bootstrap)


def sessions(n: int, seed: int) -> list[tuple[bytes, list[bytes]]]:
    """``n`` recorded sessions (key = session id, real sealed events: the local log reads keys from them)."""
    out = []
    for i in range(n):
        sid, values = record_session(n_commands=2, seed=seed + i)
        out.append((sid.encode(), values))
    return out


def interleaved(sess) -> list[tuple[bytes, bytes]]:
    """Round robin over the sessions, each in its own order."""
    out, i = [], 0
    while any(i < len(v) for _, v in sess):
        out += [(k, v[i]) for k, v in sess if i < len(v)]
        i += 1
    return out


def send_all(sink: Sink, topic: str, msgs) -> None:
    for k, v in msgs:
        sink.send(topic, k, v)


def read_all(src: Source, topic: str, timeout_s: float = 60.0):
    """Every message of the topic up to its end offsets now (assign + poll)."""
    src.assign(topic, {})
    ends = src.end_offsets(topic)
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pos = src.positions()
        if all(pos.get((topic, p), 0) >= e for p, e in ends.items()):
            return got
        got += src.poll(10_000, 0.5)
    raise AssertionError(f"read {len(got)} messages; positions {src.positions()}, ends {ends}")


def by_key(msgs, sess):
    """Per key: its values in partition order (a message's key comes from the send, by value)."""
    key_of = {v: k for k, vals in sess for v in vals}
    out = defaultdict(list)
    for m in sorted(msgs, key=lambda m: (m.partition, m.offset)):
        out[key_of[m.value]].append(m)
    return out


def test_order_partitions_and_acknowledgements(backend):
    sess = sessions(4, seed=100)
    msgs = interleaved(sess)
    sink = backend.open_sink()
    try:
        sink.ensure_topic(backend.topic, PARTITIONS)
        send_all(sink, backend.topic, msgs)
        assert sink.in_flight() + sink.acknowledged() == len(msgs), "every sent message is in flight or acknowledged"
        sink.flush(60)
        assert (sink.in_flight(), sink.acknowledged(), sink.failure(), sink.unacknowledged()) == (0, len(msgs), None, [])
        parts = {k: sink.partition_for(backend.topic, k) for k, _ in sess}
    finally:
        sink.close(10)
    src = backend.open_source()
    try:
        assert src.partitions(backend.topic) == list(range(PARTITIONS))
        assert {k: src.partition_for(backend.topic, k) for k, _ in sess} == parts, "sink and source partition alike"
        assert src.partition_for(backend.topic + ".none", b"k") is None
        got = read_all(src, backend.topic)
        assert len(got) == len(msgs) and all(m.damaged is None for m in got)
        for key, values in sess:
            mine = by_key(got, sess)[key]
            assert [m.value for m in mine] == values, "per key, the order of the sends"
            assert {m.partition for m in mine} == {parts[key]}, "every message where partition_for said"
        for p in range(PARTITIONS):
            offsets = sorted(m.offset for m in got if m.partition == p)
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else True
        assert src.end_offsets(backend.topic) == {p: max([m.offset + 1 for m in got if m.partition == p], default=0)
                                                  for p in range(PARTITIONS)}
    finally:
        src.close()


def test_scan_and_seek_from_offsets(backend):
    sess = sessions(3, seed=200)
    sink = backend.open_sink()
    try:
        sink.ensure_topic(backend.topic, PARTITIONS)
        send_all(sink, backend.topic, interleaved(sess))
        sink.flush(60)
    finally:
        sink.close(10)
    src = backend.open_source()
    try:
        key, values = sess[0]
        p = src.partition_for(backend.topic, key)
        src.assign(backend.topic, {})
        before = src.positions()
        whole = src.scan(backend.topic, p)
        assert whole.end == src.end_offsets(backend.topic)[p] and whole.first == 0
        assert [m.offset for m in whole.messages] == list(range(whole.end)), "without a key: every offset"
        mine = src.scan(backend.topic, p, key=key)
        assert [m.value for m in mine.messages] == values and all(m.key == key for m in mine.messages)
        third = mine.messages[2].offset
        assert [m.value for m in src.scan(backend.topic, p, third, key=key).messages] == values[2:]
        assert [m.value for m in src.scan(backend.topic, p, key=key, max_found=2).messages] == values[:2]
        assert src.scan(backend.topic, p, whole.end + 5, key=key).messages == mine.messages, "out of range: all"
        assert src.scan(backend.topic, p, key=b"no-such-session").messages == []
        assert src.positions() == before, "a scan does not move the source"
        # seek: polling resumes at the offset
        src.seek(backend.topic, p, third)
        got = []
        deadline = time.monotonic() + 30
        while not any(m.partition == p for m in got) and time.monotonic() < deadline:
            got += src.poll(10_000, 0.5)
        assert min(m.offset for m in got if m.partition == p) == third
    finally:
        src.close()


def test_abort_hands_back_what_was_not_acknowledged_and_refuses_later_sends(backend):
    sess = sessions(3, seed=300)
    msgs = interleaved(sess)
    first, rest = msgs[:6], msgs[6:]
    sink = backend.open_sink()
    sink.ensure_topic(backend.topic, PARTITIONS)
    send_all(sink, backend.topic, first)
    sink.flush(60)
    send_all(sink, backend.topic, rest)
    sink.abort()
    # The spooling sink's background thread wakes every 0.5 s: it must not take the failure the abort
    # itself causes ("Producer is closed forcefully") for a broker outage and spool what it held (it
    # did, once in CI: those events were then neither handed back nor in the topic).
    time.sleep(0.7)
    back = sink.unacknowledged()
    with pytest.raises(NotDurableError) as refused:
        sink.send(backend.topic, msgs[0][0], b"after abort")
    assert [m.value for m in refused.value.undelivered] == [b"after abort"]
    assert sink.unacknowledged() == [], "handed back once"
    sink.close(1)  # closing an aborted sink sends nothing and does not raise
    sent = {v: i for i, (_, v) in enumerate(msgs)}
    assert [sent[m.value] for m in back] == sorted(sent[m.value] for m in back), "in send order"
    assert {m.value for m in back} <= {v for _, v in rest}, "what was acknowledged is never handed back"
    src = backend.open_source()
    try:
        landed = {m.value for m in read_all(src, backend.topic)}
    finally:
        src.close()
    assert {v for _, v in first} <= landed
    assert {v for _, v in rest} <= landed | {m.value for m in back}, "nothing lost without being handed back"
    assert b"after abort" not in landed
    for _key, values in sess:  # per key, what landed is a prefix of what was sent
        mine = [v for v in values if v in landed]
        assert mine == values[:len(mine)]


def test_a_reopened_sink_appends_after_what_a_closed_one_made_durable(backend):
    sess = sessions(2, seed=400)
    msgs = interleaved(sess)
    half = len(msgs) // 2
    sink = backend.open_sink()
    sink.ensure_topic(backend.topic, PARTITIONS)
    send_all(sink, backend.topic, msgs[:half])
    sink.close(30)  # close flushes
    src = backend.open_source()
    try:
        ends = src.end_offsets(backend.topic)
        assert sum(ends.values()) == half
    finally:
        src.close()
    sink = backend.open_sink()
    try:
        sink.ensure_topic(backend.topic, PARTITIONS)
        send_all(sink, backend.topic, msgs[half:])
        sink.flush(60)
    finally:
        sink.close(10)
    src = backend.open_source()
    try:
        got = read_all(src, backend.topic)
        assert sum(src.end_offsets(backend.topic).values()) == len(msgs)
        for key, values in sess:
            assert [m.value for m in by_key(got, sess)[key]] == values
        # a fresh source starting at the old end offsets reads exactly the second half
        src.assign(backend.topic, ends)
        later = []
        deadline = time.monotonic() + 30
        while len(later) < len(msgs) - half and time.monotonic() < deadline:
            later += src.poll(10_000, 0.5)
        assert sorted(m.value for m in later) == sorted(v for _, v in msgs[half:])
    finally:
        src.close()
