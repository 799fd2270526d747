"""The anomaly model outside the simulator: `agentledger model train` trains a per-deployment model
on the warehouse's own history of Codex sessions (consumers/detect/baseline.py through
agentledger.api.train_model), saves it in the home, and `detect` uses it -- against the shipped
simulator-trained artifact, on new sessions of the same deployment (tests/codex_corpus.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from codex_corpus import write_corpus
from conftest import cli_env, run_cli

from agentledger.consumers.detect.model import AnomalyModel


def _sql(env, query):
    return json.loads(run_cli("sql", query, "--format", "json", env=env).stdout)


def _model_alerts(env) -> dict[str, str]:
    return {r["session_id"]: r["severity"] for r in _sql(env, "select session_id, severity from alerts "
                                                               "where detector = 'model'")}


MIN_SESSIONS = 60  # more than one copy of the benign corpus, fewer than two


def _add_history(env, tmp_path: Path, seed: int) -> int:
    d = tmp_path / f"history-{seed}"  # the deployment's benign sessions of an earlier week
    n = len(write_corpus(d, seed=seed, benign_only=True))
    run_cli("import", "codex-rollout", str(d), env=env)
    run_cli("ingest", env=env)
    return n


def test_model_train_cold_start_then_a_deployment_model_detect_uses(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home)
    # cold start: one week of history (50 sessions) is under the 60 asked for here (the default is 50)
    first = _add_history(env, tmp_path, 1)
    assert first < MIN_SESSIONS
    shown = json.loads(run_cli("model", "show", "--format", "json", env=env).stdout)
    assert shown["source"] == "shipped" and shown["deployment"] is None
    out = run_cli("model", "train", "--min-sessions", str(MIN_SESSIONS), env=env).stdout
    assert "cold start" in out and "raises no model alert" in out, out
    cold = json.loads(run_cli("model", "show", "--format", "json", env=env).stdout)
    assert cold["source"] == "deployment" and cold["model"]["cold_start"]
    assert cold["model"]["history_sessions"] == first
    path = Path(cold["model"]["path"])
    assert path.parent == home / "models" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert AnomalyModel.load(path).digest == cold["model"]["digest"]
    det = json.loads(run_cli("detect", "--all", "--format", "json", env=env).stdout)
    assert det["model"] == "isoforest-v1-local" and det["model_cold_start"] and det["model_digest"] == cold["model"]["digest"]
    assert "cold start" in run_cli("detect", "--all", env=env).stdout
    assert _model_alerts(env) == {}  # no baseline yet: no model alert at all ...
    scored = _sql(env, "select count(distinct session_id) n from anomaly_scores where model_id = 'isoforest-v1-local'")
    assert scored[0]["n"] == first  # ... but every session is scored

    # a second week of history: a real baseline, calibrated on held-out history sessions
    second = _add_history(env, tmp_path, 2)
    trained = json.loads(run_cli("model", "train", "--min-sessions", str(MIN_SESSIONS), "--format", "json", env=env).stdout)
    assert not trained["cold_start"] and trained["history_sessions"] == first + second
    assert trained["calibration_sessions"] >= 0.25 * (first + second) and trained["calibration_medium_rate"] <= 0.02
    assert trained["path"] == str(path) and trained["digest"] != cold["model"]["digest"]
    assert "calibrated on" in run_cli("model", "show", env=env).stdout

    # this week's sessions, attacks among them, never seen: detect (no --model) uses the trained model
    sessions = write_corpus(tmp_path / "new")
    run_cli("import", "codex-rollout", str(tmp_path / "new"), env=env)
    run_cli("ingest", env=env)
    det = json.loads(run_cli("detect", "--format", "json", env=env).stdout)
    assert det["model"] == "isoforest-v1-local" and det["model_digest"] == trained["digest"] and not det["model_cold_start"]
    assert det["sessions"] == len(sessions) + first + second  # a new model re-examines every session
    got = _model_alerts(env)
    benign = [s for s, r in sessions.items() if r.label == "benign"]
    rate = sum(s in got for s in benign) / len(benign)
    print(f"\nbenign sessions of a new week with a model alert (deployment model): {rate:.1%}")
    assert rate <= 0.02 and not any(got.get(s) in ("high", "critical") for s in benign)
    versions = {r["detector_version"] for r in _sql(env, "select detector_version from alerts where detector = 'model'")}
    assert versions <= {trained["digest"]}  # every model alert names the model that raised it

    # the shipped model on the same sessions finds nearly every real session novel
    shipped = cli_env(tmp_path / "shipped")
    run_cli("import", "codex-rollout", str(tmp_path / "new"), env=shipped)
    run_cli("ingest", env=shipped)
    run_cli("detect", env=shipped)
    got = _model_alerts(shipped)
    assert sum(s in got for s in benign) / len(benign) > 0.5

    # --model / AGENTLEDGER_MODEL still choose
    st = json.loads(run_cli("model", "show", "--model", "none", "--format", "json", env=env).stdout)
    assert st["source"] == "--model" and st["model"] is None
    st = json.loads(run_cli("model", "show", "--format", "json", env={**env, "AGENTLEDGER_MODEL": "none"}).stdout)
    assert st["source"] == "AGENTLEDGER_MODEL" and st["model"] is None and st["deployment"]["digest"] == trained["digest"]
    det = json.loads(run_cli("detect", "--all", "--format", "json", env={**env, "AGENTLEDGER_MODEL": "none"}).stdout)
    assert det["model"] is None


def test_a_model_is_per_warehouse(tmp_path):
    """Another warehouse with the same home has no model of its own yet: the shipped one is used."""
    env = cli_env(tmp_path / "home")
    _add_history(env, tmp_path, 1)
    run_cli("model", "train", env=env)
    other = {**env, "AGENTLEDGER_WAREHOUSE": str(tmp_path / "other.duckdb")}
    st = json.loads(run_cli("model", "show", "--format", "json", env=other).stdout)
    assert st["source"] == "shipped" and st["deployment"] is None and st["model"]["model_id"] == "isoforest-v1"
