"""Magnitude pruning: drop the smallest |W| over the whole layer (or per N:M group)."""

from __future__ import annotations

import torch
from torch import Tensor

from ebft.pruners.base import Pruner, register_pruner


def magnitude_scores(weight: Tensor) -> Tensor:
    """|W| in float32, [out, in]."""
    return weight.detach().to(torch.float32).abs()


@register_pruner("magnitude")
class MagnitudePruner(Pruner):
    """Scores are |W|; unstructured sparsity is compared layer-wise."""

    needs_activations = False
    per_row = False

    def score(self, name: str, weight: Tensor) -> Tensor:
        return magnitude_scores(weight)
