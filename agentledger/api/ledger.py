"""Checking and maintaining the ledger: verify, dead letters, compaction, snapshots, keys, spool."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from agentledger.schemas.config import Settings
from agentledger.schemas.errors import ConfigError, WarehouseError

from .common import Rows
from .sessions import in_warehouse


# --- verify ------------------------------------------------------------------------------------------

@dataclass
class Verification:
    """Every session's verdict (``verdicts``: session_id, ok, label, events, checkpoints, detail,
    ...) and the Merkle tree's check (``tree``); ``ok`` only when every session and the tree verify."""

    verdicts: list
    tree: Any  # schemas.treelog tree check
    keys: int
    operator_keys: int

    @property
    def broken(self) -> list:
        return [v for v in self.verdicts if not v.ok]

    @property
    def ok(self) -> bool:
        return not self.broken and self.tree.ok

    def as_dict(self) -> dict:
        return {"ok": self.ok, "sessions": len(self.verdicts), "broken": len(self.broken), "keys": self.keys,
                "operator_keys": self.operator_keys, "tree": self.tree.as_dict(),
                "results": [v.as_dict() for v in self.verdicts]}


def verify(s: Settings, sessions: Sequence[str] | None = None, *, public_keys: Sequence[Path] | None = None,
           operator_keys: Sequence[Path] | None = None, heads: Sequence[str] | None = None,
           require_signatures: bool = False, allow_open: bool = False) -> Verification:
    """Re-check sessions (ids or unique prefixes; default all) from the warehouse: every hash, the
    chain, signed checkpoints, and the Merkle tree against its signed heads and the heads
    published outside the warehouse (``heads``: files or ``kafka:TOPIC``; default the home's)."""
    from agentledger.consumers.verify import verify as run_verify
    from agentledger.schemas import treelog
    from agentledger.schemas.signing import Keyring, home_keyring, operator_key_dir
    from agentledger.schemas.warehouse import open_for

    for p in operator_keys or []:
        if not Path(p).exists():
            raise WarehouseError(f"no public key at {p}")
    keyring = home_keyring(s.home, list(public_keys or []))
    operators = Keyring.from_paths(operator_key_dir(s.home), *(operator_keys or []))
    with open_for(s, read_only=True) as wh:
        ids = [in_warehouse(wh.con, x, s.warehouse) for x in sessions or []]  # ids or unique prefixes
        sources, pin_problem = _heads_sources(s, wh.con, list(heads or []))
        tree = treelog.check_tree(wh.con, operators, sources, require_sources=bool(heads))
        if pin_problem:
            tree.problem("log_replaced", pin_problem)
        verdicts = list(run_verify(wh, ids, keyring, require_signatures=require_signatures, allow_open=allow_open,
                                   tree=tree))
    return Verification(verdicts, tree, len(keyring), len(operators))


def _heads_sources(s: Settings, con, heads: list[str]) -> tuple[list, str | None]:
    """Where published tree heads are read from: ``heads`` (files, ``kafka:TOPIC``), else the home's
    heads file of this warehouse's log and, with Kafka, the heads topic. Also says whether the
    warehouse's log is not the one this home published heads for (its tree was dropped and re-made)."""
    from agentledger.schemas import treelog

    if heads:
        out = []
        for h in heads:
            if h.startswith("kafka:"):
                if not s.bootstrap_servers:
                    raise WarehouseError(f"--heads {h} needs --bootstrap-servers (or AGENTLEDGER_BOOTSTRAP_SERVERS)")
                out.append(treelog.HeadsTopic(s.bootstrap_servers, h[len("kafka:"):]))
            else:
                out.append(treelog.HeadsFile(Path(h)))
        return out, None
    if not treelog.has_tree(con):
        return [], None
    try:
        log_id = treelog.read_state(con).log_id
    except treelog.TreeError:
        return [], None
    out = treelog.default_destinations(s, log_id)
    out = [d for d in out if not isinstance(d, treelog.HeadsFile) or d.path.exists()]
    pinned = treelog.pinned_log(s.home, s.warehouse)
    if pinned and pinned != log_id:
        old = treelog.HeadsFile(treelog.heads_file_path(s.home, pinned))
        return out + ([old] if old.path.exists() else []), (
            f"this home published heads of log {pinned} for {s.warehouse}, whose tree is now log {log_id}: the "
            "tree was dropped and made anew")
    return out, None


# --- dead letters ------------------------------------------------------------------------------------

