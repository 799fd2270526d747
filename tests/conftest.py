"""Shared fixtures. Kafka tests use a REAL broker: the one named by $AGENTLEDGER_TEST_BOOTSTRAP
(scripts/test starts it) or one this session starts with scripts/kafka. If it cannot start, every
test that needs it FAILS with the broker log -- it is never skipped."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# AGENTLEDGER_TEST_SCALE=full: the scaled-down tests run at the size of the issues that asked for
# them (bench/README.md lists them); the default sizes prove the same behaviour, faster.
FULL_SCALE = os.environ.get("AGENTLEDGER_TEST_SCALE") == "full"
KAFKA_SCRIPT = REPO / "scripts" / "kafka"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, bootstrap: str | None, error: str | None = None, port: int | None = None,
                 directory: Path | None = None):
        self.bootstrap = bootstrap
        self.error = error
        self.port = port
        self.directory = directory

    def require(self) -> str:
        if not self.bootstrap:
            pytest.fail(f"the Kafka broker is required and could not be started:\n{self.error}", pytrace=False)
        return self.bootstrap


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a server a test started: SIGTERM, then SIGKILL after 10 s; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_broker(directory: Path, port: int | None = None, partitions: int = 6) -> tuple[str, int]:
    port = port or free_port()
    ctrl = free_port()
    env = {**os.environ, "AGENTLEDGER_PYTHON": sys.executable}
    proc = subprocess.run(
        [str(KAFKA_SCRIPT), "start", "--port", str(port), "--controller-port", str(ctrl), "--dir", str(directory),
         "--partitions", str(partitions)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/kafka start failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc.stdout.strip().splitlines()[-1], port


def stop_broker(directory: Path) -> None:
    subprocess.run([str(KAFKA_SCRIPT), "stop", "--dir", str(directory)], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> Broker:
    given = os.environ.get("AGENTLEDGER_TEST_BOOTSTRAP")
    if given:
        yield Broker(given)
        return
    d = tmp_path_factory.mktemp("kafka")
    try:
        bootstrap, port = start_broker(d)
    except Exception as exc:  # reported by every test that needs the broker
        yield Broker(None, str(exc))
        return
    try:
        yield Broker(bootstrap, port=port, directory=d)
    finally:
        stop_broker(d)


@pytest.fixture
def bootstrap(kafka: Broker) -> str:
    return kafka.require()


@pytest.fixture
def topic() -> str:
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["duckdb", "ducklake"])
def warehouse_url(request, tmp_path) -> str:
    """A DuckDB file or a DuckLake (SQLite catalog, Parquet files) warehouse under tmp_path: the ingest
    invariants run over both (a DuckLake-only bug once reached CI by chance)."""
    if request.param == "ducklake":
        return f"ducklake:sqlite:{tmp_path / 'lake' / 'meta.sqlite'}"
    return str(tmp_path / "warehouse.duckdb")


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


_warehouse_template: Path | None = None


def new_warehouse(path: Path) -> str:
    """A new, empty DuckDB-file warehouse at ``path``, for a test whose subject is not the schema's
    creation: a copy of one this worker made once with `open_warehouse` (creating the schema is
    mostly DuckDB binding the views, ~0.12 CPU-s a warehouse; opening the copy finds it current)."""
    global _warehouse_template
    if _warehouse_template is None:
        from agentledger.schemas.warehouse import open_warehouse

        template = Path(tempfile.mkdtemp(prefix="agentledger-wh-template-")) / "warehouse.duckdb"
        atexit.register(shutil.rmtree, template.parent, True)
        with open_warehouse(str(template)):
            pass
        _warehouse_template = template
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_warehouse_template, path)
    return str(path)


# The suite's own settings that a CLI subprocess keeps (scripts/test: one DuckDB thread per process).
PASS_THROUGH = frozenset({"AGENTLEDGER_DUCKDB_THREADS"})


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: AGENTLEDGER_HOME is ``home``, and the user's home
    (HOME, XDG_DATA_HOME: where the default home and the hook's fallback redaction key live) is a
    directory next to it -- tests never write to the real user home."""
    user = home.with_name(home.name + ".user-home")
    user.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_") or k in PASS_THROUGH}
    env.update({"AGENTLEDGER_HOME": str(home), "PYTHONPATH": str(REPO), "COLUMNS": "200", "NO_COLOR": "1",
                "HOME": str(user), "XDG_DATA_HOME": str(user / ".local" / "share")})
    env.update(extra)
    return env


