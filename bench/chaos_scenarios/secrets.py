"""Secrets: a seeded corpus of real-shaped secrets (bench/redaction.py's: every gitleaks provider rule,
cloud, GitHub, OpenAI, Anthropic, Slack, Stripe tokens, PEM keys, JWTs, passwords in URLs and flags,
argv-split, base64- and URL-encoded, inside JSON strings of command output) sent through every
producer path -- `agentledger hook` (Claude Code payloads), `agentledger import codex-rollout` (a
rollout whose commands, outputs and prompts carry them), `agentledger sandbox run` (commands that
carry them in argv, in environment variables, in files they write and in their output, with a
deny-all network policy: nothing leaves) and the simulator (its own planted secrets) -- then
ingested with detection on (alerts), verified, exported as bundles and replayed to HTML.

Two transports, each with its own home and warehouse: the embedded local log, and (with
``--bootstrap``) a Kafka topic of its own -- the same producers recording to Kafka, one importer
run through an unreachable broker so that it spools (the spool is scanned, then drained onto the
topic), then `ingest --detect` from Kafka (alerts to an alerts topic of its own).

Then every byte written anywhere under the scenario's directory (log, spool, warehouse files,
bundles, HTML, alerts, import and sandbox state, keys), every message of the topics (raw and
decoded) and every value of every warehouse table (DuckDB compresses strings on disk, so the bytes
alone could hide one) is scanned for each secret in clear and in its base64 and URL-encoded
spellings (any 12-character piece of it counts, as in bench/redaction.py). The sandbox's recording
store (``cas/``, which holds environment values, outputs and files by design, see docs/sandbox.md)
and the sandboxed commands' own workspace are scanned and reported apart: they are not events.

Independently, detect-secrets (a maintained scanner, every plugin) reads every text file written,
every decoded message (one JSON line each) and every warehouse value; its findings are reported per
location and classified: a piece of a corpus secret (a leak: must be 0), a redaction token, or a
known non-secret (digests, ids, ...), with examples; anything else is ``unexplained``.

Figures: secrets tried per path, secrets found in clear (must be 0) with where, bytes scanned,
detect-secrets findings per location and class.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shlex
import subprocess
import sys
import urllib.parse
import uuid
from collections import Counter, defaultdict
from pathlib import Path

from chaos_scenarios import agentledger_cmd, scenario

REPO = Path(__file__).resolve().parents[2]
TOKEN_RE = re.compile(r"\[SECRET:[a-z0-9_]+:[0-9a-f]{8}\]")  # producers/redact.py's tokens


def _env(home: Path, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "HOME": str(home.parent), "PYTHONPATH": str(REPO), "NO_COLOR": "1",
                "COLUMNS": "200", "AGENTLEDGER_HOOK_DAEMON": "0"})
    env.update(extra or {})
    return env


def _cli(home: Path, *args: str, stdin: bytes | None = None, extra: dict | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*agentledger_cmd(), *args], input=stdin, capture_output=True,
                          env=_env(home, extra), cwd=cwd or REPO, timeout=600,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


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


def _hook_session(home: Path, samples, sid: str, extra: dict | None = None) -> int:
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
        proc = _cli(home, "hook", stdin=json.dumps(c).encode(), extra=extra)
        bad += proc.returncode not in (0, 2)
    return bad


SANDBOX_POLICY = """name = "chaos-secrets"
[sandbox]
mode = "workspace_write"
writable_roots = ["$WORKSPACE"]
[sandbox.env]
# the secrets are let in on purpose (the default policy filters *TOKEN* and the like out)
allow = ["PATH", "HOME", "LANG", "CHAOS_*"]
deny = []
[network]
default = "deny"
[approvals]
default = "allow"
noninteractive = "deny"
"""


def _sandbox_script(batch) -> tuple[str, dict]:
    """One `sh -c` script for a batch of samples, and its environment. Per sample: the sample run
    as a command (its secret in the script, i.e. the argv, and in the argv of whatever it starts),
    the secret from an environment variable printed bare and inside JSON, written to a file, and
    passed on a command line (`curl -u user:$SECRET` to a denied address)."""
    lines, env = [], {}
    for j, s in enumerate(batch):
        var = f"CHAOS{j}_TOKEN"  # a name that says secret, as GITHUB_TOKEN does
        env[var] = s.secret
        text = _text(s) if isinstance(s.text, str) else shlex.join(s.text)
        # the sample as a command: literally in the script (a quoted here-document: no sample can
        # break the script's syntax) and as the argv of the `sh -c` that runs it
        lines += [f"sh -c \"$(cat <<'CHAOS_EOF_{j}'\n{text}\nCHAOS_EOF_{j}\n)\" </dev/null 2>&1 | head -c 600",
                  f'printf "%s\\n" "${var}"',
                  f'printf \'{{"config": {{"token": "%s"}}}}\\n\' "${var}"',
                  f'printf "password=%s\\n" "${var}" > secret-{j}.txt',
                  f'curl -s -m 5 -u "user:${var}" http://127.0.0.1:1/ 2>&1 | head -c 200']
    return "\n".join(lines) + "\n", env


def _sandbox_runs(home: Path, ws: Path, policy: Path, samples, batch: int, extra: dict | None = None) -> dict:
    """`agentledger sandbox run` (one one-command session per batch of samples); returns figures."""
    ws.mkdir(parents=True, exist_ok=True)
    runs = bad = 0
    for i in range(0, len(samples), batch):
        script, env = _sandbox_script(samples[i:i + batch])
        proc = _cli(home, "sandbox", "run", "--policy", str(policy), "--timeout", "120", "--stdin", "none", "--",
                    "sh", "-c", script, extra={**(extra or {}), **env}, cwd=ws)
        runs += 1
        # the script's own exit status is whatever its last command returned; the recorder's failures are >= 124
        bad += proc.returncode >= 124 or "Traceback" in proc.stderr.decode("utf-8", "replace")
    return {"runs": runs, "errors": bad}


def _simulated_secrets(home: Path, sessions: int, seed: int, extra: dict | None = None) -> list[str]:
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
        api.simulate(from_env(_env(home, extra)), sessions, seed, attack_rate=0.5)
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

class NeedleIndex:
    """Every needle of every secret, found in one pass per text (pyahocorasick, the automaton
    producers/redact.py uses too). Texts are bytes; needles their UTF-8 bytes (both read as Latin-1)."""

    def __init__(self, secrets: list[tuple[str, list[str]]]):
        import ahocorasick

        self.names = [name for name, _ in secrets]
        self.auto = ahocorasick.Automaton()
        owners: dict[str, set[int]] = defaultdict(set)
        for idx, (_, needles) in enumerate(secrets):
            for n in needles:
                owners[n.encode("utf-8", "surrogateescape").decode("latin-1")].add(idx)
        for n, idxs in owners.items():
            self.auto.add_word(n, frozenset(idxs))
        self.empty = not owners
        if not self.empty:
            self.auto.make_automaton()

    def find(self, data: bytes) -> set[int]:
        """Indexes of the secrets one of whose needles ``data`` holds."""
        out: set[int] = set()
        if not self.empty:
            for _, idxs in self.auto.iter(data.decode("latin-1")):
                out |= idxs
        return out


def _warehouse_text(db: Path, prefix: str) -> dict[str, bytes]:
    """Every value of every table, as text (what a query would show): one line per row."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    out = {}
    for (t,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
                            ).fetchall():
        rows = con.execute(f'SELECT * FROM "{t}"').fetchall()
        out[f"{prefix}warehouse:{t}"] = "\n".join(repr(r) for r in rows).encode("utf-8", "surrogateescape")
    con.close()
    return out