def _filters(reasons, session, include_resolved) -> tuple[str, list]:
    where = ["TRUE"]
    params: list = []
    if not include_resolved:
        where.append("resolved_at IS NULL")
    if reasons:
        where.append("reason IN (SELECT unnest(?))")
        params.append(list(reasons))
    if session:
        where.append("session_id = ?")
        params.append(session)
    return " AND ".join(where), params


def dead_letters(s: Settings, *, reasons: Sequence[str] | None = None, session: str | None = None,
                 include_resolved: bool = False, summary: bool = False, limit: int = 100) -> Rows:
    """Quarantined messages with their reason (raw bytes: size and a hex prefix), or with
    ``summary`` counts per reason."""
    from agentledger.schemas.warehouse import open_for

    with open_for(s, read_only=True) as wh:
        where, params = _filters(reasons, session and in_warehouse(wh.con, session, s.warehouse), include_resolved)
        if summary:
            cur = wh.con.execute(f"""
                SELECT reason, count(*) AS letters, count(*) FILTER (WHERE resolved_at IS NULL) AS unresolved,
                       count(DISTINCT session_id) AS sessions, min(received_at) AS first_received_at,
                       max(received_at) AS last_received_at
                FROM dead_letters WHERE {where} GROUP BY reason ORDER BY letters DESC""", params)
        else:
            cur = wh.con.execute(f"""
                SELECT dead_letter_id, reason, detail, topic, "partition", "offset", session_id, seq,
                       octet_length(raw) AS raw_bytes, hex(raw[1:24]) AS raw_prefix, received_at,
                       resolved_at, resolution
                FROM dead_letters WHERE {where}
                ORDER BY received_at, topic, "partition", "offset" LIMIT ?""", [*params, limit])
        return Rows([d[0] for d in cur.description], cur.fetchall())


@dataclass
class Retried:
    """What `retry_dead_letters` did."""

    retried: int = 0
    accepted: int = 0
    resolved_as_duplicate: int = 0
    still_quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"retried": self.retried, "accepted": self.accepted,
                "resolved_as_duplicate": self.resolved_as_duplicate, "still_quarantined": self.still_quarantined,
                "reasons": self.reasons}


def retry_dead_letters(s: Settings, *, reasons: Sequence[str] | None = None, session: str | None = None,
                       ids: Sequence[str] | None = None) -> Retried:
    """Feed unresolved dead letters through the same validation again (idempotent): accepted ones
    become events and are resolved in the same transaction, identical duplicates are resolved as
    such, the rest stay with the reason they failed for this time."""
    from agentledger.consumers.ingest import Ingestor
    from agentledger.schemas.transport.base import Message
    from agentledger.schemas.treelog import tree_heads_for
    from agentledger.schemas.warehouse import open_for

    with open_for(s) as wh:
        where, params = _filters(reasons, session and in_warehouse(wh.con, session, s.warehouse), False)
        if ids:
            where += " AND dead_letter_id IN (SELECT unnest(?))"
            params.append(list(ids))
        rows = wh.con.execute(f"""
            SELECT dead_letter_id, topic, "partition", "offset", "key", raw, reason, detail FROM dead_letters
            WHERE {where} ORDER BY session_id NULLS LAST, seq, received_at""", params).fetchall()
        # bytes cut out of a damaged log are not an event: they stay log_damaged, with their detail
        letters = [(lid, Message(t, p, o, k, bytes(raw) if raw is not None else b"", 0,
                                 detail if why == "log_damaged" else None))
                   for lid, t, p, o, k, raw, why, detail in rows]
        ing = Ingestor(wh, None, s.topic, tree_heads=tree_heads_for(s, wh.con))
        total = Retried(retried=len(letters))
        for i in range(0, len(letters), 50_000):
            r = ing.retry_dead_letters(letters[i:i + 50_000])
            total.accepted += r.accepted
            dup = r.reasons.get("duplicate", 0)
            total.resolved_as_duplicate += dup
            total.still_quarantined += r.dead_letters - dup
            for k, v in r.reasons.items():
                if k != "duplicate":
                    total.reasons[k] = total.reasons.get(k, 0) + v
        ing.finish_tree()
        ing.tree_heads.publisher.close()
    return total


# --- DuckLake maintenance ----------------------------------------------------------------------------

def compact(s: Settings, expire_older_than: str = "1 hour", merge: bool = False) -> dict:
    """Expire the snapshots of a DuckLake warehouse older than the interval and delete the files no
    snapshot uses (safe while ingest and readers run); with ``merge``, first merge small Parquet
    files -- only when nothing else uses the warehouse (see `Warehouse.compact`)."""
    from agentledger.schemas.warehouse import open_for

    with open_for(s) as wh:
        return wh.compact(expire_older_than, merge=merge)


