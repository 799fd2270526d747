"""Codex-format sessions we have not seen must load just as cleanly; crashes lose and duplicate nothing."""

from __future__ import annotations

import json
import random
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from agent_sources import count_sources
from conftest import REPO
from agentledger.producers import normalize as N
from agentledger.producers.claude_transcript import ClaudeTranscriptParser
from agentledger.producers.codex_rollout import RolloutParser
from agentledger.producers.counts import FileCounts
from agentledger.producers.importer import run_import
from agentledger.producers.importstate import ProducerState
from agentledger.producers.ledger import SessionAppender
from agentledger.producers.otel import OtelParser
from agentledger.schemas.config import from_env
from agentledger.schemas.contract import load_store
from agentledger.schemas.envelope import ChainVerifier
from agentledger.schemas.errors import NotDurableError
from agentledger.schemas.transport import open_sink, open_source
from agentledger.schemas.transport.base import ForwardingSink, Sink

FIXTURES = REPO / "tests" / "fixtures" / "codex"
ROLLOUTS = sorted(FIXTURES.glob("rollout-*.jsonl"))
OTELS = sorted(FIXTURES.glob("otel-codex-0.*"))
KINDS = {"commands": "command_started", "files": "file_accessed", "decisions": "approval_decided",
         "network": "network_decided"}
OPTIONAL = ["summary", "effort", "model", "originator", "cli_version", "duration", "stdout", "stderr", "aggregated_output",
            "formatted_output", "rationale", "risk_level", "justification", "timeout_ms", "workdir", "timestamp",
            "git", "instructions", "source", "model_provider", "parsed_cmd", "turn_id", "cwd", "encrypted_content"]


def read_log(s) -> tuple[dict, dict]:
    """Per session: kind counts, and the chain verified from the raw log bytes."""
    store = load_store()
    src = open_source(s)
    try:
        src.assign(s.topic, {})
        ends = src.end_offsets(s.topic)
        msgs = []
        while sum(src.positions().get((s.topic, p), 0) for p in ends) < sum(ends.values()):
            msgs += src.poll(10_000, 1.0)
    finally:
        src.close()
    kinds: dict = defaultdict(Counter)
    verifiers: dict = {}
    for m in msgs:
        rec = store.decode(m.value)
        sid = rec["session_id"]
        v = verifiers.setdefault(sid, ChainVerifier(sid))
        assert v.check(m.value, rec) is None, (sid, rec["seq"], v.check(m.value, rec))
        kinds[sid][rec["payload"][0]] += 1
    names = {k.name: k.kind for k in store.kinds}
    return {sid: {names[k]: n for k, n in c.items()} for sid, c in kinds.items()}, {s: v.count for s, v in verifiers.items()}


def as_counts(kinds: dict) -> dict:
    return {sid: {k: c.get(kind, 0) for k, kind in KINDS.items()} for sid, c in kinds.items()}


# -- mutations of real-format lines ------------------------------------------------------------

def _mutate_obj(obj, rng: random.Random, what: str):
    target = obj.get("payload") if isinstance(obj.get("payload"), dict) and rng.random() < 0.7 else obj
    if what == "unknown_field":
        target[f"x_{rng.randrange(10**6)}"] = rng.choice([1, "v", None, [1, {"a": 2}], {"nested": {"deep": True}}])
    elif what == "drop_optional":
        for k in [k for k in list(target) if k in OPTIONAL]:
            if rng.random() < 0.5:
                del target[k]
    elif what == "reorder":
        items = list(target.items())
        rng.shuffle(items)
        target.clear()
        target.update(items)
    return obj


