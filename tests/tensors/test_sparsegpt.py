"""SparseGPT: agreement with a plain column-by-column OBS sweep, exact counts, and lower error than Wanda."""

from __future__ import annotations

import math

import pytest
import torch

from ebft.errors import EbftError
from ebft.pruners import PRUNERS, make_pruner, wanda_scores
from ebft.pruners.sparsegpt import SparseGPTPruner, block_prune_counts, sparsegpt_prune
from ebft.sparsity import check_nm, mask_stats, nm_mask, num_pruned, unstructured_mask


def _inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Correlated inputs X = Z A (so that H is far from diagonal), with per-feature scales."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, width, generator=g, dtype=torch.float64)
    a = torch.randn(width, width, generator=g, dtype=torch.float64) / math.sqrt(width)
    a += 0.3 * torch.eye(width, dtype=torch.float64)
    scale = torch.rand(width, generator=g, dtype=torch.float64) * 2 + 0.1
    return (z @ a) * scale


def _problem(rows: int = 16, cols: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _inputs(256, cols, seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return w, x, 2.0 * x.T @ x / x.shape[0]


def _reference(w: torch.Tensor, h: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
               blocksize: int, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column OBS without lazy batching, in float64."""
    w = w.clone().double()
    h = h.clone().double()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # U^T U = H^-1
    d = torch.diag(u)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            c1 = min(j + blocksize, cols)
            k = num_pruned(rows * c1, sparsity) - num_pruned(rows * j, sparsity)
            score = (w[:, j:c1] ** 2 / d[j:c1] ** 2).flatten()
            order = torch.sort(score, stable=True).indices[:k]
            block = torch.ones(score.numel(), dtype=torch.bool)
            block[order] = False
            keep[:, j:c1] = block.reshape(rows, c1 - j)
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            score = w[:, j : j + m] ** 2 / d[j : j + m] ** 2
            order = torch.sort(score, dim=1, stable=True).indices[:, : m - n]
            group = torch.ones(rows, m, dtype=torch.bool)
            group.scatter_(1, order, False)
            keep[:, j : j + m] = group
        q = torch.where(keep[:, j], w[:, j], torch.zeros(rows, dtype=torch.float64))
        err = (w[:, j] - q) / d[j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
        w[:, j] = q
    return w, keep


def _recon_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - pruned.double()) @ x.T).pow(2).sum())


def test_registered() -> None:
    assert PRUNERS["sparsegpt"] is SparseGPTPruner
    assert SparseGPTPruner.needs_activations
    pruner = make_pruner("sparsegpt", 0.5)
    assert isinstance(pruner, SparseGPTPruner) and pruner.percdamp == 0.01 and pruner.blocksize == 128


@pytest.mark.parametrize("nm", [None, (2, 4), (1, 4)])
@pytest.mark.parametrize("blocksize", [16, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_column_by_column_reference(nm: tuple[int, int] | None, blocksize: int, seed: int) -> None:
    w, _, h = _problem(seed=seed)
    want_w, want_keep = _reference(w, h, 0.5, nm, blocksize)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        got_w, got_keep = sparsegpt_prune(w.to(dtype), h, 0.5, nm, blocksize=blocksize, dtype=dtype)
        assert got_w.dtype == dtype
        assert torch.equal(got_keep, want_keep)
        torch.testing.assert_close(got_w.double(), want_w, rtol=tol, atol=tol)


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.77])
def test_exact_counts_and_zeros(sparsity: float) -> None:
    w, _, h = _problem(rows=7, cols=50, seed=3)  # 7 * 16 * s is not whole: counts carry across blocks
    new_w, keep = sparsegpt_prune(w.float(), h, sparsity, blocksize=16)
    assert int((~keep).sum()) == num_pruned(7 * 50, sparsity)
    assert mask_stats({"x": keep})["per_layer"]["x"] == num_pruned(7 * 50, sparsity) / (7 * 50)
    counts = block_prune_counts(7, 50, sparsity, 16)
    assert sum(counts) == num_pruned(7 * 50, sparsity)
    for b, c0 in enumerate(range(0, 50, 16)):
        assert int((~keep[:, c0 : c0 + 16]).sum()) == counts[b]
    assert torch.all(new_w[~keep] == 0)
    assert torch.all(new_w[keep] != 0)
    assert block_prune_counts(16, 256, 0.5, 128) == [16 * 64, 16 * 64]  # the reference's int(numel * s)


def test_nm_holds() -> None:
    w, _, h = _problem(seed=4)
    for n, m in ((2, 4), (4, 8), (1, 2)):
        new_w, keep = sparsegpt_prune(w.float(), h, 0.0, (n, m), blocksize=10)  # rounded up to a multiple of m
        assert check_nm(keep, n, m) and check_nm(new_w, n, m)
        assert int(keep.sum()) == w.numel() * n // m
        assert torch.all(new_w[~keep] == 0)


def test_lower_reconstruction_error_than_wanda_and_magnitude() -> None:
    for seed in range(4):
        w, x, h = _problem(rows=32, cols=64, seed=seed)
        sq_norm = (x * x).mean(0)
        for nm in (None, (2, 4)):
            new_w, keep = sparsegpt_prune(w.float(), h, 0.5, nm)
            if nm is None:
                wanda = unstructured_mask(wanda_scores(w, sq_norm), 0.5, per_row=True)
                magnitude = unstructured_mask(w.abs(), 0.5, per_row=False)
            else:
                wanda = nm_mask(wanda_scores(w, sq_norm), *nm)
                magnitude = nm_mask(w.abs(), *nm)
            ours = _recon_error(w, new_w, x)
            assert ours < _recon_error(w, w * wanda, x)
            assert ours < _recon_error(w, w * magnitude, x)
            # the OBS update matters: the same mask without it is worse
            assert ours < _recon_error(w, w * keep, x)


def test_dead_inputs() -> None:
    w, x, h = _problem(rows=8, cols=32, seed=5)
    x[:, [3, 17]] = 0
    h = 2.0 * x.T @ x / x.shape[0]
    new_w, keep = sparsegpt_prune(w.float(), h, 0.5, blocksize=16)
    assert torch.isfinite(new_w).all()
    assert torch.all(new_w[:, [3, 17]] == 0)
    assert not keep[:, [3, 17]].any()  # zero weights score 0 and go first
    assert int((~keep).sum()) == 8 * 16


def test_pruner_class_accumulates_the_hessian_and_prunes_in_place() -> None:
    w, x, _ = _problem(rows=8, cols=32, seed=6)
    x = x.float()
    pruner = SparseGPTPruner(0.5, percdamp=0.01, blocksize=16)
    pruner.add_batch("fc", x[:100].reshape(4, 25, 32))
    pruner.add_batch("fc", x[100:])
    torch.testing.assert_close(pruner.hessian("fc"), 2.0 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    weight = w.float().clone()
    want_w, want_keep = sparsegpt_prune(weight, pruner.hessian("fc"), 0.5, blocksize=16)
    mask = pruner.mask("fc", weight)
    assert torch.equal(weight, w.float())  # mask() leaves the weight alone
    keep = pruner.prune("fc", weight)
    assert torch.equal(keep, want_keep) and torch.equal(mask, want_keep)
    assert torch.equal(weight, want_w)
    pruner.reset()
    with pytest.raises(EbftError, match="no calibration inputs"):
        pruner.prune("fc", weight)


def test_bf16_weight() -> None:
    w, _, h = _problem(rows=8, cols=32, seed=7)
    weight = w.to(torch.bfloat16)
    new_w, keep = sparsegpt_prune(weight, h, 0.5, blocksize=16)
    assert new_w.dtype == torch.bfloat16 and torch.all(new_w[~keep] == 0)


def test_cholesky_failure_hint() -> None:
    h = -torch.eye(8, dtype=torch.float64)  # negative definite, and damping keeps it so
    with pytest.raises(EbftError, match="increase --percdamp"):
        sparsegpt_prune(torch.randn(4, 8), h, 0.5)
