"""The anomaly model of a deployment: `train_model` trains it on the warehouse's own history and
saves it in the home, `model_status` says which model detection uses, `resolve_model` picks it.

The shipped artifact (consumers/detect/models/isoforest-v1.json) was trained on the simulator: on
real agents' sessions its novelty score flags nearly every session. `train_model` keeps its
isolation forest and learns the rest from this warehouse (consumers/detect/baseline.py): the
vocabulary of the sessions no rule raised a high or critical alert on, and thresholds calibrated so
that at most ``medium_rate`` (2 %) of held-out history sessions would get a model alert. With fewer
than ``min_sessions`` (50) history sessions it is a *cold start*: the saved model raises no model
alert at all (scores are still written) until it is trained again on more history.

The model is saved in the home, one per warehouse (``models/deployment-<key>.json``, owner-only),
and every detection over that warehouse (`agentledger detect`, `ingest --detect`) loads it unless
``--model`` / ``AGENTLEDGER_MODEL`` says otherwise. Its digest (sha256 of its canonical JSON, the
first 16 hex digits) is recorded with every alert it raises (``detector_version``) and in the
detection state, so a retrained model re-examines every session on the next pass.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from agentledger.schemas import envvars
from agentledger.schemas.config import Settings

MODEL_ENV = "AGENTLEDGER_MODEL"
MIN_SESSIONS = 50  # consumers/detect/baseline.py (not imported here: the CLI's start-up stays light)
MEDIUM_RATE = 0.02


def warehouse_key(s: Settings) -> str:
    """Which warehouse a deployment model belongs to: a digest of the configured warehouse (never
    the string itself, which may carry a catalog's credentials)."""
    return hashlib.sha256(s.warehouse.encode()).hexdigest()[:12]


def deployment_model_path(s: Settings) -> Path:
    """Where `train_model` saves the model of the configured warehouse."""
    return s.home / "models" / f"deployment-{warehouse_key(s)}.json"


def resolve_model(model: str | Path | None = None, no_model: bool = False, *,
                  s: Settings | None = None) -> Path | bool | None:
    """The model detection loads: a path, the shipped default (True), or none (None). In order:
    ``no_model``; ``model`` (a path, or 'none'); $AGENTLEDGER_MODEL; with settings ``s``, the model
    `train_model` saved for that warehouse; the shipped one."""
    if no_model:
        return None
    value = model or envvars.raw(MODEL_ENV)
    if not value:
        if s is not None and deployment_model_path(s).is_file():
            return deployment_model_path(s)
        return True
    if str(value).lower() in ("none", "off", "0"):
        return None
    return Path(value)


@dataclass
class ModelInfo:
    """One model artifact: where it is, its id and digest, and how (on what) it was trained."""

    path: str
    model_id: str
    digest: str
    baseline: str  # "deployment" (trained on this warehouse) or "shipped" (the simulator's)
    cold_start: bool = False
    history_sessions: int | None = None
    min_sessions: int | None = None
    fit_sessions: int | None = None
    calibration_sessions: int | None = None
    medium_rate_target: float | None = None
    calibration_medium_rate: float | None = None
    thresholds: dict = field(default_factory=dict)
    trained_at: str | None = None
    base_model: str | None = None

    @classmethod
    def of(cls, model) -> "ModelInfo":
        """From a loaded `AnomalyModel`."""
        t = model.artifact.get("training") or {}
        deployment = t.get("baseline") == "deployment"
        return cls(path=model.source, model_id=model.model_id, digest=model.digest,
                   baseline="deployment" if deployment else "shipped", cold_start=bool(t.get("cold_start")),
                   history_sessions=t.get("history_sessions"), min_sessions=t.get("min_sessions"),
                   fit_sessions=t.get("fit_sessions"), calibration_sessions=t.get("calibration_sessions"),
                   medium_rate_target=t.get("medium_rate_target"),
                   calibration_medium_rate=t.get("calibration_medium_rate"),
                   thresholds={k: (None if isinstance(v, float) and math.isinf(v) else v)
                               for k, v in (model.artifact.get("thresholds") or {}).items()},
                   trained_at=t.get("trained_at"), base_model=t.get("base_model"))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelStatus:
    """Which model detection over the configured warehouse uses (``model``; None: rules only) and
    where that choice comes from (``source``: "--model", "AGENTLEDGER_MODEL", "deployment" or
    "shipped"), and the warehouse's own deployment model, if any."""

    source: str
    model: ModelInfo | None
    deployment_path: str
    deployment: ModelInfo | None

    def as_dict(self) -> dict:
        return {"source": self.source, "model": self.model.as_dict() if self.model else None,
                "deployment_path": self.deployment_path,
                "deployment": self.deployment.as_dict() if self.deployment else None}


def _load(path: Path | bool):
    from agentledger.consumers.detect.model import DEFAULT_MODEL, AnomalyModel

    return AnomalyModel.load(DEFAULT_MODEL if path is True else path)


def model_status(s: Settings, model: str | Path | None = None, no_model: bool = False) -> ModelStatus:
    """The model `detect` would load with these options (see `resolve_model`), and the deployment
    model saved for this warehouse, if any."""
    chosen = resolve_model(model, no_model, s=s)
    dep_path = deployment_model_path(s)
    if no_model or model:
        source = "--model"
    elif envvars.raw(MODEL_ENV):
        source = MODEL_ENV
    elif chosen is True:
        source = "shipped"
    else:
        source = "deployment"
    deployment = ModelInfo.of(_load(dep_path)) if dep_path.is_file() else None
    info = None
    if chosen is not None:
        info = deployment if source == "deployment" and deployment else ModelInfo.of(_load(chosen))
    return ModelStatus(source, info, str(dep_path), deployment)


def train_model(s: Settings, *, rules_dirs: Sequence[Path] | None = None, min_sessions: int = MIN_SESSIONS,
                medium_rate: float = MEDIUM_RATE, out: str | Path | None = None, seed: int = 0) -> ModelInfo:
    """Train the deployment's model on the configured warehouse's own history and save it.

    Runs the rules (built-in, $AGENTLEDGER_RULES_DIR, ``rules_dirs``) over every session -- their
    alerts are written as `detect` would -- and trains on the sessions none of them raised a high or
    critical alert on: vocabulary from them, thresholds calibrated on a held-out part so that at most
    ``medium_rate`` of them would get a model alert (consumers/detect/baseline.py). Fewer than
    ``min_sessions`` of them: a cold-start model, which raises no model alert. Saved atomically to
    ``out``, else `deployment_model_path` (which detection then loads by default)."""
    from agentledger.consumers.detect.baseline import train_from_warehouse
    from agentledger.consumers.detect.model import AnomalyModel, save
    from agentledger.schemas.warehouse import open_for

    if not 0 < medium_rate < 1:
        raise ValueError(f"medium_rate must be between 0 and 1, not {medium_rate}")
    with open_for(s) as wh:
        wh.lock_down()  # rules are SQL: no file or network access beyond the warehouse while they run
        art = train_from_warehouse(wh, rules_dirs=[Path(d) for d in rules_dirs or []], min_sessions=min_sessions,
                                   medium_rate=medium_rate, seed=seed)
    art["training"].update(trained_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           warehouse_key=warehouse_key(s))
    path = save(art, Path(out) if out is not None else deployment_model_path(s))
    return ModelInfo.of(AnomalyModel.load(path))  # as detection will load it (same digest)
