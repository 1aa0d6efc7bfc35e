"""RFC 6962 Merkle roots, audit paths and their verification, against a reference from the RFC."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cdc_audit.merkle as merkle_module
from cdc_audit.merkle import (
    EMPTY_ROOT,
    MerkleBuilder,
    audit_path,
    leaf_hash,
    merkle_root,
    node_hash,
    root_from_path,
    verify_inclusion,
)

# ---- reference: RFC 6962 section 2.1 and 2.1.1 transcribed literally (recursive, slicing) --------


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_root(d: Sequence[bytes]) -> bytes:
    """MTH(D[n])."""
    n = len(d)
    if n == 0:
        return _sha256(b"")
    if n == 1:
        return _sha256(b"\x00" + d[0])
    k = _split(n)
    return _sha256(b"\x01" + ref_root(d[:k]) + ref_root(d[k:]))


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n])."""
    n = len(d)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*ref_path(m, d[:k]), ref_root(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_root(d[:k])]


@cache
def ref_shape(m: int, n: int) -> tuple[bool, ...]:
    """For each element of PATH(m, D[n]), leaf up: whether the sibling is on the right."""
    if n == 1:
        return ()
    k = _split(n)
    if m < k:
        return (*ref_shape(m, k), True)
    return (*ref_shape(m - k, n - k), False)


# Distinct 32-byte leaves, like the event hashes the trail uses.
LEAVES = [_sha256(b"cdc-audit leaf %d" % i) for i in range(140)]

# ---- known answers -------------------------------------------------------------------------------

# Computed with ref_root above from LEAVES[:n].
KNOWN_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "d63a2f2011216997e8051347be0b46adc920f30ac36adc0b8aefa4c149bbcdce",
    2: "12b15bc63dccf2202e2ec7e49ea90f97b33c59b0fc7bd3f4ac620e59c38e2cdd",
    3: "e80f96fa698a45e8a1e6207e820869d5ce2bcb70bf708000e858e2ae88a8c1c7",
    4: "34379c8080f73db5f0b01194172e3c815c5908f172a96b6941bedaa607135a85",
    5: "d8e4a0f0e74b41e1a1e1ffd42a700a71b02385b7e817fe03625f33edad43cff3",
    7: "e67a81fd050f4bab8b009d6a81b141e835c0d8c849a31379f3d2412c45c3f312",
    8: "2fbe8788376c0e90876657808bdcebd6a4956c815fc4e7d64b452e33d00740a2",
}


@pytest.mark.parametrize("size", sorted(KNOWN_ROOTS))
def test_known_roots(size: int) -> None:
    expected = KNOWN_ROOTS[size]
    assert ref_root(LEAVES[:size]).hex() == expected
    assert merkle_root(LEAVES[:size]).hex() == expected
    builder = MerkleBuilder()
    builder.extend(LEAVES[:size])
    assert builder.root().hex() == expected


# The Certificate Transparency test vectors (the CT C++ merkle_tree_test, kept in
# transparency-dev/merkle proof/verify_test.go): eight leaves, the root of every prefix, and
# inclusion proofs given there as (1-based leaf number, tree size, path).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PROOFS: list[tuple[int, int, list[str]]] = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        2,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


@pytest.mark.parametrize("size", range(1, 9))
def test_certificate_transparency_roots(size: int) -> None:
    assert ref_root(CT_LEAVES[:size]).hex() == CT_ROOTS[size - 1]
    assert merkle_root(CT_LEAVES[:size]).hex() == CT_ROOTS[size - 1]
    builder = MerkleBuilder()
    builder.extend(CT_LEAVES[:size])
    assert builder.root().hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize(("number", "size", "expected"), CT_PROOFS)
def test_certificate_transparency_inclusion_proofs(
    number: int, size: int, expected: list[str]
) -> None:
    index = number - 1
    path = audit_path(CT_LEAVES[:size], index)
    assert [h.hex() for h in path] == expected
    assert ref_path(index, CT_LEAVES[:size]) == path
    root = bytes.fromhex(CT_ROOTS[size - 1])
    assert root_from_path(CT_LEAVES[index], index, size, path) == root
    assert verify_inclusion(CT_LEAVES[index], index, size, path, root)


