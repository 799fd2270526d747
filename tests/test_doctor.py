"""`agentledger doctor`: what is installed, what is missing, the command that fixes each, and an exit
code that says whether everything required is there -- run as a real subprocess on this machine,
with PATH, PYTHONPATH and the home changed to take things away."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import tomllib

import duckdb
import pytest

from conftest import REPO, cli_env, free_port, run_cli
from agentledger.api.health import EXTENSIONS, EXTRAS


def doctor(env, *args: str):
    proc = run_cli("doctor", "--format", "json", *args, env=env, check=False, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is (proc.returncode == 0)
    return proc.returncode, {(c["area"], c["check"]): c for c in report["checks"]}


def test_this_machine_has_everything_required(home):
    code, checks = doctor(cli_env(home))
    assert code == 0, [c for c in checks.values() if c["required"] and not c["ok"]]
    for name in EXTENSIONS:
        assert checks[("duckdb", name)]["ok"]
    assert checks[("kafka", "bootstrap")]["detail"].startswith("not configured")


def test_without_bwrap_on_path_the_sandbox_is_reported_missing_with_the_apt_command(home, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = cli_env(home, PATH=str(empty))
    code, checks = doctor(env)
    bwrap = checks[("sandbox", "bwrap")]
    assert not bwrap["ok"] and re.search(r"apt-get install -y bubblewrap$", bwrap["fix"])
    assert re.search(r"apt-get install -y strace$", checks[("sandbox", "strace")]["fix"])
    assert code == 0, "the sandbox is optional unless required"
    # required: exit 1, and the table names it with its fix
    table = run_cli("doctor", "--require", "sandbox", env=env, check=False)
    assert table.returncode == 1
    row = next(line for line in table.stdout.splitlines() if " bwrap " in line)
    assert "MISSING" in row and "bubblewrap" in row
    assert "something required is missing" in table.stdout


def test_missing_native_decoder_names_the_build_command(home, tmp_path):
    env = cli_env(home, AGENTLEDGER_AVRO2ARROW=str(tmp_path / "no-such-decoder"))
    code, checks = doctor(env)
    native = checks[("native", "agentledger-avro2arrow")]
    assert code == 0 and not native["ok"] and not native["required"]
    assert "scripts/bootstrap" in native["fix"] and "AGENTLEDGER_NATIVE=require" in native["fix"]
    code, _ = doctor(env, "--require", "native")
    assert code == 1


def test_a_missing_duckdb_extension_wheel_is_required_and_names_the_pip_command(home, tmp_path):
    """An impostor duckdb_extension_avro package (no extension binary in it) shadows the real wheel."""
    fake = tmp_path / "shadow" / "duckdb_extension_avro"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env = cli_env(home)
    env["PYTHONPATH"] = f"{tmp_path / 'shadow'}{os.pathsep}{env['PYTHONPATH']}"
    code, checks = doctor(env)
    avro = checks[("duckdb", "avro")]
    assert code == 1 and not avro["ok"] and avro["required"]
    assert avro["fix"].endswith(f"-m pip install 'duckdb-extension-avro=={duckdb.__version__}'")
    assert checks[("duckdb", "ducklake")]["ok"]


def test_signing_key_presence_and_permissions(home):
    env = cli_env(home)
    code, checks = doctor(env, "--require", "signing")
    key = checks[("signing", "signing key")]
    assert code == 1 and not key["ok"] and key["fix"].endswith("keys generate")
    out = json.loads(run_cli("keys", "generate", "--format", "json", env=env).stdout)
    code, checks = doctor(env, "--require", "signing")
    assert code == 0 and out["key_id"] in checks[("signing", "signing key")]["detail"]
    # a key others can read is refused: required (it is configured), with the chmod that fixes it
    os.chmod(out["private_key"], 0o644)
    code, checks = doctor(env)
    key = checks[("signing", "signing key")]
    assert code == 1 and not key["ok"] and key["required"]
    assert "readable by group or others" in key["detail"] and key["fix"].startswith("chmod 600 ")


def test_unreachable_kafka_is_required_and_reported_within_seconds(home):
    env = cli_env(home, AGENTLEDGER_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    code, checks = doctor(env)
    assert time.monotonic() - t0 < 20
    kafka = checks[("kafka", "bootstrap")]
    assert code == 1 and not kafka["ok"] and "not reachable" in kafka["detail"]
    assert "scripts/kafka start" in kafka["fix"]


@pytest.mark.kafka
def test_reachable_kafka(home, bootstrap, topic):
    code, checks = doctor(cli_env(home, AGENTLEDGER_BOOTSTRAP_SERVERS=bootstrap, AGENTLEDGER_TOPIC=topic))
    kafka = checks[("kafka", "bootstrap")]
    assert code == 0 and kafka["ok"] and kafka["required"] and f"{topic} does not exist yet" in kafka["detail"]


def _declared(pyproject: dict, extra: str) -> set[str]:
    reqs = pyproject["project"]["optional-dependencies"][extra]
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs if not r.startswith("agentledger")}


def test_doctor_checks_what_pyproject_declares():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheels = {re.split(r"[<>=]", r)[0] for r in pyproject["project"]["dependencies"]
              if r.startswith("duckdb-extension-")}
    assert wheels == {f"duckdb-extension-{n.replace('_', '-')}" for n in EXTENSIONS}
    for extra, dists in EXTRAS.items():
        assert set(dists) == _declared(pyproject, extra), extra
    assert sys.version_info >= (3, 11)
