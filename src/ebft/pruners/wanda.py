"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch
from torch import Tensor

from ebft.errors import EbftError
from ebft.pruners.base import Pruner, register_pruner


def wanda_scores(weight: Tensor, sq_norm: Tensor) -> Tensor:
    """|W_ij| * sqrt(sq_norm_j) in float32.

    ``weight`` is [out, in]; ``sq_norm`` is [in], the per-input-feature squared activation norm
    (any positive per-feature scaling, such as a mean over tokens, leaves the ranking unchanged).
    """
    if weight.dim() != 2 or sq_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"wanda_scores needs weight [out, in] and sq_norm [in]; got {tuple(weight.shape)} and {tuple(sq_norm.shape)}"
        )
    norm = sq_norm.detach().to(device=weight.device, dtype=torch.float32).clamp_min(0).sqrt()
    return weight.detach().to(torch.float32).abs() * norm.unsqueeze(0)


@register_pruner("wanda")
class WandaPruner(Pruner):
    """Collects the mean of squared inputs per feature for every layer, then scores with :func:`wanda_scores`."""

    needs_activations = True
    per_row = True

    def __init__(self, sparsity: float, nm: tuple[int, int] | None = None, options: None = None) -> None:
        super().__init__(sparsity, nm, options)
        self._sum_sq: dict[str, Tensor] = {}  # name -> [in] float64, sum over tokens of x_j^2
        self._tokens: dict[str, int] = {}

    def add_batch(self, name: str, inputs: Tensor) -> None:
        x = inputs.detach()
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [tokens, in]
        batch_sq = (x * x).sum(dim=0).to(torch.float64)
        if name in self._sum_sq:
            if self._sum_sq[name].shape != batch_sq.shape:
                raise EbftError(
                    f"wanda: layer {name!r} received inputs of width {batch_sq.shape[0]} "
                    f"after width {self._sum_sq[name].shape[0]}"
                )
            self._sum_sq[name] += batch_sq.to(self._sum_sq[name].device)
            self._tokens[name] += x.shape[0]
        else:
            self._sum_sq[name] = batch_sq
            self._tokens[name] = x.shape[0]

    def sq_norm(self, name: str) -> Tensor:
        """Mean over recorded tokens of x_j^2 for layer ``name``, [in] float64."""
        if name not in self._sum_sq or self._tokens[name] == 0:
            raise EbftError(f"wanda: no calibration inputs were recorded for layer {name!r}, so it cannot be scored")
        return self._sum_sq[name] / self._tokens[name]

    def score(self, name: str, weight: Tensor) -> Tensor:
        sq_norm = self.sq_norm(name)
        if sq_norm.shape[0] != weight.shape[-1]:
            raise EbftError(
                f"wanda: layer {name!r} has {weight.shape[-1]} inputs but its recorded activations have {sq_norm.shape[0]}"
            )
        return wanda_scores(weight, sq_norm)

    def reset(self) -> None:
        self._sum_sq.clear()
        self._tokens.clear()
