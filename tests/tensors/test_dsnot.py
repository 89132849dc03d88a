"""DSnoT: hand-computed swaps, exact per-row and N:M counts, a never-increasing objective, block tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ebft.config import FinetuneConfig
from ebft.finetune import FINETUNERS
from ebft.finetune.dsnot import DSnoT, FeatureStats, dsnot_mask, expected_error
from ebft.models.blocks import run_block
from ebft.pruners import wanda_scores
from ebft.sparsity import check_nm, nm_mask, unstructured_mask
from ebft.sparsity.patterns import detect_nm

CPU = torch.device("cpu")


def _stats(mean: list[float], var: list[float], sq: list[float] | None = None) -> FeatureStats:
    m = torch.tensor(mean, dtype=torch.float64)
    v = torch.tensor(var, dtype=torch.float64)
    return FeatureStats(m, v, torch.tensor(sq, dtype=torch.float64) if sq is not None else v + m * m)


def _random_stats(cols: int, seed: int) -> FeatureStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, cols, generator=g, dtype=torch.float64) * (torch.rand(cols, generator=g) + 0.2)
    x += torch.randn(cols, generator=g) * 0.8  # non-zero means
    mean = x.mean(0)
    return FeatureStats(mean, x.var(0, unbiased=False), (x * x).mean(0))


def test_registered() -> None:
    assert FINETUNERS["dsnot"] is DSnoT and DSnoT.needs_dense_weights and DSnoT.name == "dsnot"
    assert FinetuneConfig(method="dsnot").method == "dsnot"
    tuner = DSnoT(FinetuneConfig(method="dsnot"))
    assert (tuner.options.cycles, tuner.options.threshold) == (50, 0.1)


# rows mirror each other: e = +1.1 and -1.1 with mean 1 on every input
W = torch.tensor([[0.6, 0.5, 0.3, -0.2], [-0.6, -0.5, -0.3, 0.2]], dtype=torch.float64)
START = torch.tensor([[False, False, True, True]] * 2)
ONES = _stats([1.0] * 4, [1.0] * 4, [1.0] * 4)


def test_hand_computed_swaps() -> None:
    # cycle 1: e = 1.1; grow j=0 (0.6 beats 0.5), e -> 0.5; prune among {2: |0.5+0.3|, 3: |0.5-0.2|}, both
    # improve, lowest |w| is 3; e -> 0.3. cycle 2: grow j=1 (0.5 < 2*0.3), e -> -0.2; prune 0 would give
    # |0.4| > 0.3, prune 2 gives |0.1|: e -> 0.1. cycle 3: the only positive candidate 0.3 is not < 0.2: stop.
    one, swaps = dsnot_mask(W, START, ONES, max_cycles=1)
    assert one.tolist() == [[True, False, True, False]] * 2 and swaps == 2
    keep, swaps = dsnot_mask(W, START, ONES)
    assert keep.tolist() == [[True, True, False, False]] * 2 and swaps == 4
    torch.testing.assert_close(expected_error(W, keep, ONES.mean), torch.tensor([0.1, -0.1], dtype=torch.float64))
    assert torch.equal(START, torch.tensor([[False, False, True, True]] * 2))  # input untouched


def test_variance_steers_growing() -> None:
    # Var(x_0) = 4: 0.6 / 4 < 0.5 / 1, so input 1 grows first; then 3 is pruned (|0.6 - 0.2| < 1.1, lowest |w|)
    keep, swaps = dsnot_mask(W[:1], START[:1], _stats([1.0] * 4, [4.0, 1.0, 1.0, 1.0], [1.0] * 4), max_cycles=1)
    assert keep.tolist() == [[False, True, True, False]] and swaps == 1


def test_threshold_and_cycles_stop() -> None:
    keep, swaps = dsnot_mask(W, START, ONES, threshold=2.0)
    assert torch.equal(keep, START) and swaps == 0
    keep, swaps = dsnot_mask(W, START, ONES, max_cycles=0)
    assert torch.equal(keep, START) and swaps == 0
    # threshold 0.4: after the first swap |e| = 0.3 < 0.4, so each row stops there
    keep, swaps = dsnot_mask(W, START, ONES, threshold=0.4)
    assert keep.tolist() == [[True, False, True, False]] * 2 and swaps == 2


def test_nm_swaps_stay_in_group() -> None:
    # 2:4 on 8 inputs; the error sits in group 0, the only useful growth is there
    w = torch.tensor([[0.6, 0.5, 0.3, -0.2, 0.05, 0.04, 0.9, 0.8]], dtype=torch.float64)
    start = torch.tensor([[False, False, True, True, False, False, True, True]])
    stats = _stats([1.0] * 8, [1.0] * 8, [1.0] * 8)
    keep, swaps = dsnot_mask(w, start, stats, nm=(2, 4))
    assert check_nm(keep, 2, 4) and int(keep.sum()) == 4 and swaps > 0
    assert expected_error(w, keep, stats.mean).abs() < expected_error(w, start, stats.mean).abs()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_random_invariants(seed: int, nm: tuple[int, int] | None) -> None:
    rows, cols = 24, 64
    dense = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    stats = _random_stats(cols, seed)
    scores = wanda_scores(dense, stats.sq_mean)
    start = unstructured_mask(scores, 0.5, per_row=True) if nm is None else nm_mask(scores, *nm)
    if nm is not None:
        found = detect_nm(start)
        assert found is not None and check_nm(start, *found) and nm[1] % found[1] == 0
    keep, swaps = dsnot_mask(dense, start, stats, nm, threshold=1e-3)
    assert swaps > 0
    assert torch.equal(keep.sum(1), start.sum(1))  # every row keeps its count
    if nm is not None:
        assert check_nm(keep, *nm)
        groups = lambda k: k.reshape(rows, cols // nm[1], nm[1]).sum(2)  # noqa: E731
        assert torch.equal(groups(keep), groups(start))
    before = expected_error(dense, start, stats.mean).abs()
    after = expected_error(dense, keep, stats.mean).abs()
    assert torch.all(after <= before + 1e-12)
    assert after.sum() < before.sum()
    assert int((keep != start).sum()) <= 2 * swaps


def test_detect_nm() -> None:
    assert detect_nm(torch.tensor([[True, False, True, False, False, True, True, False]] * 3)) == (1, 2)
    assert detect_nm(torch.tensor([[True, True, False, False, False, True, True, False]] * 3)) == (2, 4)
    assert detect_nm(torch.tensor([[True, True, True, False, False, False, True, False]])) == (4, 8)  # one group
    assert detect_nm(torch.tensor([[True, True, True, False, False, False, True, False],
                                   [True, False, False, False, False, False, False, True]])) is None
    assert detect_nm(torch.ones(2, 8, dtype=torch.bool)) is None


# ------------------------------------------------------------------------------ tune() on a block


@pytest.fixture
def block_problem(pruned_mlp) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict, dict]:
    """A ReLU residual MLP on inputs of mean 1, pruned row-wise by magnitude: (block, x, y, masks, dense)."""
    return pruned_mlp(lambda w: unstructured_mask(w.abs(), 0.5, per_row=True), seqlen=16, shift=1.0,
                      activation=torch.relu)


def test_tune_updates_masks_in_place(block_problem, assert_refined_masks) -> None:
    block, x, y, masks, dense = block_problem
    start = {n: m.clone() for n, m in masks.items()}
    refs = dict(masks)
    init = run_block(block, x, {}, 8, targets=y)
    tuner = DSnoT(FinetuneConfig(method="dsnot", batch_size=2), threshold=1e-3)
    result = tuner.tune(block, x, y, masks, {}, 0, dense_weights=dense)
    assert all(masks[n] is refs[n] for n in masks)
    assert_refined_masks(block, masks, start, dense)
    assert result.restored is None and result.steps > 0
    assert any(not torch.equal(masks[n], start[n]) for n in masks)
    assert run_block(block, x, {}, 8, targets=y) < init


def test_tune_puts_everything_back_when_the_loss_does_not_drop(block_problem) -> None:
    block, x, _, masks, dense = block_problem
    with torch.no_grad():
        y = block(x)  # the pruned block is already perfect: no change can help
    start = {n: m.clone() for n, m in masks.items()}
    weights = {n: p.detach().clone() for n, p in block.named_parameters()}
    result = DSnoT(FinetuneConfig(method="dsnot"), threshold=1e-6).tune(block, x, y, masks, {}, 0, dense)
    assert result.restored is not None and result.steps > 0
    assert all(torch.equal(masks[n], start[n]) for n in masks)
    assert all(torch.equal(p, weights[n]) for n, p in block.named_parameters())


def test_tune_needs_dense_weights(block_problem) -> None:
    block, x, y, masks, _ = block_problem
    with pytest.raises(Exception, match="dense weights"):
        DSnoT(FinetuneConfig(method="dsnot")).tune(block, x, y, masks, {}, 0, None)


def test_dsnot_flags_reach_the_tuner() -> None:
    from ebft.finetune.dsnot import DSnoT

    tuner = DSnoT(FinetuneConfig(method="dsnot", options={"cycles": 3, "threshold": 0.5}))
    assert (tuner.options.cycles, tuner.options.threshold) == (3, 0.5)
    tuner = DSnoT(FinetuneConfig(method="dsnot"))
    assert (tuner.options.cycles, tuner.options.threshold) == (50, 0.1)
