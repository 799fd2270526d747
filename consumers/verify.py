"""Re-check sessions from the warehouse alone: every hash, the chain, and signed checkpoints.

Each row is re-encoded to the exact bytes its producer sealed (`schemas.rows`; Avro encoding is
deterministic), so an edited row -- any column of the event -- no longer hashes to its `hash`, and
an edited `hash` no longer matches the next event's `prev_hash`. Checkpoints are checked against the
events before them (head_seq, head_hash, event_count) and their Ed25519 signature against the
keyring. A session is:

- ``ok``: its chain verifies from seq 0 to its end and every checkpoint verifies; ``signed`` says
  whether at least one checkpoint is signed by a known key (``ok (unsigned)`` otherwise). A
  signature by a key not in the keyring proves nothing either way: the session counts as unsigned
  and says which key it would need (``unknown_key_ids``; give it with ``--public-key``), as
  verify-bundle does;
- ``open``: as ok so far, but it has no session_ended event yet;
- ``broken``: the first problem is at ``first_bad_seq``, with a ``reason``.

With ``require_signatures``, an unsigned (or only partly covered) session is a problem too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

from schemas.contract import SchemaStore
from schemas.envelope import ChainVerifier
from schemas.errors import DecodeError
from schemas.rows import iter_session_values
from schemas.checkpoints import check_checkpoint
from schemas.signing import Keyring
from schemas.warehouse import Warehouse


@dataclass
class Verdict:
    session_id: str
    status: str  # ok | open | broken
    events: int = 0
    first_bad_seq: int | None = None
    reason: str | None = None
    detail: str | None = None
    checkpoints: int = 0
    signed_checkpoints: int = 0
    signed: bool = False
    covered_to_seq: int | None = None  # highest seq covered by a valid signed checkpoint
    key_ids: list[str] = field(default_factory=list)
    unknown_key_ids: list[str] = field(default_factory=list)  # signed by keys not in the keyring

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "open")

    @property
    def label(self) -> str:
        if self.status == "broken":
            return f"broken at seq {self.first_bad_seq}: {self.reason}"
        if self.signed:
            return self.status
        if self.unknown_key_ids:
            return f"{self.status} (unsigned: signed by unknown key {', '.join(self.unknown_key_ids)})"
        return self.status + " (unsigned)"

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "label": self.label}


def session_ids(wh: Warehouse) -> list[str]:
    """Every session the warehouse knows: from its events, its chain heads and its dead letters."""
    rows = wh.con.execute("""
        SELECT session_id FROM chain_heads
        UNION SELECT DISTINCT session_id FROM dead_letters WHERE session_id IS NOT NULL AND resolved_at IS NULL
        ORDER BY 1""").fetchall()
    return [r[0] for r in rows]


def verify_session(wh: Warehouse, session_id: str, keyring: Keyring, *, require_signatures: bool = False,
                   store: SchemaStore | None = None) -> Verdict:
    store = store or wh.store
    v = Verdict(session_id, "open")
    chain = ChainVerifier(session_id)
    hashes: list[str] = []
    ended = False
    problem: tuple[int | None, str, str] | None = None
    try:
        for value, rec, row in iter_session_values(wh.con, store, session_id):
            v.events += 1
            p = chain.check(value, rec)
            if p is not None:
                problem = (p.seq, p.reason, p.detail)
                break
            hashes.append(rec["hash"])
            kind = row["kind"]
            if kind == "session_ended":
                ended = True
            elif kind == "checkpoint":
                cp_problem = _check_checkpoint(v, rec, hashes, keyring)
                if cp_problem:
                    problem = (rec["seq"], *cp_problem)
                    break
    except DecodeError as exc:
        problem = (chain.head_seq + 1, "unreadable_row", f"{exc.reason}: {exc.detail}")
    if problem is None:
        problem = _quarantined_problem(wh, session_id, chain.head_seq)
    if problem is None and v.events == 0:
        problem = (0, "no_events", "the warehouse holds no event of this session")
    if problem is None and require_signatures:
        last = chain.head_seq
        if not v.signed:
            problem = (0, "unsigned", "no checkpoint signed by a known key" + (
                f" (signed by unknown key {', '.join(v.unknown_key_ids)})" if v.unknown_key_ids else ""))
        elif ended and v.covered_to_seq is not None and v.covered_to_seq < last - 1:
            # the final checkpoint follows the end event, so it covers everything but itself
            problem = (v.covered_to_seq + 1, "not_covered",
                       f"events after seq {v.covered_to_seq} are not covered by a signed checkpoint")
    if problem is not None:
        v.status = "broken"
        v.first_bad_seq, v.reason, v.detail = problem
    else:
        v.status = "ok" if ended else "open"
    return v


def _check_checkpoint(v: Verdict, rec: dict, hashes: list[str], keyring: Keyring) -> tuple[str, str] | None:
    """A checkpoint states the head of the events before it; a signature must verify if present
    (`schemas.checkpoints.check_checkpoint`, the one check replay and bundles use too)."""
    cp = rec["payload"][1]
    v.checkpoints += 1
    r = check_checkpoint(cp, rec["seq"], rec["session_id"], lambda s: hashes[s] if 0 <= s < len(hashes) else None,
                         keyring)
    if r.status in ("head_mismatch", "count_mismatch"):
        return "checkpoint_mismatch", r.detail
    if r.status in ("bad_signature", "unsupported_algorithm"):
        return "bad_signature", r.detail
    if r.status == "unsigned":
        return None  # an unsigned checkpoint is a statement, not evidence
    kid = cp.get("key_id") or ""
    if r.status == "unknown_key":  # cannot be checked here: not evidence, not a failure (see the module doc)
        if kid not in v.unknown_key_ids:
            v.unknown_key_ids.append(kid)
        return None
    v.signed_checkpoints += 1
    v.signed = True
    v.covered_to_seq = max(v.covered_to_seq or -1, cp["head_seq"])
    if kid not in v.key_ids:
        v.key_ids.append(kid)
    return None


def _quarantined_problem(wh: Warehouse, session_id: str, head_seq: int) -> tuple[int, str, str] | None:
    """What ingest quarantined for this session and that the chain in the warehouse does not settle:
    an event that should extend the chain, or a second, different event for an existing seq."""
    row = wh.con.execute("""
        SELECT seq, reason, detail FROM dead_letters
        WHERE session_id = ? AND resolved_at IS NULL AND seq IS NOT NULL
          AND reason NOT IN ('duplicate') AND (seq > ? OR reason = 'conflicting_duplicate')
        ORDER BY seq LIMIT 1""", [session_id, head_seq]).fetchone()
    if row is None:
        return None
    seq, reason, detail = row
    if reason == "conflicting_duplicate":
        return seq, reason, detail
    return head_seq + 1, reason, f"quarantined: {detail}"


def verify(wh: Warehouse, sessions: Iterable[str] | None, keyring: Keyring, *,
           require_signatures: bool = False) -> Iterator[Verdict]:
    ids = list(sessions) if sessions else session_ids(wh)
    for sid in ids:
        yield verify_session(wh, sid, keyring, require_signatures=require_signatures)
