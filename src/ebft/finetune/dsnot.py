"""DSnoT (Zhang et al., 2024, "Dynamic Sparse No Training"): training-free prune-and-grow of masks.

For an output row r of a linear layer with dense weights W and keep-mask M, the expected output
error over the calibration tokens is

    e_r = sum_j (1 - M_rj) W_rj mu_j,        mu_j = E[x_j].

Each cycle, every row whose |e_r| is still above ``threshold`` swaps one pruned weight for one
kept weight (so per-row counts, and N:M group counts, never change):

* grow: the pruned j with 0 < sign(e_r) W_rj mu_j < 2 |e_r| (restoring it alone lowers |e_r|)
  maximising sign(e_r) W_rj mu_j / Var(x_j)^var_power (the paper's growing criterion; the
  variance prefers features whose mean compensates reliably);
* prune: among kept k (for N:M, in j's group) whose removal keeps the swap improving,
  |e_r - W_rj mu_j + W_rk mu_k| < |e_r|, the one with the lowest Wanda importance
  |W_rk| sqrt(E[x_k^2]).

A row stops when |e_r| < ``threshold`` (the paper's update threshold, 0.1), when e_r changes
sign from its starting sign, when no improving swap is found, or after ``max_cycles`` cycles.
Since every swap strictly lowers |e_r|, the objective sum_r |e_r| never increases. Weights end
as the dense weights under the new mask (grown weights get their dense values back).

Simplifications against the reference code: the statistics come from one forward pass of the
already pruned block over its calibration inputs (all of its linears at once, each seeing the
pruned layers before it), not from the dense pass; the pruning candidate is restricted by the
improvement test above instead of the paper's sign rule, and a row whose best growing
candidate has no improving partner stops. N:M structure is not passed to fine-tuners, so it is
detected from each mask (see :func:`ebft.sparsity.patterns.detect_nm`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ebft.errors import EbftError, UsageError
from ebft.finetune.base import BlockResult, MaskRefiner, register_finetuner
from ebft.models.blocks import record_inputs
from ebft.settings import check_finite, setting
from ebft.sparsity.patterns import detect_nm

logger = logging.getLogger(__name__)

__all__ = ["DSnoT", "DSnoTOptions", "FeatureStats", "dsnot_mask", "expected_error"]

_VAR_EPS = 1e-12


@dataclass
class FeatureStats:
    """Per-input-feature mean, variance and mean square of a layer's inputs, float64 [in]."""

    mean: Tensor
    var: Tensor
    sq_mean: Tensor