def mutate_lines(raw: bytes, rng: random.Random, ops: list[str]) -> bytes:
    lines = raw.splitlines(keepends=False)
    for op in ops:
        i = rng.randrange(len(lines) + 1)
        if op == "extra_type":
            lines.insert(i, json.dumps({"timestamp": "2026-01-01T00:00:00Z", "type": f"new_{rng.randrange(99)}",
                                        "payload": {"type": "whatever", "n": rng.random()}}).encode())
        elif op == "extra_event_msg":
            lines.insert(i, json.dumps({"timestamp": "2026-01-01T00:00:00Z", "type": "event_msg",
                                        "payload": {"type": f"future_event_{rng.randrange(99)}", "k": [1, 2]}}).encode())
        elif op == "garbage":
            lines.insert(i, rng.choice([b"garbage", b"{", b"null", b"\x00\x01\x02", b'{"type": 1,}', b"[]"]))
        elif op == "non_utf8":
            lines.insert(i, b'{"timestamp":"2025-09-14T10:02:30Z","type":"event_msg","payload":{"type":"agent_message",'
                            b'"message":"\xc3\x28 \xff\xfe"}}')
        elif op in ("unknown_field", "drop_optional", "reorder", "compact_spacing"):
            j = rng.randrange(len(lines))
            try:
                obj = json.loads(lines[j])
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if op == "compact_spacing":
                lines[j] = json.dumps(obj, indent=None, separators=(", ", " : ")).encode()
            else:
                lines[j] = json.dumps(_mutate_obj(obj, rng, op)).encode()
    out = b"\n".join(lines) + b"\n"
    if "truncated_tail" in ops:
        out += b'{"timestamp":"2026-01-01T00:00:00Z","type":"event_msg","payload":{"ty'
    return out


MUTATIONS = st.lists(st.sampled_from(["extra_type", "extra_event_msg", "garbage", "non_utf8", "unknown_field",
                                      "drop_optional", "reorder", "compact_spacing", "truncated_tail"]),
                     min_size=1, max_size=12)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=MUTATIONS, seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(ROLLOUTS) - 1), with_otel=st.booleans())
def test_mutated_sources_import_cleanly_with_exact_counts(ops, seed, which, with_otel):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = ROLLOUTS[which]
        files = [d / src.name]
        files[0].write_bytes(mutate_lines(src.read_bytes(), rng, ops))
        otel = []
        if with_otel:
            for o in OTELS:
                (d / o.name).write_bytes(o.read_bytes())  # OTel documents are whole lines: mutate only the rollout
                otel.append(d / o.name)
        s = from_env({"AGENTLEDGER_HOME": str(d / "home")})
        rep = run_import(s, [files[0]], otel)
        assert not [f for f in rep.files if f.status == "error"]
        kinds, chains = read_log(s)
        expected = count_sources(files + otel)
        assert as_counts(kinds) == {sid: c for sid, c in expected.items() if sid in kinds}
        assert set(expected) <= set(kinds) | {sid for sid, c in expected.items() if not any(c.values())}
        assert all(n == sum(kinds[sid].values()) for sid, n in chains.items())
        t = rep.totals()["counts"]
        assert t["invalid_json"] + t["not_object"] == sum(1 for op in ops if op == "garbage")
        assert t["non_utf8"] == ops.count("non_utf8")
        assert (t["pending_tail_bytes"] > 0) == ("truncated_tail" in ops)
        again = run_import(s, [files[0]], otel)
        assert again.events_added == 0


