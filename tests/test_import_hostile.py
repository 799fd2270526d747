"""Importers against hostile and wrong input (issue 21, items 4 and 5): a bad line is a per-line
problem with a reason, one bad file never stops the others, memory stays bounded whatever a line
holds, and the exit status says when nothing usable was read or (--strict) when anything was not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env, run_cli
from agentledger.producers.importer import MAX_LINE_BYTES
from agentledger.producers.normalize import MAX_JSON_DEPTH

FIXTURES = REPO / "tests" / "fixtures" / "codex"
ROLLOUT_A = next(FIXTURES.glob("rollout-*0199a1b2*.jsonl"))
OTEL_A = next(FIXTURES.glob("otel-codex-0.46-*"))
HOSTILE_SID = "0badc0de-0000-4000-8000-000000000001"
DEEP = b"[" * 250_000 + b"]" * 250_000  # 500 KB of nesting


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _by_name(rep: dict) -> dict:
    return {Path(f["path"]).name: f for f in rep["files"]}


def _hostile_rollout(path: Path, middle: bytes) -> None:
    meta = {"timestamp": "2025-09-14T10:00:00.000Z", "type": "session_meta",
            "payload": {"id": HOSTILE_SID, "cwd": "/w", "cli_version": "0.46.0"}}
    turn = {"timestamp": "2025-09-14T10:00:01.000Z", "type": "turn_context",
            "payload": {"cwd": "/w", "approval_policy": "on-request", "sandbox_policy": {"type": "workspace-write"}}}
    path.write_bytes(json.dumps(meta).encode() + b"\n" + middle + b"\n" + json.dumps(turn).encode() + b"\n")


def test_a_deeply_nested_line_is_one_problem_and_every_other_file_and_line_is_imported(tmp_path):
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    shutil.copy(ROLLOUT_A, rollouts)
    _hostile_rollout(rollouts / f"rollout-2025-09-14T10-00-00-{HOSTILE_SID}.jsonl", DEEP)
    otel = tmp_path / "otel"
    otel.mkdir()
    shutil.copy(OTEL_A, otel)
    (otel / "otel-hostile.jsonl").write_bytes(DEEP + b"\n" + OTEL_A.read_bytes().splitlines()[0] + b"\n")
    env = cli_env(tmp_path / "home")

    proc = run_cli("import", "codex-rollout", str(rollouts), "--format", "json", env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = _json(proc)
    files = _by_name(rep)
    assert files[ROLLOUT_A.name]["status"] == "new" and files[ROLLOUT_A.name]["observations"] > 10
    hostile = files[f"rollout-2025-09-14T10-00-00-{HOSTILE_SID}.jsonl"]
    assert hostile["counts"]["too_deep"] == 1 and hostile["problems"] == 1 and hostile["sessions"] == [HOSTILE_SID]
    assert [(r["line"], r["reason"]) for r in rep["rejects"]] == [(2, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")]
    added = {s["session_id"]: s["added"] for s in rep["sessions"]}
    assert added[HOSTILE_SID] >= 2 and sum(added.values()) > 10  # the hostile file's good lines too, and a gap

    proc = run_cli("import", "otel", str(otel), "--format", "json", env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = _json(proc)
    files = _by_name(rep)
    assert files["otel-hostile.jsonl"]["counts"]["too_deep"] == 1
    assert files[OTEL_A.name]["counts"]["too_deep"] == 0 and files[OTEL_A.name]["observations"] > 5
    assert rep["totals"]["already_recorded"] > 0  # OTEL_A's facts met the rollout's: the file was read


def _run_measured(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI; its own peak resident memory in KiB (from wait4, this child only)."""
    out, err = (open(Path(env["AGENTLEDGER_HOME"]).parent / n, "w+") for n in ("out.txt", "err.txt"))
    p = subprocess.Popen([sys.executable, "-m", "agentledger", *args], stdout=out, stderr=err, env=env, cwd=REPO)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(args, p.returncode, out.read(), err.read()), usage.ru_maxrss


