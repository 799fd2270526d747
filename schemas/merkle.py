"""The Merkle tree hashing of RFC 9162 (Certificate Transparency 2.0), section 2.1: pure functions.

Hashing (RFC 9162 §2.1.1, SHA-256): the hash of the empty tree is ``SHA-256()``; a leaf hash is
``SHA-256(0x00 ‖ entry)``; an interior node is ``SHA-256(0x01 ‖ left ‖ right)``. The tree over ``n``
leaves is the left-balanced one: its left subtree holds the largest power of two ``k < n`` leaves.

What this module provides, and where each comes from:

* `Frontier` -- the "compact range" ``[0, n)``: the roots of the perfect subtrees that the binary
  decomposition of ``n`` gives, largest first (RFC 9162 §2.1.1's MTH folded right to left). Appending
  ``k`` leaves costs O(k + log n) hashes, never O(n), so the ingest side (the log operator) keeps the
  tree as one small state row;
* `root` / `subtree_root` -- MTH(D[lo:hi]) from leaf hashes (§2.1.1);
* `inclusion_path` / `verify_inclusion` -- PATH(m, D[n]) (§2.1.3.1) and its verification (§2.1.3.2);
* `consistency_path` / `verify_consistency` -- PROOF(m, D[n]) (§2.1.4.1) and its verification
  (§2.1.4.2).

Proof generation takes a ``node(lo, hi)`` callback returning MTH(D[lo:hi]); `leaves_node` makes one
from a list of leaf hashes (O(n) work for a proof over the whole tree). `consistency_from_frontier`
builds a consistency proof from the old size's frontier and only the leaves added since -- every node
RFC 9162's SUBPROOF asks for is either a frontier node of the old size or lies wholly in the new part
(see its docstring) -- so publishing a new tree head costs O(new leaves + log n).

Hashes are ``bytes`` (32) here; callers store them as lowercase hex.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HASH_LEN = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_LEAF = b"\x00"
_NODE = b"\x01"


class ProofError(ValueError):
    """A proof that does not verify, or that is malformed (wrong length, bad sizes)."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(_LEAF + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _fold(nodes: Sequence[bytes]) -> bytes:
    """Root of a range given its perfect subtrees, largest first (fold from the right)."""
    if not nodes:
        return EMPTY_ROOT
    acc = nodes[-1]
    for h in reversed(nodes[:-1]):
        acc = node_hash(h, acc)
    return acc


@dataclass
class Frontier:
    """The compact range [0, size): ``nodes`` are the roots of the perfect subtrees of the binary
    decomposition of ``size``, largest first (one per set bit of ``size``)."""

    size: int = 0
    nodes: list[bytes] = field(default_factory=list)

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash: like a binary counter, merge equal-sized subtrees from the right."""
        nodes = self.nodes
        nodes.append(leaf)
        n = self.size
        while n & 1:
            right = nodes.pop()
            nodes[-1] = node_hash(nodes[-1], right)
            n >>= 1
        self.size += 1

    def extend(self, leaves: Sequence[bytes]) -> None:
        for h in leaves:
            self.append(h)

    def root(self) -> bytes:
        return _fold(self.nodes)

    def copy(self) -> "Frontier":
        return Frontier(self.size, list(self.nodes))

    def ranges(self) -> list[tuple[int, int]]:
        """The leaf range [lo, hi) each node covers, largest first."""
        out, lo = [], 0
        for bit in reversed(range(self.size.bit_length())):
            if self.size >> bit & 1:
                out.append((lo, lo + (1 << bit)))
                lo += 1 << bit
        return out

    def to_hex(self) -> list[str]:
        return [h.hex() for h in self.nodes]

    @classmethod
    def from_hex(cls, size: int, nodes: Sequence[str]) -> "Frontier":
        f = cls(int(size), [bytes.fromhex(h) for h in nodes])
        if len(f.nodes) != bin(f.size).count("1") or any(len(h) != HASH_LEN for h in f.nodes):
            raise ProofError(f"a frontier of size {size} has {bin(f.size).count('1')} nodes of 32 bytes, "
                             f"not {len(f.nodes)}")
        return f


def subtree_root(leaves: Sequence[bytes], lo: int = 0, hi: int | None = None) -> bytes:
    """MTH(D[lo:hi]) from leaf hashes (iterative, O(hi - lo))."""
    hi = len(leaves) if hi is None else hi
    f = Frontier()
    for i in range(lo, hi):
        f.append(leaves[i])
    return f.root()


def root(leaves: Sequence[bytes]) -> bytes:
    return subtree_root(leaves, 0, len(leaves))


Node = Callable[[int, int], bytes]


def leaves_node(leaves: Sequence[bytes]) -> Node:
    """``node(lo, hi)`` = MTH(D[lo:hi]) over a list of leaf hashes (memoised)."""
    memo: dict[tuple[int, int], bytes] = {}

    def node(lo: int, hi: int) -> bytes:
        key = (lo, hi)
        if key not in memo:
            memo[key] = subtree_root(leaves, lo, hi)
        return memo[key]

    return node


# --- inclusion (RFC 9162 §2.1.3) ------------------------------------------------------------------

def inclusion_path(index: int, size: int, node: Node) -> list[bytes]:
    """PATH(m, D[n]) of §2.1.3.1, bottom-up."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    path: list[bytes] = []

    def walk(m: int, lo: int, hi: int) -> None:
        if hi - lo == 1:
            return
        k = _split(hi - lo)
        if m < k:
            walk(m, lo, lo + k)
            path.append(node(lo + k, hi))
        else:
            walk(m - k, lo + k, hi)
            path.append(node(lo, lo + k))

    walk(index, 0, size)
    return path


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to (§2.1.3.2); raises `ProofError` if malformed."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not below the tree size {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if len(p) != HASH_LEN:
            raise ProofError("a proof hash is not 32 bytes")
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the path to the root")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes], expected_root: bytes) -> None:
    """Raise `ProofError` unless ``leaf`` is leaf ``index`` of the tree of ``size`` with ``expected_root``."""
    if root_from_inclusion(index, size, leaf, path) != expected_root:
        raise ProofError(f"the inclusion proof of leaf {index} does not lead to the root of the tree of size {size}")


