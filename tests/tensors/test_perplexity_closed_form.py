"""Perplexity over non-overlapping windows of a model whose answer is known in closed form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ebft.errors import EbftError
from ebft.eval import perplexity


class ConstantLogits(nn.Module):
    """Returns the same logits at every position: a model whose perplexity is known in closed form."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding(logits.numel(), 1)
        self.register_buffer("logits", logits)
        self.config = SimpleNamespace(use_cache=True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        b, s = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, s, -1))


def test_uniform_model_has_perplexity_equal_to_the_vocabulary() -> None:
    model = ConstantLogits(torch.zeros(50))
    windows = torch.randint(0, 50, (3, 9))
    result = perplexity(model, windows)
    assert result.perplexity == pytest.approx(50.0, rel=1e-6)
    assert result.nll == pytest.approx(math.log(50), rel=1e-6)
    assert (result.tokens, result.windows) == (3 * 8, 3)
    assert result.to_dict() == {"perplexity": result.perplexity, "tokens": 24, "windows": 3}


def test_hand_computed_two_token_vocabulary() -> None:
    # p(0) = 3/4, p(1) = 1/4 everywhere; window [0, 0, 1] predicts 0 then 1 (the first token is context only)
    model = ConstantLogits(torch.log(torch.tensor([0.75, 0.25])))
    result = perplexity(model, torch.tensor([[1, 0, 1]]))
    expected = math.exp(-(math.log(0.75) + math.log(0.25)) / 2)
    assert result.perplexity == pytest.approx(expected, rel=1e-6)
    assert result.tokens == 2


@pytest.mark.parametrize("shape", [(0, 8), (2, 1), (8,)])
def test_nothing_to_evaluate(shape: tuple[int, ...]) -> None:
    with pytest.raises(EbftError, match="nothing to evaluate"):
        perplexity(ConstantLogits(torch.zeros(4)), torch.zeros(shape, dtype=torch.long))


def test_non_finite_model_is_an_error() -> None:
    model = ConstantLogits(torch.tensor([0.0, math.nan]))
    with pytest.raises(EbftError, match="non-finite"):
        perplexity(model, torch.zeros(1, 4, dtype=torch.long))
