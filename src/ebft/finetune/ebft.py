"""EBFT: tune a pruned block's remaining weights to reproduce the dense block's outputs.

Loss: mean squared error between the pruned block's outputs and the dense block's outputs on the
same inputs. AdamW, linear decay to zero, gradient-norm clipping. Masks stay fixed: gradients of
pruned weights are zeroed before each step and the masks are re-applied after it, so a pruned
weight is exactly 0.0 throughout.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ebft.finetune.base import (
    BlockFinetuner,
    BlockResult,
    autocast_context,
    block_device,
    call_block,
    register_finetuner,
    resolve_precision,
)

logger = logging.getLogger(__name__)


@register_finetuner("ebft")
class EBFT(BlockFinetuner):
    """Block-wise reconstruction fine-tuning of all of a block's parameters (config: FinetuneConfig)."""

    supports_early_stopping = True

    def tune(
        self,
        block: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        masks: dict[str, torch.Tensor],
        block_kwargs: dict[str, Any],
        index: int,
        dense_weights: dict[str, torch.Tensor] | None = None,
        on_epoch_end: Callable[[int], bool] | None = None,
    ) -> BlockResult:
        cfg = self.config
        device = block_device(block)
        precision = resolve_precision(cfg.precision, device)
        params = dict(block.named_parameters())
        unknown = set(masks) - set(params)
        if unknown:
            raise KeyError(f"masks name parameters the block does not have: {sorted(unknown)[:3]}")
        device_masks = {name: mask.to(device) for name, mask in masks.items()}
        trainable = [p for p in params.values() if p.dtype.is_floating_point]
        for p in trainable:
            p.requires_grad_(True)

        optimizer = torch.optim.AdamW(
            trainable, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **_fused_kwargs(device)
        )
        nsamples = inputs.shape[0]
        steps_per_epoch = math.ceil(nsamples / cfg.batch_size)
        total_steps = cfg.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)

        result = BlockResult()
        start = time.perf_counter()
        progress = tqdm(total=total_steps, desc=f"block {index} ebft", leave=False, disable=None)
        block.train(False)  # no dropout: targets were computed in eval mode
        try:
            for epoch in range(cfg.epochs):
                order = torch.randperm(nsamples, generator=generator)
                epoch_loss = 0.0
                for step in range(steps_per_epoch):
                    idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                    x = inputs[idx].to(device, non_blocking=True)
                    y = targets[idx].to(device, non_blocking=True)
                    with autocast_context(device, precision):
                        out = call_block(block, x, block_kwargs)
                    loss = torch.nn.functional.mse_loss(out.float(), y.float())
                    if not torch.isfinite(loss):
                        result.restored = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"
                        logger.warning("block %d: %s; stopping its fine-tuning", index, result.restored)
                        return result
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)
                    else:
                        loss.backward()
                    for name, mask in device_masks.items():
                        grad = params[name].grad
                        if grad is not None:
                            grad.mul_(mask)
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    with torch.no_grad():
                        for name, mask in device_masks.items():
                            params[name].mul_(mask)
                    epoch_loss += float(loss.detach())
                    result.steps += 1
                    result.tokens += x.shape[0] * x.shape[1]
                    progress.update(1)
                    progress.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{float(loss.detach()):.4g}")
                result.losses.append(epoch_loss / steps_per_epoch)
                logger.debug("block %d epoch %d/%d loss %.6g", index, epoch + 1, cfg.epochs, result.losses[-1])
                if on_epoch_end is not None and on_epoch_end(epoch) and epoch + 1 < cfg.epochs:
                    logger.info("block %d: early stop after epoch %d/%d", index, epoch + 1, cfg.epochs)
                    break
        finally:
            progress.close()
            for p in trainable:
                p.requires_grad_(False)
                p.grad = None
            result.train_seconds = time.perf_counter() - start
        return result


def _fused_kwargs(device: torch.device) -> dict[str, bool]:
    """Use the fused AdamW kernel where this torch build has one for the device."""
    if device.type in ("cuda", "cpu", "mps"):
        return {"fused": True}
    return {}
