"""The AdamW training loop the fine-tuners share (EBFT, EBFT mask tuning, LoRA).

AdamW over ``params`` with an optional linear warm-up of the learning rate (``cfg.warmup``, a
fraction of the steps) and a linear decay to zero over the rest, gradient-norm clipping
(``cfg.grad_clip > 0``) and, for fp16, a GradScaler. Each epoch visits the ``nsamples`` windows in
an order drawn from a ``torch.Generator`` seeded with ``seed``, ``cfg.batch_size`` at a time (the
last batch of an epoch may be smaller). The run takes ``cfg.epochs`` epochs, or exactly
``cfg.steps`` optimizer steps when that is set (the last epoch then stops part way).

Progress: a tqdm bar where standard error is a terminal; elsewhere (a log file, a sweep), a log line every
:data:`PROGRESS_LOG_SECONDS` with the step, the loss and the time left, so that a long stage is not silent.

Under torchrun (``dist``), every process draws the same order and takes its contiguous shard of each
batch; the losses are weighted by each shard's share of the batch's tokens and the gradients summed
over the processes before clipping, so each process takes the step a single process would take.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ebft.models.blocks import call_block
from ebft.page import fmt_duration
from ebft.precision import autocast_context

if TYPE_CHECKING:
    from ebft.distributed import DistContext

__all__ = ["PROGRESS_LOG_SECONDS", "TrainResult", "block_mse_loss", "fused_kwargs", "lr_factor", "planned_steps",
           "train_steps"]

logger = logging.getLogger(__name__)

#: without a progress bar (standard error not a terminal, or --quiet's bars off), a training run logs its progress
#: at most this often; runs shorter than this log nothing from the loop
PROGRESS_LOG_SECONDS = 60.0


class TrainResult(Protocol):
    """What the loop fills in: the mean loss of each epoch, the steps taken and why it stopped, if it did."""

    losses: list[float]
    steps: int
    restored: str | None


def fused_kwargs(device: torch.device) -> dict[str, bool]:
    """Use the fused AdamW kernel where this torch build has one for the device."""
    if device.type in ("cuda", "cpu", "mps"):
        return {"fused": True}
    return {}


def planned_steps(cfg: Any, nsamples: int) -> tuple[int, int, int]:
    """``(total steps, steps per epoch, epochs)`` of a run over ``nsamples`` windows (``cfg``: a FinetuneConfig)."""
    per_epoch = math.ceil(nsamples / cfg.batch_size)
    if cfg.steps is None:
        return cfg.epochs * per_epoch, per_epoch, cfg.epochs
    return cfg.steps, per_epoch, math.ceil(cfg.steps / per_epoch)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate at 0-based ``step`` over its peak: ``(step + 1) / warmup`` for the first
    ``warmup`` steps, then a linear decay from 1 towards 0 over the other ``total - warmup``."""
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 - (step - warmup) / (total - warmup)


