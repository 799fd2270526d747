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
  verify-bundle does. A signature by a *simulator* key (seed-derived: anyone can make one, see
  schemas/signing.py) is not evidence either: the session counts as unsigned and names it
  (``simulator_key_ids``);
- ``open``: as ok so far, but it has no session_ended event yet;
- ``broken``: the first problem is at ``first_bad_seq``, with a ``reason``.

Rows are also held to what the warehouse recorded *about* them, so that removing rows shows even
when what is left verifies: the session's ``chain_heads`` row (head seq, head hash, count) and its
leaves in the log-wide Merkle tree (schemas/treelog.py; each leaf is the session's chain head at an
ingest commit, and the latest must be the last row). Sessions are listed from the events, the chain
heads, the tree and unresolved dead letters, so a session deleted from some of them is still found.
Reasons of those checks: ``tail_truncated`` (rows end before a recorded head), ``session_deleted``
(no rows left), ``heads_disagree`` (the chain_heads row is missing or says otherwise),
``not_in_tree`` (rows beyond the session's latest leaf, or no leaf), ``tree_mismatch`` (a leaf names
a hash the rows do not have).

The tree itself (`schemas.treelog.check_tree`) is recomputed from its leaves and checked against
its state, every stored signed tree head and the heads published outside the warehouse.

With ``require_signatures`` a session must also be signed: a valid *final* checkpoint by a trusted
key covering every event but itself, and its latest leaf covered by a tree head signed by a trusted
operator key (a published one when published heads were given). A session without a session_ended
event fails with reason ``open`` unless ``allow_open`` (live monitoring): a session still running
cannot be told from one whose tail never arrived. A session signed only by a simulator key fails
with reason ``simulator_key``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Any, Iterable, Iterator

from agentledger.schemas.contract import SchemaStore
from agentledger.schemas.envelope import ChainVerifier
from agentledger.schemas.errors import DecodeError
from agentledger.schemas.rows import event_select_list, iter_session_values, reencode, row_to_record
from agentledger.schemas.sql import idents
from agentledger.schemas.checkpoints import check_checkpoint
from agentledger.schemas.signing import Keyring
from agentledger.schemas.treelog import TreeReport, has_tree
from agentledger.schemas.warehouse import Warehouse


# reasons `schemas.rows.reencode` gives for a row, reported as they are
ROW_PROBLEMS = ("unreadable_row", "field_not_in_writer_schema")


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
    final_signed: bool = False  # a valid final checkpoint by a trusted key
    leaf_index: int | None = None  # the session's latest leaf in the Merkle tree
    tree_covered: bool | None = None  # that leaf is in a tree head signed by a trusted operator key
    key_ids: list[str] = field(default_factory=list)
    unknown_key_ids: list[str] = field(default_factory=list)  # signed by keys not in the keyring
    simulator_key_ids: list[str] = field(default_factory=list)  # signed by simulator keys (never trusted)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "open")

    @property
    def label(self) -> str:
        if self.status == "broken":
            return f"broken at seq {self.first_bad_seq}: {self.reason}"
        if self.signed:
            return self.status
        if self.simulator_key_ids:
            return f"{self.status} (unsigned: signed by simulator key {', '.join(self.simulator_key_ids)})"
        if self.unknown_key_ids:
            return f"{self.status} (unsigned: signed by unknown key {', '.join(self.unknown_key_ids)})"
        return self.status + " (unsigned)"

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "label": self.label}


def session_ids(wh: Warehouse) -> list[str]:
    """Every session the warehouse knows: from its events, its chain heads, its Merkle tree and its
    unresolved dead letters."""
    tree = "UNION SELECT DISTINCT session_id FROM tree_leaves" if has_tree(wh.con) else ""
    rows = wh.con.execute(f"""
        SELECT DISTINCT session_id FROM {wh.events_relation()}
        UNION SELECT session_id FROM chain_heads
        {tree}
        UNION SELECT DISTINCT session_id FROM dead_letters WHERE session_id IS NOT NULL AND resolved_at IS NULL
        ORDER BY 1""").fetchall()
    return [r[0] for r in rows if r[0] is not None]