def _decoded(value: bytes, stores) -> str:
    for store in stores:
        try:
            return json.dumps(store.decode(value), default=repr, ensure_ascii=False)
        except Exception:  # noqa: BLE001 -- not this subject (or damaged): the raw bytes are scanned anyway
            continue
    return ""


def _topic_messages(source, topic: str, stores) -> tuple[int, bytes, bytes]:
    """(messages, raw values, decoded values one JSON line each) of a whole topic."""
    if not source.partitions(topic):
        return 0, b"", b""
    source.assign(topic, {})
    end = source.end_offsets(topic)
    n, raw, dec = 0, [], []
    while any(source.positions().get((topic, p), 0) < e for p, e in end.items()):
        batch = source.poll(5000, 10.0)
        if not batch:
            break
        for m in batch:
            n += 1
            raw.append((m.key or b"") + b"\n" + m.value)
            dec.append(_decoded(m.value, stores))
    return n, b"\n".join(raw), "\n".join(dec).encode("utf-8", "surrogateescape")


def _bundle_text(path: Path) -> bytes:
    from agentledger.schemas import codec

    try:
        with open(path, "rb") as f:
            _, meta, records = codec.read_container(f)
            lines = [json.dumps(meta, default=repr)] + [json.dumps(r, default=repr, ensure_ascii=False) for r in records]
        return "\n".join(lines).encode("utf-8", "surrogateescape")
    except Exception as exc:  # noqa: BLE001 -- an unreadable bundle is scanned as bytes only
        return f"(unreadable: {exc})".encode()


