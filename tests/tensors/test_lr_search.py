"""--ebft-lr-search: each block's learning rate chosen by short trials judged on held-out windows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ebft.config import FinetuneConfig
from ebft.errors import UsageError
from ebft.finetune.ebft import EBFT, EBFTOptions
from ebft.models.blocks import run_block
from ebft.sparsity import apply_mask_


def _problem(residual_mlp, n: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    dense, block = residual_mlp(), residual_mlp()
    block.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(p.shape, generator=g) < 0.5 for name, p in block.named_parameters()
             if name.endswith("weight") and p.dim() == 2}
    for name, mask in masks.items():
        apply_mask_(dict(block.named_parameters())[name].data, mask)
    x = torch.randn(n, 12, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = dense(x)
    block.requires_grad_(False)
    return block, x, y, masks


def _cfg(**options: object) -> FinetuneConfig:
    return FinetuneConfig(method="ebft", epochs=2, lr=1e-2, batch_size=2, precision="fp32", grad_clip=0.0,
                          options=EBFTOptions(**options))


def test_the_search_picks_the_trial_with_the_lowest_held_out_loss_and_trains_with_it(residual_mlp) -> None:
    block, x, y, masks = _problem(residual_mlp)
    untuned = {k: v.clone() for k, v in block.state_dict().items()}
    holdout = (x[6:], y[6:])
    result = EBFT(_cfg(lr_search=(4.0, 1.0, 0.01), lr_trial_steps=3), seed=0).tune(
        block, x[:6], y[:6], masks, {}, index=0, holdout=holdout)
    assert set(result.lr_trials) == {"0.04", "0.01", "0.0001"}
    # each trial, rerun by hand from the untuned block: 3 steps at that lr, then the held-out loss
    for lr_text, loss in result.lr_trials.items():
        trial = residual_mlp()
        trial.load_state_dict(untuned)
        trial.requires_grad_(False)
        EBFT(FinetuneConfig(method="ebft", epochs=1, steps=3, lr=float(lr_text), batch_size=2, precision="fp32",
                            grad_clip=0.0), seed=0).tune(trial, x[:6], y[:6], masks, {}, index=0)
        assert loss == pytest.approx(run_block(trial, x[6:], {}, 2, targets=y[6:]), rel=1e-6)
    best = min(result.lr_trials, key=lambda k: result.lr_trials[k])
    assert result.lr == float(best)
    # and the block was then trained from its untuned state at that lr alone
    plain = residual_mlp()
    plain.load_state_dict(untuned)
    plain.requires_grad_(False)
    EBFT(FinetuneConfig(method="ebft", epochs=2, lr=result.lr, batch_size=2, precision="fp32", grad_clip=0.0),
         seed=0).tune(plain, x[:6], y[:6], masks, {}, index=0)
    for name, value in block.state_dict().items():
        assert torch.equal(value, plain.state_dict()[name]), name
    for name, mask in masks.items():
        assert not dict(block.named_parameters())[name][~mask].any()


def test_without_held_out_windows_the_lr_is_as_given(residual_mlp) -> None:
    block, x, y, masks = _problem(residual_mlp)
    result = EBFT(_cfg(lr_search=(4.0, 0.25)), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.lr is None and result.lr_trials == {}


def test_a_diverging_trial_is_never_chosen(residual_mlp) -> None:
    block, x, y, masks = _problem(residual_mlp)
    result = EBFT(_cfg(lr_search=(1e9, 1.0), lr_trial_steps=2), seed=0).tune(
        block, x[:6], y[:6], masks, {}, index=0, holdout=(x[6:], y[6:]))
    assert result.lr == pytest.approx(1e-2)
    loss = result.lr_trials["1e+07"]
    assert loss is None or not math.isfinite(loss) or loss > result.lr_trials["0.01"]


def test_bad_search_options_are_refused() -> None:
    with pytest.raises(UsageError, match="--ebft-lr-search must be positive factors"):
        EBFTOptions(lr_search=(1.0, -2.0))
    with pytest.raises(UsageError, match="--ebft-lr-trial-steps must be a positive whole number"):
        EBFTOptions(lr_search=(1.0,), lr_trial_steps=0)
