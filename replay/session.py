"""Replaying one session: verify its raw bytes, decode it natively, project and lay out its timeline.

    raw = WarehouseSource(con).read(session_id)        # or Kafka / local log / bundle
    with replay(raw, keyring=keyring) as r:
        r.verification.status, r.state(at=42).digest, r.timeline()
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from itertools import chain as chain_items
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from agentledger.schemas.contract import SchemaStore, load_store
from agentledger.schemas.signing import Keyring, is_simulator_key, load_public
from agentledger.schemas.sql import idents

from . import native
from . import verify as _verify
from .bundle import BundleCheck, ProvenanceCheck, check_bundle
from .chain import ChainResult, verify_values
from .projection import SessionState, project
from .sources import RawSession
from .timeline import build_timeline, fetch_events
from .workset import Workset, WorksetError, cuts_are_block_starts, load, load_bundle_natively, load_unframed_bundle


@dataclass
class Replay:
    raw: RawSession
    chain: ChainResult
    workset: Workset
    verification: _verify.Verification
    bundle_check: BundleCheck | None = None
    alerts: list[dict] = field(default_factory=list)
    decode_note: str | None = None
    store: SchemaStore | None = None

    @property
    def session_id(self) -> str:
        return self.raw.session_id

    @property
    def con(self):
        return self.workset.con

    def state(self, at: int | None = None, *, materialize: bool = True) -> SessionState:
        return project(self.con, self.session_id, at, materialize=materialize)

    def timeline(self, at: int | None = None) -> list[dict]:
        return build_timeline(fetch_events(self.con, self.session_id, at, self.store), self.chain, self.alerts)

    def checkpoint_rows(self) -> list[dict]:
        return checkpoint_rows(self.con, self.session_id)

    def coverage(self) -> dict:
        return coverage_of(self.con, self.session_id)

    def close(self) -> None:
        self.workset.close()

    def __enter__(self) -> "Replay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


PARALLEL_MIN_BYTES = 16 * 1024 * 1024  # a bundle this big is framed and verified in a child process


def _try_load(raw: RawSession, store: SchemaStore) -> dict:
    try:
        return {"ws": load(raw, store)}
    except WorksetError as exc:
        return {"error": exc}


def _try_load_unframed(b, store: SchemaStore) -> dict:
    try:
        ws, cuts = load_unframed_bundle(b, store)
        return {"ws": ws, "cuts": cuts}
    except Exception:  # damaged bytes: decoded again, framed, by the careful path
        return {}


def _can_fork() -> bool:
    import multiprocessing as mp

    return "fork" in mp.get_all_start_methods()


class _SpanHashes(Sequence):
    """The hashes of a bundle's first ``n`` events, read from the file (they verified, so the hash
    each event carries is its hash). ``blob``: all of them, concatenated, when already at hand."""

    def __init__(self, bundle, n: int, blob: bytes | None = None):
        self._b, self._n, self._blob = bundle, n, blob

    def blob(self) -> bytes:
        """The ``n`` hashes concatenated (64 ASCII bytes each), gathered without a Python loop."""
        if self._blob is None:
            self._blob = _gather_hashes(self._b, self._n)
        return self._blob

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        e = self._b.spans[i][1]
        return self._b.data[e - 64 : e].decode("ascii")


def _gather_hashes(b, n: int) -> bytes:
    """The last 64 bytes of each of the first ``n`` framed bodies of bundle ``b``, concatenated."""
    spans = b.spans
    if isinstance(spans, native.Spans):
        ends = np.frombuffer(spans._flat, dtype=np.int64)[1 : 2 * n : 2]
    else:
        ends = np.fromiter((e for _, e in spans[:n]), dtype=np.int64, count=n)
    data = b.data
    if n == 0 or len(data) < 8:
        return b""
    # every 8 bytes of the file as an (unaligned) little-endian word: 8 vectorised gathers per hash
    words = np.ndarray(shape=(len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    out = np.empty((n, 8), dtype="<u8")
    for k in range(8):
        out[:, k] = words[ends - 64 + 8 * k]
    return out.tobytes()


def _check_child(bundle, conn, send_framing: bool) -> None:
    try:
        chk = check_bundle(bundle)
        blob = None
        if chk.chain is not None:
            blob = "".join(chk.chain.hashes).encode("ascii")  # one string pickles far faster than a list
            chk.chain.hashes = []
        framing = None
        if send_framing:
            framing = (array("q", chain_items.from_iterable(bundle.spans)), bundle.framing_error)
        conn.send((chk, framing, blob))
    except BaseException as exc:  # reported to the parent, which re-raises
        conn.send((exc, None, None))
    finally:
        conn.close()


def _check_in_child(bundle, work) -> BundleCheck:
    """check_bundle(bundle) in a forked child while ``work()`` runs here. When the bundle was not
    framed yet, the child frames it and hands the framing back."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    send_framing = not bundle.framed
    proc = ctx.Process(target=_check_child, args=(bundle, child, send_framing), daemon=True)
    proc.start()
    child.close()
    try:
        work()
        res, framing, blob = parent.recv()
    finally:
        proc.join()
        parent.close()
    if isinstance(res, BaseException):
        raise res
    if framing is not None:
        flat, error = framing
        it = iter(flat.tolist())
        bundle.set_framing(list(zip(it, it)), error)
    if res.chain is not None:
        res.chain.hashes = _SpanHashes(bundle, res.chain.verified, blob)
    return res


