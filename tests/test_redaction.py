"""Secret redaction: every listed kind, in argv, env, URLs and outputs, never reaches Kafka or the
warehouse in clear; the same secret always gets the same token; near-misses stay readable."""

from __future__ import annotations

import hashlib
import hmac
import random
import re

import pytest

from consumers.ingest import Ingestor
from producers.recorder import Recorder
from producers.redact import DETECTOR_NAMES, Redactor, default_transforms, load_redaction_key
from producers.simulate import SECRET_KINDS, make_secret, simulate, simulation_keys, simulation_recorder
from producers.sinks import open_producer_sink
from schemas.config import from_env
from schemas.transport import open_source
from schemas.transport.kafka import KafkaSource
from schemas.warehouse import open_warehouse

KEY = b"unit-test-key"


def hmac8(secret: str, key: bytes = KEY) -> str:
    return hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()[:8]


SAMPLES = {
    "aws_access_key": ("AKIAQ3EGUMRKZW4E7XPL", "aws configure set aws_access_key_id {}"),
    "aws_secret_key": ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKy", "aws_secret_access_key = {}"),
    "github_token": ("ghp_" + "Zq81mN0aB7cD4eF6gH2iJ9kL3mN5oP1qR7sT", "GITHUB_TOKEN={}"),
    "anthropic_key": ("sk-ant-api03-" + "xY7_kLm-9" * 10 + "AA", "claude --api-key {}"),
    "openai_key": ("sk-proj-" + "Ab3dE5gH7jK9mN1pQ3sT" + "T3BlbkFJ" + "u5wY7zA9cE1gI3kM5oQ7", "OPENAI_API_KEY={} python x.py"),
    "slack_token": ("xoxb-263324012345-1234567890123-QkZ8vN3mX1pL7tR2yW9sE4hJ", "post with {} now"),
    "stripe_key": ("sk_live_" + "51HqLyjWDarjtT1zdp7dcQW", "stripe --api-key {} customers list"),
    "jwt": ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyMSJ9.c2lnbmF0dXJlLWJ5dGVzLWhlcmUtMTIzNDU2", "curl -H 'Authorization: Bearer {}' x"),
    "bearer_token": ("Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4", "Authorization: Bearer {}"),
    "private_key": ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nq9xZ\n-----END RSA PRIVATE KEY-----", "{}"),
    "url_credentials": ("s3cr3tPw!", "https://deploy:{}@git.example.com/acme/app.git"),
    "url_secret_param": ("8f2kq0x9v7b3n1m5", "https://hooks.example.com/notify?channel=ops&token={}"),
    "password_assignment": ("Tr0ub4dor&3", "mysql -u root --password={} app"),
    "token_assignment": ("Zq1Wx2Ec3Rv4Tb5", "deploy --token={} --prod"),
    "high_entropy_assignment": ("q8Zr2LmX9vT4kW7pN3sB6yH1", "DATABASE_DSN_SIG={}"),
}


@pytest.mark.parametrize("detector", sorted(SAMPLES))
def test_each_detector_replaces_the_secret_with_a_keyed_token(detector):
    secret, template = SAMPLES[detector]
    text, found = Redactor(KEY).scan(template.format(secret))
    assert secret not in text
    assert (detector, f"[SECRET:{detector}:{hmac8(secret)}]") in found
    assert f"[SECRET:{detector}:{hmac8(secret)}]" in text


def test_every_detector_is_exercised():
    assert set(SAMPLES) == set(DETECTOR_NAMES)


@pytest.mark.parametrize("text", [
    "cat .env.example", "cp .env.example .env", "curl -s http://localhost:3000/health", "pip install requests",
    "/home/dev/src/python-service-3/src/app/models.py", "12 passed in 0.42s", "https://pypi.org/simple/requests/",
    "API_KEY=your-api-key-here", "PASSWORD=$DB_PASSWORD", "token: ${{ secrets.GITHUB_TOKEN }}", "git commit -m 'fix: token refresh'",
    "commit=5f2c41d0a8b3c9e1f4d2a6b7c8d9e0f1a2b3c4d5", "sha256=" + "ab" * 32, "risk-assessment-framework-document-12",
    "npm run build -- --mode=production", "version=1.2.3-rc.4+build.5", "printenv PATH",
])
def test_near_misses_are_left_alone(text):
    assert Redactor(KEY).scan(text) == (text, [])


