"""Secrets: a seeded corpus of real-shaped secrets (bench/redaction.py's: every gitleaks provider rule,
cloud, GitHub, OpenAI, Anthropic, Slack, Stripe tokens, PEM keys, JWTs, passwords in URLs and flags,
argv-split, base64- and URL-encoded, inside JSON strings of command output) sent through the producer
paths -- `agentledger hook` (Claude Code payloads), `agentledger import codex-rollout` (a rollout
whose commands, outputs and prompts carry them) and the simulator (its own planted secrets) -- then
ingested with detection on (alerts), verified, exported as bundles and replayed to HTML. Then every
byte written anywhere under the scenario's directory (the local log, spool, warehouse file, bundles,
HTML, alerts, import state, keys) and every value of every warehouse table (DuckDB compresses
strings on disk, so the bytes alone could hide one) is scanned for each secret in clear and in its
base64 and URL-encoded spellings (any 12-character piece of it counts, as in bench/redaction.py).

Figures: secrets tried per path, secrets found in clear (must be 0) with where, bytes scanned.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

from chaos_scenarios import scenario

REPO = Path(__file__).resolve().parents[2]


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "HOME": str(home.parent), "PYTHONPATH": str(REPO), "NO_COLOR": "1",
                "COLUMNS": "200", "AGENTLEDGER_HOOK_DAEMON": "0"})
    return env


def _cli(home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentledger", *args], input=stdin, capture_output=True,
                          env=_env(home), cwd=REPO, timeout=600)


def corpus(seed: int, limit: int | None):
    """The first ``limit`` samples of the redaction corpus (all: None), then the same secrets split
    across lines (of the first 40) and base64-encoded in a credential line (of the next 20)."""
    sys.path.insert(0, str(REPO / "bench"))
    import redaction  # bench/redaction.py

    found, _ = redaction.samples(random.Random(seed), 1)
    rng = random.Random(seed)
    rng.shuffle(found)
    found = found[:limit] if limit else found  # (a small run keeps the split and base64 forms of its samples)
    # secrets split across lines, and base64 of a credential line, on top of redaction's forms
    extra = []
    for s in found[:40]:
        # the sample itself with its secret continued on the next line (backslash-newline), in the
        # context that makes it a secret (`export API_CREDENTIAL=ghp_…`, `X-Vault-Token: …`)
        if isinstance(s.text, str) and len(s.secret) >= 16 and s.secret in s.text:
            half = len(s.secret) // 2
            extra.append(redaction.Sample("split_lines", s.text.replace(s.secret, f"{s.secret[:half]}\\\n{s.secret[half:]}"),
                                          s.secret, public=s.public, label="split"))
    for s in found[40:60]:
        if isinstance(s.text, str):
            b64 = base64.b64encode(f"password={s.secret}".encode()).decode()
            extra.append(redaction.Sample("base64", f"echo {b64} | base64 -d", s.secret, (b64,), label="b64"))
    return found + extra


def _text(s) -> str:
    return " ".join(s.text) if isinstance(s.text, list) else s.text


def _rollout(path: Path, samples, sid: str) -> None:
    lines = [{"timestamp": "2025-09-14T10:02:11.482Z", "type": "session_meta",
              "payload": {"id": sid, "timestamp": "2025-09-14T10:02:11.482Z", "cwd": "/home/dev/p",
                          "originator": "codex_cli_rs", "cli_version": "0.46.0", "source": "cli",
                          "model_provider": "openai"}},
             {"timestamp": "2025-09-14T10:02:19.051Z", "type": "turn_context",
              "payload": {"cwd": "/home/dev/p", "approval_policy": "on-request",
                          "sandbox_policy": {"type": "workspace-write", "network_access": False}, "model": "gpt-5"}}]
    for i, s in enumerate(samples):
        ts = f"2025-09-14T10:{3 + i // 3600:02d}:{(i // 60) % 60:02d}.{i % 60:03d}Z"
        cmd = list(s.text) if isinstance(s.text, list) else ["bash", "-lc", s.text]
        lines.append({"timestamp": ts, "type": "event_msg",
                      "payload": {"type": "user_message", "message": f"use this: {_text(s)}", "kind": "plain"}})
        lines.append({"timestamp": ts, "type": "response_item",
                      "payload": {"type": "function_call", "name": "shell", "call_id": f"c{i}",
                                  "arguments": json.dumps({"command": cmd, "workdir": "/home/dev/p"})}})
        output = json.dumps({"result": {"config": _text(s)}}) if i % 2 else f"ok\n{_text(s)}\n"
        lines.append({"timestamp": ts, "type": "response_item",
                      "payload": {"type": "function_call_output", "call_id": f"c{i}",
                                  "output": json.dumps({"output": output,
                                                        "metadata": {"exit_code": 0, "duration_seconds": 0.1}})}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _hook_session(home: Path, samples, sid: str) -> int:
    base = {"session_id": sid, "cwd": "/w", "permission_mode": "default", "transcript_path": "/h/.claude/x.jsonl"}
    calls = [{**base, "hook_event_name": "SessionStart", "source": "startup", "model": "claude-sonnet-4-5"}]
    for i, s in enumerate(samples):
        cmd = _text(s)
        pre = {**base, "hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_use_id": f"toolu_{i}",
               "tool_input": {"command": cmd, "description": "run"}}
        calls.append(pre)
        calls.append({**pre, "hook_event_name": "PostToolUse",
                      "tool_response": {"stdout": json.dumps({"token": cmd}) if i % 2 else cmd, "stderr": "",
                                        "interrupted": False}})
        if i % 5 == 0:
            calls.append({**base, "hook_event_name": "PreToolUse", "tool_name": "WebFetch", "tool_use_id": f"w{i}",
                          "tool_input": {"url": f"https://api.example.com/x?token={urllib.parse.quote(s.secret)}",
                                         "prompt": cmd}})
    calls.append({**base, "hook_event_name": "SessionEnd", "reason": "exit"})
    bad = 0
    for c in calls:
        proc = _cli(home, "hook", stdin=json.dumps(c).encode())
        bad += proc.returncode not in (0, 2)
    return bad


def _simulated_secrets(home: Path, sessions: int, seed: int) -> list[str]:
    from agentledger import api
    from agentledger.producers import simulate
    from agentledger.schemas.config import from_env

    planted: list[str] = []
    real = simulate.make_secret

    def spy(rng, kind):
        v = real(rng, kind)
        planted.append(v)
        return v

    simulate.make_secret = spy
    try:
        api.simulate(from_env(_env(home)), sessions, seed, attack_rate=0.5)
    finally:
        simulate.make_secret = real
    return planted


def _needles(secret: str, spellings=(), public=()) -> list[str]:
    """What counts as the secret in clear: any 12-character piece (with 4+ letters or digits of
    secret material) of it or of a spelling the sample used, and its whole base64 and URL-encoded
    forms. ``public`` marks the characters of ``secret`` that are literals of its format (a gitleaks
    rule's fixed prefix: ``pscale_oauth_``, ``_gitlab_session=``, ``https://hooks.slack.com/``): the
    same in every key of that format, in documentation and in the redaction token's detector name
    (``[SECRET:planetscale_oauth_token:…]`` holds ``scale_oauth_``), so not secret material."""
    out = set()
    for s in (secret, *spellings):
        n = min(12, len(s))
        mask = public if s is secret and len(public) == len(s) else ()
        for i in range(0, len(s) - n + 1):
            w = s[i:i + n]
            if sum(c.isalnum() and not (mask and mask[i + j]) for j, c in enumerate(w)) >= min(4, n):
                out.add(w)
    for enc in (base64.b64encode(secret.encode()).decode().rstrip("="), urllib.parse.quote(secret, safe="")):
        if enc != secret and len(enc) >= 12:
            out.add(enc[:40])
    return sorted(out)


def _warehouse_text(db: Path) -> dict[str, str]:
    """Every value of every table, as text (what a query would show)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    out = {}
    for (t,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
                            ).fetchall():
        rows = con.execute(f'SELECT * FROM "{t}"').fetchall()
        out[f"warehouse:{t}"] = "\n".join(repr(r) for r in rows)
    con.close()
    return out


@scenario("secrets")
def run(args, workdir: Path) -> dict:
    home = workdir / "home"
    home.mkdir(parents=True)
    samples = corpus(args.seed, args.secret_samples or None)
    paths = {"hook": samples[:args.hook_samples], "importer": samples}
    hook_errors = _hook_session(home, paths["hook"], "cc-secrets-1")
    rollout = workdir / "rollouts" / "rollout-2025-09-14T10-02-11-0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6c.jsonl"
    rollout.parent.mkdir()
    _rollout(rollout, samples, "0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6c")
    imp = _cli(home, "import", "codex-rollout", str(rollout))
    planted = _simulated_secrets(home, args.sim_sessions, args.seed)
    ing = _cli(home, "ingest", "--detect")
    errors = {"hook": hook_errors, "import": imp.returncode, "ingest": ing.returncode}
    import duckdb

    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    sids = [r[0] for r in con.execute("SELECT session_id FROM chain_heads ORDER BY 1").fetchall()]
    con.close()
    out_dir = workdir / "outputs"
    out_dir.mkdir()
    for sid in sids:
        errors[f"export {sid[:8]}"] = _cli(home, "export", sid, "--out", str(out_dir / f"{sid}.avro")).returncode
    for sid in sids[:3]:
        errors[f"replay {sid[:8]}"] = _cli(home, "replay", sid, "--html", str(out_dir / f"{sid}.html")).returncode
    errors["verify"] = _cli(home, "verify").returncode
    errors = {k: v for k, v in errors.items() if v}
    # every byte written, plus the warehouse's values
    texts: dict[str, str] = {}
    nbytes = 0
    rollout.unlink()  # the input, not something we wrote
    for p in sorted(workdir.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            nbytes += len(data)
            texts[str(p.relative_to(workdir))] = data.decode("latin-1")
    texts.update(_warehouse_text(home / "warehouse.duckdb"))
    secrets = [(f"{s.family}:{s.label}", s.secret, s.spellings, s.public) for s in samples]
    secrets += [("simulator", v, (), ()) for v in planted]
    found = []
    for name, secret, spellings, public in secrets:
        needles = _needles(secret, spellings, public)
        if not needles:
            continue
        pat = re.compile("|".join(re.escape(n) for n in needles))
        where = [k for k, t in texts.items() if pat.search(t)]
        if where:
            found.append({"secret": name, "where": where[:4]})
    return {"secrets": len(secrets), "hook_samples": len(paths["hook"]), "importer_samples": len(samples),
            "simulator_secrets": len(planted), "files_scanned": sum(1 for k in texts if not k.startswith("warehouse:")),
            "bytes_scanned": nbytes, "in_clear": len(found), "found": found[:30], "errors": errors,
            "undetected": len(found), "tracebacks": 0}
