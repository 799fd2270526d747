"""A per-deployment baseline for the anomaly model: novelty and thresholds learnt from the
warehouse's own history instead of the simulator's.

The shipped artifact (models/isoforest-v1.json) knows what the *simulator's* benign sessions do:
on real agents' sessions almost every session has an event kind it never saw (`cmd:rg`,
`cmd:apply_patch`, MCP tools...), so its novelty score raises a medium alert on nearly every one.
`train_deployment` keeps the artifact's isolation forest (generic counts of behaviour) and replaces
what depends on the deployment:

* the **vocabulary** (token frequencies the rarity/novelty features are scored against) is this
  warehouse's history: the sessions no rule raised a high or critical alert on;
* the **thresholds** are calibrated on held-out history sessions scored against a vocabulary of the
  others: the isolation-score and novelty thresholds are set so that at most ``medium_rate``
  (default 2 %) of held-out sessions would get a medium alert (half of the budget each), never below
  the shipped ones;
* **cold start**: with fewer than ``min_sessions`` history sessions there is no baseline to speak
  of: the artifact raises no model alert at all (its scores are still written to
  ``anomaly_scores``), and says so in ``training.cold_start``.

The result is an artifact of the same format (``model_id`` + ``-local``), loaded with ``--model``
/ ``AGENTLEDGER_MODEL`` like any other.
"""

from __future__ import annotations

import copy
import math
import random

import duckdb
import numpy as np
import polars as pl

from . import features as F
from .model import AnomalyModel

MIN_SESSIONS = 50
MEDIUM_RATE = 0.02


def history_sessions(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Sessions of ``detect_events`` that no rule raised a high or critical alert on."""
    flagged = {r[0] for r in con.execute(
        "SELECT DISTINCT session_id FROM alerts WHERE detector = 'rule' AND severity IN ('high', 'critical')").fetchall()}
    return sorted({r[0] for r in con.execute("SELECT DISTINCT session_id FROM detect_events").fetchall()} - flagged)


def _quantile_above(values: np.ndarray, rate: float) -> float:
    """A threshold that at most ``rate`` of ``values`` reach (just above the (1-rate) quantile)."""
    if len(values) == 0:
        return math.inf
    v = np.sort(values)
    k = int(math.floor(len(v) * rate))  # how many may reach it
    top = v[len(v) - k - 1]  # the largest value that must stay below
    return float(np.nextafter(top, math.inf))


def train_deployment(ev: pl.DataFrame, base: AnomalyModel, sessions: list[str], *, medium_rate: float = MEDIUM_RATE,
                     min_sessions: int = MIN_SESSIONS, holdout: float = 0.3, seed: int = 0) -> dict:
    """A model artifact whose vocabulary and thresholds come from ``sessions`` of ``ev`` (the
    `features.load_events` frame of the deployment's detect_events)."""
    ev = ev.filter(pl.col("session_id").is_in(sessions))
    art = copy.deepcopy(base.artifact)
    art["model_id"] = base.model_id.removesuffix("-local") + "-local"
    th = dict(art["thresholds"])
    training = {"baseline": "deployment", "history_sessions": len(sessions), "base_model": base.model_id,
                "base_digest": base.digest, "medium_rate_target": medium_rate, "min_sessions": min_sessions}
    if len(sessions) < min_sessions:
        th.update(score=math.inf, score_high=math.inf, novelty=math.inf)
        art.update(thresholds=th, vocabulary=F.vocabulary(ev) if ev.height else {"total": 0, "counts": {}},
                   training={**training, "cold_start": True})
        return art
    order = sorted(sessions)
    random.Random(seed).shuffle(order)
    n_cal = max(1, int(len(order) * holdout))
    cal, fit = set(order[:n_cal]), set(order[n_cal:])
    vocab_fit = F.vocabulary(ev.filter(pl.col("session_id").is_in(fit)))
    feats, _ = F.session_features(ev.filter(pl.col("session_id").is_in(cal)), vocab_fit)
    scores = base.score(feats)
    novelty = feats["rarity_max"].to_numpy()
    th["score"] = max(float(th["score"]), _quantile_above(scores, medium_rate / 2))
    th["score_high"] = max(float(th.get("score_high", th["score"])), th["score"])
    th["novelty"] = _quantile_above(novelty, medium_rate / 2)
    medium = float(np.mean((scores >= th["score"]) | (novelty >= th["novelty"])))
    art.update(thresholds=th, vocabulary=F.vocabulary(ev),
               training={**training, "cold_start": False, "fit_sessions": len(fit), "calibration_sessions": len(cal),
                         "calibration_medium_rate": medium})
    art["baseline"] = {**art.get("baseline", {}), **_p99(feats)}
    return art


def _p99(feats: pl.DataFrame) -> dict:
    from .model import baseline_stats

    return baseline_stats(feats, F.feature_names()) if feats.height else {}


def train_from_warehouse(warehouse, base: AnomalyModel | None = None, *, rules_dirs=None, **kw) -> dict:
    """Run the rules over every session of ``warehouse`` (an open `Warehouse`), then train the
    deployment's artifact on the sessions they left quiet (see `train_deployment`)."""
    from . import prepare as P
    from .engine import Detector
    from .model import DEFAULT_MODEL

    base = base or AnomalyModel.load(DEFAULT_MODEL)
    det = Detector(warehouse, rules_dirs=rules_dirs, model=None)
    det.detect(det.all_sessions())
    try:
        P.prepare(det.con, det.lists, None)
        ev = F.load_events(det.con)
        sessions = history_sessions(det.con)
    finally:
        P.drop(det.con)
    return train_deployment(ev, base, sessions, **kw)