def _location(key: str) -> str:
    """The kind of place a scanned text is (the figures' rows)."""
    k = key.split(":", 1)[1] if key.startswith(("local:", "kafka:")) else key
    if "warehouse:" in k:
        return "warehouse values"
    if k.startswith("topic"):
        return "topic messages"
    for part, name in (("/cas/", "cas (recording store)"), ("ws/", "sandbox workspace"), ("spool", "spool"),
                       ("/log/", "log"), ("/sandbox/", "sandbox state"), ("/keys/", "keys"),
                       ("/state/", "import state"), ("warehouse.duckdb", "warehouse file")):
        if part in k:
            return name
    if k.endswith(".html"):
        return "HTML"
    if k.endswith(".avro") or k.endswith(".avro decoded"):
        return "bundles"
    return "other"


# Places that are not events: the sandbox's recording store keeps environment values, outputs and
# files so that a session can be re-executed (docs/sandbox.md, "Security trade-off"), and the
# workspace is the sandboxed command's own. Scanned and reported, not counted as leaks.
NOT_EVENTS = ("cas (recording store)", "sandbox workspace")


def _is_text(data: bytes) -> bool:
    if b"\0" in data[:8192]:
        return False
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_HEX = re.compile(r"[0-9a-fA-F]+")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _classify(value: str, line: str, index: NeedleIndex, ptype: str, loc: str) -> str:
    """What a detect-secrets finding is: ``leak`` (a piece of a corpus secret), or a known kind."""
    if index.find(value.encode("utf-8", "surrogateescape")):
        return "leak: a corpus secret"
    if TOKEN_RE.search(value) or any(value in t for t in TOKEN_RE.findall(line)) or value.startswith("[SECRET"):
        return "redaction token"
    v = value.strip("\"'")
    if _HEX.fullmatch(v) and len(v) in (8, 12, 16, 32, 40, 64, 128):
        return f"hex digest/id ({len(v)} hex: sha256 digests, chain hashes, key ids)"
    if _UUID.search(v):
        return "uuid (session, command, event ids)"
    if loc == "keys":
        return "agentledger's own keys (keys/: signing and redaction keys, 0600)"
    if ptype == "Public IP (ipv4)":
        return "public IP address (simulated network destinations)"
    return "unexplained"


