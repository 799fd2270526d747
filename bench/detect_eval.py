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

The anomaly model on its own: AUC of its isolation score and of its novelty (attack vs benign
sessions, from `anomaly_scores`), and the share of benign sessions it raises a medium (or higher)
alert on -- target <= 2 %.

Speed: `detect` seconds per 100k events, with `ingest` of the same events in the same run as the
baseline: ratio = detect time / ingest time, target <= 1.5. Both as the user sees them (the
commands' wall time, process start included) and inside the commands (the pass's own seconds).

Prints the per-scenario confusion matrix (rules, model, and both), benign near-misses that drew
an alert, and a JSON line last.

    .venv/bin/python bench/detect_eval.py --sessions 2000 --seed 9_412_733

`--corpus` scores the realistic corpus instead (tests/codex_corpus.py: the quiet attacks of issue 22
in ten classes and benign near-misses), in each shape -- Codex rollouts imported with `agentledger
import codex-rollout`, and the same scenarios as Claude Code transcripts imported with `agentledger
import claude-code`: per shape, recall per class (a high/critical alert from the rule made for it),
the benign high-alert rate, the model's medium-alert rate on benign sessions and its AUC -- with the
shipped model, and with a per-deployment baseline trained on `--history-seeds` copies of the benign
corpus in that shape (consumers/detect/baseline.py).

    .venv/bin/python bench/detect_eval.py --corpus [--history-seeds 1,2,3] [--shapes codex,claude]
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