def test_recorder_redacts_argv_env_urls_outputs_paths_and_approvals(tmp_path):
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path)})
    rec = Recorder(open_producer_sink(settings), topic=settings.topic, transforms=[Redactor(KEY)])
    gh, aws = SAMPLES["github_token"][0], SAMPLES["aws_access_key"][0]
    s = rec.session(agent="codex", cwd="/w")
    started = s.emit("command_started", {"command_id": "c1", "argv": ["gh", "auth", "login", "--with-token", gh],
                                         "cwd": "/w", "env_names": ["PATH", f"GITHUB_TOKEN={gh}"],
                                         "shell": f"echo {aws} | aws configure"})
    cmd_finished = s.command_finished("c1", exit_code=0, duration_ms=1, stdout=f"token: {gh}\nkey {aws}")
    att = s.emit("network_attempted", {"attempt_id": "a1", "host": "api.github.com", "port": 443, "protocol": "https",
                                       "url": f"https://x:{gh}@api.github.com/?access_token={aws}"})
    f = s.file_accessed(f"/tmp/{gh}/notes.txt", "read")
    ap = s.emit("approval_requested", {"request_id": "r1", "action_kind": "exec", "subject": f"curl -H 'Authorization: Bearer {gh}'",
                                       "action_digest": "d" * 64, "justification": f"needs AWS key {aws}"})
    tok_gh, tok_aws = f"[SECRET:github_token:{hmac8(gh)}]", f"[SECRET:aws_access_key:{hmac8(aws)}]"
    for sealed in (started, cmd_finished, att, f, ap):
        assert gh.encode() not in sealed.value and aws.encode() not in sealed.value
        assert sealed.record["redactions"], "each event lists what was redacted"
    p = started.record["payload"][1]
    assert p["argv"][4] == tok_gh and p["env_names"][1] == f"GITHUB_TOKEN={tok_gh}" and tok_aws in p["shell"]
    fields = {r["field"] for r in started.record["redactions"]}
    assert fields == {"payload.argv[4]", "payload.env_names[1]", "payload.shell"}
    assert tok_gh in cmd_finished.record["payload"][1]["stdout"]["excerpt"]
    assert tok_gh in f.record["payload"][1]["path"]
    assert all(r["token"] in (tok_gh, tok_aws) or r["detector"] in ("url_credentials", "url_secret_param", "bearer_token")
               for sealed in (started, cmd_finished, f) for r in sealed.record["redactions"])
    # the digest of the exact output is kept (it reveals nothing), the raw secret is not
    assert cmd_finished.record["payload"][1]["stdout"]["sha256"] == hashlib.sha256(f"token: {gh}\nkey {aws}".encode()).hexdigest()


def test_redaction_key_is_created_once_private_and_never_in_events(tmp_path):
    k1 = load_redaction_key(tmp_path, env={})
    k2 = load_redaction_key(tmp_path, env={})
    assert k1 == k2 and len(k1) >= 32
    assert (tmp_path / "keys" / "redaction.key").stat().st_mode & 0o777 == 0o600
    assert load_redaction_key(tmp_path, env={"AGENTLEDGER_REDACTION_KEY": "abc"}) == b"abc"
    [t] = default_transforms(from_env({"AGENTLEDGER_HOME": str(tmp_path)}), env={})
    assert default_transforms(from_env({"AGENTLEDGER_HOME": str(tmp_path)}), env={"AGENTLEDGER_REDACTION": "off"}) == []
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path)})
    rec = Recorder(open_producer_sink(settings), topic=settings.topic, transforms=[t])
    sealed = rec.session(agent="codex", cwd="/w").command_started(["x", SAMPLES["github_token"][0]], cwd="/w")
    rec.flush()
    for f in (tmp_path / "log").rglob("*.avro"):
        assert k1 not in f.read_bytes()


