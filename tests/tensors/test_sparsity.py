"""Mask construction, application and statistics, checked against hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from ebft.errors import UsageError
from ebft.sparsity import (
    PackedMasks,
    apply_mask_,
    check_nm,
    keep_top,
    mask_stats,
    nm_mask,
    num_pruned,
    pack_mask,
    unpack_mask,
    unstructured_mask,
    weight_sparsity,
)

# 4x8 scores holding each of 1..32 once, so every answer below is unambiguous.
S = torch.tensor(
    [
        [32.0, 1, 20, 3, 15, 2, 28, 4],
        [5, 30, 6, 25, 7, 8, 9, 10],
        [11, 12, 31, 13, 29, 14, 16, 17],
        [18, 19, 21, 22, 23, 24, 26, 27],
    ]
)


def _m(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# --- naive references: plain Python loops, ties pruned lower index first -------------------------


def _ref_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    s = scores.float().tolist()
    mask = torch.ones(scores.shape, dtype=torch.bool)
    k = num_pruned(len(s[0]), sparsity)
    for i, row in enumerate(s):
        for j in sorted(range(len(row)), key=lambda j: (row[j], j))[:k]:
            mask[i, j] = False
    return mask


def _ref_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = scores.float().reshape(-1).tolist()
    mask = torch.ones(len(flat), dtype=torch.bool)
    for idx in sorted(range(len(flat)), key=lambda i: (flat[i], i))[: num_pruned(len(flat), sparsity)]:
        mask[idx] = False
    return mask.reshape(scores.shape)


def _ref_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    s = scores.float().tolist()
    mask = torch.ones(scores.shape, dtype=torch.bool)
    for i, row in enumerate(s):
        for start in range(0, len(row), m):
            cols = range(start, start + m)
            for j in sorted(cols, key=lambda j: (row[j], j))[: m - n]:
                mask[i, j] = False
    return mask


# --- unstructured --------------------------------------------------------------------------------


def test_row_wise_50() -> None:
    expected = _m(
        [
            [1, 0, 1, 0, 1, 0, 1, 0],
            [0, 1, 0, 1, 0, 0, 1, 1],
            [0, 0, 1, 0, 1, 0, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(unstructured_mask(S, 0.5, per_row=True), expected)


def test_row_wise_25() -> None:
    expected = _m(
        [
            [1, 0, 1, 1, 1, 0, 1, 1],
            [0, 1, 0, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(unstructured_mask(S, 0.25, per_row=True), expected)


def test_layer_wise_50() -> None:
    # the 16 lowest values (1..16) go, wherever they sit; row 3 keeps everything
    expected = _m(
        [
            [1, 0, 1, 0, 0, 0, 1, 0],
            [0, 1, 0, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 1, 0, 0, 1],
            [1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(unstructured_mask(S, 0.5, per_row=False), expected)


def test_zero_sparsity_keeps_everything() -> None:
    assert unstructured_mask(S, 0.0, per_row=True).all()
    assert unstructured_mask(S, 0.0, per_row=False).all()


def test_full_sparsity_prunes_everything() -> None:
    assert not unstructured_mask(S, 1.0, per_row=True).any()
    assert not unstructured_mask(S, 1.0, per_row=False).any()


def test_odd_sparsity_exact_counts() -> None:
    scores = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    row = unstructured_mask(scores, 0.3, per_row=True)
    assert (~row).sum(dim=1).tolist() == [3, 3, 3]
    layer = unstructured_mask(scores, 0.3, per_row=False)
    assert int((~layer).sum()) == 9
    # floor, not round: 0.35 of 10 -> 3; 0.29 of 100 -> 29 despite 0.29 * 100 == 28.999...
    assert (~unstructured_mask(scores, 0.35, per_row=True)).sum(dim=1).tolist() == [3, 3, 3]
    assert num_pruned(100, 0.29) == 29
    assert num_pruned(7, 0.5) == 3


def test_ties_prune_lower_index_first() -> None:
    ones = torch.ones(2, 8)
    assert torch.equal(unstructured_mask(ones, 0.5, per_row=True), _m([[0, 0, 0, 0, 1, 1, 1, 1]] * 2))
    assert torch.equal(unstructured_mask(ones, 0.5, per_row=False), _m([[0] * 8, [1] * 8]))
    assert torch.equal(nm_mask(ones, 2, 4), _m([[0, 0, 1, 1, 0, 0, 1, 1]] * 2))


def test_nan_scores_rank_highest() -> None:
    scores = torch.tensor([[float("nan"), 1.0, 2.0, 3.0], [4.0, float("nan"), float("nan"), 0.0]])
    assert torch.equal(unstructured_mask(scores, 0.5, per_row=True), _m([[1, 0, 0, 1], [0, 1, 1, 0]]))
    assert int((~unstructured_mask(scores, 0.75, per_row=False)).sum()) == 6
    assert torch.equal(nm_mask(scores, 1, 2), _m([[1, 0, 0, 1], [0, 1, 1, 0]]))


def test_bad_sparsity_raises() -> None:
    with pytest.raises(UsageError):
        unstructured_mask(S, 1.5, per_row=True)
    with pytest.raises(UsageError):
        unstructured_mask(S, -0.1, per_row=False)


def test_not_2d_raises() -> None:
    with pytest.raises(ValueError):
        unstructured_mask(torch.ones(8), 0.5, per_row=True)


# --- N:M -----------------------------------------------------------------------------------------


def test_nm_2_4() -> None:
    expected = _m(
        [
            [1, 0, 1, 0, 1, 0, 1, 0],
            [0, 1, 0, 1, 0, 0, 1, 1],
            [0, 0, 1, 1, 1, 0, 0, 1],
            [0, 0, 1, 1, 0, 0, 1, 1],
        ]
    )
    mask = nm_mask(S, 2, 4)
    assert torch.equal(mask, expected)
    assert check_nm(mask, 2, 4)


def test_nm_1_4() -> None:
    expected = _m(
        [
            [1, 0, 0, 0, 0, 0, 1, 0],
            [0, 1, 0, 0, 0, 0, 0, 1],
            [0, 0, 1, 0, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(nm_mask(S, 1, 4), expected)


def test_nm_4_8() -> None:
    expected = _m(
        [
            [1, 0, 1, 0, 1, 0, 1, 0],
            [0, 1, 0, 1, 0, 0, 1, 1],
            [0, 0, 1, 0, 1, 0, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ]
    )
    mask = nm_mask(S, 4, 8)
    assert torch.equal(mask, expected)
    assert check_nm(mask, 4, 8)
    assert not check_nm(mask, 2, 4)  # row 3 holds 4 kept in cols 4..7


def test_nm_width_not_divisible() -> None:
    with pytest.raises(UsageError, match=r"--nm 2:4 needs .*divisible by 4; layer 'mlp.down_proj' has 570 inputs"):
        nm_mask(torch.rand(3, 570), 2, 4, name="mlp.down_proj")
    with pytest.raises(UsageError, match="divisible by 8; layer has 12 inputs"):
        nm_mask(torch.rand(3, 12), 4, 8)


# --- vectorised vs. naive reference on random matrices -------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7])
def test_unstructured_matches_reference(seed: int, sparsity: float) -> None:
    scores = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unstructured_mask(scores, sparsity, per_row=True), _ref_row(scores, sparsity))
    assert torch.equal(unstructured_mask(scores, sparsity, per_row=False), _ref_layer(scores, sparsity))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_matches_reference(seed: int, nm: tuple[int, int]) -> None:
    scores = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(nm_mask(scores, *nm), _ref_nm(scores, *nm))


@pytest.mark.parametrize("seed", [0, 1])
def test_tied_integer_scores_match_reference(seed: int) -> None:
    scores = torch.randint(0, 4, (16, 32), generator=torch.Generator().manual_seed(seed)).float()
    assert torch.equal(unstructured_mask(scores, 0.5, per_row=True), _ref_row(scores, 0.5))
    assert torch.equal(unstructured_mask(scores, 0.5, per_row=False), _ref_layer(scores, 0.5))
    assert torch.equal(nm_mask(scores, 2, 4), _ref_nm(scores, 2, 4))


def test_large_matrix_is_exact() -> None:
    scores = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    assert int((~unstructured_mask(scores, 0.5, per_row=True)).sum()) == 1536 * 288
    assert int((~unstructured_mask(scores, 0.5, per_row=False)).sum()) == 1536 * 288
    assert check_nm(nm_mask(scores, 2, 4), 2, 4)


# --- dtypes --------------------------------------------------------------------------------------


def test_bf16_scores() -> None:
    scores = S.to(torch.bfloat16)  # 1..32 are exact in bf16
    assert torch.equal(unstructured_mask(scores, 0.5, per_row=True), unstructured_mask(S, 0.5, per_row=True))
    assert torch.equal(unstructured_mask(scores, 0.5, per_row=False), unstructured_mask(S, 0.5, per_row=False))
    assert torch.equal(nm_mask(scores, 2, 4), nm_mask(S, 2, 4))


# --- apply / check / stats -----------------------------------------------------------------------


def test_apply_mask_in_place_bf16() -> None:
    weight = S.clone().to(torch.bfloat16)
    mask = nm_mask(weight, 2, 4)
    out = apply_mask_(weight, mask)
    assert out is weight and weight.dtype == torch.bfloat16
    assert torch.equal(weight != 0, mask)
    assert check_nm(weight, 2, 4)
    assert weight_sparsity(weight) == 0.5


def test_apply_mask_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        apply_mask_(torch.ones(4, 8), torch.ones(8, 4, dtype=torch.bool))


def test_apply_mask_on_parameter() -> None:
    layer = torch.nn.Linear(8, 4, bias=False)
    apply_mask_(layer.weight, unstructured_mask(layer.weight.abs(), 0.25, per_row=True))
    assert (layer.weight == 0).sum(dim=1).tolist() == [2, 2, 2, 2]


def test_check_nm() -> None:
    assert not check_nm(torch.ones(2, 8), 2, 4)
    assert check_nm(torch.tensor([[1.0, 0, 0, 2, 0, 3, 0, 4]]), 2, 4)
    assert not check_nm(torch.tensor([[1.0, 0, 5, 2, 0, 3, 0, 4]]), 2, 4)
    assert not check_nm(torch.zeros(2, 6), 2, 4)  # width not a multiple of M


def test_weight_sparsity() -> None:
    assert weight_sparsity(torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == 0.75
    assert weight_sparsity(torch.ones(3, 3)) == 0.0
    assert weight_sparsity(torch.empty(0, 4)) == 0.0


def test_mask_stats() -> None:
    masks = {
        "a": unstructured_mask(S, 0.5, per_row=True),  # 16 of 32 pruned
        "b": _m([[1, 0, 1, 1], [1, 1, 0, 1]]),  # 2 of 8 pruned
    }
    stats = mask_stats(masks)
    assert stats["per_layer"] == {"a": 0.5, "b": 0.25}
    assert stats["overall"] == pytest.approx(18 / 40)
    assert mask_stats({}) == {"overall": 0.0, "per_layer": {}}


# ------------------------------------------------------------------ packed masks


def test_pack_mask_by_hand() -> None:
    # row-major, least significant bit first: 1000 0001 -> 1 + 128; then 11 padded with zeros -> 3
    mask = _m([[1, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    assert pack_mask(mask).tolist() == [129, 3]
    assert pack_mask(_m([[0, 1, 0, 0, 0, 0, 0, 0]])).tolist() == [2]
    assert pack_mask(torch.ones(2, 8, dtype=torch.bool)).tolist() == [255, 255]
    assert pack_mask(torch.empty(0, 3, dtype=torch.bool)).tolist() == []


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (7, 13), (64, 24), (0, 4)])
def test_pack_mask_matches_numpy_and_round_trips(shape: tuple[int, int]) -> None:
    np = pytest.importorskip("numpy")
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert packed.tolist() == np.packbits(mask.numpy().reshape(-1), bitorder="little").tolist()
    restored = unpack_mask(packed, mask.shape)
    assert restored.dtype == torch.bool and torch.equal(restored, mask)


def test_unpack_mask_rejects_a_wrong_size() -> None:
    with pytest.raises(ValueError, match="cannot hold a mask of shape"):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), (4, 5))  # 20 entries need 3 bytes
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_mask(torch.zeros(3, dtype=torch.int64), (4, 5))


def test_packed_masks_behave_as_a_dict_in_an_eighth_of_the_memory() -> None:
    plain = {"a": unstructured_mask(S, 0.5, per_row=True), "b": _m([[1, 0, 1], [1, 1, 0], [0, 0, 1]])}
    store = PackedMasks(plain)
    assert list(store) == ["a", "b"] and len(store) == 2 and "a" in store
    for name, mask in plain.items():
        assert torch.equal(store[name], mask)
    assert store.nbytes() == 32 // 8 + 2  # 9 entries take two bytes
    assert mask_stats(store) == mask_stats(plain)
    read = store["a"]
    read.fill_(False)  # a read is a copy: the store keeps its mask
    assert torch.equal(store["a"], plain["a"])
    store["a"] = read  # storing replaces it
    assert not store["a"].any()
    del store["b"]
    assert list(store) == ["a"]
    big = torch.rand(256, 512) < 0.5
    store["big"] = big
    assert store.nbytes() * 8 == big.numel() * big.element_size() + 32


def _reference_keep_top(scores: torch.Tensor, k: int, ties: str) -> torch.Tensor:
    """A stable sort along the last dimension: the straightforward definition of keep_top."""
    s = torch.nan_to_num(scores.double(), nan=math.inf)
    keep = torch.zeros(s.shape, dtype=torch.bool)
    if ties == "later":  # ascending stable: among equals the lower index comes first and is dropped first
        order = torch.sort(s, dim=-1, stable=True).indices[..., s.shape[-1] - k:]
    else:  # descending stable: among equals the lower index comes first and is kept
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return keep.scatter_(-1, order, True)


@pytest.mark.parametrize("ties", ["later", "earlier"])
def test_keep_top_matches_a_stable_sort(ties: str) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        cols = 1 + trial % 9
        scores = torch.randint(0, 4, (5, cols), generator=g).float()  # many ties
        scores[0, 0] = float("nan")
        for k in range(cols + 1):
            got = keep_top(scores, k, dim=1, ties=ties)
            assert torch.equal(got, _reference_keep_top(scores, k, ties)), (trial, k)
            assert (got.sum(1) == k).all()


def test_keep_top_by_hand() -> None:
    s = torch.tensor([3.0, 1.0, 1.0, 2.0, 1.0])
    assert keep_top(s, 2).tolist() == [True, False, False, True, False]
    assert keep_top(s, 3).tolist() == [True, False, False, True, True]  # the later 1.0 stays
    assert keep_top(s, 3, ties="earlier").tolist() == [True, True, False, True, False]  # the earlier 1.0 stays
    assert keep_top(torch.tensor([0.0, float("nan")]), 1).tolist() == [False, True]  # NaN ranks highest
    assert keep_top(s, 0).tolist() == [False] * 5 and keep_top(s, 9).tolist() == [True] * 5
    wide = torch.tensor([1.0, 1.0 + 2**-40], dtype=torch.float64)  # equal in float32, not in float64
    assert keep_top(wide, 1).tolist() == [False, True]
