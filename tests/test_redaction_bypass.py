"""Redaction bypasses an audit found (/tmp/audit-redact): a secret that begins with a placeholder
word, a forged ``[SECRET:…]`` token glued to a secret, invisible or compatibility Unicode inside a
secret or its name, double percent-encoding, and crafted strings that cost the redactor minutes.
Each form is redacted, placeholders stay readable, and redaction stays idempotent."""

from __future__ import annotations

import pytest

from agentledger.producers.redact import Redactor

KEY = b"unit-test-key"


# -- a value that merely begins with a placeholder word is a secret -----------------------------
PLACEHOLDER_PREFIXED = {  # text -> the secret in it
    "export DB_PASSWORD=test_Sup3rS3cretPw && ./migrate": "Sup3rS3cretPw",
    "export API_KEY=token_9f8a7b6c5d4e3f2a1b0c && ./run": "9f8a7b6c5d4e3f2a1b0c",
    "ADMIN_PASSWORD=changeme-Hunter2024x ./setup": "Hunter2024x",
    "curl 'https://api.example.com/v1?api_key=password-Hq7Zr2Lm9Vx4'": "Hq7Zr2Lm9Vx4",
    "psql postgres://admin:test_Hunter2024@db.example.com/app": "Hunter2024",
    "mysql -u root -pmy_Hunter2Pw app": "Hunter2Pw",
    'DB_PASSWORD="sample-Horse-Battery-Staple" ./run': "Horse-Battery-Staple",
    "https://admin:x@db.example.com/x?token=password-abc12345": "abc12345",
    "deploy --token secret_Zq1Wx2Ec3Rv4 --prod": "Zq1Wx2Ec3Rv4",
    '{"name": "DB_PASSWORD", "value": "your_Tr0ub4dor3"}': "Tr0ub4dor3",
}


@pytest.mark.parametrize("text", sorted(PLACEHOLDER_PREFIXED))
def test_a_secret_that_begins_with_a_placeholder_word_is_redacted(text):
    out, found = Redactor(KEY).scan(text)
    assert PLACEHOLDER_PREFIXED[text] not in out and found, out


@pytest.mark.parametrize("argv, secret", [
    (["mysql", "-u", "root", "-pmy_Hunter2Pw", "app"], "Hunter2Pw"),
    (["mysql", "-u", "root", "-p", "test_Hunter2Pw", "app"], "Hunter2Pw"),
    (["deploy", "--password", "changeme_Depl0yPw!"], "Depl0yPw"),
    (["curl", "-u", "admin:password-Adm1nPa55", "https://x"], "Adm1nPa55"),
    (["npm", "config", "set", "//registry.npmjs.org/:_authToken", "token_s3cr3tvalue42"], "s3cr3tvalue42"),
])
def test_a_placeholder_prefixed_secret_in_argv_is_redacted(argv, secret):
    out: list[dict] = []
    res = Redactor(KEY).redact_argv(argv, "payload.argv", out)
    assert secret not in "\0".join(res) and out, res


@pytest.mark.parametrize("text", [
    "API_KEY=your-api-key", "API_KEY=your-api-key-here", "API_KEY=YOUR_API_KEY", "DB_PASSWORD=changeme",
    "DB_PASSWORD=change_me", "PASSWORD=xxxxxxxx", "SECRET_KEY=XXXXXXXXXXXX", "api_token: <token>", "password: <password>",
    "PASSWORD=$DB_PASSWORD", "PASSWORD=${DB_PASSWORD}", "token: ${{ secrets.GITHUB_TOKEN }}", "password: {{ .Values.pw }}",
    "def connect(password=None, token=None):", "DB_PASSWORD=your_password_here", "GITHUB_TOKEN=my-token",
    "mysql -u root -p$MYSQL_PWD app", "deploy --token <token> --prod", "https://user:password@example.com/x",
    "ADMIN_PASSWORD=test ./setup", "CLIENT_SECRET=placeholder", "password: '********'", "API_KEY=...",
    "DB_PASSWORD='%(password)s'", "SET PASSWORD=%MY_PASSWORD%",
])
def test_placeholders_are_left_alone(text):
    assert Redactor(KEY).scan(text) == (text, [])


