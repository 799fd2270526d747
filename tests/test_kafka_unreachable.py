"""Kafka unreachable (issue 21 item 8): every command that talks to Kafka says so in one line within
seconds -- not after kafka-python's 30 s bootstrap, not after pages of the client's log, which only
--verbose shows; producers keep what they recorded in the spool and say so."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import REPO, cli_env

NOWHERE = "127.0.0.1:1"  # nothing listens on port 1


def _run_all(cmds: dict[str, tuple[list[str], object]], env: dict) -> dict[str, tuple[int, str, float]]:
    """Run the commands at once (each mostly waits for the connection timeout): name -> (exit, stderr,
    seconds it took)."""
    t0 = time.monotonic()
    procs = {}
    for name, (args, home) in cmds.items():
        err = open(f"{home}.err", "w+")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "agentledger", *args], env={**env, "HOME": str(home)},
                                        cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, text=True), err)
    out: dict[str, tuple[int, str, float]] = {}
    while len(out) < len(procs) and time.monotonic() - t0 < 120:
        for name, (p, err) in procs.items():
            if name not in out and p.poll() is not None:
                err.seek(0)
                out[name] = (p.returncode, err.read(), time.monotonic() - t0)
        time.sleep(0.05)
    assert len(out) == len(procs), f"still running after 120 s: {set(procs) - set(out)}"
    return out


def test_commands_fail_fast_in_one_line_and_the_client_log_shows_only_when_verbose(tmp_path):
    env = cli_env(tmp_path / "home", AGENTLEDGER_BOOTSTRAP_SERVERS=NOWHERE)
    homes = {n: tmp_path / n for n in ("ingest", "verbose", "replay", "simulate")}
    res = _run_all({
        "ingest": (["--home", str(homes["ingest"]), "ingest"], homes["ingest"]),
        "verbose": (["--home", str(homes["verbose"]), "--verbose", "ingest"], homes["verbose"]),
        "replay": (["--home", str(homes["replay"]), "replay", "019b76db-346b-7254-b0ae-e8bdd0f71c51"], homes["replay"]),
        "simulate": (["--home", str(homes["simulate"]), "simulate", "--sessions", "1", "--seed", "3"],
                     homes["simulate"]),
    }, env)
    for name in ("ingest", "replay"):
        code, err, seconds = res[name]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 1 and len(lines) == 1, (name, err)
        assert lines[0].startswith("error: Kafka at 127.0.0.1:1 is not reachable"), (name, err)
        assert seconds < 20, (name, seconds)  # was 31 s (kafka-python's 30 s bootstrap)
    code, err, _ = res["verbose"]
    assert code == 1 and "kafka.net" in err and "is not reachable" in err  # the client's log, when asked for
    code, err, _ = res["simulate"]  # a producer: everything recorded is kept in the spool, and it says so
    assert code == 0 and "kafka" not in err.replace("Kafka unavailable", "") and "spooled" in err, err