def _detect_secrets(texts: dict[str, bytes], files: dict[str, Path], index: NeedleIndex) -> dict:
    """detect-secrets as `detect-secrets scan` runs it (every plugin, its default filters, file by
    file) over every text file written (``files``, in place) and over ``texts`` (decoded messages,
    bundles and warehouse values, written to a scratch directory outside the run's)."""
    import tempfile

    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.core.scan import scan_file
    from detect_secrets.settings import default_settings

    plugins = sorted(c.__name__ for c in get_mapping_from_secret_type_to_class().values())
    per_loc: dict[str, Counter] = defaultdict(Counter)
    classes: Counter = Counter()
    examples: dict[str, list] = defaultdict(list)
    scanned = 0
    with tempfile.TemporaryDirectory(prefix="agentledger-chaos-ds-") as tmp, default_settings():
        todo = dict(files)
        for i, (key, data) in enumerate(texts.items()):
            todo[key] = Path(tmp) / f"{i}.txt"
            todo[key].write_bytes(data)
        for key, path in todo.items():
            loc = _location(key)
            lines = path.read_text("utf-8", "replace").splitlines()
            scanned += len(lines)
            for ps in scan_file(str(path)):
                value = ps.secret_value or ""
                line = lines[ps.line_number - 1] if 0 < ps.line_number <= len(lines) else ""
                cls = _classify(value, line, index, ps.type, loc)
                per_loc[loc][cls] += 1
                classes[cls] += 1
                if len(examples[cls]) < 3:
                    examples[cls].append({"where": key, "type": ps.type, "value": value[:60]})
    leak = "leak: a corpus secret"
    return {"plugins": len(plugins), "lines_scanned": scanned, "findings": sum(classes.values()),
            "by_class": dict(classes.most_common()),
            "by_location": {loc: dict(c.most_common()) for loc, c in sorted(per_loc.items())},
            "examples": dict(examples),
            "leaks_in_events": sum(c[leak] for loc, c in per_loc.items() if loc not in NOT_EVENTS),
            "unexplained": sum(c["unexplained"] for loc, c in per_loc.items() if loc not in NOT_EVENTS)}


def _collect(root: Path, prefix: str) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, Path], int]:
    """(every file's bytes, bundles decoded, the text files -- for detect-secrets: binaries are read
    decoded instead --, bytes read) under ``root``."""
    raw: dict[str, bytes] = {}
    text: dict[str, bytes] = {}
    files: dict[str, Path] = {}
    nbytes = 0
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        nbytes += len(data)
        key = f"{prefix}{p.relative_to(root)}"
        raw[key] = data
        if p.suffix == ".avro" and "/log/" not in f"/{p.relative_to(root)}" and "/spool/" not in f"/{p.relative_to(root)}":
            text[key + " decoded"] = _bundle_text(p)
        elif _is_text(data):
            files[key] = p
    return raw, text, files, nbytes


def _log_messages(log_dir: Path, topics: list[str], prefix: str, stores) -> tuple[dict[str, bytes], int]:
    """Every message of the embedded log (or a spool), decoded: one JSON line each."""
    from agentledger.schemas.transport import local_source

    out, n = {}, 0
    if not log_dir.is_dir():
        return out, 0
    for topic in topics:
        if not (log_dir / topic).is_dir():
            continue
        k, _, dec = _topic_messages(local_source(log_dir), topic, stores)
        n += k
        out[f"{prefix}{log_dir.name}/{topic} decoded"] = dec
    return out, n


def _export_and_replay(home: Path, out_dir: Path, replays: int, extra: dict | None = None) -> dict:
    import duckdb

    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    sids = [r[0] for r in con.execute("SELECT session_id FROM chain_heads ORDER BY 1").fetchall()]
    con.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = {}
    for sid in sids:
        errors[f"export {sid[:8]}"] = _cli(home, "export", sid, "--out", str(out_dir / f"{sid}.avro"),
                                          extra=extra).returncode
    for sid in sids[:replays]:
        errors[f"replay {sid[:8]}"] = _cli(home, "replay", sid, "--html", str(out_dir / f"{sid}.html"),
                                          extra=extra).returncode
    errors["verify"] = _cli(home, "verify", extra=extra).returncode
    return errors


def _local_half(args, workdir: Path, samples, inputs: Path, policy: Path) -> tuple[dict, dict, dict, dict]:
    """Record through every producer into the embedded log, ingest, export, replay."""
    home = workdir / "local" / "home"
    home.mkdir(parents=True)
    hook_errors = _hook_session(home, samples[:args.hook_samples], "cc-secrets-1")
    rollout = inputs / "rollout-2025-09-14T10-02-11-0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6c.jsonl"
    _rollout(rollout, samples, "0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6c")
    imp = _cli(home, "import", "codex-rollout", str(rollout))
    sbx_samples = samples[:args.sandbox_samples] if args.sandbox_samples else samples
    sbx = _sandbox_runs(home, workdir / "local" / "ws", policy, sbx_samples, args.sandbox_batch)
    planted = _simulated_secrets(home, args.sim_sessions, args.seed)
    ing = _cli(home, "ingest", "--detect")
    errors = {"hook": hook_errors, "import": imp.returncode, "ingest": ing.returncode, "sandbox": sbx["errors"]}
    errors.update(_export_and_replay(home, workdir / "local" / "outputs", args.replays))
    counts = {"hook_samples": min(args.hook_samples, len(samples)), "importer_samples": len(samples),
              "sandbox_samples": len(sbx_samples), "sandbox_runs": sbx["runs"], "simulator_secrets": len(planted)}
    return counts, {k: v for k, v in errors.items() if v}, {"planted": planted}, {"home": home}


