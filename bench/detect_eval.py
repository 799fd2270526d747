"""Evaluation: detection quality on the simulator's labelled sessions, and detection speed.

Runs the product end to end in a fresh AGENTLEDGER_HOME, exactly as a user would:

    agentledger simulate --sessions N --seed S --labels labels.jsonl
    agentledger ingest --until-caught-up
    agentledger detect

then reads the `alerts` table and scores it against the labels file -- which only this script
reads: the detector never sees it. An attack session counts as detected when it has at least one
high or critical alert; a benign session with one is a false alarm.

Quality target (issue 6): recall >= 95 % of attack sessions, high/critical alerts on <= 2 % of
benign sessions, on a seed never used in development.

Speed: `detect` seconds per 100k events, with `ingest` of the same events in the same run as the
baseline (ratio = detect time / ingest time).

Prints the per-scenario confusion matrix (rules, model, and both), benign near-misses that drew
an alert, and a JSON line last.

    .venv/bin/python bench/detect_eval.py --sessions 2000 --seed 9_412_733
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIGH = ("high", "critical")


EXTRA_ENV: dict[str, str] = {}


def cli(home: Path, *args: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLEDGER_")}
    env.update({"AGENTLEDGER_HOME": str(home), "PYTHONPATH": str(REPO), "COLUMNS": "200", **EXTRA_ENV})
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "agentledger", *args], env=env, cwd=REPO, capture_output=True,
                          text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"agentledger {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout, dt


def evaluate(labels: list[dict], alerts: list[tuple]) -> dict:
    """Per-scenario counts for rules, model and both, from labels and (session, detector, severity) rows."""
    hi = collections.defaultdict(set)
    model_any = set()
    for sid, detector, severity in alerts:
        if severity in HIGH:
            hi[sid].add(detector)
        if detector == "model":
            model_any.add(sid)
    per = collections.OrderedDict()
    near = collections.Counter()
    near_total = collections.Counter()
    for l in sorted(labels, key=lambda l: (l["scenario"] != "benign", l["scenario"])):
        row = per.setdefault(l["scenario"], {"sessions": 0, "alerted": 0, "rules": 0, "model": 0})
        got = hi.get(l["session_id"], set())
        row["sessions"] += 1
        row["alerted"] += bool(got)
        row["rules"] += "rule" in got
        row["model"] += "model" in got
        if not l["attack"]:
            for nm in l.get("near_misses", []):
                near_total[nm] += 1
                near[nm] += bool(got)
    attacks = [l for l in labels if l["attack"]]
    benign = [l for l in labels if not l["attack"]]
    tp = sum(1 for l in attacks if hi.get(l["session_id"]))
    fp = sum(1 for l in benign if hi.get(l["session_id"]))

    def rate(a, b):
        return round(a / b, 4) if b else None

    return {
        "attack_sessions": len(attacks), "benign_sessions": len(benign), "detected": tp, "false_alarms": fp,
        "recall": rate(tp, len(attacks)), "benign_alert_rate": rate(fp, len(benign)),
        "precision": rate(tp, tp + fp),
        "rules_recall": rate(sum(1 for l in attacks if "rule" in hi.get(l["session_id"], ())), len(attacks)),
        "model_recall": rate(sum(1 for l in attacks if "model" in hi.get(l["session_id"], ())), len(attacks)),
        "rules_benign_alert_rate": rate(sum(1 for l in benign if "rule" in hi.get(l["session_id"], ())), len(benign)),
        "model_benign_alert_rate": rate(sum(1 for l in benign if "model" in hi.get(l["session_id"], ())), len(benign)),
        # the model's medium alerts too (novelty or an unusual score alone)
        "model_any_severity_recall": rate(sum(1 for l in attacks if l["session_id"] in model_any), len(attacks)),
        "model_any_severity_benign_rate": rate(sum(1 for l in benign if l["session_id"] in model_any), len(benign)),
        "per_scenario": per,
        "near_misses": {k: {"sessions": near_total[k], "alerted": near[k]} for k in sorted(near_total)},
    }


def print_report(ev: dict) -> None:
    print(f"{'scenario':26s} {'sessions':>8s} {'alerted':>8s} {'missed':>7s} {'rate':>6s}   {'rules':>6s} {'model':>6s}")
    for name, r in ev["per_scenario"].items():
        missed = r["sessions"] - r["alerted"]
        label = "benign (false alarms)" if name == "benign" else name
        print(f"{label:26s} {r['sessions']:8d} {r['alerted']:8d} {missed:7d} {r['alerted'] / r['sessions']:6.1%}"
              f"   {r['rules']:6d} {r['model']:6d}")
    print(f"\nrecall {ev['recall']:.2%} of {ev['attack_sessions']} attack sessions (rules {ev['rules_recall']:.2%}, "
          f"model {ev['model_recall']:.2%}); high/critical alerts on {ev['benign_alert_rate']:.2%} of "
          f"{ev['benign_sessions']} benign sessions (rules {ev['rules_benign_alert_rate']:.2%}, "
          f"model {ev['model_benign_alert_rate']:.2%}); model alerts of any severity: "
          f"{ev['model_any_severity_recall']:.2%} of attacks, {ev['model_any_severity_benign_rate']:.2%} of benign")
    hit = {k: v for k, v in ev["near_misses"].items() if v["alerted"]}
    print("benign near-misses with a high/critical alert:", hit or "none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--attack-rate", type=float, default=0.1)
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--target-benign", type=float, default=0.02)
    ap.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers: the events (and alerts) go "
                                                     "through Kafka instead of the embedded log")
    args = ap.parse_args()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="agentledger-detect-eval-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    labels_path = work / "labels.jsonl"
    if args.bootstrap:
        run = f"detect-eval-{args.seed}-{os.getpid()}-{int(time.time())}"
        EXTRA_ENV.update({"AGENTLEDGER_BOOTSTRAP_SERVERS": args.bootstrap, "AGENTLEDGER_TOPIC": f"{run}.events",
                          "AGENTLEDGER_ALERTS_TOPIC": f"{run}.alerts"})
    out, t_sim = cli(home, "simulate", "--sessions", str(args.sessions), "--seed", str(args.seed), "--attack-rate",
                     str(args.attack_rate), "--labels", str(labels_path), "--format", "json")
    sim = json.loads(out.strip().splitlines()[-1])
    out, t_ingest = cli(home, "ingest", "--until-caught-up", "--format", "json")
    out, t_detect = cli(home, "detect", "--format", "json")
    det = json.loads(out.strip().splitlines()[-1])
    out, _ = cli(home, "detect", "--format", "json")  # again: nothing is pending, nothing changes
    again = json.loads(out.strip().splitlines()[-1])
    out, _ = cli(home, "sql", "SELECT session_id, detector, severity FROM alerts", "--format", "json")
    alerts = [(r["session_id"], r["detector"], r["severity"]) for r in json.loads(out)]
    labels = [json.loads(line) for line in labels_path.read_text().splitlines()]
    ev = evaluate(labels, alerts)
    print_report(ev)
    events = sim["events"]
    result = {
        "seed": args.seed, "transport": "kafka" if args.bootstrap else "embedded log",
        "sessions": sim["sessions"], "events": events, **{k: v for k, v in ev.items()},
        "alerts": len(alerts), "alerts_high_or_critical": sum(1 for a in alerts if a[2] in HIGH),
        "detect_s": round(t_detect, 3), "detect_inner_s": det["seconds"], "ingest_s": round(t_ingest, 3),
        "detect_s_per_100k_events": round(det["seconds"] / events * 100_000, 3),
        "ingest_s_per_100k_events": round(t_ingest / events * 100_000, 3),
        "ratio_detect_to_ingest": round(det["seconds"] / t_ingest, 3),
        "published": det["published"], "timings": det["timings"], "second_run_sessions": again["sessions"],
        "second_run_changes": again["alerts_new"] + again["alerts_updated"],
        "target_met": bool(ev["recall"] is not None and ev["recall"] >= args.target_recall
                           and ev["benign_alert_rate"] is not None and ev["benign_alert_rate"] <= args.target_benign),
    }
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
