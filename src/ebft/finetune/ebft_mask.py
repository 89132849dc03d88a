"""EBFT mask tuning (the EBFT paper's ablation): learn which dense weights to keep, not their values.

Every masked linear layer's weight is fixed at its dense value W; what is learned is a real-valued
score S per weight (same shape). The forward pass uses ``W * topk(S)``, a hard mask at exactly the
incoming mask's sparsity and structure (see :func:`detect_structure`):

* N:M masks (every group of M inputs keeps N): N per group;
* row-uniform masks (every output row keeps the same count): that count per row;
* anything else: the layer's total count.

Straight-through estimator: the backward pass treats the mask as if it were S itself, so
``dL/dS = dL/dW_eff * W`` (:class:`_StraightThrough`).

Score scale. Scores are dimensionless, not O(|W|): they start at

    S0 = margin * (keep + 0.5 * |W| / max|W|)        (max over the layer)

so kept scores lie in [margin, 1.5 margin], pruned ones in [0, 0.5 margin]: the starting mask is
exactly the pruner's, and |W| breaks ties (of two pruned weights the larger is closer to coming
back). AdamW moves each score by about ``lr`` per step whatever the gradient's size, so ``lr`` reads
as "score change per step" and ``margin`` as the distance to cross: a kept and a pruned weight
swap after about (0.5 .. 1.5) * margin / (2 lr) consistently signed steps. With the default
margin 1e-2 and FinetuneConfig's default lr 2e-4 over 10 epochs of 16 steps (linear decay: at most
~80 lr = 0.016 per score), every pair can swap if its gradients agree, and noise alone rarely
swaps one. Larger ``lr`` -> more swaps.

Loss, optimizer, schedule, precision and seeding are :mod:`ebft.finetune.ebft`'s (the shared loop of
:mod:`ebft.finetune.loop`). At the end the block's weights become ``W * mask`` (pruned entries exactly
0.0, kept entries exactly W) and the ``masks`` tensors are updated in place; if that does not lower
the block's output MSE against ``targets`` (no-grad passes over ``inputs``), or the loss or scores
went non-finite, the starting masks and weights are put back and ``restored`` says why.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ebft.errors import EbftError
from ebft.finetune.base import BlockResult, MaskRefiner, register_finetuner
from ebft.finetune.loop import block_mse_loss, planned_steps, train_steps
from ebft.models.blocks import block_device
from ebft.precision import block_shapes, resolve_precision
from ebft.settings import check_finite, setting
from ebft.sparsity.patterns import MaskStructure, detect_structure, topk_mask

logger = logging.getLogger(__name__)

__all__ = ["EBFTMask", "EBFTMaskOptions", "init_scores", "masked_weights", "ste_mask"]

TIE_BREAK = 0.5  # |W| tie-break span of the initial scores, as a fraction of the margin


def init_scores(keep: Tensor, dense: Tensor, margin: float) -> Tensor:
    """S0 = margin * (keep + 0.5 |W| / max|W|), float32: its top-k under any structure of ``keep`` is ``keep``."""
    magnitude = dense.detach().float().abs()
    top = magnitude.max() if magnitude.numel() else magnitude.new_tensor(0.0)
    tie = magnitude / top if float(top) > 0 else torch.zeros_like(magnitude)
    return margin * (keep.to(device=dense.device, dtype=torch.float32) + TIE_BREAK * tie)


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard mask; backward: the gradient passes to the scores unchanged."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, hard: Tensor) -> Tensor:
        return hard.to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def ste_mask(scores: Tensor, structure: MaskStructure) -> Tensor:
    """``topk_mask(scores)`` as floats, with d(out)/d(scores) = identity."""
    return _StraightThrough.apply(scores, topk_mask(scores, structure))


class _MaskedDense(nn.Module):
    """Parametrization of a linear weight as ``dense * ste_mask(scores)``; ignores the stored weight."""

    def __init__(self, dense: Tensor, scores: Tensor, structure: MaskStructure) -> None:
        super().__init__()
        self.dense = dense  # plain attributes: nothing extra in the module's state_dict or parameters
        self.scores = scores
        self.structure = structure

    def forward(self, original: Tensor) -> Tensor:
        return self.dense * ste_mask(self.scores, self.structure).to(self.dense.dtype)


@contextlib.contextmanager
def masked_weights(
    modules: dict[str, nn.Module],
    dense: dict[str, Tensor],
    scores: dict[str, Tensor],
    structures: dict[str, MaskStructure],
) -> Iterator[None]:
    """Within the block, each module's ``weight`` reads ``dense * ste_mask(scores)``; always undone on exit.

    The original ``weight`` parameters (same objects) come back untouched, whatever happens inside.
    """
    done: list[nn.Module] = []
    try:
        for key, module in modules.items():
            if parametrize.is_parametrized(module, "weight"):
                raise EbftError(f"ebft-mask: {key} is already parametrized")
            parametrize.register_parametrization(
                module, "weight", _MaskedDense(dense[key], scores[key], structures[key])
            )
            done.append(module)
        yield
    finally:
        for module in reversed(done):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


@dataclass
class EBFTMaskOptions:
    """What only ``--finetune ebft-mask`` reads."""

    margin: float = setting(1e-2, help="initial score gap between kept and pruned weights, in units of AdamW steps "
                                       "of size --lr (see ebft.finetune.ebft_mask)")

    def __post_init__(self) -> None:
        check_finite(self.margin, "--ebft-mask-margin", "a positive number", low=0.0, low_open=True)


@register_finetuner("ebft-mask", options=EBFTMaskOptions)
class EBFTMask(MaskRefiner):
    """Learns the keep-masks of a block's linear layers over its dense weights (config: FinetuneConfig).

    ``margin`` (its option): the initial score gap between kept and pruned weights, in units of AdamW
    steps of size ``lr`` (see the module docstring).
    """

    what = "mask tuning"

    def refine(self, block: nn.Module, inputs: Tensor, targets: Tensor, masks: dict[str, Tensor],
               block_kwargs: dict[str, Any], index: int, dense: dict[str, Tensor], modules: dict[str, nn.Module],
               result: BlockResult) -> dict[str, Tensor] | None:
        cfg = self.config
        device = block_device(block)
        precision = resolve_precision(cfg.precision, device, block_shapes(block), cfg.batch_size * inputs.shape[1])
        block.train(False)  # no dropout: targets were computed in eval mode
        structures = {key: detect_structure(mask) for key, mask in masks.items()}
        scores = {key: init_scores(mask.to(dense[key].device), dense[key], self.options.margin).requires_grad_(True)
                  for key, mask in masks.items()}
        with masked_weights(modules, dense, scores, structures):
            epochs = planned_steps(cfg, inputs.shape[0])[2]
            result.tokens = train_steps(
                list(scores.values()), cfg, device, precision, inputs.shape[0], self.seed * 1_000_003 + index,
                block_mse_loss(block, inputs, targets, block_kwargs, device, precision), result,
                desc=f"block {index} ebft-mask", on_epoch_end=functools.partial(_log_epoch, index, epochs),
                dist=self.dist,
            )
        if result.restored is None and not all(bool(torch.isfinite(s).all()) for s in scores.values()):
            result.restored = "non-finite mask scores"
        if result.restored is not None:
            return None
        return {key: topk_mask(scores[key], structures[key]) for key in masks}


def _log_epoch(index: int, epochs: int, epoch: int, loss: float) -> bool:
    logger.debug("block %d epoch %d/%d loss %.6g", index, epoch + 1, epochs, loss)
    return False
