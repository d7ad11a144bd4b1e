"""The Merkle tree and its proofs against RFC 9162's own definitions, computed naively.

`mth`, `path` and `proof` below are RFC 9162 §2.1.1, §2.1.3.1 and §2.1.4.1 transcribed
literally (recursive, over the whole list of leaves), so the stored-node implementation
(broker.audit.merkle) and the auditor's verifier (tokenbroker.merkle) are each checked
against a reference one can follow by hand.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence

import pytest

from broker.audit.merkle import (
    Frontier,
    NodeId,
    consistency_proof,
    inclusion_proof,
    root_at,
)
from tokenbroker.merkle import ProofError, verify_consistency, verify_inclusion


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(leaves: Sequence[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return sha(b"")
    if n == 1:
        return sha(b"\x00" + leaves[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return sha(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*subproof(m, leaves[:k], whole), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


class Tree:
    """The stored nodes, as a store keeps them, built by appending one leaf at a time."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.nodes: dict[NodeId, bytes] = {}
        frontier = Frontier(0, [])
        for data in leaves:
            for level, index, digest in frontier.append(data):
                self.nodes[(level, index)] = digest
        self.frontier = frontier

    def read(self, ids: Sequence[NodeId]) -> dict[NodeId, bytes]:
        return {i: self.nodes[i] for i in ids if i in self.nodes}


def leaves_of(n: int) -> list[bytes]:
    return [f"event {i}".encode() for i in range(n)]


@pytest.mark.parametrize("n", range(0, 9))
def test_roots_and_every_proof_of_trees_of_one_to_eight_leaves_match_rfc_9162(n: int) -> None:
    leaves = leaves_of(n)
    tree = Tree(leaves)
    assert tree.frontier.root() == mth(leaves)
    for size in range(0, n + 1):
        assert root_at(size, tree.read) == mth(leaves[:size])
        for m in range(size):
            proof = inclusion_proof(m, size, tree.read)
            assert proof == path(m, leaves[:size])
            verify_inclusion(sha(b"\x00" + leaves[m]), m, size, proof, mth(leaves[:size]))
        for first in range(1, size):
            proof = consistency_proof(first, size, tree.read)
            assert proof == subproof(first, leaves[:size], True)
            verify_consistency(first, size, proof, mth(leaves[:first]), mth(leaves[:size]))


def test_the_tree_of_seven_leaves_is_the_one_drawn_in_rfc_9162() -> None:
    # RFC 9162 §2.1.5: the tree of d0..d6; the path for d0 is [b, h, l], for d3 [c, g, l],
    # for d4 [f, j, k]; the consistency proof between sizes 3 and 7 is [c, d, g, l].
    d = leaves_of(7)
    a, b, c, dd, e, f, j = (sha(b"\x00" + x) for x in d)
    g, h, i = sha(b"\x01" + a + b), sha(b"\x01" + c + dd), sha(b"\x01" + e + f)
    k, l_ = sha(b"\x01" + g + h), sha(b"\x01" + i + j)
    tree = Tree(d)
    assert tree.frontier.root() == sha(b"\x01" + k + l_)
    assert inclusion_proof(0, 7, tree.read) == [b, h, l_]
    assert inclusion_proof(3, 7, tree.read) == [c, g, l_]
    assert inclusion_proof(4, 7, tree.read) == [f, j, k]
    assert consistency_proof(3, 7, tree.read) == [c, dd, g, l_]
    assert consistency_proof(4, 7, tree.read) == [l_]
    assert consistency_proof(6, 7, tree.read) == [i, j, k]


def test_every_proof_of_every_leaf_in_trees_up_to_64_verifies_and_matches_the_reference() -> None:
    leaves = leaves_of(64)
    tree = Tree(leaves)
    roots = [mth(leaves[:n]) for n in range(65)]
    for size in range(1, 65):
        for m in range(size):
            proof = inclusion_proof(m, size, tree.read)
            assert proof == path(m, leaves[:size])
            verify_inclusion(sha(b"\x00" + leaves[m]), m, size, proof, roots[size])
        for first in range(1, size + 1):
            proof = consistency_proof(first, size, tree.read)
            verify_consistency(first, size, proof, roots[first], roots[size])