class _StatsAccumulator:
    """Running sums of x and x^2 per feature over all tokens seen."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.total_sq: Tensor | None = None
        self.count = 0

    def add(self, inputs: Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        s, s2 = x.sum(0), (x * x).sum(0)
        if self.total is None:
            self.total, self.total_sq = s, s2
        else:
            self.total += s
            self.total_sq += s2
        self.count += x.shape[0]

    def stats(self) -> FeatureStats:
        if self.total is None or self.count == 0:
            raise EbftError("dsnot: a linear layer saw no calibration inputs")
        mean = self.total / self.count
        sq_mean = self.total_sq / self.count
        return FeatureStats(mean, (sq_mean - mean * mean).clamp_min(0), sq_mean)


def expected_error(dense: Tensor, keep: Tensor, mean: Tensor) -> Tensor:
    """e_r = sum_j (1 - M_rj) W_rj mu_j for every row, float64 [out]."""
    contrib = dense.detach().to(torch.float64) * mean.to(device=dense.device, dtype=torch.float64).unsqueeze(0)
    return torch.where(keep.to(dense.device), torch.zeros_like(contrib), contrib).sum(1)


@torch.no_grad()
def dsnot_mask(dense: Tensor, keep: Tensor, stats: FeatureStats, nm: tuple[int, int] | None = None,
               max_cycles: int = 50, threshold: float = 0.1, var_power: float = 1.0) -> tuple[Tensor, int]:
    """Prune-and-grow ``keep`` [out, in] for dense weights ``dense``; returns (new keep-mask, swaps).

    All rows are updated together (one swap per active row per cycle). With ``nm``, the grown and
    the pruned weight always share an M-group. ``keep`` is not modified.
    """
    if dense.shape != keep.shape or dense.dim() != 2:
        raise ValueError(f"dsnot_mask needs dense and keep of one shape [out, in]; got {dense.shape} and {keep.shape}")
    device = dense.device
    rows, cols = dense.shape
    f64 = dict(device=device, dtype=torch.float64)
    w = dense.detach().to(**f64)
    contrib = w * stats.mean.to(**f64).unsqueeze(0)  # W_rj mu_j
    importance = w.abs() * stats.sq_mean.to(**f64).clamp_min(0).sqrt().unsqueeze(0)
    grow_weight = stats.var.to(**f64).clamp_min(_VAR_EPS).pow(-var_power).unsqueeze(0)
    keep = keep.to(device=device, dtype=torch.bool).clone()
    if nm is not None:
        if cols % nm[1]:
            raise ValueError(f"N:M {nm[0]}:{nm[1]} does not fit a layer with {cols} inputs")
        group = torch.arange(cols, device=device) // nm[1]

    err = torch.where(keep, torch.zeros_like(contrib), contrib).sum(1)
    start_sign = torch.sign(err)
    active = err.abs() >= threshold
    row_idx = torch.arange(rows, device=device)
    neg_inf = torch.tensor(-torch.inf, **f64)
    pos_inf = torch.tensor(torch.inf, **f64)
    swaps = 0
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        sign = torch.sign(err).unsqueeze(1)
        signed = sign * contrib
        can_grow = ~keep & (signed > 0) & (signed < 2 * err.abs().unsqueeze(1))
        grow_val, grow = torch.where(can_grow, signed * grow_weight, neg_inf).max(1)
        after_grow = err - contrib.gather(1, grow.unsqueeze(1)).squeeze(1)
        can_prune = keep & ((after_grow.unsqueeze(1) + contrib).abs() < err.abs().unsqueeze(1))
        if nm is not None:
            can_prune &= group.unsqueeze(0) == group[grow].unsqueeze(1)
        prune_val, prune = torch.where(can_prune, importance, pos_inf).min(1)
        do = active & torch.isfinite(grow_val) & torch.isfinite(prune_val)
        rows_do = row_idx[do]
        keep[rows_do, grow[do]] = True
        keep[rows_do, prune[do]] = False
        new_err = after_grow + contrib.gather(1, prune.unsqueeze(1)).squeeze(1)
        err = torch.where(do, new_err, err)
        swaps += int(do.sum())
        active = do & (err.abs() >= threshold) & (torch.sign(err) == start_sign)
    return keep, swaps


@dataclass
class DSnoTOptions:
    """What only ``--finetune dsnot`` reads."""

    cycles: int = setting(50, help="most prune-and-grow swaps per output row")
    threshold: float = setting(0.1, help="a row stops swapping once |its expected output error| is below this")
    var_power: float = setting(1.0, help="exponent of the input variance that divides the growing criterion")

    def __post_init__(self) -> None:
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise UsageError(f"--dsnot-cycles must be a positive whole number; got {self.cycles!r}")
        check_finite(self.threshold, "--dsnot-threshold", "a number >= 0", low=0.0)
        check_finite(self.var_power, "--dsnot-var-power", "a number >= 0", low=0.0)


@register_finetuner("dsnot", options=DSnoTOptions)
class DSnoT(MaskRefiner):
    """Training-free mask repair (:func:`dsnot_mask`) of every linear layer of a block.

    The statistics come from the pass that measures the block's starting loss; every layer's mask
    is then refined on its own (:class:`~ebft.finetune.base.MaskRefiner` applies and judges them).
    """

    what = "dsnot"
    reads = frozenset({"batch_size", "holdout_fraction", "model_guard"})  # its passes, the windows it may see

    def observe(self, modules: dict[str, nn.Module]) -> contextlib.AbstractContextManager:
        self._stats = {key: _StatsAccumulator() for key in modules}
        return record_inputs(modules, lambda key, x: self._stats[key].add(x))

    def refine(self, block: nn.Module, inputs: Tensor, targets: Tensor, masks: dict[str, Tensor],
               block_kwargs: dict[str, Any], index: int, dense: dict[str, Tensor], modules: dict[str, nn.Module],
               result: BlockResult) -> dict[str, Tensor]:
        result.tokens = inputs.shape[0] * inputs.shape[1]
        opts = self.options
        new: dict[str, Tensor] = {}
        err_before = err_after = 0.0
        for key, mask in masks.items():
            stats = self._stats[key].stats()
            nm = detect_nm(mask)
            new[key], swaps = dsnot_mask(dense[key], mask, stats, nm, opts.cycles, opts.threshold, opts.var_power)
            err_before += float(expected_error(dense[key], mask, stats.mean).abs().sum())
            err_after += float(expected_error(dense[key], new[key], stats.mean).abs().sum())
            result.steps += swaps
            logger.debug("block %d %s: %d swaps%s", index, key, swaps, f" (N:M {nm[0]}:{nm[1]})" if nm else "")
        logger.info("block %d dsnot: %d swaps, sum|e| %.4g -> %.4g", index, result.steps, err_before, err_after)
        self._stats = {}
        return new
