"""The anomaly model the pipeline runs: an isolation forest plus a behaviour-novelty score, loaded
from a versioned JSON artifact and scored with numpy.

Why JSON and not pickle: a pickle runs code when it is loaded, and ties the pipeline to the exact
scikit-learn that trained it. The artifact holds the fitted trees as arrays (children, split
feature, threshold, node sizes), the feature list and version, the token vocabulary, the trained
thresholds and the training/evaluation metadata; scikit-learn is only needed to *train*
(notebooks/02_anomaly_model.ipynb). `score_samples` reproduces scikit-learn's
``IsolationForest.score_samples`` exactly (tests/test_detect_model.py checks it).

A session is anomalous when its isolation score reaches the trained threshold (a benign quantile),
or when its rarest event is a behaviour the benign training sessions never showed (novelty). Either
alone is a medium alert; both, or an isolation score over the high threshold, a high one (see
`AnomalyModel.assess`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from agentledger.schemas.canonical import canonical_json, canonical_json_spaced
from agentledger.schemas.errors import AgentLedgerError

from . import features as F

ARTIFACT_FORMAT = "agentledger-anomaly-model"
ARTIFACT_FORMAT_VERSION = 1
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "isoforest-v1.json"


class ModelError(AgentLedgerError):
    """The model artifact is missing, malformed, or made for other features."""


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): the average path length of an unsuccessful search in a binary tree of n points."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


@dataclass
class _Tree:
    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    leaf_length: np.ndarray  # depth of each node + c(samples at node): the path length if it is a leaf
    features: np.ndarray  # which columns of X this tree was grown on


def _tree(spec: dict) -> _Tree:
    left = np.asarray(spec["children_left"], dtype=np.int64)
    right = np.asarray(spec["children_right"], dtype=np.int64)
    depth = np.zeros(len(left), dtype=np.float64)
    for i in range(len(left)):  # children always come after their parent in scikit-learn's arrays
        if left[i] >= 0:
            depth[left[i]] = depth[i] + 1
            depth[right[i]] = depth[i] + 1
    samples = np.asarray(spec["n_node_samples"], dtype=np.float64)
    return _Tree(left, right, np.asarray(spec["feature"], dtype=np.int64),
                 np.asarray(spec["threshold"], dtype=np.float64), depth + average_path_length(samples),
                 np.asarray(spec["features"], dtype=np.int64))


class AnomalyModel:
    def __init__(self, artifact: dict, source: str = "<memory>"):
        if artifact.get("format") != ARTIFACT_FORMAT or artifact.get("format_version") != ARTIFACT_FORMAT_VERSION:
            raise ModelError(f"{source}: not an {ARTIFACT_FORMAT} v{ARTIFACT_FORMAT_VERSION} artifact")
        if artifact.get("feature_version") != F.FEATURE_VERSION:
            raise ModelError(f"{source}: trained on {artifact.get('feature_version')}, the pipeline computes "
                             f"{F.FEATURE_VERSION}: retrain it (notebooks/02_anomaly_model.ipynb)")
        missing = set(artifact["features"]) - set(F.feature_names())
        if missing:
            raise ModelError(f"{source}: unknown features {sorted(missing)}")
        self.artifact = artifact
        self.source = source
        self.model_id: str = artifact["model_id"]
        self.features: list[str] = list(artifact["features"])
        forest = artifact["isolation_forest"]
        self.max_samples = int(forest["max_samples"])
        self.trees = [_tree(t) for t in forest["trees"]]
        th = artifact["thresholds"]
        self.threshold = float(th["score"])
        self.threshold_high = float(th.get("score_high", math.inf))
        self.novelty_threshold = float(th.get("novelty", math.inf))
        self.vocabulary = artifact.get("vocabulary") or {"total": 0, "counts": {}}
        self.baseline = artifact.get("baseline", {})
        self.digest = hashlib.sha256(canonical_json_spaced(artifact)).hexdigest()[:16]

    @classmethod
    def load(cls, path: Path | str) -> "AnomalyModel":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read the model artifact {p}: {exc}") from exc
        return cls(data, str(p))

    # -- scoring --------------------------------------------------------------------------------
    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """scikit-learn's ``score_samples`` (negative: lower is more anomalous), from the arrays."""
        X = np.asarray(X, dtype=np.float32)  # scikit-learn's trees split float32 values
        n = X.shape[0]
        depths = np.zeros(n, dtype=np.float64)
        rows = np.arange(n)
        for t in self.trees:
            Xt = X[:, t.features]
            node = np.zeros(n, dtype=np.int64)
            active = t.left[node] >= 0
            while active.any():
                idx = rows[active]
                nd = node[idx]
                go_left = Xt[idx, t.feature[nd]] <= t.threshold[nd]
                node[idx] = np.where(go_left, t.left[nd], t.right[nd])
                active = t.left[node] >= 0
            depths += t.leaf_length[node]
        denom = len(self.trees) * average_path_length(np.array([self.max_samples]))[0]
        if denom == 0:
            return -np.ones(n)
        return -(2.0 ** (-depths / denom))

    def score(self, feats: pl.DataFrame) -> np.ndarray:
        """Anomaly score of each row of `features.session_features` output: in (0, 1], higher is
        more anomalous (the isolation forest's 2^(-E[h]/c))."""
        if feats.height == 0:
            return np.zeros(0)
        return -self.score_samples(F.transform(feats, self.features).to_numpy())

    def assess(self, feats: pl.DataFrame, evidence: dict[str, dict[str, list[int]]],
               ended: set[str] | None = None) -> list[dict]:
        """Score, verdict, severity, the most unusual features and their evidence, per session.

        Severity: an isolation score over the threshold, or novelty, alone is ``medium`` (worth a
        look: the model knows what its training sessions did, not what is dangerous); ``high`` when
        the isolation score is over the high threshold, or over the threshold together with novelty.
        The isolation score of a session that has not ended is provisional (its counts are still
        growing), so it raises ``high`` only once the session ended. ``ended=None``: all have."""
        scores = self.score(feats)
        names = F.feature_names()
        out = []
        for row, s in zip(feats.iter_rows(named=True), scores):
            novelty = float(row.get("rarity_max", 0.0))
            final = ended is None or row["session_id"] in ended
            unusual = s >= self.threshold
            novel = novelty >= self.novelty_threshold
            reasons = []
            if unusual:
                reasons.append(f"isolation score {s:.3f} ≥ threshold {self.threshold:.3f}"
                               + ("" if final else " (session still open)"))
            if novel:
                reasons.append(f"a behaviour benign training sessions never showed (rarity {novelty:.2f} ≥ "
                               f"{self.novelty_threshold:.2f})")
            severity = None
            if unusual or novel:
                high = final and unusual and (s >= self.threshold_high or novel)
                severity = "high" if high else "medium"
            top = self.unusual(row)
            out.append({"session_id": row["session_id"], "score": float(s), "novelty": novelty,
                        "anomalous": severity is not None, "severity": severity, "reasons": reasons,
                        "top_features": top, "features": {n: float(row[n]) for n in names},
                        "evidence": evidence.get(row["session_id"], {})})
        return out

    def unusual(self, row: dict, k: int = 4) -> list[str]:
        """Features furthest above their benign 99th percentile (from the training metadata)."""
        p99 = self.baseline.get("p99", {})
        spread = self.baseline.get("iqr", {})
        dev = []
        for n in self.features:
            if n in p99 and row[n] > p99[n]:
                dev.append(((row[n] - p99[n]) / (spread.get(n, 0.0) + 1.0), n))
        return [n for _, n in sorted(dev, reverse=True)[:k]]

    def explain(self, a: dict, describe: dict[int, str]) -> tuple[str, list[int]]:
        """The alert text for an assessed session, citing the events behind its unusual features."""
        parts = []
        seqs: set[int] = set()
        ev = a["evidence"]
        p99 = self.baseline.get("p99", {})
        names = list(a["top_features"])
        if a["novelty"] >= self.novelty_threshold and "rare_events" in ev and "rare_events" not in names:
            names.insert(0, "rare_events")
        for n in names:
            cited = sorted(ev.get(n, []))[:6]
            seqs.update(ev.get(n, [])[:50])
            base = f" (benign p99 {p99[n]:g})" if n in p99 else ""
            parts.append(f"{n}={a['features'][n]:g}{base}" + (": " + "; ".join(
                f"#{q} {describe.get(q, '')}".strip() for q in cited) if cited else ""))
        text = f"{'; '.join(a['reasons'])}. Most unusual: " + (" | ".join(parts) if parts else "no single feature")
        return text, sorted(seqs)


