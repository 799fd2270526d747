"""A small run of each benchmark, so they keep working (the real runs are in bench/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, cli_shim


def chaos_env(tmp_path) -> dict:
    """The chaos runner's environment: its CLI runs go through this worker's fork server
    (AGENTLEDGER_BENCH_CLI, tests/forkcli.py), ~0.5 CPU-s less each (the secrets smoke makes 31)."""
    return {**os.environ, "AGENTLEDGER_BENCH_CLI": str(cli_shim(tmp_path / "bin"))}


@pytest.mark.kafka
def test_bench_ingest_smoke(bootstrap, tmp_path):
    # one batch of >= 2,000 messages: the native decoder's path (smaller batches skip it), in 1 commit
    proc = subprocess.run([sys.executable, "bench/ingest.py", "--bootstrap", bootstrap, "--events", "2500",
                           "--workdir", str(tmp_path), "--base-rows", "10000", "--batch", "5000", "--rounds", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["events"] >= 2500 and result["decoder"] == "native"
    assert result["raw_poll"] > 0 and result["ingest"] > 0 and 0 < result["ratio"]
    assert result["embedded"] > 0 and result["ingest_at_20m"] > 0 and result["base_rows"] >= result["events"]
    # the compared rates in rounds (one here: each round is a dozen spawned processes), each round's
    # pair reported, the median of one round being that round
    rounds = result["rounds"]
    assert len(rounds["kafka"]) == 1 and len(rounds["embedded"]) == 1 and len(rounds["at_20m"]) == 1
    assert result["ratio"] == rounds["kafka"][0]["ratio"] and result["embedded"] == rounds["embedded"][0]
    assert result["at_20m_vs_ingest_again"] == rounds["at_20m"][0]["ratio"]
    # the ingest's own CPU per 100,000 events, per phase and round
    assert len(result["cpu_s_per_100k_rounds"]["ingest_at_20m"]) == 1 and result["cpu_s_per_100k"]["embedded"] > 0
    assert result["at_20m_cpu_vs_ingest_again"] > 0
    # the same rates counting the checkpoint that writes the committed rows
    wc = result["with_checkpoint"]
    assert wc["ratio"] > 0 and wc["embedded"] > 0
    assert all(0 < w <= k["ingest"] for w, k in zip(wc["rounds"]["ingest"], rounds["kafka"], strict=True))
    assert len(wc["rounds"]["ingest_at_20m"]) == 1 and wc["at_20m_vs_ingest_again"] > 0


def test_bench_replay_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/replay.py", "--events", "6000", "--decode-sample", "2000",
                           "--big-bundle-bytes", "0", "--workdir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["events"] == 6000 and result["events_per_s"] > 0
    # the big-bundle path with the native decoder, and the same replay without it as the baseline
    assert result["decoder"] == "native", "the native decoder is missing (scripts/bootstrap builds it)"
    assert result["baseline_without_native"]["events_per_s"] > 0 and result["ratio_vs_without_native"] > 0
    assert result["baseline_sha256_events_per_s"] > 0 and result["baseline_fastavro_decode_events_per_s"] > 0
    assert result["processes"] > 0 and len(result["state_digest"]) == 64


@pytest.mark.kafka
def test_bench_emit_smoke(bootstrap, tmp_path):
    proc = subprocess.run([sys.executable, "bench/emit.py", "--bootstrap", bootstrap, "--events", "3000", "--rounds", "1",
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["events"] >= 1500
    assert result["ours"] > 0 and result["baseline"] > 0 and result["ratio"] > 0 and result["ours_in_process"] > 0


def test_bench_chaos_tampering_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/chaos.py", "--scenario", "tampering", "--mutations", "50",
                           "--sessions", "4", "--cli-runs", "2", "--seed", "3", "--workdir", str(tmp_path)],
                          cwd=REPO, env=chaos_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["scenario"] == "tampering" and result["tried"] >= 45
    assert result["undetected"] == 0 and result["tracebacks"] == 0, result
    assert result["detected"] == result["tried"] and result["detected_with_first_bad_seq"] > 0


def test_bench_chaos_disk_full_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/chaos.py", "--scenario", "disk_full", "--disk-runs", "3",
                           "--seed", "2", "--workdir", str(tmp_path)], cwd=REPO, env=chaos_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["scenario"] == "disk_full" and result["runs"] == 3 and result["events_acknowledged"] > 0
    assert result["undetected"] == 0 and result["tracebacks"] == 0, result


def test_bench_redaction_smoke():
    """One instance of every form: every gitleaks rule, the argv, URL, header, JSON, PEM and JWT forms,
    and the look-alikes (issue 21's targets: all provider formats, no false redaction)."""
    proc = subprocess.run([sys.executable, "bench/redaction.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples"] >= 100 and set(result["families"]) >= {
        "provider", "assignment", "cli_flag", "split_argv", "url", "url_encoded", "header", "json_output", "pem", "jwt"}
    prov = result["provider_rules"]
    assert prov["rules"] >= 200 and prov["generated"] == prov["rules"] and prov["recall"] == 1.0, prov
    assert result["recall"] == 1.0, result["missed"]
    assert result["negatives"] >= 25 and result["false_redactions"] == 0, result["false_examples"]


def test_bench_import_memory_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/import_memory.py", "--line-mb", "17", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["huge_line_exit"] == 0 and result["deep_line_exit"] == 0 and not result["deep_line_traceback"]
    assert result["baseline_kib"] > 0 and result["huge_line_kib"] - result["baseline_kib"] < 40 * 1024


@pytest.mark.kafka
def test_bench_chaos_bad_input_smoke(tmp_path, bootstrap):
    proc = subprocess.run([sys.executable, "bench/chaos.py", "--scenario", "bad_input", "--hostile", "120",
                           "--seed", "4", "--bootstrap", bootstrap, "--timeout", "300",
                           "--workdir", str(tmp_path)], cwd=REPO, env=chaos_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["kinds"]) == {"random_bytes", "truncated", "unknown_fingerprint", "wrong_magic", "broken_chain",
                                    "duplicate", "conflicting_seq", "skipped_seq", "oversized", "empty",
                                    "absurd_values", "deep_nesting"}
    for transport in ("local", "kafka"):
        r = result[transport]
        assert r["hostile"] == 120 and r["quarantined_pct"] == 100.0 and r["valid_stored_pct"] == 100.0, r
        assert r["crashes"] == 0 and r["hangs"] == 0 and r["hostile_stored"] == 0, r
    assert result["undetected"] == 0 and result["tracebacks"] == 0


def test_bench_chaos_readonly_sql_smoke(tmp_path):
    """A sample of the statements on a DuckLake warehouse (where COPY into the data path, ATTACH of a
    new catalog and CHECKPOINT wrote files before `check_query`), a few through the real CLI."""
    proc = subprocess.run([sys.executable, "bench/chaos.py", "--scenario", "readonly_sql", "--sql-warehouses", "lake",
                           "--sql-sample", "4", "--sql-cli-every", "40", "--workdir", str(tmp_path)],
                          cwd=REPO, env=chaos_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lib, cli = result["lake_library"], result["lake_cli"]
    assert lib["tried"] >= 20 and cli["tried"] >= 2, result
    assert lib["refused"] == lib["tried"] and cli["refused"] == cli["tried"], (lib["allowed"], cli["allowed"])
    assert lib["controls_ok"] == lib["controls"] and cli["controls_ok"] == cli["controls"]
    assert result["undetected"] == 0 and result["tracebacks"] == 0


@pytest.mark.kafka
def test_bench_chaos_secrets_smoke(tmp_path, bootstrap):
    """60 corpus secrets, then the same secrets split across lines (the first 40 that can be) and
    base64-encoded (the next 20), through the importer (3 through the hook), one `sandbox run` of 10
    of them (argv, environment, files, output), 3 simulated sessions; then the same producers to a
    Kafka topic of its own (half the importer's through an unreachable broker: spooled, drained),
    tiny (1 hook sample, 5 in the sandbox). Everything written, every topic message and warehouse
    value scanned, by our pieces and by detect-secrets. The first 60 of seed 1 hold the password
    flags in JSON output that leaked, and the here-document and bare environment forms the sandbox
    leaked; the split and base64 forms leaked at full size only, before they were part of the smoke."""
    proc = subprocess.run([sys.executable, "bench/chaos.py", "--scenario", "secrets", "--secret-samples", "60",
                           "--hook-samples", "3", "--sim-sessions", "3", "--sandbox-samples", "10", "--replays", "1",
                           "--bootstrap", bootstrap, "--kafka-hook-samples", "1", "--kafka-sandbox-samples", "5",
                           "--kafka-sim-sessions", "2", "--seed", "1", "--workdir", str(tmp_path)],
                          cwd=REPO, env=chaos_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    local, kafka, ds = result["local"], result["kafka"], result["detect_secrets"]
    assert local["importer_samples"] >= 60 + 20 + 10 and local["simulator_secrets"] > 0, local
    assert local["sandbox_runs"] == 1 and local["sandbox_samples"] == 10 and result["files_scanned"] > 10
    assert kafka["topic_messages"] > 100 and kafka["spooled_messages"] > 10 and kafka["sandbox_runs"] == 1, kafka
    assert result["errors"] == {}, result["errors"]
    assert result["in_clear"] == 0, result["found"]
    # the recording store does keep the values (it re-executes): the scan does see them there
    assert result["in_not_event_places"].get("cas (recording store)", 0) > 0
    assert ds["findings"] > 0 and ds["leaks_in_events"] == 0 and ds["unexplained"] == 0, ds


def test_bench_chaos_consumer_kill_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "bench/chaos.py", "--scenario", "consumer_kill", "--kills", "3",
                           "--kill-sessions", "6", "--kill-batch", "50", "--kill-min-s", "1.5", "--kill-max-s", "4",
                           "--kill-warehouses", "file", "--workdir", str(tmp_path)],
                          cwd=REPO, env=chaos_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    f = result["file"]
    assert f["produced"] > 100 and f["kills"] >= 1, f
    assert f["kills_in_commit"] >= 1, f  # (the first run is killed at its first batch commit seen being written)
    assert f["stored"] == f["produced"] and f["missing"] == f["duplicated"] == f["unexpected"] == 0, f
    assert f["chains_not_ok"] == 0 and f["errors"] == [], f
    assert result["undetected"] == 0


def test_bench_chaos_broker_kill_smoke(tmp_path):
    """Its own broker (scripts/kafka, random ports), SIGKILLed and restarted once under two producers."""
    proc = subprocess.run([sys.executable, "bench/chaos.py", "--scenario", "broker_kill", "--broker-sessions", "10",
                           "--producers", "2", "--broker-kills", "1", "--broker-up-min-s", "2", "--broker-down-s", "3",
                           "--workdir", str(tmp_path)], cwd=REPO, env=chaos_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["broker_kills"] == 1 and result["produced"] > 100 and result["sessions"] == 10, result
    assert result["stored"] == result["produced"] and result["lost"] == result["duplicated"] == 0, result
    assert result["sessions_out_of_order"] == 0 and result["spool_remaining"] == 0 and result["errors"] == []


def test_bench_console_smoke(tmp_path):
    """bench/console.py end to end on a tiny warehouse: a real `agentledger serve`, every page timed."""
    proc = subprocess.run([sys.executable, "bench/console.py", "--events", "600", "--repeat", "2",
                           "--sessions-viewed", "2", "--home", str(tmp_path / "home")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["sessions_in_warehouse"] >= 10 and doc["events"] >= 300
    for page in ("first_page", "agent", "severity_high", "text", "session_first_view", "session_step", "alerts"):
        assert doc["pages"][page]["n"] >= 1 and doc["pages"][page]["p50_ms"] > 0, page
    assert doc["baseline_sessions_view_offset"]["n"] >= 2 and "meets_target" in doc
