"""Perplexity of a tiny Llama against a direct reference computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ebft.eval import perplexity


def test_matches_a_direct_reference(tiny_llama: nn.Module) -> None:
    windows = torch.randint(0, 258, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(tiny_llama(windows).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(2, windows[:, 1:, None]).mean()
    for batch_size in (1, 3):
        result = perplexity(tiny_llama, windows, batch_size=batch_size)
        assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
        assert result.tokens == 4 * 11


def test_restores_training_mode(tiny_llama: nn.Module) -> None:
    tiny_llama.train()
    perplexity(tiny_llama, torch.zeros(1, 4, dtype=torch.long))
    assert tiny_llama.training
