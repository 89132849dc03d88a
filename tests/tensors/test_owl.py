"""OWL's layer-wise sparsities: the outlier ratio and the allocation by hand."""

from __future__ import annotations

import pytest
import torch

from ebft.allocation.owl import OWLOptions, outlier_ratio, owl_sparsities
from ebft.errors import UsageError
from ebft.sparsity import num_pruned, share_counts


def test_outlier_ratio_by_hand() -> None:
    # 8 scores in two layers, mean (1+1+1+1+1+1+10+24)/8 = 5; with M = 2 the bar is 10: only 24 is above it
    a = torch.tensor([[1.0, 1.0], [1.0, 10.0]])
    b = torch.tensor([1.0, 1.0, 1.0, 24.0])
    assert outlier_ratio([a, b], 2.0) == 1 / 8
    assert outlier_ratio([a, b], 1.5) == 2 / 8  # bar 7.5: 10 and 24
    assert outlier_ratio([a, b], 0.1) == 1.0  # bar 0.5: every score


def test_owl_sparsities_by_hand() -> None:
    # ratios 0.1, 0.3, 0.2 -> scaled to [0, 2 * 0.05]: 0, 0.1, 0.05 (mean 0.05) -> 0.5 - (0 - 0.05), ...
    got = owl_sparsities([0.1, 0.3, 0.2], 0.5, 0.05)
    assert got == pytest.approx([0.55, 0.45, 0.5], abs=1e-12)
    assert sum(got) / 3 == pytest.approx(0.5, abs=1e-15)
    assert owl_sparsities([0.2, 0.2], 0.7, 0.08) == [0.7, 0.7]  # equal ratios: uniform


@pytest.mark.parametrize("seed", range(5))
def test_owl_sparsities_average_to_the_target_and_span_two_lambda(seed: int) -> None:
    ratios = torch.rand(30, generator=torch.Generator().manual_seed(seed)).tolist()
    got = torch.tensor(owl_sparsities(ratios, 0.7, 0.08), dtype=torch.float64)
    assert float(got.mean()) == pytest.approx(0.7, abs=1e-14)
    assert float(got.max() - got.min()) == pytest.approx(0.16, abs=1e-12)
    # the most outlier-heavy block is pruned least
    assert int(got.argmin()) == max(range(30), key=lambda i: ratios[i])


def test_options_refuse_a_spread_that_leaves_zero_one() -> None:
    OWLOptions(5.0, 0.08).check_target(0.7)
    with pytest.raises(UsageError, match="outside \\[0, 1\\) for --sparsity 0.9; use a smaller --owl-lambda"):
        OWLOptions(5.0, 0.08).check_target(0.9)
    with pytest.raises(UsageError, match="--owl-threshold must be a positive number"):
        OWLOptions(0.0, 0.08)
    with pytest.raises(UsageError, match="--owl-lambda must be in \\[0, 0.5\\)"):
        OWLOptions(5.0, 0.5)


def test_share_counts_by_hand() -> None:
    # 316.8, 259.2, 288 -> floors 316, 259, 288 (863); uniform prunes 3 x 288 = 864: the largest remainder gets it
    assert share_counts([0.55, 0.45, 0.5], 576, 0.5) == [317, 259, 288]
    # 2.0 and 1.0 round to 3, one more than uniform's 2 x 1: the smallest remainder (the later on a tie) gives it up
    assert share_counts([2 / 3, 1 / 3], 3, 0.5) == [2, 0]
    assert share_counts([0.5] * 4, 7, 0.5) == [3, 3, 3, 3]  # uniform: floor(3.5) each, as num_pruned


@pytest.mark.parametrize("seed", range(5))
def test_share_counts_keep_the_uniform_total(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    fractions = owl_sparsities(torch.rand(30, generator=g).tolist(), 0.7, 0.08)
    for size in (576, 1536, 100, 13):
        counts = share_counts(fractions, size, 0.7)
        assert sum(counts) == 30 * num_pruned(size, 0.7)
        assert all(abs(c - f * size) <= 1 + 1e-9 for c, f in zip(counts, fractions))
