"""The anomaly model outside the simulator: a per-deployment baseline (consumers/detect/baseline.py)
trained on the warehouse's own history of Codex sessions, against the shipped simulator-trained
artifact, on new sessions of the same deployment (tests/codex_corpus.py)."""

from __future__ import annotations

import json
import math

from codex_corpus import write_corpus
from conftest import cli_env, run_cli

from agentledger.consumers.detect.baseline import MIN_SESSIONS, train_from_warehouse
from agentledger.consumers.detect.model import AnomalyModel, save
from agentledger.schemas.warehouse import open_warehouse


def _model_alerts(env) -> dict[str, str]:
    rows = json.loads(run_cli("sql", "select session_id, severity from alerts where detector = 'model'",
                              "--format", "json", env=env).stdout)
    return {r["session_id"]: r["severity"] for r in rows}


def test_deployment_baseline_brings_benign_model_alerts_under_two_percent_and_cold_start_raises_none(tmp_path):
    hist = cli_env(tmp_path / "hist")
    for seed in (1, 2):  # the deployment's history: its benign sessions of two earlier weeks
        write_corpus(tmp_path / "history", seed=seed, benign_only=True)
    run_cli("import", "codex-rollout", str(tmp_path / "history"), env=hist)
    run_cli("ingest", env=hist)
    with open_warehouse(str(tmp_path / "hist" / "warehouse.duckdb")) as wh:
        art = train_from_warehouse(wh)
        cold = train_from_warehouse(wh, min_sessions=10_000)
    assert art["model_id"] == "isoforest-v1-local" and not art["training"]["cold_start"]
    assert art["training"]["history_sessions"] >= MIN_SESSIONS and art["training"]["calibration_medium_rate"] <= 0.02
    assert cold["training"]["cold_start"] and math.isinf(cold["thresholds"]["novelty"])
    local, cold_path = save(art, tmp_path / "local.json"), save(cold, tmp_path / "cold.json")
    AnomalyModel.load(local)  # valid artifacts
    AnomalyModel.load(cold_path)

    sessions = write_corpus(tmp_path / "new")  # this week's sessions: attacks and benign, never seen
    benign = [s for s, r in sessions.items() if r.label == "benign"]
    attacks = [s for s, r in sessions.items() if r.label != "benign"]
    env = cli_env(tmp_path / "eval")
    run_cli("import", "codex-rollout", str(tmp_path / "new"), env=env)
    run_cli("ingest", env=env)
    rates = {}
    for name, model in (("shipped", []), ("deployment", ["--model", str(local)]), ("cold", ["--model", str(cold_path)])):
        run_cli("detect", "--rebuild", *model, env=env)
        got = _model_alerts(env)
        rates[name] = (sum(s in got for s in benign) / len(benign), sum(s in got for s in attacks) / len(attacks),
                       sum(got.get(s) in ("high", "critical") for s in benign))
    print(f"\nbenign sessions with a model alert: shipped {rates['shipped'][0]:.1%}, deployment baseline "
          f"{rates['deployment'][0]:.1%}; attack sessions with one: {rates['shipped'][1]:.1%} -> {rates['deployment'][1]:.1%}")
    assert rates["shipped"][0] > 0.5  # the simulator's vocabulary finds nearly every real session novel
    assert rates["deployment"][0] <= 0.02 and rates["deployment"][2] == 0
    assert rates["cold"][:2] == (0.0, 0.0)  # no baseline yet: no model alert at all
    n = json.loads(run_cli("sql", "select count(distinct session_id) n from anomaly_scores where model_id = "
                           "'isoforest-v1-local'", "--format", "json", env=env).stdout)[0]["n"]
    assert n == len(sessions)  # ... but every session is still scored