def _kafka_half(args, workdir: Path, samples, inputs: Path, policy: Path) -> tuple[dict, dict, dict, dict]:
    """The same producers recording to a Kafka topic of their own (one importer run through an
    unreachable broker, so that it spools; then `spool drain`), then `ingest --detect` from Kafka."""
    run_id = uuid.uuid4().hex[:12]
    topic, alerts = f"chaos-secrets-{run_id}", f"chaos-secrets-alerts-{run_id}"
    kx = {"AGENTLEDGER_BOOTSTRAP_SERVERS": args.bootstrap, "AGENTLEDGER_TOPIC": topic,
          "AGENTLEDGER_ALERTS_TOPIC": alerts}
    home = workdir / "kafka" / "home"
    home.mkdir(parents=True)
    hook_errors = _hook_session(home, samples[:args.kafka_hook_samples], "cc-secrets-kafka", kx)
    half = len(samples) // 2
    direct = inputs / "kafka-direct" / "rollout-2025-09-14T10-02-11-0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6d.jsonl"
    spooled = inputs / "kafka-spool" / "rollout-2025-09-14T10-02-11-0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6e.jsonl"
    for path, part, sid in ((direct, samples[:half], "0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6d"),
                            (spooled, samples[half:], "0199a1b2-3c4d-7e8f-9a0b-1c2d3e4f5a6e")):
        path.parent.mkdir(parents=True)
        _rollout(path, part, sid)
    imp = _cli(home, "import", "codex-rollout", str(direct), extra=kx)
    # an unreachable broker: the importer's events wait in the spool (scanned before the drain)
    imp_spool = _cli(home, "import", "codex-rollout", str(spooled),
                     extra={**kx, "AGENTLEDGER_BOOTSTRAP_SERVERS": "127.0.0.1:1", "AGENTLEDGER_FLUSH_TIMEOUT_MS": "1000"})
    spool_raw = _collect(home / "spool", "kafka:spool-before-drain/")[0] if (home / "spool").is_dir() else {}
    from agentledger.schemas.contract import load_store

    spool_dec, spooled_n = _log_messages(home / "spool", [topic], "kafka:spool-before-drain/", [load_store()])
    drain = _cli(home, "spool", "drain", extra=kx)
    sbx_samples = samples[:args.kafka_sandbox_samples] if args.kafka_sandbox_samples else samples
    sbx = _sandbox_runs(home, workdir / "kafka" / "ws", policy, sbx_samples, args.sandbox_batch, kx)
    planted = _simulated_secrets(home, args.kafka_sim_sessions, args.seed + 1, kx)
    ing = _cli(home, "ingest", "--detect", extra=kx)
    errors = {"hook": hook_errors, "import": imp.returncode, "import (spooled)": imp_spool.returncode,
              "spool drain": drain.returncode, "sandbox": sbx["errors"], "ingest": ing.returncode}
    errors["verify"] = _cli(home, "verify", extra=kx).returncode
    from agentledger.schemas.transport import kafka_source

    source = kafka_source(args.bootstrap)
    try:
        n_ev, raw_ev, dec_ev = _topic_messages(source, topic, [load_store()])
        n_al, raw_al, dec_al = _topic_messages(kafka_source(args.bootstrap), alerts, [load_store("alert")])
    finally:
        source.close() if hasattr(source, "close") else None
    texts_raw = {**spool_raw, "kafka:topic events (raw)": raw_ev, "kafka:topic alerts (raw)": raw_al}
    texts_dec = {**spool_dec, "kafka:topic events decoded": dec_ev, "kafka:topic alerts decoded": dec_al}
    counts = {"topic": topic, "hook_samples": min(args.kafka_hook_samples, len(samples)), "importer_samples": half,
              "spooled_importer_samples": len(samples) - half, "spooled_messages": spooled_n,
              "sandbox_samples": len(sbx_samples), "sandbox_runs": sbx["runs"], "simulator_secrets": len(planted),
              "topic_messages": n_ev, "alert_messages": n_al}
    return counts, {k: v for k, v in errors.items() if v}, {"planted": planted}, \
        {"home": home, "raw": texts_raw, "decoded": texts_dec}


