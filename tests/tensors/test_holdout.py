"""Never worse, the pure pieces: how many windows are held out, when a block is restored, early stopping."""

from __future__ import annotations

import math

import torch
from torch import nn

from ebft.walk import EarlyStopping, holdout_count, restore_reason


def test_holdout_count() -> None:
    assert holdout_count(256, 0.125) == 32
    assert holdout_count(8, 0.125) == 1
    assert holdout_count(4, 0.125) == 1  # at least one window once there are two
    assert holdout_count(2, 0.9) == 1  # at least one window is left to train on
    assert holdout_count(1, 0.5) == 0
    assert holdout_count(64, 0.0) == 0


def test_restore_reason() -> None:
    assert restore_reason(1.0, 0.5, None, None) is None
    assert "did not lower the loss" in restore_reason(1.0, 1.0, None, None)
    assert "non-finite" in restore_reason(1.0, math.nan, 1.0, 0.5)
    assert "non-finite" in restore_reason(1.0, math.inf, None, None)
    # with held-out windows they decide, whatever the training windows say
    assert restore_reason(1.0, 0.5, 2.0, 1.5) is None
    assert "held-out" in restore_reason(1.0, 0.5, 2.0, 2.5)
    assert "held-out" in restore_reason(1.0, 0.5, 2.0, math.nan)
    assert restore_reason(1.0, 1.5, 2.0, 1.5) is None


def test_early_stopping_keeps_the_best_epoch() -> None:
    block = nn.Linear(2, 2)
    scripted = iter([5.0, 4.0, 4.5, 4.6, 1.0])
    weights = []

    def measure() -> float:
        weights.append(block.weight.detach().clone())
        return next(scripted)

    stopper = EarlyStopping(block, measure, baseline=6.0, patience=2)
    untuned = {k: v.clone() for k, v in block.state_dict().items()}
    stops = []
    for epoch in range(4):
        with torch.no_grad():
            block.weight.add_(1.0)  # a "training" epoch
        stops.append(stopper(epoch))
    assert stops == [False, False, False, True]  # two epochs without beating epoch 2
    assert stopper.best_epoch == 2 and stopper.losses == [5.0, 4.0, 4.5, 4.6]
    stopper.keep_best(untuned)
    assert torch.equal(block.weight, weights[1])


def test_early_stopping_without_improvement_goes_back_to_untuned() -> None:
    block = nn.Linear(2, 2)
    untuned = {k: v.clone() for k, v in block.state_dict().items()}
    stopper = EarlyStopping(block, lambda: math.nan, baseline=1.0, patience=1)
    with torch.no_grad():
        block.weight.add_(1.0)
    assert stopper(0) is True and stopper.best_epoch == 0
    stopper.keep_best(untuned)
    assert torch.equal(block.weight, untuned["weight"])