def _native_check_and_load(raw: RawSession, store: SchemaStore, box: dict) -> BundleCheck | None:
    """Decode and check a big unframed bundle with `replay.native` (None when it cannot: the
    other paths then run). The decoder vouches only for a bundle sound throughout; otherwise the
    bundle is framed and checked here, which names what is wrong and where. The workset is kept
    only when it holds one row per framed event; else the framed blocks are decoded again."""
    b = raw.bundle
    try:
        ws, vouched = load_bundle_natively(b, store, verify=True)
    except Exception:  # not installed properly, or input it cannot read: the other paths decide
        return None
    if vouched is not None and vouched.sound:
        b.set_framing(vouched.spans, None)
        n = len(vouched.spans)
        first_seq = b.header.meta_int("first_seq")
        chain = ChainResult(b.header.meta("session_id"), n, n, first_seq, vouched.head_seq, vouched.head_hash,
                            hashes=_SpanHashes(b, n))
        bcheck = check_bundle(b, chain)
    else:
        bcheck = check_bundle(b)
    if b.framing_error is None and ws.events == len(b.spans):
        box["ws"] = ws
    else:
        ws.close()
        box.update(_try_load(raw, store))
    return bcheck


def _chain_of(bcheck: BundleCheck, raw: RawSession) -> ChainResult:
    """The chain as the bundle check verified it; its events' own when the header was unreadable."""
    return bcheck.chain if bcheck.chain is not None else verify_values(raw.values, session_id=raw.session_id)


def _expected_table(chain: ChainResult, n: int) -> pa.Table:
    """The first ``n`` verified events as (seq, hash): what the decoded rows must be."""
    hs = chain.hashes
    blob = hs.blob()[: 64 * n] if isinstance(hs, _SpanHashes) else "".join(hs[:n]).encode("ascii")
    if len(blob) != 64 * n:  # (a hash that is not 64 ASCII characters never verifies)
        raise ValueError(f"the chain holds {len(blob)} bytes of hashes for {n} events")
    offsets = np.arange(0, 64 * (n + 1), 64, dtype=np.int64)
    hashes = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(blob))
    seqs = pa.array(np.arange(chain.first_seq, chain.first_seq + n, dtype=np.int64))
    return pa.table({"seq": seqs, "hash": hashes})