def test_an_over_long_line_is_skipped_unread_and_memory_stays_bounded(tmp_path):
    lines = ROLLOUT_A.read_bytes().splitlines(keepends=True)
    huge = (b'{"timestamp":"2025-09-14T10:02:30.000Z","type":"event_msg","payload":{"type":"agent_message",'
            b'"message":"' + b"A" * (MAX_LINE_BYTES + 24 * 2**20) + b'"}}\n')
    (tmp_path / "small").mkdir()
    (tmp_path / "big").mkdir()
    (tmp_path / "small" / ROLLOUT_A.name).write_bytes(b"".join(lines))
    (tmp_path / "big" / ROLLOUT_A.name).write_bytes(b"".join(lines[:6] + [huge] + lines[6:]))

    args = ["import", "codex-rollout", "--dry-run", "--format", "json"]
    small, small_kib = _run_measured([*args, str(tmp_path / "small")], cli_env(tmp_path / "h1"))
    big, big_kib = _run_measured([*args, str(tmp_path / "big")], cli_env(tmp_path / "h2"))
    assert small.returncode == 0 and big.returncode == 0, big.stderr[-3000:]
    rep, base = _json(big), _json(small)
    f = rep["files"][0]
    assert f["counts"]["too_long"] == 1 and f["counts"]["lines"] == len(lines) + 1
    # every other line was read as without the long one, and the long one is a gap in the session
    assert f["observations"] == base["files"][0]["observations"] + 1
    assert f["to_offset"] == len(huge) + len(b"".join(lines))
    (reject,) = rep["rejects"]
    assert reject["line"] == 7 and f"line of {len(huge) - 1} bytes" in reject["reason"]
    assert len(reject["excerpt"]) <= 200
    # the line is 40 MB: reading it whole (and parsing it) would cost several times that
    assert big_kib - small_kib < 24 * 1024, (small_kib, big_kib)


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a rollout\n\x00\x01\x02 binary junk\n" + b"<html>nope</html>\n")
    return path


def test_nothing_usable_exits_nonzero_and_strict_remembers_earlier_problems(tmp_path):
    env = cli_env(tmp_path / "home")
    junk = _garbage(tmp_path / "junk.jsonl")
    first = run_cli("import", "codex-rollout", str(junk), env=env, check=False)
    assert first.returncode == 1 and "nothing imported" in first.stderr and "Traceback" not in first.stderr
    # the problems are remembered with the file: a re-run (the file unchanged) still knows them
    again = run_cli("import", "codex-rollout", str(junk), "--strict", "--format", "json", env=env, check=False)
    assert again.returncode == 1
    assert _json(again)["totals"]["problems_earlier"] == 3 and "3 problems" in again.stderr

    # one good file with the bad one: imported, exit 0; --strict fails on the bad file's earlier problems
    good = tmp_path / f"rollout-2025-09-14T10-00-00-{HOSTILE_SID}.jsonl"
    _hostile_rollout(good, b'{"timestamp":"2025-09-14T10:00:00.500Z","type":"event_msg",'
                           b'"payload":{"type":"user_message","message":"hi"}}')
    mixed = run_cli("import", "codex-rollout", str(good), str(junk), "--format", "json", env=env, check=False)
    assert mixed.returncode == 0 and _json(mixed)["totals"]["events_added"] > 0
    assert run_cli("import", "codex-rollout", str(good), str(junk), "--strict", env=env, check=False).returncode == 1
    assert run_cli("import", "codex-rollout", str(good), "--strict", env=env, check=False).returncode == 0