def test_random_larger_trees_prove_random_leaves_and_sizes() -> None:
    rng = random.Random(18)
    leaves = [os.urandom(rng.randrange(1, 64)) for _ in range(1500)]
    tree = Tree(leaves)
    for _ in range(40):
        size = rng.randrange(1, len(leaves) + 1)
        m = rng.randrange(size)
        root = root_at(size, tree.read)
        assert root == mth(leaves[:size])
        verify_inclusion(
            sha(b"\x00" + leaves[m]), m, size, inclusion_proof(m, size, tree.read), root
        )
        first = rng.randrange(1, size + 1)
        proof = consistency_proof(first, size, tree.read)
        assert proof == subproof(first, leaves[:size], True)
        verify_consistency(first, size, proof, root_at(first, tree.read), root)


def _flips(data: bytes) -> list[bytes]:
    return [
        data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
        for i in range(len(data))
        for bit in (0, 7)
    ]


def test_one_bit_flipped_anywhere_in_an_inclusion_proof_fails() -> None:
    leaves = leaves_of(13)
    tree = Tree(leaves)
    root, m = tree.frontier.root(), 5
    leaf, proof = sha(b"\x00" + leaves[m]), inclusion_proof(m, 13, tree.read)
    verify_inclusion(leaf, m, 13, proof, root)
    for bad_leaf in _flips(leaf):
        with pytest.raises(ProofError):
            verify_inclusion(bad_leaf, m, 13, proof, root)
    for bad_root in _flips(root):
        with pytest.raises(ProofError):
            verify_inclusion(leaf, m, 13, proof, bad_root)
    for position, element in enumerate(proof):
        for bad in _flips(element):
            with pytest.raises(ProofError):
                verify_inclusion(
                    leaf, m, 13, [*proof[:position], bad, *proof[position + 1 :]], root
                )
    # (The sizes come from a signed tree head; a wrong index must fail.)
    for wrong_index, wrong_size in ((4, 13), (6, 13), (13, 13)):
        with pytest.raises(ProofError):
            verify_inclusion(leaf, wrong_index, wrong_size, proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, m, 13, proof[:-1], root)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, m, 13, [*proof, proof[0]], root)


def test_one_bit_flipped_anywhere_in_a_consistency_proof_fails() -> None:
    leaves = leaves_of(21)
    tree = Tree(leaves)
    old, new = root_at(6, tree.read), root_at(21, tree.read)
    proof = consistency_proof(6, 21, tree.read)
    verify_consistency(6, 21, proof, old, new)
    for position, element in enumerate(proof):
        for bad in _flips(element):
            with pytest.raises(ProofError):
                verify_consistency(
                    6, 21, [*proof[:position], bad, *proof[position + 1 :]], old, new
                )
    for bad in _flips(old):
        with pytest.raises(ProofError):
            verify_consistency(6, 21, proof, bad, new)
    for bad in _flips(new):
        with pytest.raises(ProofError):
            verify_consistency(6, 21, proof, old, bad)
    for first in (5, 7):  # the old root is of size 6 (its size comes from a signed head)
        with pytest.raises(ProofError):
            verify_consistency(first, 21, proof, old, new)


def test_a_rewritten_leaf_breaks_consistency_with_the_old_root() -> None:
    leaves = leaves_of(40)
    honest = Tree(leaves)
    old_root = root_at(25, honest.read)
    forged = Tree([*leaves[:10], b"rewritten", *leaves[11:]])
    with pytest.raises(ProofError):
        verify_consistency(
            25, 40, consistency_proof(25, 40, forged.read), old_root, forged.frontier.root()
        )