def verify_session(wh: Warehouse, session_id: str, keyring: Keyring, *, require_signatures: bool = False,
                   store: SchemaStore | None = None, allow_open: bool = False,
                   tree: TreeReport | None = None, recorded: "Recorded | None" = None,
                   values: Iterable[tuple[bytes, dict, dict]] | None = None) -> Verdict:
    """One session's verdict. ``recorded`` and ``values`` come from `verify`'s bulk reading (one query
    per table for the whole warehouse instead of a few per session); by default they are queried."""
    store = store or wh.store
    recorded = recorded or Recorded.query(wh)
    v = Verdict(session_id, "open")
    chain = ChainVerifier(session_id)
    hashes: list[str] = []
    ended = False
    problem: tuple[int | None, str, str] | None = None
    try:
        for value, rec, row in (values if values is not None else iter_session_values(wh.con, store, session_id)):
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
    except DecodeError as exc:  # a row that cannot be the bytes its producer sealed (`schemas.rows.reencode`)
        if exc.reason in ROW_PROBLEMS:
            problem = (chain.head_seq + 1, exc.reason, exc.detail)
        else:
            problem = (chain.head_seq + 1, "unreadable_row", f"{exc.reason}: {exc.detail}")
    if problem is None:
        problem = _quarantined_problem(recorded.quarantined(session_id), chain.head_seq)
    leaves = recorded.leaves(session_id)
    if problem is None:
        problem = _recorded_heads_problem(recorded, session_id, v.events, hashes, ended, leaves)
    if problem is None and v.events == 0:
        problem = (0, "no_events", "the warehouse holds no event of this session")
    if leaves:
        v.leaf_index = leaves[-1][0]
        if tree is not None:
            v.tree_covered = v.leaf_index < tree.covered_size
    if problem is None and require_signatures:
        last = chain.head_seq
        if not ended and not allow_open:
            problem = (last + 1, "open", "no session_ended event: the session is still running or its tail is "
                                         "missing (the two cannot be told apart; --allow-open accepts open sessions)")
        elif not v.signed and v.simulator_key_ids:
            problem = (0, "simulator_key", f"signed only by simulator key {', '.join(v.simulator_key_ids)}, derived "
                                           "from a public seed: anyone can sign with it, so it is never trusted")
        elif not v.signed:
            problem = (0, "unsigned", "no checkpoint signed by a known key" + (
                f" (signed by unknown key {', '.join(v.unknown_key_ids)})" if v.unknown_key_ids else ""))
        elif ended and not v.final_signed:
            problem = (last, "no_final_checkpoint", "the session ended without a final checkpoint signed by a "
                                                    "trusted key")
        elif ended and v.covered_to_seq is not None and v.covered_to_seq < last - 1:
            # the final checkpoint follows the end event, so it covers everything but itself
            problem = (v.covered_to_seq + 1, "not_covered",
                       f"events after seq {v.covered_to_seq} are not covered by a signed checkpoint")
        elif tree is None or not v.tree_covered:
            covered = [lf for lf in leaves if tree is not None and lf[0] < tree.covered_size]
            first = covered[-1][1] + 1 if covered else 0
            src = "published" if tree is not None and tree.coverage_from == "published" else "stored"
            problem = (first, "not_in_signed_tree",
                       f"events from seq {first} on are not in any {src} tree head signed by a trusted operator key")
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
    if r.status in ("unknown_key", "simulator_key"):  # not evidence, not a failure (see the module doc)
        ids = v.unknown_key_ids if r.status == "unknown_key" else v.simulator_key_ids
        if kid not in ids:
            ids.append(kid)
        return None
    v.signed_checkpoints += 1
    v.signed = True
    if cp.get("final"):
        v.final_signed = True
    v.covered_to_seq = max(v.covered_to_seq or -1, cp["head_seq"])
    if kid not in v.key_ids:
        v.key_ids.append(kid)
    return None