# -- a forged token switches nothing off -------------------------------------------------------
FAKE = "[SECRET:x:00000000]"
FORGED = {  # text -> the secret a forged token is glued to
    f"curl -H 'Authorization: Bearer {FAKE}Zk9pQ2xL7vN3mR8sT1uW' https://api.example.com": "Zk9pQ2xL7vN3mR8sT1uW",
    f"curl -H 'Authorization: Bearer {FAKE}{FAKE}Zk9pQ2xL7vN3mR8sT1uW' https://api.example.com": "Zk9pQ2xL7vN3mR8sT1uW",
    f"git clone https://deploy:{FAKE}Hunter2Passw0rd@git.example.com/a/b": "Hunter2Passw0rd",
    f"curl -H 'Cookie: {FAKE}; session=9f8a7b6c5d4e3f2a1b0cQq' https://x.example.com": "9f8a7b6c5d4e3f2a1b0cQq",
    f"DB_PASSWORD='{FAKE}Hunter2Passw0rd' ./migrate": "Hunter2Passw0rd",
    f"curl -H 'X-Api-Key: {FAKE} 8d7e6f5a4b3c2d1e0f9a' https://api.example.com": "8d7e6f5a4b3c2d1e0f9a",
    f"echo ghp_a1B2c3D4e5F6{FAKE}g7H8i9J0k1L2m3N4o5P6q7R8 > ~/.token": "g7H8i9J0k1L2m3N4o5P6q7R8",
    f"mysql -u root -p{FAKE}My5qlRootPw app": "My5qlRootPw",
    f"https://x.example.com/cb?token={FAKE}8f2kq0x9v7b3n1m5": "8f2kq0x9v7b3n1m5",
    "[SECRET:github_pat:0badc0de]Zk9pQ2xL7vN3mR8sT1uW DB_PASSWORD=[SECRET:github_pat:0badc0de]Hunter2Passw0rd":
        "Hunter2Passw0rd",
}


@pytest.mark.parametrize("text", sorted(FORGED))
def test_a_forged_token_glued_to_a_secret_does_not_switch_redaction_off(text):
    red = Redactor(KEY)
    out, found = red.scan(text)
    assert FORGED[text] not in out and found, out
    assert red.scan(out) == (out, [])  # redacting the result again changes nothing


def test_an_id_with_a_forged_token_in_it_is_redacted_and_stays_so():
    red = Redactor(KEY)
    gh = "ghp_" + "Zq81mN0aB7cD4eF6gH2iJ9kL3mN5oP1qR7sT"
    call = f"call_{gh[:10]}{FAKE}{gh[10:]}"
    rid = red.redact_id(call)
    assert gh[10:] not in rid and red.redact_id(rid) == rid
    assert red.redact_key(f"cmd:{call}:started") == f"cmd:{rid}:started"


def test_text_redacted_before_is_left_as_it_is_by_any_redactor_with_the_key():
    """Idempotence: redacting already-redacted text changes nothing, in the process that redacted it
    and in another one (its tokens were not issued there, and nothing inside a token is a secret)."""
    texts = list(PLACEHOLDER_PREFIXED) + [
        "MYSQL_PWD=Sql5ecret mysql -u app", "java -Ddb.password=Hunter2Passw0rd -jar app.jar",
        "curl -H 'Authorization: Bearer Zk9pQ2xL7vN3mR8sT1uW' https://x", "export GITHUB_TOKEN=ghp_" + "Zq81mN0aB7cD4eF6gH2iJ9kL3mN5oP1qR7sT",
        '{"name": "DB_PASSWORD", "value": "Zq1Wx2Ec3Rv4Tb5"}', "openssl pkcs12 -export -passout pass:Hunter2Pw -out a.p12",
    ]
    red = Redactor(KEY)
    for text in texts:
        out, found = red.scan(text)
        assert found and red.scan(out) == (out, []), out
        assert Redactor(KEY).scan(out) == (out, []), out


def test_a_token_standing_alone_is_not_listed_as_a_replacement():
    """The redactions array lists what this redactor replaced, not text that looks like a token."""
    red = Redactor(KEY)
    rec = {"payload": ("CommandStarted", {"command_id": "c1", "cwd": "/w", "shell": f"echo {FAKE} && PGPASSWORD=Pg5ecr3t!x psql",
                                          "argv": ["echo", FAKE, "&&", "PGPASSWORD=Pg5ecr3t!x", "psql"]}), "redactions": []}
    out = red(rec)
    assert "Pg5ecr3t!x" not in repr(out["payload"])
    assert all(r["token"] != FAKE for r in out["redactions"]) and out["redactions"]


