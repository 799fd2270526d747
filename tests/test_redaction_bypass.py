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