def _undecoded(con, session_id: str, chain: ChainResult, n: int, loaded: int) -> int | None:
    """The first of the ``n`` verified events (seq first_seq..) without its decoded row in
    ``events`` of ``con``, or None when every one has exactly its row. A decoder can stop at a
    malformed record without an error, so the rows are counted whatever decoded them: a verdict,
    signature coverage and timeline made from a prefix would claim events that were never shown.

    ``loaded``: how many events were decoded. When all of them are the verified ones (a sound chain:
    the usual case) the check is a few aggregates, O(n) and parallel in DuckDB -- count, first and
    last seq and the sum of hash(seq, hash), against the same sum over the verified hashes; only
    when those differ (or the chain is broken, so unverified rows follow) is each event looked up."""
    if n <= 0:
        return None
    name = "_agentledger_verified_events"
    con.register(name, _expected_table(chain, n))
    try:
        if chain.ok and n == loaded:
            got = con.execute("SELECT count(*), count(*) FILTER (WHERE session_id = ?), min(seq), max(seq), "
                              "sum(hash(seq, hash)::HUGEINT) FROM events", [session_id]).fetchone()
            want = con.execute(f"SELECT sum(hash(seq, hash)::HUGEINT) FROM {name}").fetchone()[0]
            if got == (n, n, chain.first_seq, chain.first_seq + n - 1, want):
                return None
        missing = con.execute(
            f"SELECT min(x.seq) FROM {name} x WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.seq = x.seq "
            "AND e.hash = x.hash AND e.session_id = ?)", [session_id]).fetchone()[0]
        if missing is not None:
            return int(missing)
        if not (chain.ok and n == loaded):
            return None  # every verified event has its row; the unverified rest is the chain's to report
        # a row too many: a duplicated seq, or one that no verified event has
        extra = con.execute(
            f"SELECT min(seq) FROM (SELECT seq FROM events GROUP BY seq HAVING count(*) > 1 UNION ALL "
            f"SELECT seq FROM events e WHERE NOT EXISTS (SELECT 1 FROM {name} x WHERE x.seq = e.seq "
            "AND x.hash = e.hash) OR e.session_id IS DISTINCT FROM ?)", [session_id]).fetchone()[0]
        return chain.first_seq if extra is None else max(chain.first_seq, min(int(extra), chain.head_seq))
    finally:
        con.unregister(name)


def _rows_of_verified_events(raw: RawSession, chain: ChainResult, ws: Workset, store: SchemaStore,
                             loaded: int) -> tuple[Workset, int | None, str | None]:
    """``ws`` when it holds exactly one row per verified event; else a workset of the events before
    the first one without its row (decoded again, and held to the same check), that seq, and why."""
    first_bad = detail = None
    n = min(chain.verified, loaded)
    for _ in range(4):  # each round decodes fewer events
        bad = _undecoded(ws.con, raw.session_id, chain, n, loaded)
        if bad is None:
            return ws, first_bad, detail
        if first_bad is None:
            first_bad = bad
            detail = (f"the event at seq {bad} verified but could not be decoded (the decoder stopped or skipped it "
                      f"without an error: {ws.events} rows for {loaded} events); nothing from seq {bad} on is shown "
                      "or counted")
        else:
            first_bad = min(first_bad, bad)
        ws.close()
        n = loaded = first_bad - chain.first_seq
        prefix = RawSession(raw.session_id, list(raw.values[:n]), raw.source, raw.where, raw.provenance[:n],
                            raw.writer_schemas)
        ws = load(prefix, store)
    ws.close()  # (never in practice: an empty workset rather than rows nothing vouches for)
    ws = load(RawSession(raw.session_id, [], raw.source, raw.where, [], raw.writer_schemas), store)
    return ws, chain.first_seq, detail


COVERAGE_SQL = """
SELECT producer.source AS source, min(producer.agent_name) AS agent, count(*) AS events,
       list({'field': gap.field, 'reason': gap.reason} ORDER BY gap.field, gap.reason)
         FILTER (WHERE kind = 'gap' AND gap.gap_kind = 'not_observable') AS statements,
       count(*) FILTER (WHERE kind = 'gap' AND gap.gap_kind IS DISTINCT FROM 'not_observable') AS losses
FROM events WHERE session_id = ? GROUP BY 1 ORDER BY 1
"""


def coverage_of(con, session_id: str) -> dict:
    """The session's coverage summary (issue 24), from its events: per source (``producer.source``)
    the events it recorded, what it cannot contain at all (its ``gap`` events of kind
    ``not_observable``: ``field`` and ``reason``) and how many losses (other gaps) it has; and
    ``cannot_prove``, one line per statement. Deterministic (sorted), so the summary written into a
    bundle's header can be recomputed from the bundle's events and compared."""
    sources, lines = [], []
    for source, agent, events, statements, losses in con.execute(COVERAGE_SQL, [session_id]).fetchall():
        stmts = [{"field": st["field"], "reason": st["reason"]} for st in (statements or [])]
        sources.append({"source": source, "agent": agent, "events": int(events), "not_observable": stmts,
                        "losses": int(losses)})
        lines += [f"{source} ({agent}): {st['field']} -- {st['reason']}" for st in stmts]
    return {"format": 1, "sources": sources, "cannot_prove": lines}