class Recorded:
    """What the warehouse recorded *about* sessions: unresolved dead letters that name a seq, Merkle
    tree leaves and chain_heads rows. `query` asks per session (a few rows each); `prefetch` reads each
    table once for all sessions (what `verify` of a whole warehouse uses: on a remote lake every query
    pays catalog round trips)."""

    def __init__(self, wh: Warehouse, prefetched: bool = False) -> None:
        self.wh = wh
        self.tree = has_tree(wh.con)
        self._pre: dict[str, dict[str, list[tuple[Any, ...]]]] | None = None
        if prefetched:
            self._pre = {"dead": {}, "leaves": {}, "heads": {}}
            for name, sql in self._queries(all_sessions=True).items():
                for sid, rows in groupby(wh.con.execute(sql).fetchall(), key=lambda r: r[0]):
                    self._pre[name][sid] = [tuple(r[1:]) for r in rows]

    @classmethod
    def query(cls, wh: Warehouse) -> "Recorded":
        return cls(wh)

    @classmethod
    def prefetch(cls, wh: Warehouse) -> "Recorded":
        return cls(wh, prefetched=True)

    def _queries(self, all_sessions: bool) -> dict[str, str]:
        where = "TRUE" if all_sessions else "session_id = ?"
        out = {"dead": f"""SELECT session_id, seq, reason, detail FROM dead_letters
                          WHERE {where} AND session_id IS NOT NULL AND resolved_at IS NULL AND seq IS NOT NULL
                            AND reason NOT IN ('duplicate') ORDER BY session_id, seq""",
               "heads": f"""SELECT session_id, head_seq, head_hash, event_count, ended FROM chain_heads
                           WHERE {where} ORDER BY session_id"""}
        if self.tree:
            out["leaves"] = f"""SELECT session_id, leaf_index, head_seq, head_hash, event_count FROM tree_leaves
                               WHERE {where} ORDER BY session_id, leaf_index"""
        return out

    def _get(self, name: str, session_id: str) -> list[tuple[Any, ...]]:
        if self._pre is not None:
            return self._pre[name].get(session_id, [])
        sql = self._queries(all_sessions=False).get(name)
        if sql is None:
            return []
        return [tuple(r[1:]) for r in self.wh.con.execute(sql, [session_id]).fetchall()]

    def quarantined(self, session_id: str) -> list[tuple[Any, ...]]:
        """(seq, reason, detail) of the session's unresolved dead letters that name a seq, by seq."""
        return self._get("dead", session_id)

    def leaves(self, session_id: str) -> list[tuple[Any, ...]]:
        """(leaf_index, head_seq, head_hash, event_count) of the session's Merkle tree leaves."""
        return self._get("leaves", session_id)

    def heads(self, session_id: str) -> list[tuple[Any, ...]]:
        """(head_seq, head_hash, event_count, ended) of the session's chain_heads rows."""
        return self._get("heads", session_id)


def _quarantined_problem(dead: list[tuple[Any, ...]], head_seq: int) -> tuple[int, str, str] | None:
    """What ingest quarantined for this session and that the chain in the warehouse does not settle:
    an event that should extend the chain, or a second, different event for an existing seq."""
    for seq, reason, detail in dead:
        if seq > head_seq or reason == "conflicting_duplicate":
            if reason == "conflicting_duplicate":
                return seq, reason, detail
            return head_seq + 1, reason, f"quarantined: {detail}"
    return None


