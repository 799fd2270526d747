"""Configuration in one place: schemas/envvars.py declares every AGENTLEDGER_* variable, the README's
table is generated from it, code reads only through it, and the Kafka security settings reach every
Kafka client."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import REPO, cli_env, run_cli
from agentledger.schemas import envvars
from agentledger.schemas.errors import ConfigError, TransportError

NAME = re.compile(r"AGENTLEDGER_[A-Z0-9]+(?:_[A-Z0-9]+)*(?![A-Z0-9_])")  # not a prefix ("AGENTLEDGER_KAFKA_{x}")
BEGIN, END = "<!-- BEGIN agentledger config --markdown -->\n", "<!-- END agentledger config --markdown -->"
CODE_DIRS = ("agentledger", "schemas", "producers", "consumers", "replay", "bench", "tests")


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file() and not (REPO / f).is_symlink()]


def test_readme_table_is_the_generated_one(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert BEGIN in readme and END in readme
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block == envvars.markdown(), "README out of date: paste `agentledger config --markdown` between the markers"
    cli = run_cli("config", "--markdown", env=cli_env(tmp_path / "home"))
    assert cli.stdout == block


def test_every_agentledger_name_in_the_repo_is_declared():
    undeclared: dict[str, set[str]] = {}
    for f in repo_files():
        try:
            text = (REPO / f).read_text()
        except UnicodeDecodeError:
            continue
        for name in NAME.findall(text):
            if name not in envvars.BY_NAME:
                undeclared.setdefault(name, set()).add(f)
    assert not undeclared, f"declare these in schemas/envvars.py: {undeclared}"


def test_python_code_reads_agentledger_variables_only_through_the_registry():
    """No `os.environ.get("AGENTLEDGER_...")`, `env.get(SOME_ENV)` or `os.environ["AGENTLEDGER_..."]` read
    outside schemas/envvars.py (tests may set variables; conftest.py is the test harness's own)."""
    read = re.compile(r"""(?<!envvars)\.get\(\s*(?:["']AGENTLEDGER_|[A-Z_]+_ENV\b)|environ\[["']AGENTLEDGER_\w+["']\](?!\s*=)""")
    offenders = []
    for f in repo_files():
        if not f.endswith(".py") or not f.startswith(CODE_DIRS) or f in ("schemas/envvars.py", "tests/conftest.py", "tests/test_config.py"):
            continue
        for i, line in enumerate((REPO / f).read_text().splitlines(), 1):
            if read.search(line):
                offenders.append(f"{f}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_shell_scripts_use_declared_names_only():
    for script in (REPO / "scripts").iterdir():
        if script.is_file():
            for name in NAME.findall(script.read_text()):
                assert name in envvars.BY_NAME, f"{script.name}: {name}"


def test_values_are_typed_and_bad_values_name_the_variable():
    env = {"AGENTLEDGER_MAX_BLOCK_MS": "250", "AGENTLEDGER_SPOOL_MAX_BYTES": "512M", "AGENTLEDGER_HOOK_DAEMON": "off",
           "AGENTLEDGER_RECORDING_MODE": "Fail-Closed", "AGENTLEDGER_TOPIC": ""}
    assert envvars.get("AGENTLEDGER_MAX_BLOCK_MS", env) == 250
    assert envvars.get("AGENTLEDGER_SPOOL_MAX_BYTES", env) == 512 << 20
    assert envvars.get("AGENTLEDGER_HOOK_DAEMON", env) is False
    assert envvars.get("AGENTLEDGER_RECORDING_MODE", env) == "fail_closed"
    assert envvars.get("AGENTLEDGER_TOPIC", env) == "agentledger.events"  # empty is unset
    with pytest.raises(ConfigError, match="AGENTLEDGER_MAX_BLOCK_MS"):
        envvars.get("AGENTLEDGER_MAX_BLOCK_MS", {"AGENTLEDGER_MAX_BLOCK_MS": "soon"})
    with pytest.raises(ConfigError, match="AGENTLEDGER_RECORDING_MODE"):
        envvars.get("AGENTLEDGER_RECORDING_MODE", {"AGENTLEDGER_RECORDING_MODE": "maybe"})
    with pytest.raises(KeyError, match="not declared"):
        envvars.get("AGENTLEDGER_" + "NOT_DECLARED", {})


def test_config_command_shows_values_sources_and_masks_secrets(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home, AGENTLEDGER_TOPIC="my.events", AGENTLEDGER_SIGNING_KEY="very-secret-key-material",
                  AGENTLEDGER_KAFKA_SASL_PASSWORD="hunter2")
    out = run_cli("--warehouse", str(tmp_path / "w.duckdb"), "config", "--format", "json", env=env)
    assert "very-secret" not in out.stdout and "hunter2" not in out.stdout
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["AGENTLEDGER_TOPIC"]["value"] == "my.events" and rows["AGENTLEDGER_TOPIC"]["source"] == "env"
    assert rows["AGENTLEDGER_SIGNING_KEY"] == {**rows["AGENTLEDGER_SIGNING_KEY"], "value": "****", "source": "env"}
    assert rows["AGENTLEDGER_KAFKA_SASL_PASSWORD"]["value"] == "****"
    assert rows["AGENTLEDGER_WAREHOUSE"]["value"] == str(tmp_path / "w.duckdb")
    assert rows["AGENTLEDGER_WAREHOUSE"]["source"] == "flag"
    assert rows["AGENTLEDGER_HOME"]["value"] == str(home) and rows["AGENTLEDGER_HOME"]["source"] == "env"
    assert rows["AGENTLEDGER_MAX_BLOCK_MS"]["source"] == "default"
    assert "AGENTLEDGER_KAFKA_PORT" not in rows  # development variables only with --all
    everything = json.loads(run_cli("config", "--all", "--format", "json", env=env).stdout)
    assert {r["name"] for r in everything} == set(envvars.BY_NAME)


# -- Kafka security ---------------------------------------------------------------------------------

def test_security_settings_map_to_kafka_python(tmp_path, monkeypatch):
    from agentledger.schemas.transport.kafka import security_config

    assert security_config({}) == {}
    sasl = {"AGENTLEDGER_KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "AGENTLEDGER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "AGENTLEDGER_KAFKA_SASL_USERNAME": "recorder", "AGENTLEDGER_KAFKA_SASL_PASSWORD": "pw"}
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    for p in (ca, cert, key):
        p.write_text("-----BEGIN CERTIFICATE-----\n")
    files = {"AGENTLEDGER_KAFKA_SSL_CAFILE": str(ca), "AGENTLEDGER_KAFKA_SSL_CERTFILE": str(cert),
             "AGENTLEDGER_KAFKA_SSL_KEYFILE": str(key)}
    assert security_config({**sasl, **files}) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "recorder",
        "sasl_plain_password": "pw", "ssl_cafile": str(ca), "ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    assert security_config({"AGENTLEDGER_KAFKA_SECURITY_PROTOCOL": "SSL", **files})["security_protocol"] == "SSL"
    with pytest.raises(ConfigError, match="SASL_USERNAME"):
        security_config({"AGENTLEDGER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    with pytest.raises(ConfigError, match="need AGENTLEDGER_KAFKA_SECURITY_PROTOCOL"):
        security_config({"AGENTLEDGER_KAFKA_SASL_USERNAME": "u"})
    with pytest.raises(ConfigError, match="no such file"):
        security_config({"AGENTLEDGER_KAFKA_SECURITY_PROTOCOL": "SSL",
                         "AGENTLEDGER_KAFKA_SSL_CAFILE": str(tmp_path / "missing.pem")})


@pytest.mark.kafka
def test_security_settings_reach_every_kafka_client(bootstrap, topic, monkeypatch):
    """Against the plaintext test broker (loopback), every client connects without the settings and
    fails to when they ask for SASL: so producer, child-process producer, consumer and admin client all
    use them. (A broker with a SASL listener is not started: the failure is the proof.)"""
    from agentledger.schemas.transport import kafka as k

    quick = {"bootstrap_timeout_ms": 1500}
    clients = {
        "producer": lambda: k.KafkaSink(bootstrap, **quick),
        "child-process producer": lambda: k.KafkaProcessSink(bootstrap, **quick),
        "consumer": lambda: k.KafkaSource(bootstrap, **quick),
        "admin": lambda: k.ensure_topic(bootstrap, topic, 1),
    }
    for _what, make in clients.items():  # plaintext works
        client = make()
        if client is not None:
            (client.close)()
    monkeypatch.setenv("AGENTLEDGER_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("AGENTLEDGER_KAFKA_SASL_USERNAME", "recorder")
    monkeypatch.setenv("AGENTLEDGER_KAFKA_SASL_PASSWORD", "pw")
    for _what, make in clients.items():
        with pytest.raises(TransportError, match="not reachable|cannot"):
            make()