def _snake(obj):
    """protobuf-JSON snake_case spelling of an OTLP document (both are valid exports)."""
    if isinstance(obj, list):
        return [_snake(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    rename = {"resourceLogs": "resource_logs", "scopeLogs": "scope_logs", "logRecords": "log_records",
              "timeUnixNano": "time_unix_nano", "observedTimeUnixNano": "observed_time_unix_nano",
              "stringValue": "string_value", "intValue": "int_value", "boolValue": "bool_value",
              "doubleValue": "double_value", "severityText": "severity_text"}
    return {rename.get(k, k): _snake(v) for k, v in obj.items()}


def mutate_otel(doc: dict, rng: random.Random, ops: list[str]) -> dict:
    rls = doc.get("resourceLogs") or doc.get("resource_logs")
    lists = [sl.get("logRecords") if "logRecords" in sl else sl.get("log_records")
             for rl in rls for sl in rl.get("scopeLogs", rl.get("scope_logs", []))]
    recs = [r for lst in lists for r in lst]
    for op in ops:
        r = rng.choice(recs)
        attrs = r["attributes"]
        if op == "unknown_attr":
            attrs.insert(rng.randrange(len(attrs) + 1), {"key": f"x.{rng.randrange(999)}",
                                                          "value": rng.choice([{"stringValue": "v"}, {"intValue": "7"},
                                                                               {"arrayValue": {"values": [{"intValue": 1}]}},
                                                                               {"kvlistValue": {"values": []}}])})
        elif op == "shuffle":
            rng.shuffle(attrs)
        elif op == "drop_optional":
            r["attributes"] = [a for a in attrs if a["key"] not in ("app.version", "event.timestamp", "model",
                                                                     "auth_mode", "terminal.type", "duration_ms")]
        elif op == "int_as_number":
            for a in attrs:
                for k in ("intValue", "int_value"):
                    if k in a["value"]:
                        a["value"][k] = int(a["value"][k])
        elif op == "no_time":
            r.pop("timeUnixNano", None)
            r.pop("time_unix_nano", None)
        elif op == "unknown_event":
            lists[0].append(
                {"timeUnixNano": "1770128405300000000", "attributes": [
                    {"key": "event.name", "value": {"stringValue": f"codex.future_{rng.randrange(99)}"}},
                    {"key": "conversation.id", "value": {"stringValue": "019c2d3e-4f50-7a6b-8c9d-0e1f2a3b4c5d"}}]})
    return _snake(doc) if "snake" in ops else doc


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.sampled_from(["unknown_attr", "shuffle", "drop_optional", "int_as_number", "no_time",
                                     "unknown_event", "snake"]), min_size=1, max_size=10),
       seed=st.integers(0, 2**32 - 1), pretty=st.booleans())
def test_mutated_otel_exports_import_cleanly_with_exact_counts(ops, seed, pretty):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        files = []
        for src in OTELS + [FIXTURES / "otel-codex-exec-019d0a1b.json"]:
            text = src.read_text()
            docs = [json.loads(x) for x in text.splitlines() if x.strip()] if src.suffix == ".jsonl" else [json.loads(text)]
            docs = [mutate_otel(doc, rng, ops) for doc in docs]
            out = d / src.name
            if pretty and len(docs) == 1:
                out.write_text(json.dumps(docs[0], indent=1))
            else:
                out.write_text("".join(json.dumps(x) + "\n" for x in docs))
            files.append(out)
        s = from_env({"AGENTLEDGER_HOME": str(d / "home")})
        rep = run_import(s, [], files)
        kinds, chains = read_log(s)
        assert as_counts(kinds) == count_sources(files)
        assert rep.totals()["counts"]["unknown_types"].get("(document without resourceLogs)") is None
        assert run_import(s, [], files).events_added == 0


# -- type-confused values ----------------------------------------------------------------------
# Every imported file is written by an attacker: any field may hold any JSON value (JSON as Python
# reads it: NaN, Infinity and integers of any size included). A parser never raises on one, and the
# importer reads every line of the file whatever one of them holds.

CLAUDE_FIXTURES = sorted((REPO / "tests" / "fixtures" / "claude-code" / "projects").rglob("*.jsonl"))
TYPED_SOURCES = ([("codex_rollout", p) for p in ROLLOUTS] + [("claude_code", p) for p in CLAUDE_FIXTURES]
                 + [("otel", p) for p in OTELS])
PARSER_OF = {"codex_rollout": RolloutParser, "claude_code": ClaudeTranscriptParser, "otel": OtelParser}
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, -1e308, 2**63, -1]) | st.text(max_size=8)
    | st.sampled_from(["", "9" * 30, "NaN", "1e999", "-5", "1.5s", "user", "exec_command_end", "tool_use"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "secs", "x", "id"]), inner,
                                                                max_size=3),
    max_leaves=6)


def _json_paths(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, path + (i,))