def test_hash_primitives_follow_the_formulas() -> None:
    assert EMPTY_ROOT == _sha256(b"") == merkle_root([]) == MerkleBuilder().root()
    assert leaf_hash(b"abc") == _sha256(b"\x00abc")
    assert node_hash(b"L" * 32, b"R" * 32) == _sha256(b"\x01" + b"L" * 32 + b"R" * 32)
    assert merkle_root([b"abc"]) == leaf_hash(b"abc")
    assert merkle_root([b"a", b"b"]) == node_hash(leaf_hash(b"a"), leaf_hash(b"b"))


def test_chain_still_exports_merkle_root() -> None:
    from cdc_audit import chain

    assert chain.merkle_root is merkle_root
    assert "merkle_root" in chain.__all__


# ---- audit paths: every position of every tree size up to 70 -------------------------------------


@pytest.mark.parametrize("size", range(1, 71))
def test_every_audit_path_up_to_70_leaves(size: int) -> None:
    leaves = LEAVES[:size]
    root = merkle_root(leaves)
    assert root == ref_root(leaves)
    for index in range(size):
        leaf = leaves[index]
        path = audit_path(leaves, index)
        assert path == ref_path(index, leaves)
        assert len(path) == len(ref_shape(index, size))
        assert root_from_path(leaf, index, size, path) == root
        assert verify_inclusion(leaf, index, size, path, root)

        # A changed byte anywhere in the leaf, the path or the root.
        for pos in range(32):
            changed = bytearray(leaf)
            changed[pos] ^= 0x01
            assert not verify_inclusion(bytes(changed), index, size, path, root)
        for element in range(len(path)):
            for pos in (0, 13, 31):
                forged = [bytearray(h) for h in path]
                forged[element][pos] ^= 0x80
                assert not verify_inclusion(leaf, index, size, [bytes(h) for h in forged], root)
        assert not verify_inclusion(leaf, index, size, path, root[:-1] + bytes([root[-1] ^ 1]))

        # Any other index of the same tree.
        for other in (*range(size), -1, size, size + 1):
            if other != index:
                assert not verify_inclusion(leaf, other, size, path, root)

        # Path too short, too long, or with an element of the wrong length: refused.
        if path:
            with pytest.raises(ValueError, match="too short"):
                root_from_path(leaf, index, size, path[:-1])
            with pytest.raises(ValueError, match="32-byte"):
                root_from_path(leaf, index, size, [*path[:-1], path[-1][:31]])
        with pytest.raises(ValueError, match="too long"):
            root_from_path(leaf, index, size, [*path, root])
        assert not verify_inclusion(leaf, index, size, [*path, root], root)