def checkpoint_rows(con, session_id: str) -> list[dict]:
    cur = con.execute("SELECT seq, checkpoint FROM events WHERE session_id = ? AND kind = 'checkpoint' ORDER BY seq",
                      [session_id])
    return [{"seq": s, **cp} for s, cp in cur.fetchall()]


def replay(raw: RawSession, *, keyring: Keyring | None = None, store: SchemaStore | None = None,
           alerts: list[dict] | None = None, bundle_check: BundleCheck | None = None) -> Replay:
    """Verify and load ``raw``. Never raises for bad data: a broken chain or undecodable events are
    reported in the verification (events after an undecodable one are left out and said so).
    ``bundle_check``: `check_bundle` of ``raw.bundle`` when the caller has it already."""
    store = store or load_store()
    keyring = Keyring() if keyring is None else keyring  # (an empty one may still know simulator keys)
    bcheck = None
    box: dict = {}
    b = raw.bundle
    big = b is not None and bundle_check is None and len(b.data) >= PARALLEL_MIN_BYTES
    if big and not b.framed and b.fingerprint == store.current.fingerprint and native.decoder() is not None:
        # The native decoder decodes, frames and checks the chain in one process, on two threads.
        bcheck = _native_check_and_load(raw, store, box)
    if bcheck is not None:
        chain = _chain_of(bcheck, raw)
    elif big and _can_fork():
        # A big bundle without the native decoder: it is framed and its raw chain verified in a
        # forked process (pure Python hashing, no GIL shared) while this one has DuckDB decode it.
        if not b.framed and b.fingerprint == store.current.fingerprint:
            # Decoding starts at once, on parts cut at sync markers; once the child's framing is
            # back, the cuts must be block starts and the rows one per event, else decode again.
            bcheck = _check_in_child(b, lambda: box.update(_try_load_unframed(b, store)))
            ws = box.get("ws")
            if ws is None or not (b.framing_error is None and ws.events == len(b.spans)
                                  and cuts_are_block_starts(b, box["cuts"])):
                if ws is not None:
                    ws.close()
                box = _try_load(raw, store)
        else:
            bcheck = _check_in_child(b, lambda: box.update(_try_load(raw, store)))
        chain = _chain_of(bcheck, raw)
    else:
        if raw.bundle is not None:
            bcheck = bundle_check or check_bundle(raw.bundle)
            chain = _chain_of(bcheck, raw)
        else:
            chain = verify_values(raw.values, session_id=raw.session_id)
        box.update(_try_load(raw, store))
    note = None
    err = box.get("error")
    if err is not None and not isinstance(err, WorksetError):
        raise err
    if err is not None:
        prefix = RawSession(raw.session_id, list(raw.values[: chain.verified]), raw.source, raw.where,
                            raw.provenance[: chain.verified], raw.writer_schemas)
        ws = load(prefix, store)
        loaded = chain.verified
        note = f"{err}; showing the {chain.verified} verified events only"
    else:
        ws = box["ws"]
        loaded = len(raw.values)
    # whatever decoded them, the rows must be the verified events, one each (a decoder can stop early)
    try:
        ws, undecodable, why = _rows_of_verified_events(raw, chain, ws, store, loaded)
    except BaseException:
        ws.close()
        raise
    con = ws.con
    ended = con.execute("SELECT count(*) FROM events WHERE session_id = ? AND kind = 'session_ended'",
                        [raw.session_id]).fetchone()[0] > 0
    gaps, lost = con.execute("SELECT count(*), coalesce(sum(gap.lost_events), 0) FROM events "
                             "WHERE session_id = ? AND kind = 'gap' AND gap.gap_kind IS DISTINCT FROM 'not_observable'",
                             [raw.session_id]).fetchone()  # coverage statements are not losses
    embedded = None
    if raw.bundle is not None:
        embedded = Keyring()
        for pem in raw.bundle.public_keys.values():
            try:
                embedded.add(load_public(pem), simulator=is_simulator_key(pem))
            except Exception:  # a damaged embedded key is reported as unknown, never trusted
                continue
    cps = _verify.check_checkpoints(checkpoint_rows(con, raw.session_id), chain, raw.session_id, keyring, embedded)
    v = _verify.build(chain, raw.session_id, checkpoints=cps, ended=ended, gaps=int(gaps), lost_events=int(lost),
                      duplicates_dropped=raw.duplicates_dropped,
                      source={"kind": raw.source, "where": raw.where,
                              "scanned": len(raw.values) if raw.scanned is None else raw.scanned})
    after = -1 if v.signed_through is None else v.signed_through
    v.unsigned_events = con.execute(
        "SELECT count(*) FROM events WHERE session_id = ? AND seq > ? AND kind NOT IN ('checkpoint', 'session_ended')",
        [raw.session_id, after]).fetchone()[0]
    if bcheck is not None and not bcheck.ok and v.status != "broken":
        v.status, v.first_bad_seq, v.reason, v.detail = "broken", bcheck.first_bad_seq, bcheck.reason, bcheck.detail
    if undecodable is not None and (v.first_bad_seq is None or undecodable <= v.first_bad_seq):
        v.status, v.first_bad_seq, v.reason, v.detail = "broken", undecodable, "undecodable", why
        v.verified = undecodable - chain.first_seq
        v.unsigned_events += max(0, chain.verified - v.verified)  # (not shown, so covered by nothing shown)
    if note:
        v.detail = (v.detail + "; " if v.detail else "") + note
    return Replay(raw, chain, ws, v, bcheck, list(alerts or []), note, store)


