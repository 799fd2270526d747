"""The warehouse's log-wide Merkle tree: leaves, tree state, signed tree heads, published heads.

The design is Certificate Transparency's (RFC 9162) and Sigstore Rekor's: the ingest side is the
*log operator*. Every ingest transaction that advances sessions appends, in the same transaction,
one leaf per session it advanced; the leaf entry is the session's new chain head::

    agentledger-head-v1\\n<session_id>\\n<head_seq>\\n<head_hash>\\n<event_count>

The chain hash of the head commits to every earlier event of the session, so one leaf proves the
whole prefix 0..head_seq, and the tree grows by one leaf per session per batch, not per event.
Hashing is RFC 9162's (`schemas.merkle`); the tree state (``tree_state``: the log id, a random id
made once per warehouse, the size, the root and the frontier of perfect subtrees) is one row that
every appending transaction updates, so on a DuckLake two concurrent writers always conflict on it
and one of them retries: leaf indexes never collide.

A *signed tree head* (STH) is the log operator's Ed25519 signature over
``agentledger-tree-head-v1\\n<log_id>\\n<tree_size>\\n<root_hex>\\n<timestamp_ms>``
(`schemas.signing.tree_head_message`), stored in ``tree_heads`` in the transaction that made it. It
is then *published outside the warehouse*: a line appended to an append-only JSON-lines heads file
(``$AGENTLEDGER_HOME/heads/<log_id>.jsonl``) and, with Kafka, a message on ``<events topic>.heads``
(key = log id), each with a consistency proof (RFC 9162 §2.1.4) from the previously published head.
Whoever rewrites the warehouse afterwards cannot make its tree match what was published without the
operator key *and* every published copy; `check_tree` (used by `agentledger verify`) finds it.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from . import envvars, merkle
from .canonical import canonical_json
from .errors import AgentLedgerError
from .signing import ALGORITHM, Keyring, Signer, tree_head_message
from .warehouse import scalar

if TYPE_CHECKING:
    import duckdb

    from .config import Settings

log = logging.getLogger(__name__)

LEAF_PREFIX = "agentledger-head-v1"
HEAD_FORMAT = "agentledger.tree-head/1"
TREE_TABLES = ("tree_leaves", "tree_state", "tree_heads")
TREE_HEAD_EVERY_ENV = "AGENTLEDGER_TREE_HEAD_EVERY_S"
DEFAULT_TREE_HEAD_EVERY_S = envvars.declared(TREE_HEAD_EVERY_ENV).default


class TreeError(AgentLedgerError):
    """The tree tables are missing or inconsistent, or a tree head / proof is malformed."""


def leaf_entry(session_id: str, head_seq: int, head_hash: str, event_count: int) -> bytes:
    return f"{LEAF_PREFIX}\n{session_id}\n{int(head_seq)}\n{head_hash}\n{int(event_count)}".encode()


def session_leaf_hash(session_id: str, head_seq: int, head_hash: str, event_count: int) -> bytes:
    return merkle.leaf_hash(leaf_entry(session_id, head_seq, head_hash, event_count))


# --- the tree state ------------------------------------------------------------------------------

@dataclass
class TreeState:
    log_id: str
    frontier: merkle.Frontier

    @property
    def size(self) -> int:
        return self.frontier.size

    @property
    def root(self) -> str:
        return self.frontier.root().hex()


def has_tree(con: duckdb.DuckDBPyConnection) -> bool:
    rows = scalar(con.execute("""SELECT count(*) FROM information_schema.tables WHERE table_name IN ('tree_leaves',
                          'tree_state', 'tree_heads') AND table_catalog = current_database()
                          AND table_schema = current_schema()"""))
    return bool(rows == len(TREE_TABLES))


def read_state(con: duckdb.DuckDBPyConnection) -> TreeState:
    rows = con.execute("SELECT log_id, tree_size, root_hash, frontier FROM tree_state").fetchall()
    if len(rows) != 1:
        raise TreeError(f"the tree_state table holds {len(rows)} rows, not exactly one")
    log_id, size, root_hash, frontier = rows[0]
    try:
        f = merkle.Frontier.from_hex(size, frontier or [])
    except (merkle.ProofError, ValueError, TypeError) as exc:
        raise TreeError(f"the stored tree frontier is damaged: {exc}") from None
    if f.root().hex() != root_hash:
        raise TreeError(f"the stored tree root of size {size} is not the root of its stored frontier")
    return TreeState(log_id, f)


def create_tree(con: duckdb.DuckDBPyConnection) -> None:
    """The one tree-state row of a new tree (a new random log id), with one leaf per session the
    warehouse already holds (a warehouse made before the tree existed: the tree vouches for those
    sessions from now on). Run inside the transaction that creates the tree tables."""
    con.execute("INSERT INTO tree_state VALUES (?, 0, ?, [], now()::TIMESTAMP)",
                [uuid.uuid4().hex, merkle.EMPTY_ROOT.hex()])
    rows = con.execute("SELECT session_id, head_seq, head_hash, event_count FROM chain_heads "
                       "ORDER BY session_id").fetchall()
    if rows:
        append_leaves(con, rows)


def append_leaves(con: duckdb.DuckDBPyConnection, heads: list[tuple[str, int, str, int]]) -> TreeState:
    """Append one leaf per (session_id, head_seq, head_hash, event_count), in the given order, inside
    the caller's transaction: O(len(heads) + log n) hashes, one INSERT and one UPDATE of the state."""
    import pyarrow as pa

    state = read_state(con)
    f = state.frontier.copy()
    start = f.size
    hashes = []
    for sid, seq, h, n in heads:
        lh = session_leaf_hash(sid, seq, h, n)
        hashes.append(lh.hex())
        f.append(lh)
    tbl = pa.table({
        "leaf_index": pa.array(range(start, start + len(heads)), pa.int64()),
        "session_id": pa.array([r[0] for r in heads], pa.string()),
        "head_seq": pa.array([r[1] for r in heads], pa.int64()),
        "head_hash": pa.array([r[2] for r in heads], pa.string()),
        "event_count": pa.array([r[3] for r in heads], pa.int64()),
        "leaf_hash": pa.array(hashes, pa.string()),
    })
    con.register("_leaves", tbl)
    try:
        con.execute("INSERT INTO tree_leaves SELECT leaf_index, session_id, head_seq, head_hash, event_count, "
                    "leaf_hash, now()::TIMESTAMP FROM _leaves")
    finally:
        con.unregister("_leaves")
    # every appending transaction rewrites this one row: concurrent appenders conflict and retry
    con.execute("UPDATE tree_state SET tree_size = ?, root_hash = ?, frontier = ?, updated_at = now()::TIMESTAMP "
                "WHERE log_id = ?", [f.size, f.root().hex(), f.to_hex(), state.log_id])
    return TreeState(state.log_id, f)


