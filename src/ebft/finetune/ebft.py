"""EBFT: tune a pruned block's remaining weights to reproduce the dense block's outputs.

Loss: mean squared error between the pruned block's outputs and the dense block's outputs on the
same inputs. AdamW, linear decay to zero, gradient-norm clipping. Masks stay fixed: gradients of
pruned weights are zeroed before each step and the masks are re-applied after it, so a pruned
weight is exactly 0.0 throughout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ebft.errors import EbftError, UsageError
from ebft.finetune.base import BlockFinetuner, BlockResult, register_finetuner
from ebft.finetune.loop import block_mse_loss, planned_steps, train_steps
from ebft.models.blocks import block_device, run_block
from ebft.precision import block_shapes, resolve_precision
from ebft.settings import setting

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def compiled_forward(block: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, ``block.forward`` is ``torch.compile``d (its backward too, by AOTAutograd).

    Compiled code is cached by the forward's code, so every later block of the same class reuses the
    first block's compilation (plus one recompile for a partial last batch). A compiler failure (no
    C++ compiler, an unsupported platform) surfaces at the first step as an :class:`EbftError`.
    """
    if not enabled:
        yield
        return
    block.forward = torch.compile(block.forward)
    try:
        yield
    except Exception as exc:
        if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            inner = getattr(exc, "inner_exception", None) or exc  # BackendCompilerFailed wraps the cause
            text = str(inner).strip()
            reason = f"{type(inner).__name__}: {text.splitlines()[0]}" if text else type(inner).__name__
            raise EbftError(f"torch.compile failed ({reason}); run without --compile") from exc
        raise
    finally:
        del block.forward  # the class's forward again


@dataclass
class EBFTOptions:
    """What only ``--finetune ebft`` reads."""

    compile: bool = setting(False, key="compile",
                            help="torch.compile each block's training step (fuses norms, activations and casts; the "
                                 "first block pays a compile of some seconds, the others reuse it)")
    lr_search: tuple[float, ...] = setting((), kind="floats", metavar="FACTORS",
                                           help="per block, first try --lr times each factor for "
                                                "--ebft-lr-trial-steps steps from the untuned block and train with the "
                                                "one whose held-out loss is lowest (e.g. 4,1,0.25,0.0625; needs "
                                                "held-out windows; none: --lr as given)")
    lr_trial_steps: int | None = setting(None, kind="int",
                                         help="optimizer steps of each --ebft-lr-search trial (none: one pass over "
                                              "the training windows)")

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool):
            raise UsageError(f"compile must be true or false; got {self.compile!r}")
        self.lr_search = check_lr_search(self.lr_search, self.lr_trial_steps, "--ebft-")


def check_lr_search(factors: Any, trial_steps: Any, prefix: str) -> tuple[float, ...]:
    """``factors`` as a tuple, once they and ``trial_steps`` are valid (flags ``{prefix}lr-search``, ...)."""
    factors = tuple(factors or ())
    if not all(isinstance(f, (int, float)) and math.isfinite(f) and f > 0 for f in factors):
        raise UsageError(f"{prefix}lr-search must be positive factors of --lr, such as 4,1,0.25; got "
                         f"{','.join(map(str, factors))}")
    if trial_steps is not None and (isinstance(trial_steps, bool) or not isinstance(trial_steps, int)
                                    or trial_steps < 1):
        raise UsageError(f"{prefix}lr-trial-steps must be a positive whole number; got {trial_steps!r}")
    return factors