# --- alerts (optional: the detection stage adds an `alerts` table to the warehouse) ---------------

_ALERT_COLUMNS = ("alert_id", "session_id", "rule_id", "model_id", "severity", "title", "first_seq", "last_seq",
                  "evidence_seqs", "explanation", "created_at")


def warehouse_alerts(con, session_id: str) -> list[dict]:
    """Alerts of a session from the warehouse's ``alerts`` table, when there is one (else [])."""
    cols = [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'alerts' ORDER BY ordinal_position"
    ).fetchall()]
    if "session_id" not in cols:
        return []
    use = [c for c in _ALERT_COLUMNS if c in cols]
    quoted = idents(use)
    order = "first_seq, " if "first_seq" in cols else ""
    rows = con.execute(f"SELECT {quoted} FROM alerts WHERE session_id = ? ORDER BY {order}1", [session_id]).fetchall()
    out = []
    for r in rows:
        a = dict(zip(use, r))
        ev = a.get("evidence_seqs")
        if isinstance(ev, str):
            ev = [int(x) for x in ev.replace("[", "").replace("]", "").split(",") if x.strip().lstrip("-").isdigit()]
        if not ev:
            ev = [s for s in (a.get("first_seq"), a.get("last_seq")) if s is not None]
        a["evidence_seqs"] = sorted({int(s) for s in ev or []})
        a["alert_id"] = str(a.get("alert_id") or f"alert-{len(out) + 1}")
        a["source"] = a.get("rule_id") or a.get("model_id") or "?"
        if a.get("created_at") is not None:
            a["created_at"] = str(a["created_at"])
        out.append(a)
    return out


# --- bundles: offline verification --------------------------------------------------------------

@dataclass
class BundleVerification:
    path: str
    ok: bool
    check: "BundleCheck"
    verification: _verify.Verification | None
    problem: str | None = None  # what failed, in one sentence
    provenance: "ProvenanceCheck | None" = None  # the operator's signed header, tree head and inclusion proof
    coverage: dict | None = None  # what the sources cannot contain (issue 24), see `coverage_of`
    coverage_in_header: bool = False  # from the (digested, operator-signed) header; else from the events only

    @property
    def first_bad_seq(self) -> int | None:
        if self.verification is not None and self.verification.first_bad_seq is not None:
            return self.verification.first_bad_seq
        return self.check.first_bad_seq

    def as_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "problem": self.problem, "first_bad_seq": self.first_bad_seq,
                "structure": self.check.as_dict(),
                "verification": self.verification.as_dict() if self.verification else None,
                "provenance": self.provenance.as_dict() if self.provenance else None,
                "coverage": self.coverage, "coverage_in_header": self.coverage_in_header}


