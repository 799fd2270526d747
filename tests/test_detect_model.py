"""The anomaly model: the JSON artifact scores exactly like scikit-learn, the shipped artifact is the
one the pipeline loads, bad artifacts are refused, and unfinished sessions do not look anomalous."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.ensemble import IsolationForest

from conftest import cli_env, run_cli
from agentledger.consumers.detect import DEFAULT_MODEL, AnomalyModel, Detector, ModelError
from agentledger.consumers.detect import features as F
from agentledger.consumers.detect.model import baseline_stats, export
from detect_support import Lab, alerts_of
from agentledger.schemas.warehouse import open_warehouse


@pytest.mark.parametrize("max_features,max_samples", [(1.0, 128), (0.6, 64)])
def test_numpy_scoring_equals_scikit_learn(max_features, max_samples):
    rng = np.random.default_rng(7)
    names = F.feature_names()
    X = rng.gamma(2.0, 1.0, size=(600, len(names)))
    X[:, 3] = 0.0  # a constant column, as most attack-only features are in benign data
    clf = IsolationForest(n_estimators=40, max_samples=max_samples, max_features=max_features, random_state=1).fit(X)
    art = json.loads(json.dumps(export(clf, model_id="t", features=names, thresholds={"score": 0.6},
                                       vocabulary={}, baseline={}, training={})))  # through JSON, as shipped
    m = AnomalyModel(art)
    Y = np.vstack([rng.gamma(2.0, 1.5, size=(200, len(names))), X[:50], np.full((1, len(names)), 1e6)])
    assert np.abs(m.score_samples(Y) - clf.score_samples(Y)).max() < 1e-12


def test_the_shipped_artifact_is_current_and_documented():
    m = AnomalyModel.load(DEFAULT_MODEL)
    a = m.artifact
    assert m.model_id == "isoforest-v1" and a["feature_version"] == F.FEATURE_VERSION
    assert m.features == F.feature_names()
    assert a["training"]["benign_only"] is True and a["training"]["sessions"]["train"] >= 1000
    assert 0 < m.threshold < m.threshold_high < 1 and m.novelty_threshold > 0
    assert len(m.trees) == a["isolation_forest"]["n_estimators"] >= 100
    summary = {r["detector"]: r for r in a["evaluation"]["summary"]}
    assert a["evaluation"]["test_seed"] not in a["training"]["seeds"].values(), "evaluated on a held-out seed"
    assert summary["combined"]["recall"] >= 0.95 and summary["combined"]["benign_alert_rate"] <= 0.02


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.update(format="pickle"), "not an agentledger-anomaly-model"),
    (lambda a: a.update(feature_version="features-v0"), "retrain it"),
    (lambda a: a.update(features=a["features"] + ["no_such_feature"]), "unknown features"),
])
def test_bad_artifacts_are_refused(tmp_path, mutate, message):
    a = json.loads(DEFAULT_MODEL.read_text())
    mutate(a)
    p = tmp_path / "m.json"
    p.write_text(json.dumps(a))
    with pytest.raises(ModelError, match=message):
        AnomalyModel.load(p)
    with pytest.raises(ModelError, match="cannot read"):
        AnomalyModel.load(tmp_path / "missing.json")


def test_the_model_explains_an_anomalous_session_with_its_events(tmp_path):
    lab = Lab(tmp_path)
    plain = lab.session()
    plain.work(4)
    plain.end()
    odd = lab.session()
    odd.work(2)
    for i in range(3):
        odd.file(f"/home/dev/.kube/config{i}", "read", inside=False)
        odd.net(f"203.0.113.{i + 1}", 9000, "POST", protocol="http", bytes_out=50_000)
    odd.end()
    wh = open_warehouse(lab.warehouse)
    lab.ingest(wh)
    r = Detector(wh).detect()
    assert r.scored == 2
    scores = dict(wh.con.execute("SELECT session_id, anomalous FROM anomaly_scores").fetchall())
    assert scores == {plain.id: False, odd.id: True}
    a = alerts_of(wh, odd.id)["isoforest-v1"]
    assert a["detector"] == "model" and a["severity"] in ("medium", "high") and a["score"] > 0
    assert a["threshold"] == pytest.approx(AnomalyModel.load(DEFAULT_MODEL).threshold)
    assert a["evidence_seqs"] and any(f"#{q} " in a["explanation"] for q in a["evidence_seqs"])
    assert "isoforest-v1" not in alerts_of(wh, plain.id)
    wh.close()


def test_unfinished_sessions_are_not_anomalous_for_being_unfinished(tmp_path):
    """Streaming scores every prefix a batch boundary cuts; the model was trained on prefixes too, so
    benign sessions ingested in small batches draw (almost) no high model alerts."""
    from agentledger import api
    from agentledger.consumers.ingest import Ingestor
    from agentledger.schemas.config import from_env
    from agentledger.schemas.transport import open_source

    s = from_env({"AGENTLEDGER_HOME": str(tmp_path / "home")})
    sim = api.simulate(s, 150, 611, attack_rate=0.0)
    wh = open_warehouse(s.warehouse)
    det = Detector(wh)
    passes = []
    source = open_source(s)
    try:
        ing = Ingestor(wh, source, s.topic, batch_records=400,
                       after_commit=lambda b: passes.append(det.detect(b.sessions)))
        ing.assign()
        ing.run()
    finally:
        source.close()
    assert len(passes) >= 10 and sum(p.sessions for p in passes) > sim.sessions, "sessions were scored unfinished"
    high = wh.con.execute("SELECT count(DISTINCT session_id) FROM alerts WHERE detector = 'model' "
                          "AND severity IN ('high', 'critical')").fetchone()[0]
    assert high / sim.sessions <= 0.02
    wh.close()


def test_detect_with_another_model_or_none(tmp_path):
    env = cli_env(tmp_path / "home")
    run_cli("simulate", "--sessions", "30", "--seed", "12", "--attack-rate", "0.3", "--format", "json", env=env)
    run_cli("ingest", "--format", "json", env=env)
    out = json.loads(run_cli("detect", "--model", "none", "--format", "json", env=env).stdout)
    assert out["model"] is None and out["scored"] == 0
    n = json.loads(run_cli("sql", "select count(*) n from alerts where detector = 'model'", "--format", "json",
                           env=env).stdout)[0]["n"]
    assert n == 0
    # a model of our own (trained here on the same features) is a different detector: every session is pending
    names = F.feature_names()
    rng = np.random.default_rng(0)
    clf = IsolationForest(n_estimators=20, max_samples=64, random_state=0).fit(rng.gamma(2, 1, (200, len(names))))
    art = export(clf, model_id="isoforest-test", features=names, thresholds={"score": 0.99}, vocabulary={},
                 baseline=baseline_stats(pl.DataFrame({n: [0.0] for n in names}), names), training={})
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(art))
    out = json.loads(run_cli("detect", "--model", str(p), "--format", "json", env=env).stdout)
    assert out["model"] == "isoforest-test" and out["sessions"] == 30 and out["scored"] == 30