# --- export (training side: called with a fitted scikit-learn IsolationForest) ---------------------

def export(clf: Any, *, model_id: str, features: list[str], thresholds: dict, vocabulary: dict,
           baseline: dict, training: dict, evaluation: dict | None = None) -> dict:
    """The JSON artifact of a fitted ``sklearn.ensemble.IsolationForest`` (reads its attributes only,
    imports nothing from scikit-learn)."""
    trees = []
    for est, feats in zip(clf.estimators_, clf.estimators_features_):
        t = est.tree_
        trees.append({"children_left": t.children_left.tolist(), "children_right": t.children_right.tolist(),
                      "feature": t.feature.tolist(), "threshold": t.threshold.tolist(),
                      "n_node_samples": t.n_node_samples.tolist(), "features": [int(f) for f in feats]})
    return {
        "format": ARTIFACT_FORMAT, "format_version": ARTIFACT_FORMAT_VERSION, "model_id": model_id,
        "feature_version": F.FEATURE_VERSION, "features": list(features), "transform": "log1p",
        "isolation_forest": {"n_estimators": len(trees), "max_samples": int(clf.max_samples_), "trees": trees},
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "vocabulary": vocabulary, "baseline": baseline, "training": training, "evaluation": evaluation or {},
    }


def baseline_stats(feats: pl.DataFrame, names: list[str]) -> dict:
    """Per-feature benign p50/p99/IQR, for explanations."""
    out: dict[str, dict[str, float]] = {"p50": {}, "p99": {}, "iqr": {}}
    for n in names:
        col = feats[n]
        out["p50"][n] = float(col.quantile(0.5) or 0.0)
        out["p99"][n] = float(col.quantile(0.99) or 0.0)
        out["iqr"][n] = float((col.quantile(0.75) or 0.0) - (col.quantile(0.25) or 0.0))
    return out


def save(artifact: dict, path: Path | str) -> Path:
    """Write the artifact atomically (a temporary file renamed over ``path``): a detection pass
    that loads it meanwhile reads the old artifact or the new one, never half of one."""
    import os
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(canonical_json(artifact) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
