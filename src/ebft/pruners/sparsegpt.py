"""SparseGPT (Frantar & Alistarh, 2023): prune with OBS weight updates from the layer Hessian.

For a linear layer with inputs X, the layer-wise loss ||W X - W' X||^2 has Hessian
H = (2/n) X^T X (n tokens). Columns are processed left to right; each pruned weight's error is
spread over the not yet processed columns of its row through the upper Cholesky factor U of
H^-1 (U^T U = H^-1), the sequential form of the Optimal Brain Surgeon update. Updates are
applied lazily per block of ``blocksize`` columns.

Mask selection follows the reference implementation:

* unstructured: when a column block is reached, the lowest scores w^2 / U_jj^2 of the whole
  block (all rows together) are pruned, using the weights as updated by the earlier blocks;
* N:M: at every column j with j % M == 0, the (M - N) lowest scores of the group j .. j+M-1 are
  pruned in each row, using the weights as updated by the earlier columns.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ebft.errors import EbftError, UsageError
from ebft.pruners.base import Pruner, register_pruner
from ebft.settings import check_finite, setting
from ebft.sparsity import keep_top, num_pruned

logger = logging.getLogger(__name__)

__all__ = ["SparseGPTOptions", "SparseGPTPruner", "block_prune_counts", "inverse_hessian_factor", "sparsegpt_prune"]


def inverse_hessian_factor(hessian: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor U of (H + percdamp * mean(diag H) * I)^-1, in float64.

    ``hessian`` must have no zero diagonal entries (see :func:`sparsegpt_prune`). Raises
    :class:`EbftError` when a factorisation fails.
    """
    h = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(h)
    diag += percdamp * float(diag.mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if int(info) == 0:
            return upper
    raise EbftError(
        f"sparsegpt: the damped Hessian is not positive definite (percdamp={percdamp}); increase --percdamp"
    )


def block_prune_counts(rows: int, cols: int, sparsity: float, blocksize: int) -> list[int]:
    """How many weights each column block prunes in unstructured mode.

    Block b (columns c0 .. c1-1) prunes ``num_pruned(rows*c1, s) - num_pruned(rows*c0, s)``: exactly
    ``floor(rows * width * s)`` whenever that product is a whole number (as in the reference), and
    in every case a layer total of exactly ``num_pruned(rows * cols, s)``.
    """
    bounds = list(range(0, cols, blocksize)) + [cols]
    return [num_pruned(rows * c1, sparsity) - num_pruned(rows * c0, sparsity) for c0, c1 in zip(bounds, bounds[1:])]


def _scores(w: Tensor, d: Tensor) -> Tensor:
    """OBS saliency w^2 / d^2 (d: the Cholesky diagonal), NaN ranked highest."""
    return torch.nan_to_num(w * w / (d * d).unsqueeze(0), nan=math.inf)


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` [out, in] with SparseGPT given ``hessian`` [in, in]; returns (new weight, keep-mask).

    The new weight has ``weight``'s dtype and device, is exactly 0 where the mask is False and
    carries the OBS updates elsewhere; ``weight`` itself is not modified. Inputs whose Hessian
    diagonal is 0 (never active) get H_ii = 1 and their weight column set to 0. The column sweep
    runs in ``dtype``; the inverse Hessian is computed in float64. Unstructured: the layer prunes
    exactly ``num_pruned(out * in, sparsity)`` weights, split over column blocks as
    :func:`block_prune_counts` says. N:M (which overrides ``sparsity``): every group of M inputs
    keeps N weights per row; ``blocksize`` is rounded up to a multiple of M.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"sparsegpt_prune needs weight [out, in] and hessian [in, in]; "
            f"got {tuple(weight.shape)} and {tuple(hessian.shape)}"
        )
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1; got {blocksize}")
    rows, cols = weight.shape
    device = weight.device
    w = weight.detach().to(device=device, dtype=dtype).clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    hinv = inverse_hessian_factor(h, percdamp).to(dtype)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=device)

    if nm is not None:
        n, m = nm
        if not (1 <= m and 0 <= n <= m) or cols % m:
            raise ValueError(f"N:M {n}:{m} does not fit a layer with {cols} inputs")
        blocksize = -(-blocksize // m) * m
        counts: list[int] = []
    else:
        counts = block_prune_counts(rows, cols, sparsity, blocksize)

    for b, c0 in enumerate(range(0, cols, blocksize)):
        c1 = min(c0 + blocksize, cols)
        w1 = w[:, c0:c1].clone()
        h1 = hinv[c0:c1, c0:c1]
        d1 = torch.diagonal(h1)
        err1 = torch.zeros_like(w1)
        if nm is None:
            keep1 = keep_top(_scores(w1, d1).reshape(-1), w1.numel() - counts[b]).reshape(w1.shape)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(c1 - c0):
            if nm is not None and i % m == 0:
                keep1[:, i : i + m] = keep_top(_scores(w1[:, i : i + m], d1[i : i + m]), n, dim=1)
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, c0:c1] = w1
        keep[:, c0:c1] = keep1
        if c1 < cols:
            w[:, c1:] -= err1 @ hinv[c0:c1, c1:]
    w.masked_fill_(~keep, 0)
    return w.to(weight.dtype), keep


@dataclass
class SparseGPTOptions:
    """What only ``--pruner sparsegpt`` reads."""

    percdamp: float = setting(0.01, key="percdamp", help="Hessian dampening, a fraction of its mean diagonal")
    blocksize: int = setting(128, help="columns per lazy-update block of the OBS sweep")

    def __post_init__(self) -> None:
        check_finite(self.percdamp, "--percdamp", "a number >= 0 (0.01 is typical)", low=0.0)
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise UsageError(f"--sparsegpt-blocksize must be a positive whole number; got {self.blocksize!r}")


@register_pruner("sparsegpt", options=SparseGPTOptions)
class SparseGPTPruner(Pruner):
    """Accumulates each layer's Hessian (2/n) sum x x^T over tokens, then prunes with :func:`sparsegpt_prune`."""

    needs_activations = True
    per_row = False

    def __init__(self, sparsity: float, nm: tuple[int, int] | None = None, options: SparseGPTOptions | None = None,
                 **option_values: Any) -> None:
        super().__init__(sparsity, nm, options, **option_values)
        self.percdamp = float(self.options.percdamp)
        self.blocksize = int(self.options.blocksize)
        self._hessian: dict[str, Tensor] = {}  # name -> [in, in] float32, running (2/n) X^T X
        self._tokens: dict[str, int] = {}

    def add_batch(self, name: str, inputs: Tensor) -> None:
        x = inputs.detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [tokens, in]
        b = x.shape[0]
        if b == 0:
            return
        if name not in self._hessian:
            self._hessian[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self._tokens[name] = 0
        h = self._hessian[name]
        if h.shape[0] != x.shape[1]:
            raise EbftError(
                f"sparsegpt: layer {name!r} received inputs of width {x.shape[1]} after width {h.shape[0]}"
            )
        n = self._tokens[name]
        h.mul_(n / (n + b))
        x = x.to(h.device) * math.sqrt(2.0 / (n + b))
        h.addmm_(x.t(), x)
        self._tokens[name] = n + b

    def hessian(self, name: str) -> Tensor:
        """The accumulated (2/n) X^T X of layer ``name``, [in, in] float32."""
        if name not in self._hessian or self._tokens[name] == 0:
            raise EbftError(
                f"sparsegpt: no calibration inputs were recorded for layer {name!r}, so it cannot be pruned"
            )
        return self._hessian[name]

    def prune(self, name: str, weight: Tensor) -> Tensor:
        hessian = self.hessian(name)
        if hessian.shape[0] != weight.shape[1]:
            raise EbftError(
                f"sparsegpt: layer {name!r} has {weight.shape[1]} inputs but its Hessian is {hessian.shape[0]} wide"
            )
        new_weight, keep = sparsegpt_prune(
            weight, hessian.to(weight.device), self.sparsity, self.nm, self.blocksize, self.percdamp
        )
        with torch.no_grad():
            weight.copy_(new_weight)
        logger.debug("sparsegpt: %s pruned %d of %d", name, int((~keep).sum()), keep.numel())
        return keep

    def mask(self, name: str, weight: Tensor) -> Tensor:
        """Keep-mask SparseGPT would give ``weight``, which is left unchanged."""
        return self.prune(name, weight.detach().clone())

    def reset(self) -> None:
        self._hessian.clear()
        self._tokens.clear()

    def __repr__(self) -> str:
        target = f"nm={self.nm[0]}:{self.nm[1]}" if self.nm else f"sparsity={self.sparsity}"
        return f"{type(self).__name__}({target}, percdamp={self.percdamp}, blocksize={self.blocksize})"