@register_finetuner("ebft", options=EBFTOptions)
class EBFT(BlockFinetuner):
    """Block-wise reconstruction fine-tuning of all of a block's parameters (config: FinetuneConfig)."""

    supports_early_stopping = True
    uses_holdout = True  # for --ebft-lr-search
    tunes_windows = True  # the block may be a BlockChain

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
        holdout: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> BlockResult:
        cfg = self.config
        device = block_device(block)
        precision = resolve_precision(cfg.precision, device, block_shapes(block), cfg.batch_size * inputs.shape[1])
        params = dict(block.named_parameters())
        unknown = set(masks) - set(params)
        if unknown:
            raise KeyError(f"masks name parameters the block does not have: {sorted(unknown)[:3]}")
        device_masks = {name: mask.to(device) for name, mask in masks.items()}
        trainable = [p for p in params.values() if p.dtype.is_floating_point]
        for p in trainable:
            p.requires_grad_(True)

        def mask_grads() -> None:
            for name, mask in device_masks.items():
                grad = params[name].grad
                if grad is not None:
                    grad.mul_(mask)

        @torch.no_grad()
        def reapply_masks() -> None:
            for name, mask in device_masks.items():
                params[name].mul_(mask)

        epochs = planned_steps(cfg, inputs.shape[0])[2]

        def epoch_end(epoch: int, loss: float) -> bool:
            logger.debug("block %d epoch %d/%d loss %.6g", index, epoch + 1, epochs, loss)
            if on_epoch_end is not None and on_epoch_end(epoch) and epoch + 1 < epochs:
                logger.info("block %d: early stop after epoch %d/%d", index, epoch + 1, epochs)
                return True
            return False

        result = BlockResult()
        start = time.perf_counter()
        block.train(False)  # no dropout: targets were computed in eval mode
        step_loss = block_mse_loss(block, inputs, targets, block_kwargs, device, precision)

        def train(run_cfg: Any, into: Any, desc: str, on_end: Callable[[int, float], bool] | None = None) -> int:
            return train_steps(trainable, run_cfg, device, precision, inputs.shape[0], self.seed * 1_000_003 + index,
                               step_loss, into, desc=desc, on_grads=mask_grads, after_step=reapply_masks,
                               on_epoch_end=on_end, dist=self.dist)

        try:
            with compiled_forward(block, self.options.compile):
                if self.options.lr_search and holdout is not None:
                    cfg = self._search_lr(block, train, inputs.shape[0], holdout, block_kwargs, index, result)
                result.tokens += train(cfg, result, f"block {index} ebft", epoch_end)
            if result.restored is not None:
                logger.warning("block %d: %s; stopping its fine-tuning", index, result.restored)
        finally:
            for p in trainable:
                p.requires_grad_(False)
            result.train_seconds = time.perf_counter() - start
        return result

    def _search_lr(self, block: nn.Module, train: Callable[..., int], nsamples: int,
                   holdout: tuple[torch.Tensor, torch.Tensor], block_kwargs: dict[str, Any], index: int,
                   result: BlockResult) -> Any:
        """The training settings with the learning rate whose short trial from the untuned block gives the lowest
        held-out loss (the first on a tie); the block is untuned again afterwards."""
        cfg, opts = self.config, self.options
        untuned = {k: v.detach().clone() for k, v in block.state_dict().items()}
        steps = opts.lr_trial_steps or planned_steps(cfg, nsamples)[1]
        best_lr, best_loss = cfg.lr, math.inf
        for factor in opts.lr_search:
            lr = cfg.lr * factor
            trial = BlockResult()
            result.tokens += train(dataclasses.replace(cfg, lr=lr, steps=steps), trial, f"block {index} lr {lr:g}")
            loss = math.inf if trial.restored else run_block(block, holdout[0], block_kwargs, cfg.batch_size,
                                                             targets=holdout[1])
            result.lr_trials[f"{lr:g}"] = loss if math.isfinite(loss) else None  # None: the trial diverged
            if loss < best_loss:
                best_lr, best_loss = lr, loss
            block.load_state_dict(untuned)
        logger.info("block %d: lr %g chosen by %d trials of %d steps (held-out loss %.5g)", index, best_lr,
                    len(opts.lr_search), steps, best_loss)
        result.lr = best_lr
        return dataclasses.replace(cfg, lr=best_lr)