def test_detect_secrets_agrees_nothing_is_left(tmp_path):
    """detect-secrets (maintained, independent) finds the raw secrets, and nothing after our redaction."""
    from detect_secrets.core.scan import scan_line
    from detect_secrets.settings import transient_settings

    plugins = ["AWSKeyDetector", "GitHubTokenDetector", "OpenAIDetector", "SlackDetector", "StripeDetector",
               "JwtTokenDetector", "PrivateKeyDetector", "BasicAuthDetector"]
    red = Redactor(KEY)
    rng = random.Random(5)
    lines = []
    for kind in SECRET_KINDS:
        for _ in range(20):
            secret = make_secret(rng, kind)
            lines.append(f"export X_{kind.upper()}={secret}" if kind != "private_key" else secret.splitlines()[0])
            lines.append(f"https://user:{secret}@example.com/x" if kind == "password" else f"auth {secret} done")
    with transient_settings({"plugins_used": [{"name": p} for p in plugins]}):
        raw_hits = sum(1 for line in lines if list(scan_line(line)))
        left = [(line, [s.type for s in scan_line(red.scan(line)[0])]) for line in lines]
    assert raw_hits >= len(lines) // 2, "the oracle does see the raw secrets"
    assert [x for x in left if x[1]] == []


@pytest.mark.kafka
def test_seeded_secrets_never_reach_kafka_or_the_warehouse_in_clear(bootstrap, topic, tmp_path):
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home"), "AGENTLEDGER_BOOTSTRAP_SERVERS": bootstrap,
                         "AGENTLEDGER_TOPIC": topic})
    sink = open_producer_sink(settings)
    seed = 23
    try:
        result = simulate(lambda clock, rng: simulation_recorder(sink, topic, seed, clock, rng), 400, seed,
                          attack_rate=0.25, mix={"token_harvesting": 2, "credential_exfiltration": 1})
    finally:
        sink.close(timeout=30)
    assert set(SECRET_KINDS) <= set(result.secrets), f"every kind was seeded: {sorted(result.secrets)}"
    secrets = sorted({s for values in result.secrets.values() for s in values})
    # private keys are redacted as a block: also look for their body lines
    needles = set(secrets) | {ln for s in secrets if "PRIVATE KEY" in s for ln in s.splitlines()[1:-1]}
    needles_b = [n.encode() for n in needles]

    src = KafkaSource(bootstrap)
    src.assign(topic, {})
    raw = []
    while len(raw) < result.events:
        batch = src.poll(50_000, 2.0)
        if not batch:
            break
        raw.extend(batch)
    src.close()
    assert len(raw) == result.events
    leaks = [n for m in raw for n in needles_b if n in m.value]
    assert leaks == [], f"{len(leaks)} secrets in clear on the topic"

    wh = open_warehouse(str(tmp_path / "warehouse.duckdb"))
    source = open_source(settings)
    try:
        Ingestor(wh, source, topic).run()
    finally:
        source.close()
    rows = wh.con.execute("SELECT * FROM events").fetchall()
    assert len(rows) == result.events
    dump = "\n".join(map(str, rows)) + "\n".join(map(str, wh.con.execute("SELECT * FROM dead_letters").fetchall()))
    assert [n for n in needles if n in dump] == []
    # same secret, same token: every seeded secret shows up as exactly one token string
    key, _ = simulation_keys(seed)
    for s in secrets:
        toks = set(re.findall(r"\[SECRET:[a-z0-9_]+:" + hmac8(s, key) + r"\]", dump))
        assert len(toks) == 1, (s[:12], toks)
    wh.close()


def test_redaction_is_on_by_default_for_every_producer_using_the_factory(tmp_path):
    """Hooks, importers and the sandbox build `Recorder(open_producer_sink(settings))`: redaction is on."""
    settings = from_env({"AGENTLEDGER_HOME": str(tmp_path)})
    rec = Recorder(open_producer_sink(settings), topic=settings.topic)
    gh = SAMPLES["github_token"][0]
    sealed = rec.session(agent="codex", cwd="/w").emit("command_started", {"command_id": "c", "cwd": "/w",
                                                                         "argv": ["gh", "--token", gh]})
    assert gh.encode() not in sealed.value and sealed.record["redactions"]
    key = (tmp_path / "keys" / "redaction.key").read_bytes().strip()
    assert sealed.record["payload"][1]["argv"][2] == f"[SECRET:github_token:{hmac8(gh, key)}]"
    off = Recorder(open_producer_sink(settings), topic=settings.topic, transforms=[])
    plain = off.session(agent="codex", cwd="/w").emit("command_started", {"command_id": "c", "argv": ["gh", gh], "cwd": "/w"})
    assert gh.encode() in plain.value
