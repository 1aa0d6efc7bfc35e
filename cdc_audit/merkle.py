"""RFC 6962 Merkle tree hashes and audit paths (inclusion proofs) for checkpoints.

THE MERKLE SPECIFICATION (part of chain specification version 1).

A checkpoint's Merkle root covers a range of events of one stream; its leaves are the events'
32-byte ``hash`` values in seq order. Merkle roots follow RFC 6962 section 2.1: leaf hash =
SHA-256(0x00 || leaf), node hash = SHA-256(0x01 || left || right), the split at the largest
power of two smaller than the number of leaves, and SHA-256 of the empty string for no leaves::

    MTH({})      = SHA-256()
    MTH({d(0)})  = SHA-256(0x00 || d(0))
    MTH(D[n])    = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   k < n <= 2k, k a power of 2

An audit path (RFC 6962 section 2.1.1, PATH(m, D[n])) proves that leaf ``m`` is included in
the tree of ``n`` leaves: it lists the sibling hashes needed to recompute the root, from the
leaf up::

    PATH(0, {d(0)}) = {}
    PATH(m, D[n])   = PATH(m, D[0:k]) : MTH(D[k:n])       for m < k
    PATH(m, D[n])   = PATH(m - k, D[k:n]) : MTH(D[0:k])   for m >= k

A verifier recomputes the root from the leaf, its index and the tree size with the algorithm
of RFC 9162 section 2.1.3.2 (`root_from_path`) and compares it with the signed root.

The root does not commit to the tree size: a path may also "verify" under another
(index, tree size) pair of the same shape (e.g. index 1 of 2 leaves and index 2 of 3). The
tree size must therefore come from the signed checkpoint, never from the party presenting
the proof; with the right tree size the index is bound. (Each leaf here is an event hash,
which also commits to the event's seq.)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "EMPTY_ROOT",
    "MerkleBuilder",
    "audit_path",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "root_from_path",
    "verify_inclusion",
]

_sha256 = hashlib.sha256
_HASH_SIZE: Final = 32
_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""The Merkle root of no leaves: SHA-256 of the empty string."""


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || leaf)."""
    return _sha256(_LEAF + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(_NODE + left + right).digest()


def _leaf_hashes(leaves: Sequence[bytes]) -> list[bytes]:
    sha = _sha256
    return [sha(_LEAF + leaf).digest() for leaf in leaves]


def _next_level(level: list[bytes]) -> list[bytes]:
    """Hash adjacent pairs; a last node without a partner moves up unchanged.

    Level by level this builds exactly the RFC 6962 tree: every complete pair is a perfect
    subtree aligned on a power of two, and the lone last node is the right-hand part that the
    split at the largest power of two leaves for a higher level.
    """
    sha = _sha256
    count = len(level)
    parents = [sha(_NODE + level[i] + level[i + 1]).digest() for i in range(0, count - 1, 2)]
    if count & 1:
        parents.append(level[-1])
    return parents


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash MTH(leaves) (see the module docstring).

    Iterative, level by level: 2n - 1 hashes for n leaves, no recursion.
    """
    if not leaves:
        return EMPTY_ROOT
    level = _leaf_hashes(leaves)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def audit_path(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 6962 audit path PATH(index, leaves): the sibling hashes from the leaf up.

    Empty for a single leaf. Raises ValueError when `index` is not in range(len(leaves)).
    Costs the same 2n - 1 hashes as `merkle_root`.
    """
    count = len(leaves)
    if not 0 <= index < count:
        raise ValueError(f"leaf index {index} out of range for {count} leaves")
    level = _leaf_hashes(leaves)
    path: list[bytes] = []
    node = index
    while len(level) > 1:
        sibling = node ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        # else: the node is the lone last one of its level and moves up unchanged.
        level = _next_level(level)
        node >>= 1
    return path


def root_from_path(leaf: bytes, index: int, tree_size: int, path: Sequence[bytes]) -> bytes:
    """The Merkle root implied by `leaf` at `index` of `tree_size` leaves and its audit path.

    `leaf` is the leaf itself (an event hash), not its leaf hash. This is the verification
    algorithm of RFC 9162 section 2.1.3.2, which applies unchanged to RFC 6962 trees. Raises
    ValueError for inputs no tree can produce: `index` outside range(tree_size), a path
    element that is not a 32-byte hash, or a path too long or too short for the position.
    """
    if tree_size < 1:
        raise ValueError(f"tree size must be at least 1, got {tree_size}")
    if not 0 <= index < tree_size:
        raise ValueError(f"leaf index {index} out of range for tree size {tree_size}")
    sha = _sha256
    fn = index
    sn = tree_size - 1
    result = sha(_LEAF + leaf).digest()
    for position, sibling in enumerate(path):
        if len(sibling) != _HASH_SIZE:
            raise ValueError(f"audit path element {position} is not a {_HASH_SIZE}-byte hash")
        if sn == 0:
            raise ValueError(f"audit path too long: {len(path)} elements")
        if fn & 1 or fn == sn:
            result = sha(_NODE + sibling + result).digest()
            # The rightmost node of an incomplete level moves up unchanged: skip those levels.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            result = sha(_NODE + result + sibling).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError(f"audit path too short: {len(path)} elements")
    return result


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, path: Sequence[bytes], root: bytes
) -> bool:
    """Whether `path` proves `leaf` is leaf `index` of the `tree_size`-leaf tree with `root`.

    Returns False, never raises, for a wrong or malformed proof. `tree_size` and `root` must
    come from the signed checkpoint (see the module docstring).
    """
    try:
        computed = root_from_path(leaf, index, tree_size, path)
    except ValueError:
        return False
    return hmac.compare_digest(computed, root)


class MerkleBuilder:
    """The RFC 6962 root of leaves given one at a time, in O(log n) memory.

    Keeps one perfect-subtree root per set bit of the leaf count, largest first; adding a leaf
    merges equal-sized subtrees like a binary carry (2n - 1 hashes in all, as `merkle_root`).
    `root` combines the stack right to left, which is exactly the split at the largest power of
    two of RFC 6962. `root` does not consume the builder: more leaves may follow.
    """

    __slots__ = ("_size", "_stack")

    def __init__(self) -> None:
        self._size = 0
        self._stack: list[bytes] = []

    @property
    def size(self) -> int:
        """How many leaves were added."""
        return self._size

    def add(self, leaf: bytes) -> None:
        """Append one leaf (an event hash)."""
        sha = _sha256
        stack = self._stack
        node = sha(_LEAF + leaf).digest()
        carry = self._size
        while carry & 1:
            node = sha(_NODE + stack.pop() + node).digest()
            carry >>= 1
        stack.append(node)
        self._size += 1

    @classmethod
    def resume(cls, size: int, frontier: Sequence[bytes]) -> MerkleBuilder:
        """A builder that continues after `size` leaves whose `frontier` was saved: the
        leaves themselves are not needed (a purge keeps a range's frontier, not its events).
        """
        if size < 0 or len(frontier) != size.bit_count():
            raise ValueError(
                f"a frontier of {size} leaves has {max(size, 0).bit_count()} roots,"
                f" not {len(frontier)}"
            )
        if any(len(root) != 32 for root in frontier):
            raise ValueError("frontier roots must be 32-byte SHA-256 digests")
        builder = cls()
        builder._size = size
        builder._stack = list(frontier)
        return builder

    def frontier(self) -> list[bytes]:
        """The roots of the perfect subtrees so far, largest first: enough to `resume`."""
        return list(self._stack)

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Append leaves in order (any iterable: nothing is held beyond the stack)."""
        for leaf in leaves:
            self.add(leaf)

    def root(self) -> bytes:
        """The RFC 6962 root of the leaves added so far (`EMPTY_ROOT` for none)."""
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        result = stack[-1]
        for subtree in reversed(stack[:-1]):
            result = node_hash(subtree, result)
        return result