def test_a_directory_holding_only_the_other_format_is_an_error_that_says_so(tmp_path):
    env = cli_env(tmp_path / "home")
    rollouts = tmp_path / "sessions"
    rollouts.mkdir()
    for p in FIXTURES.glob("rollout-*.jsonl"):
        shutil.copy(p, rollouts)
    proc = run_cli("import", "otel", str(rollouts), env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no otel files found" in proc.stderr and "import codex-rollout" in proc.stderr


def test_the_line_reader_agrees_with_a_plain_split_at_every_chunk_boundary(tmp_path, monkeypatch):
    """Chunked reading with tiny limits: every line is found at its offset, a line over the limit is
    reported with its full length and only its head, an unterminated tail waits unless settled (and
    then is taken when it is JSON or over the limit; a cut JSON object waits for the rest)."""
    import io
    import random

    import agentledger.producers.importer as imp

    rng = random.Random(7)
    monkeypatch.setattr(imp, "MAX_LINE_BYTES", 20)
    monkeypatch.setattr(imp, "REJECT_SCAN_BYTES", 4)
    for chunk in (1, 3, 7, 21, 64):
        monkeypatch.setattr(imp, "CHUNK_BYTES", chunk)
        for _ in range(40):
            lines = [b"x" * rng.choice([0, 1, 5, 19, 20, 21, 22, 40, 77]) for _ in range(rng.randrange(1, 8))]
            tail = rng.choice([b"", b"[1]", b"z" * 30, b'{"cut'])
            data = b"\n".join(lines) + b"\n" + tail
            for settled in (False, True):
                reader = imp._LineReader(io.BytesIO(data), 0, len(data), settled)
                got = [(ln.offset, ln.length, ln.too_long, ln.raw) for ln in reader]
                want, off = [], 0
                for ln in lines:
                    want.append((off, len(ln), len(ln) > 20, ln[:4] if len(ln) > 20 else ln))
                    off += len(ln) + 1
                taken = settled and tail in (b"[1]", b"z" * 30)
                if taken:
                    want.append((off, len(tail), len(tail) > 20, tail[:4] if len(tail) > 20 else tail))
                assert got == want, (chunk, lines, tail, settled)
                assert reader.end == (len(data) if taken or not tail else off)
                assert reader.pending == (len(tail) if tail and not taken else 0)


def test_the_hook_refuses_deeply_nested_input_with_a_reason(tmp_path):
    deep = b'{"session_id":"s1","hook_event_name":"PreToolUse","tool_input":' + DEEP + b"}"
    proc = run_cli("hook", env=cli_env(tmp_path / "home", AGENTLEDGER_HOOK_DAEMON="0"), input=deep.decode(),
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in proc.stderr


# -- a record the parser fails on ----------------------------------------------------------------
# (from an audit: one line with a field of an unexpected type made the parser raise, and the whole
# file was an `error`: every valid line before and after it lost, no reject, no gap, and every later
# import failed the same way)

CODEX_B = next(FIXTURES.glob("rollout-*019c2d3e*.jsonl"))
CLAUDE_B = REPO / "tests" / "fixtures" / "claude-code" / "projects" / "-home-dev-api" / \
    "2b8d4f6a-1c3e-4a5b-8d7f-9e0a1b2c3d4e.jsonl"


def _inject(data: bytes, obj: dict, at: int = 3) -> bytes:
    lines = data.split(b"\n")
    return b"\n".join(lines[:at] + [json.dumps(obj).encode()] + lines[at:])


def _import(home: Path, kind: str, path: Path):
    from agentledger.producers.importer import run_import
    from agentledger.schemas.config import from_env

    s = from_env({"AGENTLEDGER_HOME": str(home)})
    return run_import(s, [path] if kind == "codex" else [], [path] if kind == "otel" else [],
                      claude=[path] if kind == "claude" else [])


@pytest.mark.parametrize("kind,source,bad,at", [
    ("codex", CODEX_B, {"type": ["x"], "payload": {}}, 3),
    ("codex", CODEX_B, {"timestamp": "2026-02-03T14:20:13.480Z", "type": "event_msg", "payload": {
        "type": "exec_command_end", "call_id": "call_Z", "command": ["ls"], "exit_code": 0,
        "duration": {"secs": 1e308, "nanos": 0}, "status": "completed"}}, 3),
    ("codex", CODEX_B, {"timestamp": "2026-02-03T14:20:09.880Z", "type": "turn_context",
                        "payload": {"turn_id": "turn-9", "cwd": "/x", "network": {"allowed_domains": 1}}}, 3),
    ("codex", CODEX_B, {"timestamp": float("inf"), "type": "session_meta", "payload": {
        "id": "019c2d3e-4f50-7a6b-8c9d-0e1f2a3b4c5d", "git": {"commit_hash": [], "branch": 10**30}, "model": {}}}, 0),
    ("claude", CLAUDE_B, {"type": [], "sessionId": "2b8d4f6a-1c3e-4a5b-8d7f-9e0a1b2c3d4e", "parentUuid": None,
                          "isSidechain": False}, 3),
    ("otel", OTEL_A, {"resource_logs": [{"resource": 1, "scope_logs": [{"log_records": 1}, 2]}]}, 1),
], ids=["codex-type-list", "codex-duration-1e308", "codex-domains-int", "codex-meta-types", "claude-type-list",
        "otel-resource-int"])
def test_a_field_of_another_type_loses_no_line_of_the_file(tmp_path, kind, source, bad, at):
    clean = tmp_path / "clean" / source.name
    hostile = tmp_path / "hostile" / source.name
    for p, data in ((clean, source.read_bytes()), (hostile, _inject(source.read_bytes(), bad, at))):
        p.parent.mkdir()
        p.write_bytes(data)
    want = _import(tmp_path / "home-clean", kind, clean)
    got = _import(tmp_path / "home-hostile", kind, hostile)
    (f,) = got.files
    assert f.status == "new" and f.error is None, f.error
    assert f.counts.lines == want.files[0].counts.lines + 1
    kinds, base = got.totals()["kinds"], want.totals()["kinds"]
    assert all(kinds.get(k, 0) >= n for k, n in base.items()), (kinds, base)  # every event of the clean file
    again = _import(tmp_path / "home-hostile", kind, hostile)
    assert [x.status for x in again.files] == ["unchanged"] and again.events_added == 0


def test_a_record_the_parser_fails_on_is_one_reject_and_gap_and_the_rest_of_the_file_is_imported(tmp_path, monkeypatch):
    """Whatever a parser fails on (a bug not found yet), the importer keeps the line as a reject with
    its reason and bytes, states a gap in the session, and reads every other line."""
    from agentledger.producers.codex_rollout import RolloutParser
    from agentledger.producers.importer import UNUSABLE

    orig = RolloutParser._turn_context

    def turn_context(self, p, at):
        if p.get("cwd") == "/boom":
            raise RuntimeError("a parser bug the record triggers: /boom secret-in-message")
        return orig(self, p, at)

    monkeypatch.setattr(RolloutParser, "_turn_context", turn_context)
    bad = {"timestamp": "2026-02-03T14:20:09.880Z", "type": "turn_context", "payload": {"turn_id": "t9", "cwd": "/boom"}}
    clean = tmp_path / "clean" / CODEX_B.name
    hostile = tmp_path / "hostile" / CODEX_B.name
    for p, data in ((clean, CODEX_B.read_bytes()), (hostile, _inject(CODEX_B.read_bytes(), bad, at=5))):
        p.parent.mkdir()
        p.write_bytes(data)
    want = _import(tmp_path / "home-clean", "codex", clean)
    got = _import(tmp_path / "home-hostile", "codex", hostile)
    (f,) = got.files
    assert f.status == "new" and f.error is None
    assert f.counts.unknown_types.get(UNUSABLE) == 1 and f.counts.problems == want.files[0].counts.problems + 1
    (reject,) = [r for r in got.rejects if r["line"] == 6]
    assert reject["reason"].startswith("record not usable: RuntimeError at ") and "secret" not in reject["reason"]
    assert '"/boom"' in reject["excerpt"]
    kinds, base = dict(got.totals()["kinds"]), dict(want.totals()["kinds"])
    assert kinds.pop("gap") == base.pop("gap", 0) + 1 and kinds == base
    # kept in the state like every reject, and the next import neither fails nor adds anything
    from agentledger.producers.importstate import ProducerState

    rows = ProducerState(tmp_path / "home-hostile").con.execute("SELECT reason FROM rejects").fetchall()
    assert [r[0] for r in rows if r[0].startswith("record not usable")] == [reject["reason"]]
    again = _import(tmp_path / "home-hostile", "codex", hostile)
    assert [x.status for x in again.files] == ["unchanged"] and again.events_added == 0


def test_a_parser_failing_at_the_end_of_the_file_keeps_what_it_read(tmp_path, monkeypatch):
    from agentledger.producers.otel import OtelParser

    def finish(self, idle):
        raise KeyError("boom")

    monkeypatch.setattr(OtelParser, "finish", finish)
    path = tmp_path / OTEL_A.name
    shutil.copy(OTEL_A, path)
    rep = _import(tmp_path / "home", "otel", path)
    (f,) = rep.files
    assert f.status == "new" and rep.events_added > 0
    assert [r["reason"] for r in rep.rejects] == [f"end of the records not usable: KeyError at {Path(__file__).name}:"
                                                  f"{finish.__code__.co_firstlineno + 1}"]


# -- what is not a regular file, and links -----------------------------------------------------


def test_a_fifo_is_not_read_and_the_other_files_are_imported(tmp_path):
    """(from an audit: a FIFO named *.jsonl in the sessions folder hung the import forever)"""
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    shutil.copy(ROLLOUT_A, sessions)
    fifo = sessions / "rollout-zz.jsonl"
    os.mkfifo(fifo)
    env = cli_env(tmp_path / "home")
    proc = run_cli("import", "codex-rollout", str(sessions), "--format", "json", env=env, check=False, timeout=120)
    files = _by_name(_json(proc))
    assert proc.returncode == 1 and f"error: {fifo}: a FIFO, not a regular file: not read" in proc.stderr
    assert files["rollout-zz.jsonl"]["status"] == "error"
    assert files[ROLLOUT_A.name]["status"] == "new" and _json(proc)["totals"]["events_added"] > 0
    named = run_cli("import", "codex-rollout", str(fifo), "--format", "json", env=env, check=False, timeout=120)
    assert named.returncode == 1 and _by_name(_json(named))["rollout-zz.jsonl"]["error"] == \
        "a FIFO, not a regular file: not read"


def test_a_fifo_swapped_in_after_it_was_found_is_refused_without_blocking(tmp_path):
    from agentledger.producers.importer import NotRegularFile, open_regular

    path = tmp_path / "rollout-x.jsonl"
    os.mkfifo(path)
    with pytest.raises(NotRegularFile, match="FIFO"):
        open_regular(str(path))
    link = tmp_path / "link.jsonl"
    link.symlink_to(ROLLOUT_A)
    with pytest.raises(NotRegularFile, match="symbolic link"):
        open_regular(str(link), follow=False)
    f, st = open_regular(str(link))  # named: the user's choice
    with f:
        assert st.st_size == ROLLOUT_A.stat().st_size and f.read(1) == b"{"


def test_links_under_a_directory_are_not_followed_a_named_one_is(tmp_path):
    """(from an audit: a link named rollout-….jsonl to any readable file put its lines, as rejects,
    into the report and state/producers.db)"""
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    notes = tmp_path / "outside-private-notes.txt"
    notes.write_text("db_host = prod-db.internal\nadmin_email = root@corp.example\n")
    outside = sessions / "rollout-2026-01-01T00-00-00-aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa.jsonl"
    outside.symlink_to(notes)
    inside = sessions / "rollout-copy.jsonl"
    inside.symlink_to(ROLLOUT_A)  # a link to a rollout is not followed either: name the file to import it
    (sessions / "sub").symlink_to(tmp_path, target_is_directory=True)  # (directories: not descended into)
    real = sessions / "real"
    real.mkdir()
    shutil.copy(OTEL_A, real)  # (the other format: skipped as ever)
    env = cli_env(tmp_path / "home")
    proc = run_cli("import", "codex-rollout", str(sessions), "--format", "json", env=env, check=False)
    rep = _json(proc)
    files = _by_name(rep)
    assert proc.returncode == 1 and rep["rejects"] == []
    for link in (outside, inside):
        assert files[link.name]["status"] == "error" and "symbolic link" in files[link.name]["error"]
    assert set(files) == {outside.name, inside.name}
    state = (tmp_path / "home" / "state" / "producers.db").read_bytes()
    assert b"prod-db.internal" not in state and b"root@corp" not in state
    named = run_cli("import", "codex-rollout", str(inside), "--format", "json", env=env, check=False)
    assert named.returncode == 0 and _by_name(_json(named))[inside.name]["status"] == "new"