def leaf_hashes(con: duckdb.DuckDBPyConnection, lo: int, hi: int) -> list[bytes]:
    rows = con.execute("SELECT leaf_index, leaf_hash FROM tree_leaves WHERE leaf_index >= ? AND leaf_index < ? "
                       "ORDER BY leaf_index", [lo, hi]).fetchall()
    if [r[0] for r in rows] != list(range(lo, hi)):
        raise TreeError(f"the tree leaves {lo}..{hi - 1} are not all there exactly once")
    return [bytes.fromhex(r[1]) for r in rows]


# --- signed tree heads ---------------------------------------------------------------------------

@dataclass
class TreeHead:
    log_id: str
    tree_size: int
    root_hash: str
    timestamp_ms: int
    key_id: str
    signature: bytes
    algorithm: str = ALGORITHM

    def message(self) -> bytes:
        return tree_head_message(self.log_id, self.tree_size, self.root_hash, self.timestamp_ms)

    def as_dict(self) -> dict[str, Any]:
        return {"log_id": self.log_id, "tree_size": self.tree_size, "root_hash": self.root_hash,
                "timestamp_ms": self.timestamp_ms, "algorithm": self.algorithm, "key_id": self.key_id,
                "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_dict(cls, d: Any) -> "TreeHead":
        """Strict: a malformed head raises `TreeError` (it came from a file or a bundle)."""
        try:
            if not isinstance(d, dict):
                raise TypeError("not an object")
            head = cls(str(d["log_id"]), _int(d["tree_size"]), str(d["root_hash"]), _int(d["timestamp_ms"]),
                       str(d["key_id"]), base64.b64decode(str(d["signature"]), validate=True),
                       str(d.get("algorithm") or ALGORITHM))
            if len(bytes.fromhex(head.root_hash)) != merkle.HASH_LEN or head.tree_size < 0:
                raise ValueError("bad root or size")
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise TreeError(f"not a tree head: {exc}") from None
        return head

    def check(self, keyring: Keyring) -> str:
        """``valid``, ``unknown_key`` (no trusted operator key with its id), ``bad_signature``,
        ``unsupported_algorithm``."""
        if self.algorithm != ALGORITHM:
            return "unsupported_algorithm"
        if self.key_id not in keyring:
            return "unknown_key"
        return "valid" if keyring.verify(self.key_id, self.signature, self.message()) else "bad_signature"


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise TypeError(f"{v!r} is not an integer")
    return int(v)


def sign_head(con: duckdb.DuckDBPyConnection, signer: Signer, state: TreeState | None = None) -> TreeHead | None:
    """Sign the current tree (inside the caller's transaction) unless it is empty or already signed
    at this size; the head is stored in ``tree_heads`` with the frontier it was made from."""
    state = state or read_state(con)
    if state.size == 0:
        return None
    last = scalar(con.execute("SELECT max(tree_size) FROM tree_heads WHERE log_id = ?", [state.log_id]))
    if last is not None and last >= state.size:
        return None
    ts = int(time.time() * 1000)
    root = state.root
    head = TreeHead(state.log_id, state.size, root, ts, signer.key_id,
                    signer.sign(tree_head_message(state.log_id, state.size, root, ts)))
    con.execute("INSERT INTO tree_heads VALUES (?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
                [head.log_id, head.tree_size, head.root_hash, head.timestamp_ms, head.algorithm, head.key_id,
                 head.signature.hex(), state.frontier.to_hex()])
    return head


_HEAD_COLUMNS = "log_id, tree_size, root_hash, timestamp_ms, key_id, signature, algorithm"


def _head_row(r: tuple[Any, ...]) -> TreeHead:
    return TreeHead(r[0], int(r[1]), r[2], int(r[3]), r[4], bytes.fromhex(r[5] or ""), r[6] or ALGORITHM)


def latest_head(con: duckdb.DuckDBPyConnection) -> TreeHead | None:
    r = con.execute(f"SELECT {_HEAD_COLUMNS} FROM tree_heads ORDER BY tree_size DESC, timestamp_ms DESC "
                    "LIMIT 1").fetchone()
    return _head_row(r) if r else None


def stored_heads(con: duckdb.DuckDBPyConnection) -> list[TreeHead]:
    return [_head_row(r) for r in con.execute(
        f"SELECT {_HEAD_COLUMNS} FROM tree_heads ORDER BY tree_size, timestamp_ms").fetchall()]


def head_covering(con: duckdb.DuckDBPyConnection, leaf_index: int, keyring: Keyring | None = None) -> TreeHead | None:
    """The newest stored head whose tree holds leaf ``leaf_index`` (signed by a key of ``keyring`` when given)."""
    for r in con.execute(f"SELECT {_HEAD_COLUMNS} FROM tree_heads WHERE tree_size > ? "
                         "ORDER BY tree_size DESC, timestamp_ms DESC", [leaf_index]).fetchall():
        head = _head_row(r)
        if keyring is None or head.check(keyring) == "valid":
            return head
    return None


def frontier_at(con: duckdb.DuckDBPyConnection, size: int) -> merkle.Frontier:
    """The frontier of the tree's first ``size`` leaves: stored with a head of that size, else built
    from the leaves (O(size))."""
    r = con.execute("SELECT frontier FROM tree_heads WHERE tree_size = ? LIMIT 1", [size]).fetchone()
    if r is not None:
        try:
            return merkle.Frontier.from_hex(size, r[0] or [])
        except merkle.ProofError:
            pass
    f = merkle.Frontier()
    f.extend(leaf_hashes(con, 0, size))
    return f


def inclusion_proof(con: duckdb.DuckDBPyConnection, leaf_index: int, tree_size: int) -> list[bytes]:
    """RFC 9162 PATH(leaf_index, D[tree_size]) from the stored leaf hashes (O(tree_size))."""
    return merkle.inclusion_path(leaf_index, tree_size, merkle.leaves_node(leaf_hashes(con, 0, tree_size)))


def consistency_proof(con: duckdb.DuckDBPyConnection, old_size: int, new_size: int) -> list[bytes]:
    """RFC 9162 PROOF(old_size, D[new_size]) from the old frontier and the leaves added since."""
    if old_size == 0 or old_size == new_size:
        return []
    proof, _ = merkle.consistency_from_frontier(frontier_at(con, old_size), leaf_hashes(con, old_size, new_size))
    return proof


# --- published heads -----------------------------------------------------------------------------

@dataclass
class PublishedHead:
    """One published tree head: the head, and the consistency proof from the one published before."""

    head: TreeHead
    prev_size: int | None
    prev_root: str | None
    consistency: list[bytes]
    where: str

    def as_dict(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, **self.head.as_dict(), "prev_tree_size": self.prev_size,
                "prev_root_hash": self.prev_root, "consistency": [h.hex() for h in self.consistency]}

    @classmethod
    def parse(cls, data: bytes | str, where: str) -> "PublishedHead":
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("format") != HEAD_FORMAT:
                raise TreeError(f"not a published tree head (format {d.get('format') if isinstance(d, dict) else None!r})")
            head = TreeHead.from_dict(d)
            prev_size = None if d.get("prev_tree_size") is None else _int(d["prev_tree_size"])
            prev_root = None if d.get("prev_root_hash") is None else str(d["prev_root_hash"])
            proof = [bytes.fromhex(str(h)) for h in d.get("consistency") or []]
        except (ValueError, TypeError) as exc:
            raise TreeError(f"{where}: not a published tree head: {exc}") from None
        except TreeError as exc:
            raise TreeError(f"{where}: {exc}") from None
        return cls(head, prev_size, prev_root, proof, where)

    def check_consistency(self) -> str | None:
        """None when the proof from the previous published head verifies (or there is none)."""
        if self.prev_size is None:
            return None
        try:
            merkle.verify_consistency(self.prev_size, self.head.tree_size, bytes.fromhex(self.prev_root or ""),
                                      bytes.fromhex(self.head.root_hash), self.consistency)
        except (merkle.ProofError, ValueError) as exc:
            return str(exc)
        return None


class HeadsFile:
    """An append-only JSON-lines file of published heads (0600; appends under an flock, fsync-ed)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.label = str(self.path)

    def read(self) -> tuple[list[PublishedHead], list[str]]:
        """(heads, problems): a line that does not parse is a problem, never an exception."""
        heads, problems = [], []
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise TreeError(f"cannot read the heads file {self.path}: {exc}") from None
        for i, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                heads.append(PublishedHead.parse(line, f"{self.path}:{i}"))
            except TreeError as exc:
                problems.append(str(exc))
        return heads, problems

    def last(self) -> PublishedHead | None:
        if not self.path.exists():
            return None
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            chunk = b""
            pos = end
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step) + chunk
                lines = [ln for ln in chunk.splitlines() if ln.strip()]
                if len(lines) > 1 or (lines and pos == 0):
                    return PublishedHead.parse(lines[-1], f"{self.path}:last")
        return None

    def append(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = canonical_json(doc) + b"\n"
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)


class HeadsTopic:
    """A Kafka topic of published heads (one partition, key = log id), through the Kafka adapter."""

    def __init__(self, bootstrap_servers: str, topic: str):
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.label = f"kafka:{topic}"
        self._sink: Any = None  # a KafkaSink once the first head is published

    def read(self) -> tuple[list[PublishedHead], list[str]]:
        from .transport import kafka_source

        heads, problems = [], []
        src = kafka_source(self.bootstrap_servers, client_id="agentledger-heads")
        try:
            for p in src.partitions(self.topic):
                for m in src.scan(self.topic, p).messages:
                    try:
                        heads.append(PublishedHead.parse(m.value or b"", f"{self.label}/{p}@{m.offset}"))
                    except TreeError as exc:
                        problems.append(str(exc))
        finally:
            src.close()
        return heads, problems

    def last(self) -> PublishedHead | None:
        from .transport import kafka_source

        src = kafka_source(self.bootstrap_servers, client_id="agentledger-heads")
        try:
            if not src.partitions(self.topic):
                return None
            end = src.end_offsets(self.topic).get(0, 0)
            msgs = src.scan(self.topic, 0, max(end - 1, 0), timeout_s=30).messages if end else []
        finally:
            src.close()
        m = msgs[-1] if msgs else None
        return PublishedHead.parse(m.value or b"", f"{self.label}@{m.offset}") if m is not None else None

    def append(self, doc: dict[str, Any]) -> None:
        from .transport import kafka_sink

        if self._sink is None:
            self._sink = kafka_sink(self.bootstrap_servers, default_partitions=1)
            self._sink.ensure_topic(self.topic, 1)
        self._sink.send(self.topic, str(doc["log_id"]).encode(),
                        canonical_json(doc))
        self._sink.flush(timeout=15)

    def close(self) -> None:
        if self._sink is not None:
            try:
                self._sink.close(timeout=5)
            except Exception:  # noqa: BLE001 -- closing after a failed publish
                log.debug("closing the heads producer failed", exc_info=True)
            self._sink = None


def heads_file_path(home: Path, log_id: str) -> Path:
    return Path(home) / "heads" / f"{log_id}.jsonl"


def heads_topic_name(events_topic: str) -> str:
    return f"{events_topic}.heads"


def _pin_path(home: Path, warehouse_url: str) -> Path:
    import hashlib

    try:  # a warehouse inside the home is named relative to it, so a moved or copied home keeps its pin
        key = str(Path(warehouse_url).resolve().relative_to(Path(home).resolve()))
    except (ValueError, OSError):
        key = warehouse_url
    return Path(home) / "heads" / "pins" / hashlib.sha256(key.encode()).hexdigest()[:24]


def pin_log(home: Path, warehouse_url: str, log_id: str) -> None:
    """Remember (once) which log a warehouse published heads for: a warehouse whose tree tables were
    dropped and re-made gets a new log id, and `pinned_log` lets verify notice."""
    p = _pin_path(home, warehouse_url)
    if p.exists():
        return
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{log_id}\n{warehouse_url}\n")


def pinned_log(home: Path, warehouse_url: str) -> str | None:
    try:
        return _pin_path(home, warehouse_url).read_text().split("\n", 1)[0].strip() or None
    except OSError:
        return None


def default_destinations(settings: Settings, log_id: str) -> list[Any]:
    """The heads file in the home, and the heads topic when Kafka is the transport."""
    out: list[Any] = [HeadsFile(heads_file_path(settings.home, log_id))]
    if settings.uses_kafka:
        out.append(HeadsTopic(str(settings.bootstrap_servers), heads_topic_name(settings.topic)))
    return out


class HeadsPublisher:
    """Publishes the warehouse's latest signed head to each destination, with a consistency proof from
    the last head published there. A failed publish is logged and retried by the next one (its proof
    then spans from the last head that did get published); a head no larger than the last published
    one is skipped. A warehouse tree that does not extend the last published head is never published
    over it: that is logged as an error (``agentledger verify`` reports it)."""

    def __init__(self, destinations: list[Any]):
        self.destinations = destinations
        self._last: dict[int, PublishedHead | None] = {}
        self.published = 0
        self.failures = 0

    def publish(self, con: duckdb.DuckDBPyConnection) -> None:
        head = latest_head(con)
        if head is None:
            return
        for i, d in enumerate(self.destinations):
            try:
                if i not in self._last:
                    self._last[i] = d.last()
                last = self._last[i]
                if last is not None and last.head.log_id == head.log_id and last.head.tree_size >= head.tree_size:
                    if last.head.tree_size == head.tree_size and last.head.root_hash != head.root_hash:
                        log.error("the warehouse's tree head of size %d differs from the one published in %s",
                                  head.tree_size, d.label)
                    continue
                prev = last.head if last is not None and last.head.log_id == head.log_id else None
                proof = consistency_proof(con, prev.tree_size, head.tree_size) if prev else []
                ph = PublishedHead(head, prev.tree_size if prev else None, prev.root_hash if prev else None,
                                   proof, d.label)
                problem = ph.check_consistency()
                if problem:
                    log.error("not publishing tree head %d to %s: the warehouse tree does not extend the head "
                              "published there (%s)", head.tree_size, d.label, problem)
                    continue
                d.append(ph.as_dict())
                self._last[i] = ph
                self.published += 1
            except Exception as exc:  # noqa: BLE001 -- publishing must never stop ingest; retried next time
                self.failures += 1
                self._last.pop(i, None)
                log.warning("publishing tree head %d to %s failed (retried with the next head): %s",
                            head.tree_size, d.label, exc)

    def close(self) -> None:
        for d in self.destinations:
            if hasattr(d, "close"):
                d.close()


@dataclass
class TreeHeads:
    """What the ingest side does about tree heads: sign with ``signer`` (None: leaves only, no heads),
    at most every ``every_s`` seconds while following, and publish with ``publisher``."""

    signer: Signer | None
    publisher: HeadsPublisher | None = None
    every_s: float = DEFAULT_TREE_HEAD_EVERY_S


def tree_heads_for(settings: Settings, con: duckdb.DuckDBPyConnection, env: Mapping[str, str] | None = None) -> TreeHeads:
    """The operator key (created on first use) and the default publishing destinations."""
    from .signing import load_operator_signer

    env = os.environ if env is None else env
    signer = load_operator_signer(settings, env, create=True)
    state = read_state(con)
    every = envvars.get(TREE_HEAD_EVERY_ENV, env)
    pin_log(settings.home, settings.warehouse, state.log_id)
    return TreeHeads(signer, HeadsPublisher(default_destinations(settings, state.log_id)), every)


# --- checking the tree (agentledger verify) ------------------------------------------------------

@dataclass
class TreeReport:
    ok: bool = True
    log_id: str | None = None
    size: int = 0
    root_hash: str | None = None
    heads: int = 0  # stored signed heads
    heads_valid: int = 0  # signed by a trusted operator key, root as recomputed
    published: int = 0  # published heads read
    published_valid: int = 0
    published_max_size: int | None = None
    covered_size: int = 0  # leaves covered by a trusted signed head (published ones when any were given)
    coverage_from: str = "stored"
    sources: list[str] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list[Any])
    warnings: list[str] = field(default_factory=list)

    def problem(self, code: str, detail: str) -> None:
        self.ok = False
        self.problems.append({"code": code, "detail": detail})

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_tree(con: duckdb.DuckDBPyConnection, keyring: Keyring, sources: Iterable[Any] = (), *, require_sources: bool = False) -> TreeReport:
    """Recompute the tree from the leaves and check it against the stored state, every stored signed
    head and every published head of ``sources`` (`HeadsFile` / `HeadsTopic`). Never raises for bad data."""
    rep = TreeReport()
    if not has_tree(con):
        rep.problem("no_tree", "the warehouse has no Merkle tree tables (dropped, or made by an older agentledger: "
                               "run `agentledger ingest` once to add them)")
        return rep
    rows = con.execute("SELECT log_id, tree_size, root_hash FROM tree_state").fetchall()
    if len(rows) != 1:
        rep.problem("tree_state", f"the tree_state table holds {len(rows)} rows, not exactly one")
        if not rows:
            return rep
    rep.log_id, state_size, state_root = rows[0]
    stored = stored_heads(con)
    published: list[PublishedHead] = []
    for src in sources:
        rep.sources.append(src.label)
        try:
            got, bad = src.read()
        except Exception as exc:  # noqa: BLE001 -- an unreadable source is a finding, not a crash
            if require_sources or not isinstance(src, HeadsFile):
                rep.problem("heads_unreadable", f"{src.label}: {exc}")
            else:
                rep.warnings.append(f"{src.label}: {exc}")
            continue
        for p in bad:
            rep.problem("published_malformed", p)
        published.extend(got)
    want = {int(state_size)} | {h.tree_size for h in stored} | {p.head.tree_size for p in published}
    want |= {p.prev_size for p in published if p.prev_size is not None}
    roots: dict[int, str] = {0: merkle.EMPTY_ROOT.hex()}
    f = merkle.Frontier()
    expected = 0
    bad_leaf = None
    for idx, sid, seq, h, n, lh in con.execute(
            "SELECT leaf_index, session_id, head_seq, head_hash, event_count, leaf_hash FROM tree_leaves "
            "ORDER BY leaf_index").fetchall():
        if idx != expected:
            rep.problem("leaf_index", f"the tree leaves are not numbered 0, 1, 2, ...: leaf {expected} is "
                                      f"{'missing' if idx > expected else 'repeated'}")
            break
        calc = session_leaf_hash(sid, seq, h, n)
        if lh != calc.hex() and bad_leaf is None:
            bad_leaf = idx
            rep.problem("leaf_hash", f"leaf {idx} (session {sid}) does not hash to its stored leaf hash")
        f.append(calc)
        expected += 1
        if f.size in want:
            roots[f.size] = f.root().hex()
    rep.size = f.size
    rep.root_hash = f.root().hex()
    if f.size != state_size or rep.root_hash != state_root:
        rep.problem("root_mismatch", f"the tree recomputed from its {f.size} leaves has root {rep.root_hash[:16]}…, "
                                     f"the tree state says size {state_size}, root {str(state_root)[:16]}…")
    rep.heads = len(stored)
    covered_stored = 0
    for h in stored:
        status = h.check(keyring)
        if h.log_id != rep.log_id:
            rep.problem("head_log_id", f"a signed head of size {h.tree_size} names log {h.log_id}, not {rep.log_id}")
        elif h.tree_size > f.size:
            rep.problem("head_beyond_tree", f"a signed head of size {h.tree_size} is larger than the tree ({f.size})")
        elif roots.get(h.tree_size) != h.root_hash:
            rep.problem("head_root_mismatch", f"the signed head of size {h.tree_size} has root {h.root_hash[:16]}…, "
                                              f"the leaves give {roots.get(h.tree_size, '?')[:16]}…")
        elif status in ("bad_signature", "unsupported_algorithm"):
            rep.problem("head_bad_signature", f"the signed head of size {h.tree_size}: {status} (key {h.key_id})")
        elif status == "unknown_key":
            rep.warnings.append(f"the signed head of size {h.tree_size} is signed by key {h.key_id}, which is not "
                                "a trusted operator key")
        else:
            rep.heads_valid += 1
            covered_stored = max(covered_stored, h.tree_size)
    rep.published = len(published)
    by_size: dict[int, str] = {}
    covered_published = 0
    for p in published:
        h = p.head
        status = h.check(keyring)
        where = p.where
        if h.log_id != rep.log_id:
            rep.problem("published_log_id", f"{where}: the head names log {h.log_id}, this warehouse is {rep.log_id}")
            continue
        if by_size.setdefault(h.tree_size, h.root_hash) != h.root_hash:
            rep.problem("published_fork", f"{where}: two published heads of size {h.tree_size} with different roots")
        if status != "valid":
            rep.problem("published_bad_signature" if status != "unknown_key" else "published_unknown_key",
                        f"{where}: the published head of size {h.tree_size} is {status} (key {h.key_id})")
            continue
        why = p.check_consistency()
        if why:
            rep.problem("published_inconsistent", f"{where}: the consistency proof from size {p.prev_size} to "
                                                  f"{h.tree_size} does not verify: {why}")
        if h.tree_size > f.size:
            rep.problem("history_rewound", f"{where}: a head of size {h.tree_size} was published, the warehouse "
                                           f"tree has only {f.size} leaves (leaves were removed)")
            continue
        if roots.get(h.tree_size) != h.root_hash:
            rep.problem("history_rewritten", f"{where}: the published head of size {h.tree_size} has root "
                                             f"{h.root_hash[:16]}…, the warehouse's leaves give "
                                             f"{roots.get(h.tree_size, '?')[:16]}… (history was changed after it "
                                             "was published)")
            continue
        if p.prev_size is not None and p.prev_size <= f.size and roots.get(p.prev_size) != p.prev_root:
            rep.problem("history_rewritten", f"{where}: the head it extends (size {p.prev_size}) has a root the "
                                             "warehouse's leaves do not give")
            continue
        rep.published_valid += 1
        covered_published = max(covered_published, h.tree_size)
    if published:
        rep.published_max_size = max(p.head.tree_size for p in published)
    if rep.sources and (published or require_sources):
        rep.covered_size, rep.coverage_from = covered_published, "published"
    else:
        rep.covered_size, rep.coverage_from = covered_stored, "stored"
    return rep
