"""Fixtures of the tensor-only tests: a residual MLP that stands in for a decoder block."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


class ResidualMLP(nn.Module):
    """``x + fc2(activation(fc1(x)))``: the smallest thing shaped like a decoder block.

    With ``fail_with_grad`` its forward raises while gradients are on, as a failure in the middle of training would.
    """

    def __init__(self, width: int = 8, hidden: int = 16,
                 activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh, fail_with_grad: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.activation = activation
        self.fail_with_grad = fail_with_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_with_grad and torch.is_grad_enabled():
            raise RuntimeError("forward failed during training")
        return x + self.fc2(self.activation(self.fc1(x)))


@pytest.fixture(scope="session")
def residual_mlp() -> type[ResidualMLP]:
    """The :class:`ResidualMLP` class: ``residual_mlp(width=8, hidden=16, activation=torch.tanh)``."""
    return ResidualMLP


@pytest.fixture(scope="session")
def pruned_mlp() -> Callable[..., tuple[ResidualMLP, torch.Tensor, torch.Tensor, dict, dict]]:
    """``pruned_mlp(mask, seed=0, seqlen=12, shift=0.0, **block)``: a seeded :class:`ResidualMLP` made with
    ``block``, inputs ``x`` [4, seqlen, 8] (plus ``shift``), its dense outputs ``y``, and each weight pruned in
    place by ``mask(weight)``; returns ``(block, x, y, masks, dense weights)``."""

    def make(mask: Callable[[torch.Tensor], torch.Tensor], seed: int = 0, seqlen: int = 12, shift: float = 0.0,
             **block: object) -> tuple[ResidualMLP, torch.Tensor, torch.Tensor, dict, dict]:
        torch.manual_seed(seed)
        mlp = ResidualMLP(**block).requires_grad_(False)
        x = torch.randn(4, seqlen, 8, generator=torch.Generator().manual_seed(seed + 1)) + shift
        with torch.no_grad():
            y = mlp(x)
        dense = {n: p.detach().clone() for n, p in mlp.named_parameters() if n.endswith("weight")}
        params = dict(mlp.named_parameters())
        masks = {}
        for name, weight in dense.items():
            masks[name] = mask(weight)
            params[name].data.mul_(masks[name])
        return mlp, x, y, masks, dense

    return make
