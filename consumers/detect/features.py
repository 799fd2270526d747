"""Per-session (and per-window) behaviour features, computed with polars from ``detect_events``.

The same code runs in the pipeline (scoring) and in notebooks/02_anomaly_model.ipynb (training), so a
model is always scored on exactly the features it was trained on; the feature list is part of the
model artifact and `FEATURE_VERSION` changes whenever a definition does.

Three groups, all generic (no feature names an attack):

* counts of kinds of behaviour per session (commands, file events outside the workspace, hosts
  outside the allowlist, refused approvals, escalations, secrets in outputs...), as log1p;
* per-window peaks: the busiest 2-minute window of each session for events, refused approvals,
  deletions and network attempts;
* rarity: every event gets a coarse *token* (``cmd:curl``, ``file:delete:home``,
  ``net:raw_ip:other_port:POST:allow``...); the model carries the token frequencies of its benign
  training sessions, and a session's rarity features say how surprising its rarest events are
  (a token never seen in training gets the smoothed minimum frequency).

Every count feature also yields its evidence: the seqs of the events it counted, so a model alert
can cite events like a rule does.
"""

from __future__ import annotations

import math
from functools import lru_cache

import duckdb
import polars as pl

from agentledger.schemas.sql import idents

FEATURE_VERSION = "features-v1"
WINDOW = "2m"

# Columns of detect_events the features read.
COLUMNS = ["session_id", "seq", "ts", "kind", "program", "escalated", "cmd_status", "exit_code", "output_secrets",
           "redactions", "file_op", "path", "inside_ws", "host", "port", "method", "host_allowed", "host_raw_ip",
           "net_decision", "bytes_out", "action_kind", "decision", "denied_op", "cmd_hosts_not_allowed"]

_REFUSED = ["denied", "timed_out", "aborted"]


def _predicates() -> dict[str, pl.Expr]:
    """name -> which events a count feature counts."""
    k = pl.col("kind")
    outside = pl.col("inside_ws").fill_null(False).not_() & ~pl.col("path").fill_null("").str.starts_with("/tmp/")
    return {
        "events": pl.lit(True),
        "commands": k == "command_started",
        "failed_commands": (k == "command_started") & pl.col("cmd_status").is_in(["failed", "killed", "timed_out"]),
        "file_reads": (k == "file_accessed") & (pl.col("file_op") == "read"),
        "file_writes": (k == "file_accessed") & pl.col("file_op").is_in(["write", "create", "rename", "chmod"]),
        "deletes": (k == "file_accessed") & (pl.col("file_op") == "delete"),
        "outside_file_events": (k == "file_accessed") & outside,
        "outside_deletes": (k == "file_accessed") & (pl.col("file_op") == "delete") & outside,
        "net_attempts": k == "network_attempted",
        "net_not_allowed": (k == "network_attempted") & ~pl.col("host_allowed").fill_null(True),
        "net_raw_ip": (k == "network_attempted") & pl.col("host_raw_ip").fill_null(False),
        "net_denied": (k == "network_attempted") & (pl.col("net_decision") == "deny"),
        "net_uploads": (k == "network_attempted") & pl.col("method").is_in(["POST", "PUT", "PATCH"]),
        "cmd_urls_not_allowed": (k == "command_started") & (pl.col("cmd_hosts_not_allowed").list.len() > 0),
        "approvals": k == "approval_requested",
        "approvals_refused": (k == "approval_requested") & pl.col("decision").is_in(_REFUSED),
        "escalated_commands": (k == "command_started") & pl.col("escalated").fill_null(False),
        "sandbox_denied": k == "sandbox_denied",
        "output_secrets": (k == "command_started") & (pl.col("output_secrets").fill_null(0) > 0),
        "input_secrets": (k == "command_started") & (pl.col("redactions").fill_null(0) > 0),
    }


WINDOW_FEATURES = {
    "peak_events_2m": "events",
    "peak_refused_2m": "approvals_refused",
    "peak_deletes_2m": "deletes",
    "peak_net_2m": "net_attempts",
}
RARITY_FEATURES = ["rarity_max", "rarity_top3", "rare_events"]


@lru_cache(maxsize=1)
def _feature_names() -> tuple[str, ...]:
    return (*_predicates(), "distinct_programs", "distinct_hosts_not_allowed", "bytes_out_not_allowed",
            *WINDOW_FEATURES, *RARITY_FEATURES)


def feature_names() -> list[str]:
    return list(_feature_names())