def snapshots(s: Settings, limit: int = 20) -> Rows:
    """The snapshots of a DuckLake warehouse, newest first."""
    from agentledger.schemas.warehouse import open_for

    with open_for(s, read_only=True) as wh:
        return Rows(["snapshot_id", "snapshot_time", "changes"], list(wh.snapshots(limit)))


# --- keys --------------------------------------------------------------------------------------------

@dataclass
class GeneratedKey:
    key_id: str
    private_key: Path
    public_key: Path
    active: bool

    def as_dict(self) -> dict:
        return {"key_id": self.key_id, "private_key": str(self.private_key), "public_key": str(self.public_key),
                "active": self.active}


def generate_key(s: Settings, out: Path | None = None, activate: bool | None = None) -> GeneratedKey:
    """An Ed25519 key pair for signing checkpoints in ``out`` (default HOME/keys); ``activate``
    (default: when writing to HOME/keys) makes it the key producers sign with."""
    from agentledger.schemas import signing
    from agentledger.schemas.homes import write_private_file

    default_dir = s.home / "keys"
    directory = out or default_dir
    signer = signing.generate()
    priv, pub = signing.write_keypair(signer, directory)
    active = activate if activate is not None else directory.resolve() == default_dir.resolve()
    if active:
        default_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.resolve() != default_dir.resolve():
            write_private_file(default_dir / f"{signer.key_id}.pub", pub.read_bytes())
            link = default_dir / f"{signer.key_id}.key"
            if not link.exists():
                link.symlink_to(priv.resolve())
        write_private_file(default_dir / "current", (signer.key_id + "\n").encode())
        signing.load_private_file(default_dir / f"{signer.key_id}.key")  # refused here, not at the first event
    return GeneratedKey(signer.key_id, priv, pub, active)


def list_keys(s: Settings, directory: Path | None = None) -> Rows:
    """The public keys in the key directory (default HOME/keys): key id, file, whether its private
    key is there, whether producers sign with it, and whether it is a simulator's."""
    from agentledger.producers.simulate import simulator_seed
    from agentledger.schemas import signing

    d = directory or s.home / "keys"
    try:
        current = (d / "current").read_text().strip()
    except OSError:
        current = None
    rows = []
    for p in sorted(d.glob("*.pub")) if d.is_dir() else []:
        data = p.read_bytes()
        kid = signing.key_id(signing.load_public(data))
        seed = simulator_seed(kid)
        sim = f"seed {seed}" if seed is not None else "marked" if signing.is_simulator_key(data) else None
        rows.append([kid, str(p), (d / f"{kid}.key").exists(), kid == current, sim])
    return Rows(["key_id", "public_key", "has_private_key", "signing", "simulator"], rows)


# --- spool -------------------------------------------------------------------------------------------

def spool_status(s: Settings) -> dict:
    """What the producer spool holds: undrained events and bytes per topic, the oldest, overflow,
    and its bound (``max_bytes``)."""
    from agentledger.producers.sinks import ProducerOptions, spool_dir
    from agentledger.producers.spool import Spool

    opts = ProducerOptions.from_env()
    st = Spool(spool_dir(s, opts)).status()
    st["max_bytes"] = opts.spool_max_bytes
    return st


def spool_drain(s: Settings, timeout_s: float = 300.0, follow: bool = False) -> dict:
    """Send spooled events to Kafka, in order (with ``follow``: keep draining until interrupted);
    ``{"drained": N, "remaining": M}``."""
    from agentledger.producers.sinks import ProducerOptions, spool_dir
    from agentledger.producers.spool import Spool, drain
    from agentledger.schemas.transport import kafka_sink

    if not s.uses_kafka:
        raise ConfigError("spool drain needs Kafka: set AGENTLEDGER_BOOTSTRAP_SERVERS or --bootstrap-servers")
    spool = Spool(spool_dir(s, ProducerOptions.from_env()))
    total = {"drained": 0, "remaining": spool.undrained()}
    while True:
        r = drain(spool, lambda: kafka_sink(s.bootstrap_servers, default_partitions=s.partitions), timeout_s=timeout_s)
        total = {"drained": total["drained"] + r["drained"], "remaining": r["remaining"]}
        if not follow:
            break
        time.sleep(1.0)
    return total