_fork_server = None
_fork_lock = threading.Lock()


def _cli_fork_server():
    """This process's CLI fork server (tests/forkcli.py), started at its first use; None when
    AGENTLEDGER_TEST_FORK=0."""
    global _fork_server
    if os.environ.get("AGENTLEDGER_TEST_FORK", "1") == "0":
        return None
    with _fork_lock:
        if _fork_server is None:
            from forkcli import ForkServer

            env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
            env.update({"PYTHONPATH": str(REPO), "COLUMNS": "200", "NO_COLOR": "1"})
            _fork_server = ForkServer(env, cwd=str(REPO))
            atexit.register(_fork_server.close)
        return _fork_server


def cli_shim(directory: Path) -> Path:
    """An executable ``directory/agentledger`` for scripts that call `agentledger` by name: a run of
    this process's fork server (tests/forkcli.py --client), else `python -m agentledger`."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "agentledger"
    server = _cli_fork_server()
    if server is None:
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m agentledger \"$@\"\n")
    else:
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -S {REPO / 'tests' / 'forkcli.py'} --client "
                        f"{server.path} \"$@\"\n")
    shim.chmod(0o755)
    return shim


def run_cli(*args: str, env: dict[str, str], check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """`python -m agentledger ARGS` in its own process: forked from the fork server when it can
    honour ``env`` and ``kw`` (tests/forkcli.py), else a new interpreter."""
    server = _cli_fork_server()
    proc = None
    if server is not None and server.can_run(env, kw):
        proc = server.run(list(args), env=env, cwd=str(kw.get("cwd", REPO)), input=kw.get("input"), timeout=timeout)
    if proc is None:
        proc = subprocess.run([sys.executable, "-m", "agentledger", *args], capture_output=True, text=True, env=env,
                              timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"agentledger {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                             f"stderr:\n{proc.stderr}")
    return proc


def assert_no_send_waited_for_the_broker(times: list[float], bound_ms: float, client_timeout_ms: float) -> None:
    """``times``: the wall time (s) of every send of a run whose broker was away. A send that waits for
    the broker (no metadata, a full buffer, a connection attempt) waits ``bound_ms`` (max_block_ms) at
    least, and then so does every send of the outage: thousands. A busy machine stops the process
    now and then for as long, but only a few sends are hit, and none for as long as the client's
    timeout (``client_timeout_ms``: the connect timeout; kafka-python's own max_block default is 60 s).
    So this counts, rather than trusting the worst wall time of one send on a shared machine."""
    limit = bound_ms + 50
    over = sorted((t * 1000 for t in times if t * 1000 > limit), reverse=True)
    assert len(over) <= max(5, len(times) // 2000), (
        f"{len(over)} of {len(times)} sends blocked over {limit:.0f} ms (bound {bound_ms} ms), worst {over[:5]}")
    assert not over or over[0] < client_timeout_ms, f"a send blocked {over[0]:.0f} ms (bound {bound_ms} ms)"


# Test files that take longest, in that order, run first (scripts/test: --dist loadfile with
# --no-loadscope-reorder, whose default sends the files with the most tests first and left these
# few-test, many-process files for the end: two of them ran alone for the last ~90 s). From a
# per-file profile of the suite (wall seconds on one worker): bench smokes 279, scale-out 217,
# Kafka group scale 151, hook 131, spool outage 119, native ingest 118, docs 111.
LONGEST_FIRST = ("test_bench_smoke.py", "test_scale_out.py", "test_ingest_kafka_scale.py", "test_hook.py",
                 "test_spool_outage.py", "test_native_ingest.py", "test_docs.py", "test_replay.py", "test_ingest.py",
                 "test_detect_pipeline.py", "test_agents_import.py", "test_detect_baseline.py", "test_bundle.py",
                 "test_detect_model.py", "test_quarantine_verify.py", "test_notebooks.py", "test_compact.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest as collected
