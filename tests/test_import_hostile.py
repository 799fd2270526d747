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
