"""LoRA baseline: fine-tune the whole pruned model end to end with low-rank adapters (``--finetune lora``).

Unlike the block tuners, this runs after pruning is finished (block-wise, without block tuning):

1. wrap the decoder blocks' linear layers (not the embeddings or ``lm_head``) in ``peft`` LoRA adapters;
2. train only the adapters with the causal-LM loss on the calibration windows (AdamW, linear decay to 0,
   gradient-norm clipping, autocast as :func:`ebft.precision.resolve_precision` says);
3. merge the adapters into the weights (``merge_and_unload``) and multiply every pruned layer by its
   keep-mask: the merged update ``alpha/r * BA`` is dense, so masking it keeps the model exactly as
   sparse as the pruned one. A pruned weight that is not exactly 0.0 afterwards is an error.

Memory: this is whole-model backpropagation, so the activations of every block for a batch of windows
live at once (on top of the full model and the adapters' optimizer state). That is what the comparison
with block-wise EBFT, which only ever holds one block, is about.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ebft.config import FinetuneConfig
from ebft.errors import EbftError, UsageError
from ebft.finetune.base import ModelFinetuner, ModelResult, register_finetuner
from ebft.finetune.loop import planned_steps, train_steps
from ebft.models.adapter import find_blocks
from ebft.precision import autocast_context, block_shapes, resolve_precision
from ebft.settings import check_finite, setting

logger = logging.getLogger(__name__)


#: LoRA's default targets: every linear layer of a decoder block (attention and MLP).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraOptions:
    """What only ``--finetune lora`` reads."""

    rank: int = setting(8, help="adapter rank")
    alpha: float = setting(16.0, help="adapter scale numerator: the update is alpha/rank * BA")
    dropout: float = setting(0.0, help="dropout on the adapters' inputs, in [0, 1)")
    targets: tuple[str, ...] = setting(LORA_TARGETS, kind="names", metavar="NAMES",
                                       help="comma-separated decoder-block linear layers that get adapters")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UsageError(f"--lora-rank must be a positive whole number; got {self.rank!r}")
        check_finite(self.alpha, "--lora-alpha", "a positive number", low=0.0, low_open=True)
        check_finite(self.dropout, "--lora-dropout", "in [0, 1)", low=0.0, high=1.0)
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(","))
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        if not isinstance(self.targets, tuple) or not self.targets or not all(
                isinstance(t, str) and t.strip() and "," not in t for t in self.targets):
            raise UsageError(
                f"--lora-targets expects comma-separated layer names such as q_proj,v_proj; got {self.targets!r}"
            )


def import_peft() -> Any:
    """The ``peft`` module, or a one-line error saying how to install it."""
    try:
        import peft
    except ImportError:
        raise EbftError("--finetune lora needs peft; install peft (pip install 'ebft[lora]')") from None
    return peft


def lora_target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the decoder-block linear layers whose last name component is in ``targets``."""
    linears = find_blocks(model).all_linears()
    names = [name for name in linears if name.rsplit(".", 1)[-1] in targets]
    present = {name.rsplit(".", 1)[-1] for name in linears}
    missing = [t for t in targets if t not in present]
    if missing:
        raise UsageError(
            f"--lora-targets {','.join(missing)} matches no linear layer of the decoder blocks; "
            f"they have: {','.join(sorted(present))}"
        )
    return names


@torch.no_grad()
def causal_lm_loss(model: nn.Module, calib_ids: torch.Tensor, device: torch.device, batch_size: int) -> float:
    """Mean causal-LM loss of ``model`` (already on ``device``) over the windows, in fp32 and eval mode."""
    was_training = model.training
    model.train(False)
    total, count = 0.0, 0
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            ids = calib_ids[start : start + batch_size].to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            total += float(loss) * ids.shape[0]
            count += ids.shape[0]
    finally:
        model.train(was_training)
    return total / count


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], after: str = "merging the LoRA adapters") -> None:
    """Zero every pruned weight (``weight *= mask``) and check that each is exactly 0.0 afterwards (``after``:
    what the error names as the cause)."""
    linears = find_blocks(model).all_linears()
    unknown = set(masks) - set(linears)
    if unknown:
        raise EbftError(f"masks name layers the model does not have: {sorted(unknown)[:3]}")
    with torch.no_grad():
        for name, mask in masks.items():
            weight = linears[name].weight
            mask = mask.to(weight.device)
            weight.mul_(mask)
            bad = int((weight[~mask] != 0).sum())  # NaN * 0 is NaN, which this counts too
            if bad:
                raise EbftError(f"{name}: {bad} pruned weights are not 0.0 after {after}")