def train_steps(
    params: Sequence[Tensor],
    cfg: Any,  # FinetuneConfig: lr, betas, weight_decay, epochs or steps, warmup, batch_size, grad_clip
    device: torch.device,
    precision: str,  # resolved: "fp32", "bf16" or "fp16"
    nsamples: int,
    seed: int,
    step_loss: Callable[[Tensor], tuple[Tensor, int]],  # window indices -> (float32 loss, tokens in them)
    result: TrainResult,
    desc: str,
    on_grads: Callable[[], None] | None = None,  # after backward (and unscaling), before clipping
    after_step: Callable[[], None] | None = None,  # after the optimizer and scheduler steps
    on_epoch_end: Callable[[int, float], bool] | None = None,  # (epoch, mean loss) -> stop now?
    dist: DistContext | None = None,  # under torchrun: split each batch over the processes
) -> int:
    """Train ``params`` to lower ``step_loss``; returns the tokens of the steps taken.

    ``step_loss`` runs its own forward pass (under :func:`autocast_context` for ``precision``).
    On a non-finite loss the step is not taken: ``result.restored`` says where and the loop
    returns. After each epoch its mean loss is appended to ``result.losses`` and ``on_epoch_end``
    is called; when it returns True, training stops there. Gradients are cleared on the way out,
    whatever happens.
    """
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **fused_kwargs(device)
    )
    total_steps, steps_per_epoch, epochs = planned_steps(cfg, nsamples)
    warmup = round(cfg.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    main = dist is None or dist.is_main
    progress = tqdm(total=total_steps, desc=desc, leave=False, disable=None if main else True)
    heartbeat = _Heartbeat(desc, total_steps, epochs) if main and progress.disable else None
    try:
        for epoch in range(epochs):
            order = torch.randperm(nsamples, generator=generator)
            epoch_loss = 0.0
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            for step in range(epoch_steps):
                idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                if dist is None:
                    loss, step_tokens = step_loss(idx)
                    loss_value = float(loss.detach())
                else:
                    loss, step_tokens, loss_value = _shard_loss(step_loss, idx, dist, params)
                if not math.isfinite(loss_value):
                    result.restored = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"
                    return tokens
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                if dist is not None:  # before unscaling, so that every process sees the same inf/NaN
                    dist.all_reduce_grads_(params)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if on_grads is not None:
                    on_grads()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if after_step is not None:
                    after_step()
                epoch_loss += loss_value
                result.steps += 1
                tokens += step_tokens
                progress.update(1)
                progress.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss_value:.4g}")
                if heartbeat is not None:
                    heartbeat.step(epoch, loss_value)
            result.losses.append(epoch_loss / epoch_steps)
            if on_epoch_end is not None and on_epoch_end(epoch, result.losses[-1]):
                break
    finally:
        progress.close()
        for p in params:
            p.grad = None
    return tokens


class _Heartbeat:
    """A log line at most every :data:`PROGRESS_LOG_SECONDS`: step, epoch, last loss and the time left."""

    def __init__(self, desc: str, total: int, epochs: int) -> None:
        self.desc, self.total, self.epochs = desc, total, epochs
        self.start = self.last = time.perf_counter()
        self.done = 0

    def step(self, epoch: int, loss: float) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last < PROGRESS_LOG_SECONDS or self.done >= self.total:
            return
        self.last = now
        left = (now - self.start) / self.done * (self.total - self.done)
        logger.info("%s: step %d/%d (epoch %d/%d), loss %.4g, about %s left", self.desc, self.done, self.total,
                    epoch + 1, self.epochs, loss, fmt_duration(left))


def _shard_loss(step_loss: Callable[[Tensor], tuple[Tensor, int]], idx: Tensor, dist: DistContext,
                params: Sequence[Tensor]) -> tuple[Tensor, int, float]:
    """The loss this process back-propagates for batch ``idx``, the batch's tokens and its loss (all processes).

    Summed over the processes, the returned losses (and so their gradients) equal the whole batch's
    token-weighted mean loss. Every process gets the same batch loss, so a non-finite one stops
    all of them at the same step.
    """
    mine = idx[dist.shard(len(idx))]
    if len(mine):
        loss, tokens = step_loss(mine)
    else:  # a last batch smaller than the job: this process contributes zero gradients
        loss, tokens = torch.zeros((), device=params[0].device, requires_grad=True), 0
    stats = torch.tensor([float(loss.detach()) * tokens, float(tokens)], dtype=torch.float64, device=dist.device)
    dist.all_reduce_(stats)
    total = float(stats[1])
    return loss * (tokens / total), int(total), float(stats[0]) / total


def block_mse_loss(
    block: torch.nn.Module,
    inputs: Tensor,  # [nsamples, seqlen, hidden], any device
    targets: Tensor,  # the same shape
    block_kwargs: dict[str, Any],
    device: torch.device,
    precision: str,
) -> Callable[[Tensor], tuple[Tensor, int]]:
    """The ``step_loss`` of the block tuners: float32 MSE between the block's outputs on the chosen
    windows (forward under autocast) and their targets, and the windows' token count."""

    def step_loss(idx: Tensor) -> tuple[Tensor, int]:
        x = inputs[idx].to(device, non_blocking=True)
        y = targets[idx].to(device, non_blocking=True)
        with autocast_context(device, precision):
            out = call_block(block, x, block_kwargs)
        return torch.nn.functional.mse_loss(out.float(), y.float()), x.shape[0] * x.shape[1]

    return step_loss
