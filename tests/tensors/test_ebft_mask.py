"""EBFT mask tuning on a residual MLP: exact sparsity, dense kept weights, the straight-through gradient, clean-up."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ebft.config import FinetuneConfig
from ebft.finetune import FINETUNERS
from ebft.finetune.ebft_mask import EBFTMask, init_scores, masked_weights
from ebft.models.blocks import run_block
from ebft.sparsity import check_nm, nm_mask, unstructured_mask
from ebft.sparsity.patterns import MaskStructure, detect_structure, topk_mask


def _cfg(**kw: Any) -> FinetuneConfig:
    base = dict(method="ebft-mask", epochs=4, lr=2e-3, batch_size=2, precision="fp32", grad_clip=0.0)
    base.update(kw)
    return FinetuneConfig(**base)


def _make_mask(scores: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "row":
        return unstructured_mask(scores, 0.5, per_row=True)
    if kind == "layer":
        return unstructured_mask(scores, 0.5, per_row=False)
    return nm_mask(scores, 2, 4)


def test_registered() -> None:
    assert FINETUNERS["ebft-mask"] is EBFTMask and EBFTMask.name == "ebft-mask" and EBFTMask.needs_dense_weights
    assert FinetuneConfig(method="ebft-mask").method == "ebft-mask"
    with pytest.raises(ValueError):
        EBFTMask(_cfg(), margin=0.0)


def test_detect_structure() -> None:
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    assert detect_structure(_make_mask(w.abs(), "row")) == MaskStructure("row", 8)
    assert detect_structure(_make_mask(w.abs(), "layer")) == MaskStructure("layer", 48)
    assert detect_structure(_make_mask(w.abs(), "nm")) in (MaskStructure("nm", 2, 4), MaskStructure("nm", 1, 2))


@pytest.mark.parametrize("kind", ["row", "layer", "nm"])
def test_initial_scores_give_back_the_mask_and_topk_is_exact(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(12, 32, generator=g)
    keep = _make_mask(torch.rand(12, 32, generator=g), kind)  # not the magnitude order: the margin must win
    structure = detect_structure(keep)
    scores = init_scores(keep, dense, 1e-2)
    assert torch.equal(topk_mask(scores, structure), keep)
    other = topk_mask(torch.randn(12, 32, generator=g), structure)
    if kind == "row":
        assert torch.equal(other.sum(1), keep.sum(1))
    elif kind == "layer":
        assert int(other.sum()) == int(keep.sum())
    else:
        assert check_nm(other, 2, 4) and int(other.sum()) == int(keep.sum())


def test_straight_through_gradient_by_hand() -> None:
    w = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -0.5, 3.0]])
    keep = torch.tensor([[True, False, True, False], [False, True, False, True]])
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w * keep)
    original = linear.weight
    structure = detect_structure(keep)
    scores = init_scores(keep, w, 1.0).requires_grad_(True)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    with masked_weights({"lin": linear}, {"lin": w}, {"lin": scores}, {"lin": structure}):
        y = linear(x)
        # forward: the hard mask. y0 = 0.5*1 + 2*3 = 6.5, y1 = 1*2 + 3*4 = 14
        assert y.tolist() == [[6.5, 14.0]]
        (y * torch.tensor([[1.0, -1.0]])).sum().backward()
    # dL/dW_eff = g^T x = [[1, 2, 3, 4], [-1, -2, -3, -4]]; dL/dS = dL/dW_eff * W (pruned entries too)
    want = torch.tensor([[0.5, -2.0, 6.0, 1.0], [-1.0, -2.0, 1.5, -12.0]])
    assert torch.equal(scores.grad, want)
    assert linear.weight is original and not parametrize.is_parametrized(linear)
    assert original.grad is None


def test_parametrization_removed_on_exception(residual_mlp) -> None:
    block = residual_mlp()
    before = {n: p for n, p in block.named_parameters()}
    keys = ["fc1.weight", "fc2.weight"]
    modules = {k: block.get_submodule(k[:-7]) for k in keys}
    dense = {k: before[k].detach().clone() for k in keys}
    keep = {k: unstructured_mask(dense[k].abs(), 0.5, per_row=True) for k in keys}
    scores = {k: init_scores(keep[k], dense[k], 1e-2) for k in keys}
    structures = {k: detect_structure(keep[k]) for k in keys}
    with pytest.raises(RuntimeError, match="boom"):
        with masked_weights(modules, dense, scores, structures):
            assert all(parametrize.is_parametrized(m) for m in modules.values())
            raise RuntimeError("boom")
    assert all(type(m) is nn.Linear and not parametrize.is_parametrized(m) for m in modules.values())
    assert dict(block.named_parameters()) == before  # same objects, nothing added
    assert set(block.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


# ------------------------------------------------------------------------------ tune() on a tiny block


@pytest.fixture
def problem(pruned_mlp) -> Callable[..., tuple[nn.Module, torch.Tensor, torch.Tensor, dict, dict]]:
    """``problem(kind="row", invert=True, **block)``: a dense residual MLP pruned with the inverted-magnitude mask
    (a bad one) of structure ``kind``, its dense outputs as targets: ``(block, x, y, masks, dense)``."""

    def make(kind: str = "row", invert: bool = True, **block: Any) -> tuple:
        return pruned_mlp(lambda w: _make_mask(-w.abs() if invert else w.abs(), kind), **block)

    return make


@pytest.mark.parametrize("kind", ["row", "layer", "nm"])
def test_exact_sparsity_and_dense_kept_weights(kind: str, problem, assert_refined_masks) -> None:
    block, x, y, masks, dense = problem(kind)
    start = {n: m.clone() for n, m in masks.items()}
    refs = dict(masks)
    init = run_block(block, x, {}, 4, targets=y)
    result = EBFTMask(_cfg(), seed=0).tune(block, x, y, masks, {}, 0, dense_weights=dense)
    assert all(masks[n] is refs[n] for n in masks)  # updated in place
    assert result.restored is None
    assert result.steps == 8 and len(result.losses) == 4 and result.tokens == 8 * 2 * 12
    assert result.train_seconds > 0
    assert any(not torch.equal(masks[n], start[n]) for n in masks)
    assert_refined_masks(block, masks, start, dense, kind)
    assert run_block(block, x, {}, 4, targets=y) < init
    assert all(not p.requires_grad and p.grad is None for p in block.parameters())
    assert not any(parametrize.is_parametrized(m) for m in block.modules())


def test_tiny_lr_leaves_the_mask_alone(problem) -> None:
    block, x, y, masks, dense = problem()
    start = {n: m.clone() for n, m in masks.items()}
    weights = {n: p.detach().clone() for n, p in block.named_parameters()}
    result = EBFTMask(_cfg(lr=1e-9), seed=0).tune(block, x, y, masks, {}, 0, dense_weights=dense)
    assert result.steps == 8
    assert all(torch.equal(masks[n], start[n]) for n in masks)
    assert all(torch.equal(p, weights[n]) for n, p in block.named_parameters())
    assert result.restored is not None and "did not lower" in result.restored  # nothing changed


def test_restores_when_the_loss_does_not_drop(problem) -> None:
    block, x, _, masks, dense = problem(invert=False)
    with torch.no_grad():
        y = block(x)  # the pruned block is already perfect
    start = {n: m.clone() for n, m in masks.items()}
    weights = {n: p.detach().clone() for n, p in block.named_parameters()}
    result = EBFTMask(_cfg(lr=5e-2), seed=0).tune(block, x, y, masks, {}, 0, dense_weights=dense)
    assert result.restored is not None
    assert all(torch.equal(masks[n], start[n]) for n in masks)
    assert all(torch.equal(p, weights[n]) for n, p in block.named_parameters())


def test_non_finite_loss_restores_without_raising(problem) -> None:
    block, x, y, masks, dense = problem()
    start = {n: m.clone() for n, m in masks.items()}
    weights = {n: p.detach().clone() for n, p in block.named_parameters()}
    x = x.clone()
    x[2, 3, 1] = math.inf
    result = EBFTMask(_cfg(batch_size=4), seed=0).tune(block, x, y, masks, {}, 0, dense_weights=dense)
    assert result.restored is not None and "non-finite" in result.restored and result.steps == 0
    assert all(torch.equal(masks[n], start[n]) for n in masks)
    assert all(torch.equal(p, weights[n]) for n, p in block.named_parameters())
    assert not any(parametrize.is_parametrized(m) for m in block.modules())


def test_exception_in_training_undoes_the_parametrization(problem) -> None:
    block, x, y, masks, dense = problem(fail_with_grad=True)
    before = dict(block.named_parameters())
    with pytest.raises(RuntimeError, match="during training"):
        EBFTMask(_cfg(), seed=0).tune(block, x, y, masks, {}, 0, dense_weights=dense)
    assert not any(parametrize.is_parametrized(m) for m in block.modules())
    assert type(block.fc1) is nn.Linear and dict(block.named_parameters()) == before


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_keeps_fp32_and_exact_masks(precision: str, problem, assert_refined_masks) -> None:
    block, x, y, masks, dense = problem()
    start = {n: m.clone() for n, m in masks.items()}
    EBFTMask(_cfg(precision=precision), seed=0).tune(block, x, y, masks, {}, 0, dense_weights=dense)
    assert all(p.dtype == torch.float32 for p in block.parameters())
    assert_refined_masks(block, masks, start, dense, "row")


def test_needs_dense_weights_and_known_names(problem) -> None:
    block, x, y, masks, dense = problem()
    with pytest.raises(Exception, match="dense weights"):
        EBFTMask(_cfg()).tune(block, x, y, masks, {}, 0, None)
    with pytest.raises(KeyError, match="fc3.weight"):
        EBFTMask(_cfg()).tune(block, x, y, {"fc3.weight": torch.ones(2, 2, dtype=torch.bool)}, {}, 0, dense)