def lora_finetune(
    model: nn.Module,
    calib_ids: torch.Tensor,  # [nsamples, seqlen] token ids
    masks: Mapping[str, torch.Tensor],  # full module name -> bool keep-mask
    cfg: FinetuneConfig,
    device: torch.device,
    seed: int = 0,
    options: LoraOptions | None = None,
) -> tuple[nn.Module, ModelResult]:
    """Train LoRA adapters on the whole pruned ``model``, merge them, re-apply ``masks``.

    Returns the plain model (no ``peft`` wrappers left; the same object as ``model``, on the CPU) and
    what training did. ``cfg.epochs`` counts passes over all windows, ``cfg.batch_size`` windows make a step.
    ``options`` default to ``cfg.options``.
    """
    peft = import_peft()
    opts = options if options is not None else cfg.options if isinstance(cfg.options, LoraOptions) else LoraOptions()
    target_names = lora_target_names(model, opts.targets)
    precision = resolve_precision(cfg.precision, device, block_shapes(find_blocks(model).blocks[0]),
                                  cfg.batch_size * calib_ids.shape[1])
    result = ModelResult("lora", "causal-LM loss", details={"targets": len(target_names)})
    start = time.perf_counter()

    model.requires_grad_(False)
    model.to(device)
    result.init_loss = causal_lm_loss(model, calib_ids, device, cfg.batch_size)

    torch.manual_seed(seed)  # the adapters' A matrices are initialised randomly
    lora_config = peft.LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=target_names,  # full names: exactly these layers, never lm_head or the embeddings
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = peft.get_peft_model(model, lora_config)
    merged = False
    try:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        result.details["trainable_parameters"] = sum(p.numel() for p in trainable)
        logger.info("lora: rank %d on %d layers, %d trainable parameters, precision %s",
                    opts.rank, len(target_names), result.details["trainable_parameters"], precision)
        _train(peft_model, trainable, calib_ids, cfg, device, precision, seed, result)
        if result.restored is None:
            model = peft_model.merge_and_unload()
            merged = True
        else:
            logger.warning("lora: %s; dropping the adapters, the model stays as pruned", result.restored)
            model = peft_model.unload()
    except BaseException:
        if not merged:
            peft_model.unload()  # leave the caller a plain model
        raise
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.requires_grad_(False)
    apply_masks(model, masks)
    result.final_loss = causal_lm_loss(model, calib_ids, device, cfg.batch_size)
    model.to("cpu")
    result.seconds = time.perf_counter() - start
    logger.info("lora: causal-LM loss %.4g -> %.4g (merged and masked) in %.1f s",
                result.init_loss, result.final_loss, result.seconds)
    if not math.isfinite(result.final_loss):
        raise EbftError("the LoRA-tuned model gives a non-finite loss; try a lower --lr")
    return model, result


def _train(
    model: nn.Module,
    trainable: list[nn.Parameter],
    calib_ids: torch.Tensor,
    cfg: FinetuneConfig,
    device: torch.device,
    precision: str,
    seed: int,
    result: ModelResult,
) -> None:
    """The training loop; fills ``result`` (stops early, setting ``result.restored``, on a non-finite loss)."""

    def step_loss(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        ids = calib_ids[idx].to(device)
        with autocast_context(device, precision):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        return loss.float(), ids.shape[0] * ids.shape[1]

    def epoch_end(epoch: int, loss: float) -> bool:
        logger.info("lora epoch %d/%d: mean loss %.5g", epoch + 1, planned_steps(cfg, calib_ids.shape[0])[2], loss)
        return False

    was_training = model.training
    model.train(True)  # for the adapters' dropout
    try:
        train_steps(trainable, cfg, device, precision, calib_ids.shape[0], seed, step_loss, result, desc="lora",
                    on_epoch_end=epoch_end)
    finally:
        model.train(was_training)


@register_finetuner("lora", options=LoraOptions)
class LoRA(ModelFinetuner):
    """The whole-model baseline: LoRA adapters trained with the causal-LM loss, merged, masks re-applied."""

    @classmethod
    def check_available(cls) -> None:
        import_peft()

    def check(self, model: nn.Module) -> None:
        import_peft()
        lora_target_names(model, self.options.targets)

    def tune_model(self, model: nn.Module, calib_ids: torch.Tensor, masks: Mapping[str, torch.Tensor],
                   device: torch.device) -> tuple[nn.Module, ModelResult]:
        return lora_finetune(model, calib_ids, masks, self.config, device, seed=self.seed, options=self.options)
