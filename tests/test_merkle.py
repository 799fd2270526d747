"""schemas/merkle.py against an independent implementation of RFC 9162 trees (pymerkle 7)."""

from __future__ import annotations

import random

import pytest
from pymerkle import InmemoryTree

from agentledger.schemas import merkle


def _entries(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(0, 80)) for _ in range(n)]


@pytest.fixture(scope="module")
def oracle():
    entries = _entries(300, 1)
    t = InmemoryTree(algorithm="sha256")  # RFC 9162 hashing: 0x00 / 0x01 prefixes
    for e in entries:
        t.append_entry(e)
    return entries, t


def test_roots_and_incremental_frontier_equal_pymerkle(oracle):
    entries, t = oracle
    leaves = [merkle.leaf_hash(e) for e in entries]
    assert [t.get_leaf(i + 1) for i in range(len(entries))] == leaves
    f = merkle.Frontier()
    assert f.root() == merkle.EMPTY_ROOT == t.get_root(0)
    for n, h in enumerate(leaves, 1):
        f.append(h)
        assert f.size == n and len(f.nodes) == bin(n).count("1")
        assert f.root() == t.get_root(n) == merkle.root(leaves[:n])
    # a frontier survives a round trip through its stored form
    g = merkle.Frontier.from_hex(f.size, f.to_hex())
    g.append(b"\x07" * 32)
    f.append(b"\x07" * 32)
    assert g == f


def test_inclusion_proofs_equal_pymerkle_and_verify(oracle):
    entries, t = oracle
    leaves = [merkle.leaf_hash(e) for e in entries]
    rng = random.Random(2)
    node = merkle.leaves_node(leaves)
    for _ in range(300):
        size = rng.randint(1, len(leaves))
        index = rng.randrange(size)
        ours = merkle.inclusion_path(index, size, merkle.leaves_node(leaves[:size]))
        theirs = t.prove_inclusion(index + 1, size)  # pymerkle counts leaves from one
        assert theirs.path[0] == leaves[index] and ours == theirs.path[1:]
        merkle.verify_inclusion(index, size, leaves[index], ours, t.get_root(size))
        # any change is refused
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(index, size, leaves[(index + 1) % len(leaves)] if size > 1 else b"\0" * 32,
                                    ours, t.get_root(size))
        if ours:
            bad = list(ours)
            k = rng.randrange(len(bad))
            bad[k] = bytes([bad[k][0] ^ 1]) + bad[k][1:]
            for wrong in (bad, ours[:-1], ours + [ours[0]]):
                with pytest.raises(merkle.ProofError):
                    merkle.verify_inclusion(index, size, leaves[index], wrong, t.get_root(size))
            if size > 1:
                with pytest.raises(merkle.ProofError):
                    merkle.verify_inclusion((index + 1) % size, size, leaves[index], ours, t.get_root(size))
    assert node(0, len(leaves)) == t.get_root(len(leaves))


def test_consistency_proofs_verify_and_match_pymerkle_states(oracle):
    entries, t = oracle
    leaves = [merkle.leaf_hash(e) for e in entries]
    rng = random.Random(3)
    for _ in range(300):
        new = rng.randint(1, len(leaves))
        old = rng.randint(0, new)
        old_root, new_root = t.get_root(old), t.get_root(new)
        full = merkle.consistency_path(old, new, merkle.leaves_node(leaves[:new]))
        # the incremental construction (old frontier + new leaves only) gives the same proof
        f = merkle.Frontier()
        f.extend(leaves[:old])
        inc, nf = merkle.consistency_from_frontier(f, leaves[old:new])
        assert inc == full and nf.root() == new_root
        merkle.verify_consistency(old, new, old_root, new_root, full)
        # pymerkle agrees that the two states are consistent
        if 0 < old < new:
            t.prove_consistency(old, new).verify(old_root, new_root)
        if 0 < old < new:
            bad = list(full)
            k = rng.randrange(len(bad))
            bad[k] = bytes([bad[k][0] ^ 0x80]) + bad[k][1:]
            for wrong_args in ((old, new, old_root, new_root, bad),
                               (old, new, old_root, t.get_root(new - 1) if new - 1 > old else b"\1" * 32, full),
                               (old, new, b"\2" * 32, new_root, full),
                               (old, new, old_root, new_root, full[:-1])):
                with pytest.raises(merkle.ProofError):
                    merkle.verify_consistency(*wrong_args)
    # a fork at the same size is refused; so is a shrinking tree
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(5, 5, t.get_root(5), t.get_root(6), [])
    with pytest.raises(merkle.ProofError):
        merkle.consistency_path(6, 5, merkle.leaves_node(leaves))


def test_appending_many_leaves_costs_hashes_per_leaf_not_per_tree():
    import hashlib

    calls = 0
    real = hashlib.sha256

    def counting(data=b""):
        nonlocal calls
        calls += 1
        return real(data)

    f = merkle.Frontier()
    f.extend([bytes([i % 256]) * 32 for i in range(100_000)])
    merkle.hashlib.sha256 = counting
    try:
        f.extend([b"\x01" * 32] * 1000)
    finally:
        merkle.hashlib.sha256 = real
    assert calls <= 1000 + 20  # amortised one node hash per leaf (a binary counter)