def _type_confused(data, source: Path) -> tuple[list, int]:
    """The records of a fixture with one value somewhere in one of them replaced by any JSON value."""
    records = [json.loads(x) for x in source.read_text(encoding="utf-8-sig").splitlines() if x.strip()]
    i = data.draw(st.integers(0, len(records) - 1), label="line")
    paths = [p for p in _json_paths(records[i]) if p]
    path = data.draw(st.sampled_from(paths), label="field")
    target = records[i]
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = data.draw(ANY_JSON, label="value")
    return records, i


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.integers(0, len(TYPED_SOURCES) - 1))
def test_a_parser_never_raises_on_a_value_of_another_type_in_any_field(data, which):
    kind, source = TYPED_SOURCES[which]
    records, _ = _type_confused(data, source)
    parser = PARSER_OF[kind](str(source), None, 0, FileCounts())
    for n, obj in enumerate(records):
        parser.feed(obj, n * 100, n + 1)
    parser.finish(True)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.integers(0, len(TYPED_SOURCES) - 1))
def test_a_value_of_another_type_in_any_field_costs_no_other_line(data, which):
    """Imported end to end (the events are encoded and appended): the file is read to its end, every
    line reaches its parser, the parser fails on none, and a second import adds nothing."""
    kind, source = TYPED_SOURCES[which]
    records, _ = _type_confused(data, source)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / source.name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        s = from_env({"AGENTLEDGER_HOME": str(Path(d) / "home")})
        args = {"codex_rollout": ([path], []), "otel": ([], [path]), "claude_code": ([], [])}[kind]
        rep = run_import(s, *args, claude=[path] if kind == "claude_code" else [])
        (f,) = rep.files
        assert f.status == "new" and f.error is None
        assert f.counts.lines == len(records) and f.to_offset == path.stat().st_size
        if kind != "otel":  # (an OTLP line holds many records)
            assert f.counts.records == len(records)
        assert not [r for r in rep.rejects if r["reason"].startswith("record not usable")], rep.rejects
        assert rep.events_added > 0
        again = run_import(s, *args, claude=[path] if kind == "claude_code" else [])
        assert again.events_added == 0 and [x.status for x in again.files] == ["unchanged"]


# -- crash consistency -------------------------------------------------------------------------

class FailingFlush(ForwardingSink):
    """Delegates to a real sink; the first ``fail`` flushes fail before (or after) delivering."""

    def __init__(self, inner: Sink, *, fail: int = 1, after_delivery: bool = False):
        super().__init__(inner)
        self.fail, self.after = fail, after_delivery

    def flush(self, timeout=None):
        if self.fail > 0:
            self.fail -= 1
            if self.after:
                self.inner.flush(timeout)
            else:
                self.inner._pending.clear()  # the transport lost them
            raise NotDurableError("simulated broker outage")
        self.inner.flush(timeout)


def _ingest(s):
    from agentledger.consumers.ingest import Ingestor
    from agentledger.schemas.warehouse import open_warehouse

    with open_warehouse(s.warehouse) as wh:
        stats = Ingestor(wh, open_source(s), s.topic).run()
        status = dict(wh.con.execute("SELECT session_id, status FROM chain_status").fetchall())
        kinds = defaultdict(dict)
        for sid, kind, n in wh.con.execute("SELECT session_id, kind, count(*) FROM events GROUP BY ALL").fetchall():
            kinds[sid][kind] = n
    return stats, status, kinds


@pytest.mark.parametrize("after_delivery", [False, True], ids=["lost-before-delivery", "delivered-then-crashed"])
def test_a_failed_flush_keeps_events_in_the_outbox_and_the_next_run_sends_them_once(tmp_path, after_delivery):
    s = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home")})
    app = SessionAppender(s, sink=FailingFlush(open_sink(s), after_delivery=after_delivery))
    with pytest.raises(NotDurableError):
        run_import(s, [FIXTURES], [FIXTURES], appender=app)
    state = ProducerState(s.home)
    pending = state.sessions_with_outbox()
    assert len(pending) == 1 and not state.file_row(str(ROLLOUTS[0]))  # offsets not advanced
    app.close()
    rep = run_import(s, [FIXTURES], [FIXTURES])
    assert rep.resent > 0 and not ProducerState(s.home).sessions_with_outbox()
    stats, status, kinds = _ingest(s)
    assert set(status.values()) == {"ok"}
    assert as_counts(kinds) == count_sources(sorted(FIXTURES.iterdir()))
    # delivered-then-crashed: the re-sent copies are byte-identical duplicates, refused without harm
    assert stats.dead_letters == (rep.resent if after_delivery else 0)
    assert set(stats.reasons) <= {"duplicate"}