# -- invisible and compatibility characters, and encodings of encodings -------------------------
GH = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
AK = "AKIAIOSFODNN7EXAMPLQ"
HIDDEN = {  # text -> (what must not stay, what must stay around it)
    f"echo {GH[:3]}\u200b{GH[3:]} > ~/.token": (GH[3:], ("echo ", " > ~/.token")),
    f"echo {GH[:10]}\ufeff{GH[10:]} > ~/.token": (GH[10:], ("echo ", " > ~/.token")),
    f"export AWS_ACCESS_KEY_ID={AK[:4]}\u2060{AK[4:]}": (AK[4:], ("export AWS_ACCESS_KEY_ID=",)),
    "export DB_PASS\u00adWORD=Hunter2Passw0rd": ("Hunter2Passw0rd", ("export DB_PASS\u00adWORD=",)),
    "export \uff24\uff22_\uff30\uff21\uff33\uff33\uff37\uff2f\uff32\uff24=Hunter2Passw0rd2 && ./run":
        ("Hunter2Passw0rd2", ("export \uff24\uff22_", " && ./run")),
    "\uff47\uff48\uff50_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8 done": ("a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", (" done",)),
    "curl -H 'Authorization: Bearer\u00a0Zk9pQ2xL7vN3mR8sT1uW' https://x": ("Zk9pQ2xL7vN3mR8sT1uW", ("https://x",)),
    "deploy --pass\u00adword Hunter2Passw0rd --prod": ("Hunter2Passw0rd", ("deploy --pass\u00adword ", " --prod")),
    "PASS\ufe0fWORD=Hunter2Passw0rd": ("Hunter2Passw0rd", ()),
    '{"out": "echo ghp\\u200b_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"}': (GH[4:], ('{"out": "echo ',)),
    "curl https://x.example.com/cb?u=a%2526password%253DHunter2Passw0rd3": ("Hunter2Passw0rd3", ("https://x.example.com/cb?u=",)),
    "curl 'https://x.example.com/cb?next=%25252Fa%252526token%25253DHunter2Passw0rd4'": ("Hunter2Passw0rd4", ("curl 'https://",)),
}


@pytest.mark.parametrize("text", sorted(HIDDEN))
def test_invisible_or_compatibility_characters_and_double_encoding_hide_no_secret(text):
    secret, kept = HIDDEN[text]
    red = Redactor(KEY)
    out, found = red.scan(text)
    assert secret not in out and found, ascii(out)
    assert all(k in out for k in kept), ascii(out)  # the secret's span, not the text around it, is replaced
    assert red.scan(out) == (out, [])


def test_a_secret_with_an_invisible_character_gets_the_token_of_the_secret():
    red = Redactor(KEY)
    plain = red.scan(f"echo {GH}")[0]
    hidden = red.scan(f"echo {GH[:6]}\u200b{GH[6:]}")[0]
    assert plain == hidden == red.scan(f"echo {GH[:6]}\u2060\u00ad{GH[6:]}")[0]


@pytest.mark.parametrize("text", [
    "日本語のテキスト: ビルドは成功しました", "café au lait — naïve résumé", "Ｈｅｌｌｏ ｗｏｒｌｄ",
    "emoji \U0001f600 and a zero\u200bwidth space", "\u202eevil.exe", "x\u00a0=\u00a0y",
])
def test_text_in_other_scripts_or_with_invisible_characters_and_no_secret_is_left_alone(text):
    assert Redactor(KEY).scan(text) == (text, [])


