"""model train, model show: the per-deployment anomaly model (agentledger.api.models)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from agentledger import api

from ..output import console, print_json
from .options import StrictTableOrJson, TableOrJsonOnly, rule_dirs, settings

model_app = typer.Typer(
    help="The anomaly model of this deployment: train it on the warehouse's own history, show which one "
         "detection uses.\n\nExample:  agentledger model train",
    no_args_is_help=True,
)


def _describe(m: api.ModelInfo) -> list[str]:
    lines = [f"model {m.model_id} (digest {m.digest}) at {m.path}"]
    if m.baseline == "shipped":
        lines.append("  the shipped model, trained on the simulator's sessions: on real agents' sessions it raises "
                     "medium alerts on most benign sessions; run `agentledger model train`")
        return lines
    lines.append(f"  trained {m.trained_at or '?'} on {m.history_sessions} sessions no rule raised a high or "
                 f"critical alert on (base model {m.base_model})")
    if m.cold_start:
        lines.append(f"  cold start: fewer than {m.min_sessions} history sessions, so this model raises no model "
                     f"alert (every session is still scored); train again once the warehouse holds more")
    else:
        rate = m.calibration_medium_rate
        lines.append(f"  calibrated on {m.calibration_sessions} held-out sessions (vocabulary from {m.fit_sessions}): "
                     f"{rate:.1%} of them would get a model alert (target ≤ {m.medium_rate_target:.0%})")
        th = m.thresholds
        lines.append(f"  thresholds: isolation score {th.get('score'):.3f} (high {th.get('score_high'):.3f}), "
                     f"novelty {th.get('novelty'):.2f}")
    return lines


@model_app.command("train")
def train(
    ctx: typer.Context,
    rules_dir: Optional[List[Path]] = typer.Option(None, "--rules-dir", help="More rules (repeatable; also "
                                                   "$AGENTLEDGER_RULES_DIR): sessions they flag are not history."),
    min_sessions: int = typer.Option(api.models.MIN_SESSIONS, "--min-sessions", min=1,
                                     help="Fewer history sessions than this: cold start (no model alerts)."),
    medium_rate: float = typer.Option(api.models.MEDIUM_RATE, "--medium-rate", min=0.001, max=0.5,
                                      help="At most this share of held-out history sessions may get a model alert."),
    out: Optional[Path] = typer.Option(None, "--out", help="Save it here instead (detection then needs --model "
                                                           "PATH). [default: HOME/models/deployment-<warehouse>.json]"),
    fmt: StrictTableOrJson = TableOrJsonOnly.table,
) -> None:
    """Train the anomaly model on this warehouse's own history and save it; detection then uses it.

    Runs the rules over every session first (their alerts are written, as `detect` does) and learns
    from the sessions none of them raised a high or critical alert on: what is usual here, and
    thresholds so that at most --medium-rate of held-out sessions would get a model alert. With fewer
    than --min-sessions of them it is a cold start: the model raises no alert until trained again.

    Example:  agentledger model train && agentledger detect --all
    """
    m = api.train_model(settings(ctx), rules_dirs=rule_dirs(rules_dir), min_sessions=min_sessions,
                        medium_rate=medium_rate, out=out)
    if fmt is TableOrJsonOnly.json:
        print_json(m.as_dict())
        return
    for line in _describe(m):
        console.print(line, highlight=False, soft_wrap=True)
    if out is None:
        console.print("detection over this warehouse uses it from now on (`agentledger detect --all` re-examines "
                      "every session with it)", highlight=False, soft_wrap=True)


@model_app.command("show")
def show(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="As `detect --model` would: a path, or 'none'."),
    fmt: StrictTableOrJson = TableOrJsonOnly.table,
) -> None:
    """Which anomaly model detection over this warehouse uses, its digest and how it was trained.

    Example:  agentledger model show --format json
    """
    st = api.model_status(settings(ctx), model)
    if fmt is TableOrJsonOnly.json:
        print_json(st.as_dict())
        return
    why = {"--model": "chosen with --model", api.models.MODEL_ENV: f"chosen by ${api.models.MODEL_ENV}",
           "deployment": "this warehouse's own model (`agentledger model train`)",
           "shipped": f"no model trained for this warehouse yet ({st.deployment_path})"}[st.source]
    console.print(f"detection uses: {'no model, rules only' if st.model is None else 'a model'} ({why})",
                  highlight=False, soft_wrap=True)
    if st.model is not None:
        for line in _describe(st.model):
            console.print(line, highlight=False, soft_wrap=True)
    if st.deployment is not None and st.source not in ("deployment",):
        console.print(f"this warehouse's own model, not in use: {st.deployment.model_id} (digest "
                      f"{st.deployment.digest}) at {st.deployment_path}", highlight=False, soft_wrap=True)