def auc(pos: list[float], neg: list[float]) -> float | None:
    """Probability that an attack session scores above a benign one (ties count half)."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def corpus_eval(work: Path, history_seeds: list[int], shapes: list[str]) -> dict:
    sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's agentledger, and the corpus
    from codex_corpus import SHAPES  # noqa: E402 (the corpus lives with the tests)

    bad = set(shapes) - set(SHAPES)
    if bad:
        sys.exit(f"--shapes: unknown {sorted(bad)}; known: {', '.join(SHAPES)}")
    out = {"shapes": {}}
    for shape in shapes:
        print(f"\n== {shape} ==")
        out["shapes"][shape] = corpus_eval_shape(work / shape, history_seeds, shape)
    print("\nper shape: caught/attacks, benign with a high alert, benign with a model alert (shipped -> deployment)")
    for shape, res in out["shapes"].items():
        m = res["models"]
        dep = m.get("deployment")
        print(f"  {shape:7s} {m['shipped']['caught']}/{m['shipped']['attacks']}, "
              f"{m['shipped']['benign_high']}/{m['shipped']['benign']}, {m['shipped']['benign_model_alert_rate']:.1%}"
              + (f" -> {dep['benign_model_alert_rate']:.1%}" if dep else ""))
    return out


def corpus_eval_shape(work: Path, history_seeds: list[int], shape: str) -> dict:
    from codex_corpus import IMPORTER, write_corpus  # noqa: E402 (the corpus lives with the tests)

    sessions = write_corpus(work / "sessions", shape=shape)
    models: list[tuple[str, str | None]] = [("shipped", None)]
    if history_seeds:
        hist = work / "history-home"
        for seed in history_seeds:
            write_corpus(work / "history", seed=seed, benign_only=True, shape=shape)
        cli(hist, "import", IMPORTER[shape], str(work / "history"))
        cli(hist, "ingest", "--until-caught-up")
        out, _ = cli(hist, "model", "train", "--out", str(work / "deployment-model.json"), "--format", "json")
        trained = json.loads(out)
        print(f"deployment model: trained on {trained['history_sessions']} history sessions, "
              f"{trained['calibration_medium_rate']:.1%} of {trained['calibration_sessions']} held-out ones alerted")
        models.append(("deployment", trained["path"]))
    out: dict = {"sessions": len(sessions), "models": {}}
    for name, model in models:
        home = work / f"home-{name}"
        cli(home, "import", IMPORTER[shape], str(work / "sessions"))
        _, t_ingest = cli(home, "ingest", "--until-caught-up")
        _, t_detect = cli(home, "detect", *(["--model", model] if model else []))
        rows, _ = cli(home, "sql", "SELECT session_id, rule_id, detector, severity FROM alerts", "--format", "json")
        scores, _ = cli(home, "sql", "SELECT session_id, score, features['rarity_max'] AS novelty FROM anomaly_scores",
                        "--format", "json")
        alerts = collections.defaultdict(list)
        for r in json.loads(rows):
            alerts[r["session_id"]].append(r)
        sc = {r["session_id"]: (r["score"], r["novelty"]) for r in json.loads(scores)}
        per: dict = collections.defaultdict(lambda: {"sessions": 0, "caught": 0})
        benign_high = benign_medium = 0
        for sid, r in sessions.items():
            got = alerts.get(sid, [])
            if r.label == "benign":
                benign_high += any(a["severity"] in HIGH for a in got)
                benign_medium += any(a["detector"] == "model" for a in got)
            else:
                per[r.label]["sessions"] += 1
                per[r.label]["caught"] += any(a["rule_id"] in r.expect and a["severity"] in HIGH for a in got)
        n_benign = sum(1 for r in sessions.values() if r.label == "benign")
        pos = [sc[s] for s, r in sessions.items() if r.label != "benign" and s in sc]
        neg = [sc[s] for s, r in sessions.items() if r.label == "benign" and s in sc]
        res = {"per_class": dict(per), "attacks": sum(v["sessions"] for v in per.values()),
               "caught": sum(v["caught"] for v in per.values()), "benign": n_benign, "benign_high": benign_high,
               "benign_high_rate": benign_high / n_benign, "benign_model_alert_rate": benign_medium / n_benign,
               "every_class_caught": all(v["caught"] == v["sessions"] for v in per.values()),
               "auc_score": auc([p[0] for p in pos], [n[0] for n in neg]),
               "auc_novelty": auc([p[1] or 0.0 for p in pos], [n[1] or 0.0 for n in neg]),
               "detect_s": round(t_detect, 2), "ingest_s": round(t_ingest, 2)}
        out["models"][name] = res
        print(f"\n[{shape}, {name} model] detected {res['caught']}/{res['attacks']} attacks by their rule; "
              f"benign: {benign_high}/{n_benign} with a high alert, {res['benign_model_alert_rate']:.1%} with a model "
              f"(medium+) alert; model AUC: score {res['auc_score']:.3f}, novelty {res['auc_novelty']:.3f}")
        for k, v in sorted(per.items()):
            print(f"  {k:24s} {v['caught']}/{v['sessions']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", action="store_true",
                    help="score the realistic corpus (tests/codex_corpus.py), as Codex rollouts and Claude Code transcripts")
    ap.add_argument("--shapes", default="codex,claude", help="with --corpus: the shapes to score")
    ap.add_argument("--history-seeds", default="1,2,3",
                    help="with --corpus: copies of the benign corpus the deployment baseline is trained on ('' = none)")
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--attack-rate", type=float, default=0.1)
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--target-benign", type=float, default=0.02)
    ap.add_argument("--target-medium", type=float, default=0.02, help="benign sessions with a model alert")
    ap.add_argument("--target-speed-ratio", type=float, default=1.5, help="detect time / ingest time")
    ap.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers: the events (and alerts) go "
                                                     "through Kafka instead of the embedded log")
    args = ap.parse_args()
    if not args.corpus and args.seed is None:
        ap.error("--seed is required (or --corpus)")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="agentledger-detect-eval-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    if args.corpus:
        seeds = [int(x) for x in args.history_seeds.split(",") if x.strip()]
        print(json.dumps(corpus_eval(work, seeds, [x.strip() for x in args.shapes.split(",") if x.strip()])))
        if tmp is not None:
            tmp.cleanup()
        return
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
    ing = json.loads(out.strip().splitlines()[-1])
    out, t_detect = cli(home, "detect", "--format", "json")
    det = json.loads(out.strip().splitlines()[-1])
    out, _ = cli(home, "detect", "--format", "json")  # again: nothing is pending, nothing changes
    again = json.loads(out.strip().splitlines()[-1])
    out, _ = cli(home, "sql", "SELECT session_id, detector, severity FROM alerts", "--format", "json")
    alerts = [(r["session_id"], r["detector"], r["severity"]) for r in json.loads(out)]
    labels = [json.loads(line) for line in labels_path.read_text().splitlines()]
    ev = evaluate(labels, alerts)
    print_report(ev)
    out, _ = cli(home, "sql", "SELECT session_id, score, features['rarity_max'] AS novelty, anomalous "
                              "FROM anomaly_scores", "--format", "json")
    sc = {r["session_id"]: r for r in json.loads(out)}
    pos = [sc[l["session_id"]] for l in labels if l["attack"] and l["session_id"] in sc]
    neg = [sc[l["session_id"]] for l in labels if not l["attack"] and l["session_id"] in sc]
    model_auc = {"auc_score": auc([r["score"] for r in pos], [r["score"] for r in neg]),
                 "auc_novelty": auc([r["novelty"] or 0.0 for r in pos], [r["novelty"] or 0.0 for r in neg])}
    medium = ev["model_any_severity_benign_rate"]
    events = sim["events"]
    ratio_wall = t_detect / t_ingest
    ratio_inner = det["seconds"] / ing["seconds"] if ing.get("seconds") else None
    print(f"model: AUC {model_auc['auc_score']:.3f} (isolation score), {model_auc['auc_novelty']:.3f} (novelty); "
          f"medium+ model alerts on {medium:.2%} of benign sessions (target <= {args.target_medium:.0%})")
    print(f"speed: detect {t_detect / events * 100_000:.2f} s per 100k events, ingest {t_ingest / events * 100_000:.2f} s "
          f"(ratio {ratio_wall:.2f}, target <= {args.target_speed_ratio}); inside the commands: detect "
          f"{det['seconds']:.2f} s, ingest {ing.get('seconds', float('nan')):.2f} s"
          + (f" (ratio {ratio_inner:.2f})" if ratio_inner else ""))
    result = {
        "seed": args.seed, "transport": "kafka" if args.bootstrap else "embedded log",
        "sessions": sim["sessions"], "events": events, **{k: v for k, v in ev.items()},
        "alerts": len(alerts), "alerts_high_or_critical": sum(1 for a in alerts if a[2] in HIGH),
        **model_auc, "benign_medium_alert_rate": medium,
        "medium_target_met": medium is not None and medium <= args.target_medium,
        "detect_s": round(t_detect, 3), "detect_inner_s": det["seconds"], "ingest_s": round(t_ingest, 3),
        "ingest_inner_s": ing.get("seconds"),
        "detect_s_per_100k_events": round(t_detect / events * 100_000, 3),
        "ingest_s_per_100k_events": round(t_ingest / events * 100_000, 3),
        "ratio_detect_to_ingest": round(ratio_wall, 3),
        "ratio_detect_to_ingest_inner": round(ratio_inner, 3) if ratio_inner else None,
        "speed_target_met": ratio_wall <= args.target_speed_ratio,
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