def verify_bundle(path, keyring: Keyring | None = None, *, require_signature: bool = False,
                  store: SchemaStore | None = None, operators: Keyring | None = None) -> BundleVerification:
    """Verify a bundle file offline (no warehouse, no broker). Never raises for bad data.

    Structure first (header digest, framing, chain, count, head: raw bytes only). Only a
    structurally sound bundle is decoded, to check its checkpoint events against the header's list,
    their signatures, and to count gaps. Then its provenance (`replay.bundle.check_provenance`):
    the log operator's signed header, signed tree head and inclusion proof, with the trusted
    ``operators`` keys -- made here in Python from the header and the verified chain whichever
    decoder loaded the events. Provenance that contradicts the bundle is always a failure; missing
    or untrusted provenance is one with ``require_signature``."""
    from .bundle import BundleError, read_bundle
    from .sources import BundleSource

    try:
        b = read_bundle(path)
    except BundleError as exc:
        chk = BundleCheck(False, None, None, 0, None, None, "bad_header", str(exc), header_ok=False)
        return BundleVerification(str(path), False, chk, None, str(exc))
    chk = None
    if len(b.data) < PARALLEL_MIN_BYTES:  # cheap: find structural damage before paying for decoding
        chk = check_bundle(b)
        if not chk.ok:
            where = f"first bad seq {chk.first_bad_seq}: " if chk.first_bad_seq is not None else ""
            return BundleVerification(str(path), False, chk, None, f"{where}{chk.reason}: {chk.detail}")
    raw = BundleSource(path, b).read()
    with replay(raw, keyring=keyring, store=store, bundle_check=chk) as r:
        chk = r.bundle_check
        if not chk.ok:
            where = f"first bad seq {chk.first_bad_seq}: " if chk.first_bad_seq is not None else ""
            return BundleVerification(str(path), False, chk, None, f"{where}{chk.reason}: {chk.detail}")
        v = r.verification
        listed = sorted((int(c["seq"]), c["signature"]) for c in b.checkpoints)
        from .bundle import checkpoint_entry

        actual = sorted((e["seq"], e["signature"]) for e in (checkpoint_entry(c["seq"], c) for c in r.checkpoint_rows()))
        coverage = r.coverage()
    from .bundle import check_provenance, header_coverage

    try:
        stated = header_coverage(b)
    except BundleError as exc:
        stated = {"malformed": str(exc)}

    prov = check_provenance(b, operators or Keyring())
    problem = None
    if v.status == "broken" and v.reason == "undecodable":  # (its checkpoints and coverage are cut short too)
        problem = f"first bad seq {v.first_bad_seq}: {v.reason}: {v.detail}"
    elif listed != actual:
        problem = "the header's checkpoint list does not match the checkpoint events in the bundle"
        v.status, v.reason, v.detail = "broken", "header_checkpoints", problem
    elif stated is not None and stated != coverage:
        problem = ("the header's coverage summary does not match the coverage statements and gaps of the bundle's "
                   "events")
        v.status, v.reason, v.detail = "broken", "header_coverage", problem
    elif v.status == "broken":
        problem = f"first bad seq {v.first_bad_seq}: {v.reason}: {v.detail}"
    elif prov.failed:
        problem = f"provenance {prov.status}: {prov.detail}"
    elif require_signature and v.unsigned_events:
        sim = sorted({c.key_id for c in v.checkpoints if c.status == "simulator_key"})
        problem = (f"signed only by simulator key {', '.join(sim)}, derived from a public seed: never trusted"
                   if sim and v.signed_through is None else
                   "no trusted signature covers the bundle's events" if v.signed_through is None else
                   f"trusted signatures cover seq 0..{v.signed_through} only: {v.unsigned_events} later events "
                   "are unsigned")
    elif require_signature and not prov.ok:
        problem = f"provenance {prov.status}: {prov.detail}"
    return BundleVerification(str(path), problem is None, chk, v, problem, prov, coverage, stated is not None)