def _recorded_heads_problem(recorded: Recorded, session_id: str, rows: int, hashes: list[str], ended: bool,
                            leaves: list[tuple[Any, ...]]) -> tuple[int, str, str] | None:
    """The rows (``rows`` of them, all verified, seq 0..rows-1 hashing to ``hashes``) against the
    session's chain_heads row and its leaves in the Merkle tree."""
    head = recorded.heads(session_id)
    last = rows - 1
    claims = [("the Merkle tree", lf[1]) for lf in leaves[-1:]] + [("chain_heads", h[0]) for h in head]
    if rows == 0:
        if claims:
            where = " and ".join(sorted({w for w, _ in claims}))
            return 0, "session_deleted", f"no events of this session are left, but {where} record it"
        return None
    for where, seq in claims:
        if seq > last:
            return last + 1, "tail_truncated", (f"{where} records the session up to seq {seq} ({seq + 1} events), "
                                                f"the warehouse holds seq 0..{last} only")
    if leaves:
        prev = -1
        for idx, seq, h, n in leaves:
            if seq <= prev or not 0 <= seq <= last or hashes[seq] != h or n != seq + 1:
                return max(0, min(seq, last)), "tree_mismatch", (f"Merkle tree leaf {idx} says seq {seq} hashes to "
                                                                 f"{str(h)[:16]}… with {n} events; the rows disagree")
            prev = seq
        if leaves[-1][1] < last:
            return leaves[-1][1] + 1, "not_in_tree", (f"events after seq {leaves[-1][1]} are in no Merkle tree leaf "
                                                      "(rows were added to the warehouse outside ingest)")
    elif recorded.tree:
        return 0, "not_in_tree", "the session has no leaf in the Merkle tree (rows added outside ingest)"
    if len(head) != 1:
        return 0, "heads_disagree", f"the session has {len(head)} chain_heads rows, not one"
    seq, h, n, h_ended = head[0]
    if seq < last:
        return seq + 1, "heads_disagree", f"events after the recorded chain head (seq {seq}) are in the warehouse"
    if hashes[seq] != h or n != rows or bool(h_ended) != ended:
        return seq, "heads_disagree", (f"chain_heads says head seq {seq} hashes to {str(h)[:16]}…, {n} events, "
                                       f"ended {bool(h_ended)}; the rows say {hashes[seq][:16]}…, {rows}, {ended}")
    return None


def verify(wh: Warehouse, sessions: Iterable[str] | None, keyring: Keyring, *,
           require_signatures: bool = False, allow_open: bool = False,
           tree: TreeReport | None = None) -> Iterator[Verdict]:
    """Verify ``sessions`` (default: every session the warehouse knows, see `session_ids`). ``tree``:
    the result of `schemas.treelog.check_tree`, which says what signed tree heads cover.

    The whole warehouse is read in bulk: one ordered scan of the events and one query per table of
    what was recorded about them, instead of a few queries per session (the same verdicts; on a
    DuckLake over PostgreSQL and S3 each query costs round trips, ~0.2 s here)."""
    kw = {"require_signatures": require_signatures, "allow_open": allow_open, "tree": tree}
    if tree is not None:
        check_schema(wh, tree)
    if sessions:
        recorded = Recorded.query(wh)
        for sid in sessions:
            yield verify_session(wh, sid, keyring, recorded=recorded, **kw)
        return
    ids = session_ids(wh)
    recorded = Recorded.prefetch(wh)
    store = wh.store
    groups = groupby(_all_rows(wh), key=lambda row: row["session_id"])
    current = next(groups, None)
    for sid in ids:  # both in DuckDB's VARCHAR order (byte order: Python's str order for UTF-8)
        while current is not None and current[0] < sid:  # not a listed session (cannot happen): skip
            current = next(groups, None)
        if current is not None and current[0] == sid:
            verdict = verify_session(wh, sid, keyring, store=store, recorded=recorded,
                                     values=_values(store, current[1]), **kw)
            current = next(groups, None)  # skips what a broken session's check left unread
            yield verdict
        else:
            yield verify_session(wh, sid, keyring, store=store, recorded=recorded, values=(), **kw)


def check_schema(wh: Warehouse, tree: TreeReport) -> None:
    """Every view, table and macro of the warehouse as this code defines it
    (`Warehouse.schema_problems`), else a ``schema_tampered`` problem naming it: verify reads the kind
    tables itself, but everyone else reads the views (``events``, ``denied_actions``, ...), which
    whoever can write the file can redefine, even to show verify's own queries the sealed rows."""
    for name, detail in wh.schema_problems():
        tree.problem("schema_tampered", f"{name}: {detail}")


def _all_rows(wh: Warehouse) -> Iterator[dict[str, Any]]:
    cols = event_select_list(wh.store)
    cur = wh.con.execute(f"SELECT {idents(cols)} FROM {wh.events_relation()} ORDER BY session_id, seq")
    while True:
        chunk = cur.fetchmany(5000)
        if not chunk:
            return
        for r in chunk:
            yield dict(zip(cols, r))


def _values(store: Any, rows: Iterable[dict[str, Any]]) -> Iterator[tuple[bytes, dict[str, Any], dict[str, Any]]]:
    for row in rows:
        rec = row_to_record(store, row)
        yield reencode(store, rec, row.get("schema_fingerprint")), rec, row