# --- consistency (RFC 9162 §2.1.4) ----------------------------------------------------------------

def consistency_path(old: int, new: int, node: Node) -> list[bytes]:
    """PROOF(m, D[n]) of §2.1.4.1 (empty when m == n or m == 0)."""
    if not 0 <= old <= new:
        raise ProofError(f"no consistency proof from size {old} to the smaller size {new}")
    if old == 0 or old == new:
        return []
    path: list[bytes] = []

    def sub(m: int, lo: int, hi: int, b: bool) -> None:
        n = hi - lo
        if m == n:
            if not b:
                path.append(node(lo, hi))
            return
        k = _split(n)
        if m <= k:
            sub(m, lo, lo + k, b)
            path.append(node(lo + k, hi))
        else:
            sub(m - k, lo + k, hi, False)
            path.append(node(lo, lo + k))

    sub(old, 0, new, True)
    return path


def consistency_from_frontier(old: Frontier, new_leaves: Sequence[bytes]) -> tuple[list[bytes], Frontier]:
    """PROOF(m, D[n]) from the frontier of the old size ``m`` and the leaf hashes m..n-1 only.

    Every node SUBPROOF asks for is either MTH of the old tree's left part D[lo:lo+k] with m > k --
    a perfect subtree, aligned, and maximal inside [0, m), i.e. a frontier node of m -- or the m == n
    case (likewise a frontier node), or MTH(D[lo+k:hi]) with m <= k, which lies wholly in [m, n).
    So the old frontier and the new leaves suffice. Returns (proof, frontier of n)."""
    m = old.size
    n = m + len(new_leaves)
    by_range = dict(zip(old.ranges(), old.nodes))
    new_frontier = old.copy()
    new_frontier.extend(new_leaves)
    memo: dict[tuple[int, int], bytes] = {}

    def node(lo: int, hi: int) -> bytes:
        if (lo, hi) in by_range:
            return by_range[(lo, hi)]
        if lo < m:
            raise ProofError(f"internal: node [{lo}, {hi}) is neither an old frontier node nor new")
        if (lo, hi) not in memo:
            memo[(lo, hi)] = subtree_root(new_leaves, lo - m, hi - m)
        return memo[(lo, hi)]

    return consistency_path(m, n, node), new_frontier


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]) -> None:
    """§2.1.4.2: raise `ProofError` unless the tree of size ``new`` with ``new_root`` extends the tree
    of size ``old`` with ``old_root``."""
    if not 0 <= old <= new:
        raise ProofError(f"the old size {old} is larger than the new size {new}")
    if any(len(p) != HASH_LEN for p in path):
        raise ProofError("a proof hash is not 32 bytes")
    if old == new:
        if path:
            raise ProofError("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same tree size {old}")
        return
    if old == 0:
        if path:
            raise ProofError("a proof from the empty tree must be empty")
        return
    path = list(path)
    if old & (old - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    if not path:
        raise ProofError("the consistency proof is empty")
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is shorter than needed")
    if fr != old_root:
        raise ProofError(f"the consistency proof does not lead to the old root (size {old})")
    if sr != new_root:
        raise ProofError(f"the consistency proof does not lead to the new root (size {new})")