def test_a_crash_between_delivery_and_commit_is_repaired_by_the_next_producer(tmp_path, monkeypatch):
    s = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home")})
    real = ProducerState.commit_head
    calls = {"n": 0}

    def crash_once(self, head, staged, **kw):
        calls["n"] += 1
        if calls["n"] == 2 and staged:
            raise KeyboardInterrupt("killed after the transport acknowledged")
        return real(self, head, staged, **kw)

    monkeypatch.setattr(ProducerState, "commit_head", crash_once)
    with pytest.raises(KeyboardInterrupt):
        run_import(s, [FIXTURES], [FIXTURES])
    monkeypatch.setattr(ProducerState, "commit_head", real)
    app = SessionAppender(s)
    try:
        resent = app.drain_all()
    finally:
        app.close()
    assert resent > 0
    run_import(s, [FIXTURES], [FIXTURES])
    stats, status, kinds = _ingest(s)
    assert set(status.values()) == {"ok"} and set(stats.reasons) == {"duplicate"}
    assert as_counts(kinds) == count_sources(sorted(FIXTURES.iterdir()))


# -- spellings --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,want", [
    ("approved", "approved"), ("Approved", "approved"), ("approvedforsession", "approved_for_session"),
    ("approved_for_session", "approved_for_session"), ("ApprovedForSession", "approved_for_session"),
    ("acceptForSession", "approved_for_session"), ("approvedexecpolicyamendment", "approved_for_session"),
    ("approved_execpolicy_amendment", "approved_for_session"), ("networkpolicyamendment", "approved_for_session"),
    ("denied", "denied"), ("Denied", "denied"), ("decline", "denied"), ("timedout", "timed_out"),
    ("timed_out", "timed_out"), ("abort", "aborted"), ("Abort", "aborted"), ("accept", "approved"),
    ("reject", "denied"), ({"approved_execpolicy_amendment": {"proposed_execpolicy_amendment": ["git"]}}, "approved_for_session"),
    ("🤷", "unknown"), (None, "unknown"),
])
def test_decision_spellings(raw, want):
    assert N.approval_decision(raw) == want


@pytest.mark.parametrize("raw,want", [
    ("untrusted", "untrusted"), ("unless-trusted", "untrusted"), ("UnlessTrusted", "untrusted"),
    ("on-failure", "on_failure"), ("OnFailure", "on_failure"), ("on_request", "on_request"), ("on-request", "on_request"),
    ("never", "never"), ("Never", "never"), ({"granular": {"rules": True}}, "granular"), ({"reject": {}}, "granular"),
    ("granular", "granular"), ("sometimes", "unknown"),
])
def test_approval_policy_spellings(raw, want):
    assert N.approval_policy(raw) == want


@pytest.mark.parametrize("raw,want", [
    ({"type": "workspace-write", "writable_roots": []}, "workspace_write"), ("read-only", "read_only"),
    ("ReadOnly", "read_only"), ("danger-full-access", "danger_full_access"), ({"type": "external-sandbox"}, "external_sandbox"),
    ("WorkspaceWrite { writable_roots: [], network_access: false }", "workspace_write"), ("chroot", "unknown"),
])
def test_sandbox_spellings(raw, want):
    assert N.sandbox_mode(raw) == want


@pytest.mark.parametrize("decision,source,want", [
    ("accept", "user_permanent", ("approved_for_session", "user")), ("accept", "user_temporary", ("approved", "user")),
    ("accept", "config", ("approved", "policy")), ("accept", "hook", ("approved", "hook")),
    ("reject", "user_reject", ("denied", "user")), ("reject", "user_abort", ("aborted", "user")),
    ("reject", "hook", ("denied", "hook")),
])
def test_claude_decisions(decision, source, want):
    assert (N.claude_decision(decision, source), N.decision_source(source)) == want