@pytest.mark.parametrize("size", range(1, 71))
def test_another_tree_size_verifies_only_with_the_same_path_shape(size: int) -> None:
    """The root does not commit to the tree size: exactly same-shaped positions verify.

    A changed tree size is rejected unless the position has the same path shape in both
    trees (then the recomputation is literally identical), hence the tree size must be the
    signed checkpoint's.
    """
    leaves = LEAVES[:size]
    root = merkle_root(leaves)
    for index in range(size):
        leaf = leaves[index]
        path = audit_path(leaves, index)
        for other in range(-1, 2 * size + 2):
            if other == size:
                continue
            same_shape = 0 <= index < other and ref_shape(index, other) == ref_shape(index, size)
            assert verify_inclusion(leaf, index, other, path, root) == same_shape
        assert not verify_inclusion(leaf, index, 2 * size, path, root)
        if size > 1:
            assert not verify_inclusion(leaf, index, size // 2, path, root)


def test_tree_size_is_not_bound_by_the_root() -> None:
    """Why verifiers must take the tree size from the signed checkpoint (see merkle's docs)."""
    a, b, c = LEAVES[:3]
    root3 = merkle_root([a, b, c])
    path = audit_path([a, b, c], 2)
    assert verify_inclusion(c, 2, 3, path, root3)
    assert verify_inclusion(c, 1, 2, path, root3)  # same shape: one sibling on the left
    assert verify_inclusion(a, 0, 4, audit_path([a, b, c], 0), root3)
    assert not verify_inclusion(c, 2, 4, path, root3)


def test_bad_positions_are_refused() -> None:
    leaves = LEAVES[:5]
    root = merkle_root(leaves)
    for index in (-1, 5, 6):
        with pytest.raises(ValueError, match="out of range"):
            audit_path(leaves, index)
    with pytest.raises(ValueError, match="out of range"):
        audit_path([], 0)
    path = audit_path(leaves, 4)
    with pytest.raises(ValueError, match="out of range"):
        root_from_path(leaves[4], 5, 5, path)
    with pytest.raises(ValueError, match="out of range"):
        root_from_path(leaves[4], -1, 5, path)
    for size in (0, -3):
        with pytest.raises(ValueError, match="tree size"):
            root_from_path(leaves[0], 0, size, [])
        assert not verify_inclusion(leaves[0], 0, size, [], root)
    assert not verify_inclusion(leaves[4], 4, 5, path, b"")
    assert not verify_inclusion(leaves[4], 4, 5, [b""], root)


def test_a_single_leaf_tree_needs_an_empty_path() -> None:
    leaf = b"only"
    root = merkle_root([leaf])
    assert audit_path([leaf], 0) == []
    assert root_from_path(leaf, 0, 1, []) == root == leaf_hash(leaf)
    assert verify_inclusion(leaf, 0, 1, (), root)
    assert not verify_inclusion(leaf, 0, 1, [root], root)
    assert not verify_inclusion(b"other", 0, 1, [], root)


# ---- properties ----------------------------------------------------------------------------------

distinct_leaves = st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=70, unique=True)


@settings(max_examples=300, deadline=None)
@given(leaves=distinct_leaves, data=st.data())
def test_any_changed_byte_of_leaf_or_path_breaks_the_proof(
    leaves: list[bytes], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1), label="index")
    leaf = leaves[index]
    path = audit_path(leaves, index)
    root = merkle_root(leaves)
    assert root == ref_root(leaves)
    assert path == ref_path(index, leaves)
    assert verify_inclusion(leaf, index, len(leaves), path, root)

    blob = bytearray(leaf + b"".join(path))
    pos = data.draw(st.integers(0, len(blob) - 1), label="byte")
    blob[pos] ^= data.draw(st.integers(1, 255), label="xor")
    forged_leaf = bytes(blob[: len(leaf)])
    rest = blob[len(leaf) :]
    forged_path = [bytes(rest[i : i + 32]) for i in range(0, len(rest), 32)]
    assert not verify_inclusion(forged_leaf, index, len(leaves), forged_path, root)

    other = data.draw(st.integers(-2, 2 * len(leaves)).filter(lambda i: i != index), label="other")
    assert not verify_inclusion(leaf, other, len(leaves), path, root)


@settings(max_examples=300, deadline=None)
@given(leaves=st.lists(st.binary(max_size=40), max_size=300))
def test_builder_matches_merkle_root(leaves: list[bytes]) -> None:
    builder = MerkleBuilder()
    for leaf in leaves:
        builder.add(leaf)
    assert builder.size == len(leaves)
    assert builder.root() == merkle_root(leaves) == ref_root(leaves)


@settings(max_examples=100, deadline=None)
@given(leaves=st.lists(st.binary(max_size=8), max_size=100))
def test_builder_root_is_available_after_every_leaf(leaves: list[bytes]) -> None:
    builder = MerkleBuilder()
    for count, leaf in enumerate(leaves, start=1):
        builder.add(leaf)
        assert builder.root() == merkle_root(leaves[:count])
        assert builder.root() == merkle_root(leaves[:count])  # root() does not consume


