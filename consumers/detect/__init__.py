"""Detection: declarative sequence rules and an anomaly model over the warehouse, raising alerts.

`Detector` (engine.py) runs a detection pass; `rules.py` loads and compiles rules; `prepare.py`
builds the ``detect_events`` relation they read; `features.py` and `model.py` are the model's
features (polars) and its JSON artifact. The stage imports only the core (`schemas`).
"""

from .engine import DetectResult, Detector, alert_id
from .model import DEFAULT_MODEL, AnomalyModel, ModelError
from .prepare import RuleError
from .rules import Rule, load_rules, rule_dirs

__all__ = ["AnomalyModel", "DEFAULT_MODEL", "DetectResult", "Detector", "ModelError", "Rule", "RuleError",
           "alert_id", "load_rules", "rule_dirs"]