@scenario("secrets")
def run(args, workdir: Path) -> dict:
    from agentledger.schemas.contract import load_store

    samples = corpus(args.seed, args.secret_samples or None)
    inputs = workdir / "inputs"  # what we hand the producers: not something agentledger wrote
    inputs.mkdir(parents=True)
    policy = inputs / "policy.toml"
    policy.write_text(SANDBOX_POLICY)
    halves = {"local": _local_half(args, workdir, samples, inputs, policy)}
    if args.bootstrap:
        halves["kafka"] = _kafka_half(args, workdir, samples, inputs, policy)
    stores = [load_store(), load_store("alert")]
    raw: dict[str, bytes] = {}
    text: dict[str, bytes] = {}
    files: dict[str, Path] = {}
    nbytes = 0
    for name, (_, _, _, where) in halves.items():
        home = where["home"]
        r, t, f, n = _collect(workdir / name, f"{name}:")
        raw.update(r)
        raw.update(t)
        text.update(t)
        files.update(f)
        nbytes += n
        dec, _ = _log_messages(home / "log", sorted(p.name for p in (home / "log").iterdir() if p.is_dir())
                               if (home / "log").is_dir() else [], f"{name}:home/", stores)
        text.update(dec)
        wh = _warehouse_text(home / "warehouse.duckdb", f"{name}:")
        text.update(wh)
        raw.update(wh)
        raw.update(where.get("raw", {}))
        text.update(where.get("decoded", {}))
        raw.update(where.get("decoded", {}))
        nbytes += sum(len(v) for v in where.get("raw", {}).values())
    planted = sorted({v for _, _, p, _ in halves.values() for v in p["planted"]})
    secrets = [(f"{s.family}:{s.label}", s.secret, s.spellings, s.public) for s in samples]
    secrets += [("simulator", v, (), ()) for v in planted]
    index = NeedleIndex([(name, _needles(secret, spellings, public)) for name, secret, spellings, public in secrets])
    hits: dict[int, list[str]] = defaultdict(list)
    apart: Counter = Counter()  # secrets found in the places that are not events (the CAS, the workspace)
    for key, data in {**raw, **text}.items():
        loc = _location(key)
        for idx in index.find(data):
            if loc in NOT_EVENTS:
                apart[loc] += 1
            else:
                hits[idx].append(key)
    found = [{"secret": secrets[i][0], "value": secrets[i][1][:6] + "…",
              "where": sorted({f"{k.split(':', 1)[0]}: {_location(k)}" for k in w}), "e.g.": sorted(w)[0]}
             for i, w in sorted(hits.items())]
    ds = _detect_secrets(text, files, index)
    out = {"secrets": len(secrets), "files_scanned": sum(1 for k in raw if "warehouse:" not in k and "topic" not in k),
           "bytes_scanned": nbytes, "in_clear": len(found), "found": found[:30],
           "in_not_event_places": dict(apart), "detect_secrets": ds}
    for name, (counts, errors, _, _) in halves.items():
        out[name] = {**counts, "errors": errors}
    if "kafka" not in halves:
        out["kafka"] = {"run": False, "why": "NOT RUN: no Kafka broker (--bootstrap / $AGENTLEDGER_TEST_BOOTSTRAP unset); "
                                            "the topic and the Kafka warehouse were not scanned"}
        print("secrets: the Kafka half was NOT RUN (no --bootstrap, $AGENTLEDGER_TEST_BOOTSTRAP unset)", file=sys.stderr)
    out["errors"] = {f"{h}: {k}": v for h in halves for k, v in out[h]["errors"].items()}
    out["undetected"] = len(found) + ds["leaks_in_events"]
    out["tracebacks"] = 0
    return out
