"""A small run of bench/detect_eval.py: the quality target, measured from the labels file, on a
seed of its own (the full run is 2,000 sessions; see the closing note of issue 6)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_detect_eval_smoke_meets_the_quality_target(tmp_path):
    proc = subprocess.run([sys.executable, "bench/detect_eval.py", "--sessions", "300", "--seed", "4242",
                           "--attack-rate", "0.3", "--workdir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    assert "benign (false alarms)" in proc.stdout and "token_harvesting" in proc.stdout  # the per-scenario table
    assert r["sessions"] == 300 and r["attack_sessions"] >= 60
    assert r["recall"] >= 0.95 and r["benign_alert_rate"] <= 0.02 and r["target_met"]
    assert set(r["per_scenario"]) >= {"benign", "credential_exfiltration", "download_execute", "approval_fatigue",
                                      "persistence", "crypto_mining", "dependency_confusion", "mass_deletion",
                                      "token_harvesting"}
    assert r["second_run_sessions"] == 0 and r["second_run_changes"] == 0, "detect is idempotent"
    assert r["detect_s_per_100k_events"] > 0 and r["ratio_detect_to_ingest"] > 0 and r["ratio_detect_to_ingest_inner"] > 0
    # the model on its own: AUC from anomaly_scores, and the benign medium-alert rate, both printed
    assert 0.5 < r["auc_score"] <= 1 and 0.5 < r["auc_novelty"] <= 1
    assert r["benign_medium_alert_rate"] == r["model_any_severity_benign_rate"]
    assert "model: AUC" in proc.stdout and "speed: detect" in proc.stdout