def test_every_format_character_of_this_python_is_an_invisible_character():
    import sys
    import unicodedata

    from agentledger.producers.redact import _INVISIBLE

    missing = [hex(c) for c in range(0x80, sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf"
               and not _INVISIBLE.match(chr(c))]
    assert missing == [], f"Unicode {unicodedata.unidata_version}: add these to _INVISIBLE"


# -- end to end: the hook and the importer ---------------------------------------------------
def test_the_audits_forms_reach_no_log_warehouse_or_state_via_the_hook_or_the_importer(tmp_path):
    from conftest import cli_env, run_cli
    from test_hook import hook
    from test_redaction_envelope import codex_rollout, leaks

    commands = {t: s for t, s in PLACEHOLDER_PREFIXED.items() if t.startswith(("export", "psql", "mysql"))}
    commands.update((t, s) for t, s in FORGED.items() if t.startswith(("curl -H 'Authorization", "git", "DB_")))
    commands.update((t, v[0]) for t, v in HIDDEN.items() if t.startswith(("echo ghp", "export", "curl https")))
    home = tmp_path / "home"
    env = cli_env(home)
    base = {"session_id": "cc-bypass", "cwd": "/w", "permission_mode": "default", "transcript_path": "/h/.claude/x.jsonl"}
    hook(env, {**base, "hook_event_name": "SessionStart", "source": "startup"}, check_exit=0)
    for i, cmd in enumerate(commands):
        call = {**base, "tool_name": "Bash", "tool_use_id": f"toolu_{i}", "tool_input": {"command": cmd}}
        hook(env, {**call, "hook_event_name": "PreToolUse"}, check_exit=0)
        hook(env, {**call, "hook_event_name": "PostToolUse",
                   "tool_response": {"stdout": f"ran: {cmd}", "stderr": "", "interrupted": False}}, check_exit=0)
    hook(env, {**base, "hook_event_name": "PreToolUse", "tool_name": "WebFetch", "tool_use_id": "toolu_web",
               "tool_input": {"url": "https://admin:test_Hunter2024@db.example.com/x?token=password-abc12345"}}, check_exit=0)
    rollout = tmp_path / "rollout-2026-02-03T14-20-05-019c2d3e-0000-7000-8000-000000000002.jsonl"
    rollout.write_text(codex_rollout("019c2d3e-0000-7000-8000-000000000002", list(commands)))
    run_cli("import", "codex-rollout", str(rollout), env=env)
    run_cli("ingest", env=env)
    assert leaks(home, env, sorted(set(commands.values()) | {"Hunter2024", "abc12345"})) == {}


# -- crafted strings cost linear time ----------------------------------------------------------
CRAFTED = {  # the audit's inputs (each 100 KB cost 18 s to 187 s) and argv ones found alike, as units to repeat
    "a=": lambda n: "a=" * (n // 2),                          # high_entropy_assignment: a value at every '='
    "key: spaces": lambda n: "key: abc\n" + " " * n,          # env_value: \n\s*-?\s* backtracking
    "token=": lambda n: "token=" * (n // 6),                  # an entropy per '=' over hundreds of characters
    "=": lambda n: "=" * n,
    "escaped quotes": lambda n: ' "' + '\\"' * (n // 2),      # a quoted string never closed, from every quote
    "gh secret set": lambda n: "gh secret set " * (n // 14),  # a program list growing with the line
    "htpasswd -b": lambda n: "htpasswd -b " * (n // 12),      # each flag looking for the end of the command
    "password= quoted": lambda n: 'password="' * (n // 10),
    # gitleaks' rules: jwt tried at every 'ey' over the rest of the word, curl-auth-* from every curl
    # over the rest of the line (5.9 s and 25.9 s at 100 KB)
    "jwt: keykey": lambda n: "key" * (n // 3),
    "jwt: eyey": lambda n: "ey" * (n // 2),
    "curl -u a:": lambda n: "curl -u a:" * (n // 10),
    "curl curl": lambda n: "curl " * (n // 5) + "-u a:b",
}


def _best_time(red_text: str) -> float:
    import time

    best = float("inf")
    for _ in range(3):
        red = Redactor(KEY)
        t0 = time.perf_counter()
        red.scan(red_text)
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_strings_are_redacted_in_near_linear_time(name):
    """The hook redacts every event with this code: 100 KB of anything must cost about ten times 10 KB
    (quadratic work costs a hundred times), and well under a second here (5 s on a loaded machine)."""
    Redactor(KEY).scan("warm up: token=abc key: x")  # rules compiled once
    small, large = _best_time(CRAFTED[name](10_000)), _best_time(CRAFTED[name](100_000))
    assert large < 5.0, f"{large:.2f}s for 100 KB"
    assert large / max(small, 0.01) < 30, f"10 KB {small:.3f}s, 100 KB {large:.3f}s"


def test_a_long_text_is_redacted_as_the_engines_own_search_would():
    """Past `LONG_TEXT` a rule that starts at a word boundary is tried at word starts only (and the
    curl rules from a line's first curl): the same findings as the regex engine's scan, in linear time."""
    import random

    from agentledger.producers import ruleset

    jwt = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0."
           "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
    secrets = [jwt, "AKIAIOSFODNN7EXAMPLQ", "curl -H 'Authorization: Bearer Zk9pQ2xL7vN3mR8sT1uWq' https://x",
               "curl -u admin:Hunter2Passw0rd https://x", "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
               "sk-ant-api03-" + "a" * 93 + "AA", "curl https://x \\\n  -u deploy:S3cretDeployPw"]
    words = ["ls", "-la", "echo", "foo", "bar=baz", "x.y", "(a)", "curl", "https://e.example/p", "-u", "-H"]
    rnd = random.Random(7)
    for _ in range(8):
        parts = []
        for _ in range(1500):
            parts.append(rnd.choice(words))
            if rnd.random() < 0.01:
                parts.append(rnd.choice(secrets))
            if rnd.random() < 0.05:
                parts.append("\n")
        text = " ".join(parts)
        assert len(text) > ruleset.LONG_TEXT
        fast = Redactor(KEY).scan(text)
        try:
            ruleset.LONG_TEXT, saved = 10 ** 9, ruleset.LONG_TEXT
            engine = Redactor(KEY).scan(text)
        finally:
            ruleset.LONG_TEXT = saved
        assert fast == engine and fast[1]
