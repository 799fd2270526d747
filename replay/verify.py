"""Verification of one session: the raw hash chain, its checkpoints and signatures, its gaps.

Statuses:

* ``ok`` -- every event verifies, in order from seq 0, and the session has ended;
* ``open`` -- every event verifies but no session_ended yet (still running, or its end was lost);
* ``broken`` -- an event does not verify (changed, missing, extra, reordered), or a checkpoint
  contradicts the chain or carries a bad signature. ``first_bad_seq`` names the first bad position.

Gap events are *recorded* losses (a truncated output, a spool overflow, a crash): they are counted
and listed, never a chain break, since the recorder sealed them into the chain itself.

Signatures: a checkpoint at seq k signs (session, head_seq, head_hash, event_count, final). It is
``valid`` when its head hash is the chain's hash at head_seq and the signature verifies with a
trusted key; ``unknown_key`` when no trusted key has its id (not a failure, but not proof either);
``invalid`` / ``head_mismatch`` otherwise (a failure). ``signed_through`` is the last seq covered
by a valid signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agentledger.schemas.checkpoints import check_checkpoint
from agentledger.schemas.signing import Keyring

from .chain import ChainResult


@dataclass
class CheckpointCheck:
    seq: int
    head_seq: int
    event_count: int
    key_id: str
    final: bool
    status: str  # valid | unknown_key | invalid | head_mismatch | count_mismatch | after_break | embedded_key_only
    #              | simulator_key (a seed-derived simulator key: proves nothing, see schemas/signing.py)
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("invalid", "head_mismatch", "count_mismatch")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Verification:
    session_id: str
    status: str  # ok | open | broken | empty
    events: int
    verified: int
    first_seq: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: str | None = None
    detail: str | None = None
    ended: bool = False
    gaps: int = 0
    lost_events: int = 0
    checkpoints: list[CheckpointCheck] = field(default_factory=list)
    signed_through: int | None = None
    key_ids: list[str] = field(default_factory=list)
    duplicates_dropped: int = 0
    source: dict = field(default_factory=dict)
    unsigned_events: int = 0  # events not covered by a valid signature (checkpoints and the end excepted)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "open")

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "checkpoints"}
        d["checkpoints"] = [c.as_dict() for c in self.checkpoints]
        d["signatures"] = signature_summary(self)
        return d


def signature_summary(v: Verification) -> str:
    valid = [c for c in v.checkpoints if c.status == "valid"]
    if any(c.failed for c in v.checkpoints):
        return "bad"
    if valid:
        return "valid" if v.unsigned_events == 0 else "partial"
    if any(c.status == "simulator_key" for c in v.checkpoints):
        return "simulator"
    if v.checkpoints:
        return "unverified"
    return "none"


def check_checkpoints(rows: list[dict], chain: ChainResult, session_id: str, keyring: Keyring,
                      embedded: Keyring | None = None) -> list[CheckpointCheck]:
    """``rows``: the session's checkpoint payloads with their ``seq`` (signature as bytes or base64/hex).
    Each is checked by `schemas.checkpoints.check_checkpoint` (the check `agentledger verify` uses)."""
    out = []
    first, hashes = chain.first_seq, chain.hashes
    for r in rows:
        seq, head_seq, count = int(r["seq"]), int(r["head_seq"]), int(r["event_count"])
        c = CheckpointCheck(seq, head_seq, count, r["key_id"], bool(r.get("final")), "valid")
        out.append(c)
        if seq > chain.head_seq:
            c.status, c.detail = "after_break", "the chain does not verify up to this checkpoint"
            continue
        res = check_checkpoint(r, seq, session_id, lambda s: hashes[s - first] if 0 <= s - first < len(hashes) else None,
                               keyring, embedded)
        # a checkpoint here is evidence or it is not: one without a good signature is invalid
        c.status = "invalid" if res.status in ("bad_signature", "unsupported_algorithm", "unsigned") else res.status
        c.detail = res.detail
    return out


def build(chain: ChainResult, session_id: str, *, checkpoints: list[CheckpointCheck], ended: bool, gaps: int,
          lost_events: int, duplicates_dropped: int = 0, source: dict | None = None) -> Verification:
    v = Verification(session_id, "ok", chain.count, chain.verified, chain.first_seq, chain.head_seq, chain.head_hash,
                     chain.first_bad_seq, chain.reason, chain.detail, ended, gaps, lost_events, checkpoints,
                     duplicates_dropped=duplicates_dropped, source=source or {})
    v.key_ids = sorted({c.key_id for c in checkpoints})
    valid = [c.head_seq for c in checkpoints if c.status == "valid"]
    v.signed_through = max(valid) if valid else None
    if chain.count == 0:
        v.status = "empty"
    elif not chain.ok:
        v.status = "broken"
    else:
        bad = [c for c in checkpoints if c.failed]
        if bad:
            v.status, v.first_bad_seq, v.reason, v.detail = "broken", bad[0].seq, f"checkpoint_{bad[0].status}", bad[0].detail
        elif chain.first_seq != 0:
            v.status, v.first_bad_seq, v.reason = "broken", 0, "seq_gap"
            v.detail = f"the events start at seq {chain.first_seq}: seq 0..{chain.first_seq - 1} are missing"
        else:
            v.status = "ok" if ended else "open"
    return v
