"""The incident responder's work: read and replay a session, what-if a policy, evidence bundles."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from agentledger.schemas.config import Settings
from agentledger.schemas.errors import ConfigError, WarehouseError

from .sessions import for_reading

SOURCES = ("auto", "warehouse", "kafka", "log", "bundle")


def keyring(s: Settings, public_keys: Sequence[Path] | None = None):
    """The trusted checkpoint keys: HOME/keys/*.pub and ``public_keys`` (files or directories)."""
    from agentledger.schemas.signing import home_keyring

    return home_keyring(s.home, list(public_keys or []))


def operator_keyring(s: Settings, operator_keys: Sequence[Path] | None = None):
    """The trusted log operator keys: ``operator_keys`` and HOME/keys/operator."""
    from agentledger.schemas.signing import Keyring, operator_key_dir

    for p in operator_keys or []:
        if not Path(p).exists():
            raise ConfigError(f"operator key {p} does not exist")
    return Keyring.from_paths(*(operator_keys or []), operator_key_dir(s.home))


def _warehouse_if_any(s: Settings):
    from agentledger.schemas.warehouse import open_warehouse

    if s.warehouse != ":memory:" and not Path(s.warehouse).exists():
        return None
    return open_warehouse(s.warehouse, read_only=True)


# --- reading a session -------------------------------------------------------------------------------

@dataclass
class SessionRecord:
    """A session's raw events (``raw``: session_id, values, source, where, ...), its alerts when
    the warehouse is there, and ``notes`` (e.g. why the warehouse was not used)."""

    raw: Any  # replay.sources.RawSession
    alerts: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_session(s: Settings, session: str, source: str = "auto") -> SessionRecord:
    """Read a session (id, unique prefix, or a bundle file's path) from ``source``: auto, warehouse,
    kafka, log (the local log) or bundle."""
    from agentledger.replay.session import warehouse_alerts
    from agentledger.replay.sources import (BundleSource, KafkaSessionSource, LocalLogSessionSource, SessionNotFound,
                                            WarehouseSource)

    if source not in SOURCES:
        raise ConfigError("--source must be auto, warehouse, kafka, log or bundle")
    if source == "bundle" or (source == "auto" and Path(session).is_file()):
        return SessionRecord(BundleSource(Path(session)).read())
    if source == "kafka" and not s.bootstrap_servers:
        raise ConfigError("--source kafka needs --bootstrap-servers (or AGENTLEDGER_BOOTSTRAP_SERVERS)")
    session = for_reading(s, session, transport={"auto": "auto", "kafka": "kafka", "log": "local"}.get(source),
                          warehouse_only=source == "warehouse")
    notes = []
    try:
        wh = _warehouse_if_any(s)
    except WarehouseError as exc:
        if source == "warehouse":
            raise
        # e.g. locked by a running `ingest --follow`: read the transport without the offsets hint
        notes.append(f"warehouse not used: {exc}")
        wh = None
    try:
        alerts, hint = [], None
        if wh is not None:
            ws = WarehouseSource(wh.con, label=s.warehouse)
            if source in ("auto", "warehouse"):
                if ws.has(session):
                    return SessionRecord(ws.read(session), warehouse_alerts(wh.con, session), notes)
                if source == "warehouse":
                    raise SessionNotFound(f"session {session} is not in the warehouse {s.warehouse}")
            hint = ws.hint(session, s.topic)
            alerts = warehouse_alerts(wh.con, session)
        elif source == "warehouse":
            raise SessionNotFound(f"no warehouse at {s.warehouse}: run `agentledger ingest` first")
    finally:
        if wh is not None:
            wh.close()
    if source == "kafka" or (source == "auto" and s.uses_kafka):
        if not s.bootstrap_servers:
            raise ConfigError("--source kafka needs --bootstrap-servers (or AGENTLEDGER_BOOTSTRAP_SERVERS)")
        return SessionRecord(KafkaSessionSource(s.bootstrap_servers, s.topic, hint).read(session), alerts, notes)
    return SessionRecord(LocalLogSessionSource(s.log_dir, s.topic, hint).read(session), alerts, notes)


# --- replay ------------------------------------------------------------------------------------------

@dataclass
class Replayed:
    """A session rebuilt step by step: its chain and signatures (``verification``), its state after
    ``at`` (or its end), the timeline up to there, its alerts and, with a policy, the what-if report.
    ``notice``: --at was past the session's end; ``notes``: how it was read."""

    session_id: str
    where: str
    at: int | None
    verification: dict
    state: dict
    timeline: list[dict]
    alerts: list[dict]
    whatif: dict | None = None
    notice: str | None = None
    notes: list[str] = field(default_factory=list)
    coverage: dict | None = None  # what the session's sources cannot contain (issue 24)

    @property
    def verifies(self) -> bool:
        return self.verification["status"] in ("ok", "open")

    def as_dict(self, limit: int | None = None) -> dict:
        """The documented replay document (agentledger.replay/1); ``limit``: timeline entries."""
        return {"format": "agentledger.replay/1", "session_id": self.session_id, "at": self.at,
                "source": self.verification["source"], "verification": self.verification,
                "state_digest": self.state["state_digest"], "state": self.state,
                "timeline": self.timeline[:limit] if limit else self.timeline, "alerts": self.alerts,
                "whatif": self.whatif, "coverage": self.coverage, **({"notice": self.notice} if self.notice else {})}

    def html(self) -> str:
        """A self-contained HTML timeline."""
        from agentledger.replay.html import render

        return render(session_id=self.session_id, verification=self.verification, state=self.state,
                      timeline=self.timeline, alerts=self.alerts, whatif=self.whatif, coverage=self.coverage)


def _load_policy(path: Path):
    from agentledger.schemas.policy import Policy

    return Policy.load(path)


def replay(s: Settings, session: str, *, at: int | None = None, policy: str | Path | None = None, source: str = "auto",
           public_keys: Sequence[Path] | None = None) -> Replayed:
    """Rebuild a session (id, unique prefix or bundle path): verify its chain and signatures, its
    timeline and state (after seq ``at``); with ``policy``, re-decide every request under it."""
    from agentledger.replay.session import replay as run_replay
    from agentledger.replay.whatif import what_if

    if at is not None and at < 0:
        raise ConfigError("--at takes a seq of the session (0 or more)")
    rec = read_session(s, session, source)
    with run_replay(rec.raw, keyring=keyring(s, public_keys), alerts=rec.alerts) as r:
        v = r.verification.as_dict()
        notice = _past_the_end(r, at)
        state = r.state(at).as_dict()
        timeline = r.timeline(at)
        coverage = r.coverage()
        rep = None
        if policy is not None:
            rep = what_if(r.con, _load_policy(Path(policy)), [r.session_id]).as_dict()
            if at is not None:
                rep["divergences"] = [d for d in rep["divergences"] if d["seq"] <= at]
    return Replayed(rec.raw.session_id, rec.raw.where, at, v, state, timeline, rec.alerts, rep, notice, rec.notes,
                    coverage)


def _past_the_end(r, at: int | None) -> str | None:
    """What to say when ``at`` names a seq after the session's last event (its end is shown)."""
    if at is None:
        return None
    count, first, last = r.con.execute("SELECT count(*), min(seq), max(seq) FROM events").fetchone()
    if last is None or at <= last:
        return None
    return (f"session {r.session_id} has {count} events (seq {first}..{last}): --at {at} is past its end, "
            f"so this is its end (the state after seq {last})")


def whatif(s: Settings, policy: str | Path, sessions_sql: str | None = None) -> dict:
    """Re-decide every recorded request of the sessions ``sessions_sql`` selects (SQL returning
    session_id; default all) under ``policy``: the report (summary, sessions, divergences)."""
    import duckdb

    from agentledger.replay.whatif import session_ids, what_if

    pol = _load_policy(Path(policy))
    wh = _warehouse_if_any(s)
    if wh is None:
        raise WarehouseError(f"no warehouse at {s.warehouse}: run `agentledger ingest` first")
    with wh:
        wh.lock_down()  # the session query is user SQL: no file or network access, as for `agentledger sql`
        try:
            ids = session_ids(wh.con, sessions_sql)
        except duckdb.Error as exc:
            raise WarehouseError(f"--sessions query failed: {str(exc).strip()}") from exc
        return what_if(wh.con, pol, ids).as_dict()


def whatif_summary(summary: dict) -> list[str]:
    """A what-if report's summary as sentences."""
    from agentledger.replay.whatif import summarize_for_humans

    return summarize_for_humans(summary)


# --- evidence bundles --------------------------------------------------------------------------------

def _provenance(s: Settings, session_id: str, head_seq: int, head_hash: str, count: int):
    """(Provenance, None) for a bundle whose last event is (head_seq, head_hash): the operator key, the
    newest signed tree head holding the session's leaf for exactly that head, and its inclusion proof;
    or (None, why not)."""
    from agentledger.replay.bundle import Provenance
    from agentledger.schemas import treelog
    from agentledger.schemas.signing import load_operator_signer

    signer = load_operator_signer(s)
    if signer is None:
        return None, "no log operator key in this home (AGENTLEDGER_OPERATOR_KEY[_FILE] or HOME/keys/operator)"
    try:
        wh = _warehouse_if_any(s)
    except WarehouseError as exc:
        return None, f"the warehouse cannot be read ({exc})"
    if wh is None:
        return None, "no warehouse"
    with wh:
        if not treelog.has_tree(wh.con):
            return None, "the warehouse has no Merkle tree (run `agentledger ingest` once)"
        row = wh.con.execute("SELECT leaf_index FROM tree_leaves WHERE session_id = ? AND head_seq = ? AND "
                             "head_hash = ? AND event_count = ? ORDER BY leaf_index DESC LIMIT 1",
                             [session_id, head_seq, head_hash, count]).fetchone()
        if row is None:
            return None, f"the session's head (seq {head_seq}) is not a leaf of the warehouse's Merkle tree"
        head = treelog.head_covering(wh.con, row[0])
        if head is None:
            return None, "no signed tree head holds the session's head yet (run `agentledger ingest` to sign one)"
        return Provenance(signer, head, row[0], treelog.inclusion_proof(wh.con, row[0], head.tree_size)), None


@dataclass
class Exported:
    """A written evidence bundle (``doc``: path, session_id, events, head, checkpoints, sha256,
    chain, tree head, ...); ``provenance_missing``: why it carries no signed header or tree proof."""

    doc: dict
    notes: list[str] = field(default_factory=list)

    @property
    def provenance_missing(self) -> str | None:
        return self.doc["provenance_missing"]

    def as_dict(self) -> dict:
        return dict(self.doc)


def export_bundle(s: Settings, session: str, out: str | Path, *, source: str = "auto",
                  public_keys: Sequence[Path] | None = None, embed_public_key: bool = False,
                  allow_broken: bool = False) -> Exported:
    """Write one session as a self-verifying evidence bundle (one standard Avro container file)."""
    from agentledger.replay.bundle import BundleError, checkpoint_entry, write_bundle
    from agentledger.replay.chain import envelope_head
    from agentledger.replay.session import replay as run_replay
    from agentledger.schemas.contract import load_store

    out = Path(out)
    if source == "bundle":
        raise ConfigError("export reads a session from the warehouse, Kafka or the local log")
    rec = read_session(s, session, source)
    raw = rec.raw
    store = load_store()
    fps = raw.fingerprints
    version = store.by_fingerprint(fps[0])
    if version is None:
        raise BundleError(f"writer schema {fps[0].hex()} is unknown to this version of agentledger")
    with run_replay(raw, keyring=keyring(s, public_keys), store=store) as r:
        v = r.verification
        if v.status == "broken" and not allow_broken:
            raise BundleError(f"session {raw.session_id} does not verify (first bad seq {v.first_bad_seq}: "
                              f"{v.reason}); refusing to export it as evidence (--allow-broken exports anyway)")
        cps = [checkpoint_entry(c["seq"], c) for c in r.checkpoint_rows()]
        last = raw.values[-1]
        prov, why_not = _provenance(s, raw.session_id, envelope_head(last)[2],
                                    last[-64:].decode("ascii", "replace"), len(raw.values))
        pems = {}
        if embed_public_key:  # (a simulator key keeps its marker: verifiers recognise it, never trust it)
            have = keyring(s, public_keys).pems()
            pems = {k: have[k] for k in {c["key_id"] for c in cps} if k in have}
        coverage = r.coverage()  # what the session's sources cannot contain: in the signed header (issue 24)
        res = write_bundle(out, session_id=raw.session_id, values=raw.values, writer_schema=version.schema,
                           checkpoints=cps, public_keys=pems, source=f"{raw.source}: {raw.where}", chain=r.chain,
                           allow_broken=allow_broken, provenance=prov, coverage=coverage,
                           extra={"signatures": v.as_dict()["signatures"], "gaps": str(v.gaps)})
    doc = {"path": str(res.path), "session_id": res.session_id, "events": res.events, "head_seq": res.head_seq,
           "head_hash": res.head_hash, "writer_fingerprint": res.writer_fingerprint, "checkpoints": res.checkpoints,
           "embedded_keys": sorted(pems), "bytes": res.bytes, "sha256": file_sha256(res.path),
           "chain": v.status, "tree_head": prov.tree_head.as_dict() if prov else None,
           "leaf_index": prov.leaf_index if prov else None, "provenance_missing": why_not,
           "coverage": coverage}
    return Exported(doc, rec.notes)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_bundle(s: Settings, bundle: str | Path, *, public_keys: Sequence[Path] | None = None,
                  operator_keys: Sequence[Path] | None = None, require_signature: bool = False):
    """Verify an evidence bundle offline (no warehouse, no broker): ``.ok``, ``.problem``,
    ``.verification``, ``.provenance``, ``.as_dict()``."""
    from agentledger.replay.session import verify_bundle as run_verify_bundle

    return run_verify_bundle(Path(bundle), keyring(s, public_keys), require_signature=require_signature,
                             operators=operator_keyring(s, operator_keys))


@dataclass
class Imported:
    """What importing a bundle did (``quarantined`` > 0 is a failure)."""

    bundle: str
    session_id: str
    events: int
    imported: int
    already_present: int
    quarantined: int
    topic: str
    warehouse: str
    cannot_prove: list = field(default_factory=list)  # the bundle's coverage statements (issue 24)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def import_bundle(s: Settings, bundle: str | Path, *, public_keys: Sequence[Path] | None = None) -> Imported:
    """Load an evidence bundle into the warehouse through the normal exactly-once ingest, after
    verifying it; events already present (same seq, same hash) are skipped."""
    from agentledger.consumers.ingest import Ingestor
    from agentledger.replay.bundle import BundleError, parse_bundle
    from agentledger.replay.importing import bundle_messages, new_messages
    from agentledger.replay.session import verify_bundle as run_verify_bundle
    from agentledger.schemas.treelog import tree_heads_for
    from agentledger.schemas.warehouse import open_warehouse

    bundle = Path(bundle)
    # what is verified is what is imported: one private copy of the file, read once (read twice, a
    # file swapped between the reads was imported unverified)
    try:
        data = bundle.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {bundle}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="agentledger-import-") as private:
        copy = Path(private) / "bundle.avro"
        copy.write_bytes(data)
        res = run_verify_bundle(copy, keyring(s, public_keys))
        if not res.ok:
            raise BundleError(f"{bundle} does not verify ({res.problem}); not importing it")
        b = parse_bundle(data, bundle)
    topic, msgs = bundle_messages(b)
    with open_warehouse(s.warehouse) as wh:
        todo = new_messages(wh.con, b.session_id, topic, msgs)
        ing = Ingestor(wh, None, topic, tree_heads=tree_heads_for(s.with_(warehouse=s.warehouse), wh.con))
        accepted = dead = 0
        for i in range(0, len(todo), 50_000):
            r = ing.ingest_batch(todo[i : i + 50_000])
            accepted += r.accepted
            dead += r.dead_letters
        ing.finish_tree()
        ing.tree_heads.publisher.close()
    return Imported(str(bundle), b.session_id, len(msgs), accepted, len(msgs) - len(todo), dead, topic, s.warehouse,
                    list((res.coverage or {}).get("cannot_prove", [])))