def load_events(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """``detect_events`` (already prepared on ``con``) as a polars frame: DuckDB -> Arrow -> polars."""
    cols = idents(COLUMNS)
    return pl.from_arrow(con.execute(f"SELECT {cols} FROM detect_events ORDER BY session_id, seq").to_arrow_table())


def tokens(ev: pl.DataFrame) -> pl.Series:
    """A coarse, generic token per event (what kind of thing happened, never an identifier).

    Null for a network attempt or an approval request whose decision has not been ingested yet (a
    batch boundary fell between them): its token is not known yet, so it is not surprising yet."""
    path = pl.col("path").fill_null("")
    path_class = (pl.when(pl.col("inside_ws").fill_null(False)).then(pl.lit("ws"))
                  .when(path.str.contains(r"^/(tmp|var/tmp|private/tmp|dev/shm)/")).then(pl.lit("tmp"))
                  .when(path.str.contains(r"^(/home/[^/]+|/root|/Users/[^/]+|~)/\.")).then(pl.lit("home_dot"))
                  .when(path.str.contains(r"^(/home/|/root|/Users/|~)")).then(pl.lit("home"))
                  .when(path.str.contains(r"^/(etc|usr|var|srv|opt|boot|lib|bin|sbin|Library|System)/")).then(pl.lit("system"))
                  .otherwise(pl.lit("other")))
    port = pl.col("port")
    port_class = (pl.when(port.is_in([80, 443])).then(pl.lit("web")).when(port == 22).then(pl.lit("ssh"))
                  .when(port == 9418).then(pl.lit("git")).otherwise(pl.lit("other_port")))
    host_class = (pl.when(pl.col("host").is_in(["localhost", "127.0.0.1", "::1"])).then(pl.lit("loopback"))
                  .when(pl.col("host_allowed").fill_null(False)).then(pl.lit("allowed"))
                  .when(pl.col("host_raw_ip").fill_null(False)).then(pl.lit("raw_ip"))
                  .otherwise(pl.lit("other")))
    k = pl.col("kind")
    tok = (pl.when(k == "command_started")
           .then(pl.concat_str([pl.lit("cmd:"), pl.col("program").fill_null("?"),
                                pl.when(pl.col("escalated").fill_null(False)).then(pl.lit(":esc")).otherwise(pl.lit(""))]))
           .when(k == "file_accessed").then(pl.concat_str([pl.lit("file:"), pl.col("file_op").fill_null("?"), pl.lit(":"),
                                                           path_class]))
           .when(k == "network_attempted").then(pl.concat_str([pl.lit("net:"), host_class, pl.lit(":"), port_class, pl.lit(":"),
                                                               pl.col("method").fill_null("-"), pl.lit(":"),
                                                               pl.col("net_decision")]))
           .when(k == "approval_requested").then(pl.concat_str([pl.lit("approval:"), pl.col("action_kind").fill_null("?"),
                                                                pl.lit(":"), pl.col("decision")]))
           .when(k == "sandbox_denied").then(pl.concat_str([pl.lit("denied:"), pl.col("denied_op").fill_null("?")]))
           .otherwise(k))
    return ev.select(tok.alias("token")).to_series()


def vocabulary(ev: pl.DataFrame) -> dict:
    """Token counts of (benign training) events, for the rarity features."""
    counts = ev.with_columns(tokens(ev)).drop_nulls("token").group_by("token").len()
    return {"total": int(counts["len"].sum()), "counts": dict(zip(counts["token"].to_list(), counts["len"].to_list()))}


def session_features(ev: pl.DataFrame, vocab: dict | None = None) -> tuple[pl.DataFrame, dict[str, dict[str, list[int]]]]:
    """One row per session (``session_id`` + `feature_names()`), and the evidence seqs of each
    count feature per session: ``{session_id: {feature: [seq, ...]}}`` (non-empty ones only)."""
    preds = _predicates()
    names = feature_names()
    if ev.height == 0:
        return pl.DataFrame(schema={"session_id": pl.String, **{n: pl.Float64 for n in names}}), {}
    flags = ev.with_columns([p.alias(f"_f_{n}") for n, p in preds.items()])
    counts = flags.group_by("session_id").agg(
        *[pl.col(f"_f_{n}").sum().alias(n) for n in preds],
        pl.col("program").filter(pl.col("kind") == "command_started").n_unique().alias("distinct_programs"),
        pl.col("host").filter(pl.col("_f_net_not_allowed")).n_unique().alias("distinct_hosts_not_allowed"),
        pl.col("bytes_out").filter(pl.col("_f_net_not_allowed")).sum().alias("bytes_out_not_allowed"),
        *[pl.col("seq").filter(pl.col(f"_f_{n}")).alias(f"_ev_{n}") for n in preds if n != "events"],
    )
    windows = (flags.sort("session_id", "ts")
               .group_by_dynamic("ts", every="1m", period=WINDOW, group_by="session_id")
               .agg(*[pl.col(f"_f_{src}").sum().alias(name) for name, src in WINDOW_FEATURES.items()])
               .group_by("session_id").agg(*[pl.col(n).max() for n in WINDOW_FEATURES]))
    out = counts.join(windows, on="session_id", how="left")
    if vocab:
        total = max(1, int(vocab.get("total", 0)))
        table = pl.DataFrame({"token": list(vocab["counts"]), "_c": [float(c) for c in vocab["counts"].values()]},
                             schema={"token": pl.String, "_c": pl.Float64})
        floor = 0.5  # Laplace-style: a never-seen token counts as half an occurrence
        rare_cut = math.log10(total / 5.0)  # rarer than 5 occurrences in training
        sur = (ev.select("session_id", "seq").with_columns(tokens(ev)).join(table, on="token", how="left")
               .with_columns(pl.when(pl.col("token").is_null()).then(0.0)
                             .otherwise(math.log10(total) - pl.col("_c").fill_null(floor).log10()).alias("_s")))
        rar = sur.group_by("session_id").agg(
            pl.col("_s").max().alias("rarity_max"),
            pl.col("_s").sort(descending=True).head(3).mean().alias("rarity_top3"),
            (pl.col("_s") > rare_cut).sum().alias("rare_events"),
            pl.col("seq").filter(pl.col("_s") > rare_cut).alias("_ev_rare_events"),
        )
        out = out.join(rar, on="session_id", how="left")
    else:
        out = out.with_columns([pl.lit(0.0).alias(n) for n in RARITY_FEATURES])
    ev_cols = [c for c in out.columns if c.startswith("_ev_")]
    evidence: dict[str, dict[str, list[int]]] = {}
    for row in out.select("session_id", *ev_cols).iter_rows(named=True):
        e = {c[4:]: v for c in ev_cols if (v := row[c])}
        if e:
            evidence[row["session_id"]] = e
    feats = out.select("session_id", *[pl.col(n).cast(pl.Float64).fill_null(0.0) for n in names]).sort("session_id")
    return feats, evidence


def transform(feats: pl.DataFrame, names: list[str]) -> pl.DataFrame:
    """What the model sees: log1p of every feature (counts are heavy-tailed)."""
    return feats.select([pl.col(n).log1p().alias(n) for n in names])


def prefixes(ev: pl.DataFrame, per_session: int = 2, seed: int = 0) -> pl.DataFrame:
    """Random prefixes of each session (as extra sessions ``<id>#<cut>``): what a session looks like
    while it is still being ingested. Training on them keeps a model from flagging a session only
    because it is not finished yet."""
    import random

    rng = random.Random(seed)
    last = ev.group_by("session_id").agg(pl.col("seq").max().alias("last")).sort("session_id")
    cuts = list(dict.fromkeys((sid, rng.randint(0, n - 1)) for sid, n in last.iter_rows() if n >= 2
                              for _ in range(per_session)))
    if not cuts:
        return ev.head(0)
    cut = pl.DataFrame({"session_id": [c[0] for c in cuts], "_cut": [c[1] for c in cuts]},
                       schema={"session_id": pl.String, "_cut": pl.Int64})
    return (ev.join(cut, on="session_id").filter(pl.col("seq") <= pl.col("_cut"))
            .with_columns(pl.concat_str([pl.col("session_id"), pl.lit("#"), pl.col("_cut").cast(pl.String)])
                          .alias("session_id"))
            .drop("_cut").sort("session_id", "seq"))


def warehouse_events(con: duckdb.DuckDBPyConnection, sessions: list[str] | None = None,
                     rules_dirs: list | None = None) -> pl.DataFrame:
    """``detect_events`` of ``sessions`` (default: all) of the warehouse on ``con``, as polars -- what
    notebooks start from. Works on a read-only connection (the relation is a TEMP table)."""
    from .prepare import load_lists, prepare
    from .rules import rule_dirs

    prepare(con, load_lists(rule_dirs(rules_dirs)), sessions)
    return load_events(con)