def test_builder_matches_merkle_root_for_every_size_up_to_600() -> None:
    builder = MerkleBuilder()
    leaves = [_sha256(b"%d" % i) for i in range(600)]
    for count, leaf in enumerate(leaves, start=1):
        builder.add(leaf)
        if count <= 140 or count % 37 == 0 or count & (count - 1) == 0:
            assert builder.root() == merkle_root(leaves[:count]), count


# ---- performance sanity: linear hashing, constant stack depth, logarithmic memory ----------------


class _HashProbe:
    """Stands in for hashlib.sha256 in cdc_audit.merkle: counts calls and the stack depth."""

    def __init__(self, base: FrameType) -> None:
        self.calls = 0
        self.max_depth = 0
        self._base = base

    def __call__(self, data: bytes) -> Any:
        self.calls += 1
        depth = 0
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and frame is not self._base:
            depth += 1
            frame = frame.f_back
        self.max_depth = max(self.max_depth, depth)
        return hashlib.sha256(data)


def _probe(monkeypatch: pytest.MonkeyPatch, work: Callable[[], object]) -> tuple[int, int]:
    """(hash calls, deepest stack below this function) while running `work`."""
    probe = _HashProbe(sys._getframe())
    with monkeypatch.context() as patch:
        patch.setattr(merkle_module, "_sha256", probe)
        work()
    return probe.calls, probe.max_depth


def _leaves(count: int) -> Iterator[bytes]:
    return (i.to_bytes(32, "big") for i in range(count))


BIG = 100_003  # a checkpoint over 100,000+ events (not a power of two)


def test_merkle_root_hashes_linearly_at_constant_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    big = list(_leaves(BIG))
    calls, depth = _probe(monkeypatch, lambda: merkle_root(big))
    assert calls == 2 * BIG - 1
    _, small_depth = _probe(monkeypatch, lambda: merkle_root(big[:3]))
    assert depth == small_depth  # no recursion: the stack does not grow with the range

    calls, depth = _probe(monkeypatch, lambda: audit_path(big, BIG - 1))
    assert calls == 2 * BIG - 1
    _, small_depth = _probe(monkeypatch, lambda: audit_path(big[:3], 2))
    assert depth == small_depth

    path = audit_path(big, 12_345)
    assert len(path) == len(ref_shape(12_345, BIG)) == 17
    calls, _ = _probe(monkeypatch, lambda: root_from_path(big[12_345], 12_345, BIG, path))
    assert calls == 1 + len(path)
    assert verify_inclusion(big[12_345], 12_345, BIG, path, merkle_root(big))


def test_builder_streams_in_logarithmic_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    builder = MerkleBuilder()
    peak = 0

    def stream() -> None:
        nonlocal peak
        for leaf in _leaves(BIG):
            builder.add(leaf)
            peak = max(peak, len(builder._stack))

    calls, _ = _probe(monkeypatch, stream)
    calls_for_root, _ = _probe(monkeypatch, builder.root)
    assert calls + calls_for_root == 2 * BIG - 1
    assert peak <= BIG.bit_length()
    assert len(builder._stack) == bin(BIG).count("1")
    assert builder.root() == merkle_root(list(_leaves(BIG)))


@pytest.mark.parametrize("split", [0, 1, 2, 3, 5, 8, 13])
def test_a_resumed_builder_gives_the_same_root_as_one_that_saw_every_leaf(split: int) -> None:
    leaves = [hashlib.sha256(bytes([n])).digest() for n in range(13)]
    whole = MerkleBuilder()
    whole.extend(leaves)
    first = MerkleBuilder()
    first.extend(leaves[:split])
    resumed = MerkleBuilder.resume(split, first.frontier())
    resumed.extend(leaves[split:])
    assert resumed.root() == whole.root() == merkle_root(leaves)
    assert resumed.size == 13


def test_a_frontier_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="a frontier of 3 leaves has 2 roots, not 1"):
        MerkleBuilder.resume(3, [bytes(32)])
    with pytest.raises(ValueError, match="32-byte"):
        MerkleBuilder.resume(1, [b"short"])