def test_sources_of_codex_decisions():
    assert [N.decision_source(x) for x in ("Config", "config", "User", "user", "AutomatedReviewer", "guardian", "?")] == [
        "policy", "policy", "user", "user", "reviewer", "reviewer", "unknown"]


def test_times_and_outputs():
    assert N.parse_time_us("2025-09-14T10:02:11.482Z") == N.parse_time_us("2025-09-14T12:02:11.482+02:00")
    assert N.parse_time_us("2025-09-14T10:02:11.482123456Z") % 1_000_000 == 482123
    assert N.parse_time_us("1757844131482000000") == N.parse_time_us("2025-09-14T10:02:11.482Z")
    assert N.parse_time_us("garbage") is None and N.parse_time_us(None) is None
    assert N.duration_ms({"secs": 1, "nanos": 420_000_000}) == 1420
    out = N.parse_exec_output("Chunk ID: 1\nWall time: 0.25 seconds\nProcess exited with code 3\nOutput:\nboom")
    assert (out["exit_code"], out["duration_ms"]) == (3, 250)
    out = N.parse_exec_output(json.dumps({"output": "x", "metadata": {"exit_code": 0, "duration_seconds": 1.5}}))
    assert (out["text"], out["exit_code"], out["duration_ms"]) == ("x", 0, 1500)
    assert N.infer_sandbox_denial(0, "Permission denied") is None
    assert N.infer_sandbox_denial(1, "touch: cannot touch '/etc/x': Read-only file system")["operation"] == "file_write"
    assert N.infer_sandbox_denial(1, "all good") is None


def test_patches():
    ops = N.parse_patch("*** Begin Patch\n*** Add File: a\n+x\n*** Update File: b\n*** Move to: c\n@@\n-x\n+y\n"
                        "*** Delete File: d\n*** End Patch")
    assert [(o["path"], o["operation"], o["new_path"]) for o in ops] == [
        ("a", "create", None), ("b", "rename", "c"), ("d", "delete", None)]
    assert N.patch_changes({"/x": {"update": {"move_path": "/y"}}, "/z": {"type": "delete"}}) == [
        {"path": "/x", "operation": "rename", "new_path": "/y"}, {"path": "/z", "operation": "delete", "new_path": None}]


def test_producer_state_is_the_only_sqlite_user_among_the_stages():
    from test_layering import CLI, STAGES, imports_of, py_files

    users = {str(f.relative_to(REPO)) for pkg in (*STAGES, CLI) for f in py_files(pkg) if "sqlite3" in imports_of(f)}
    assert users <= {"producers/importstate.py"}, users


def _open_state_at_once(home: str, k: int, barrier, out) -> None:
    try:
        barrier.wait(10)
        st = ProducerState(home)
        st.head(f"s{k}")
        with st.transaction() as con:
            con.execute("INSERT INTO sessions (session_id, next_seq, head_hash) VALUES (?, 1, 'x')", (f"s{k}",))
        out.put("ok")
    except Exception as exc:  # reported to the test
        out.put(f"{type(exc).__name__}: {exc}")


def test_first_calls_of_many_producers_racing_to_create_the_state_db_all_succeed(tmp_path):
    """Ten producers opening a new state database at the same instant (the first hook calls of ten
    sessions): switching a new SQLite file to WAL answered 'database is locked' to some of them
    without waiting (seen in CI, about 2 % of racing openers)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    problems = []
    for r in range(25):
        home = tmp_path / f"h{r}"
        out, barrier = ctx.Queue(), ctx.Barrier(10)
        procs = [ctx.Process(target=_open_state_at_once, args=(str(home), k, barrier, out)) for k in range(10)]
        for p in procs:
            p.start()
        failed = [x for x in (out.get(timeout=60) for _ in procs) if x != "ok"]
        for p in procs:
            p.join(30)
        assert ProducerState(home).con.execute("SELECT count(*) FROM sessions").fetchone()[0] == 10 - len(failed)
        problems += failed
    assert problems == []
