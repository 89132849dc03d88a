"""The block fine-tuner interface, its registry and the block forward helpers they share."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ebft.errors import EbftError

FINETUNERS: dict[str, type[BlockFinetuner] | None] = {"none": None}


def register_finetuner(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        FINETUNERS[name] = cls
        cls.name = name
        return cls

    return wrap


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
class BlockResult:
    """What tuning one block did; ``losses`` is the mean training loss of each epoch."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    restored: str | None = None  # why the untuned weights were put back, if they were


class BlockFinetuner:
    """Repairs one pruned block so that its outputs match the dense block's (``targets``)."""

    name = "base"
    needs_dense_weights = False  # whether tune() wants the block's weights from before pruning
    supports_early_stopping = False  # whether tune() takes on_epoch_end (the pipeline's --patience)

    def __init__(self, config: Any, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        #: under torchrun, the job's :class:`ebft.distributed.DistContext`: tuners that train with
        #: :func:`ebft.finetune.loop.train_steps` pass it on; the others run whole on every process
        self.dist: Any = None

    def tune(
        self,
        block: nn.Module,
        inputs: torch.Tensor,  # [nsamples, seqlen, hidden] on the CPU
        targets: torch.Tensor,  # [nsamples, seqlen, hidden] on the CPU
        masks: dict[str, torch.Tensor],  # parameter name inside the block -> bool keep-mask
        block_kwargs: dict[str, Any],  # on the block's device
        index: int,
        dense_weights: dict[str, torch.Tensor] | None = None,  # given when needs_dense_weights
        on_epoch_end: Callable[[int], bool] | None = None,  # only when supports_early_stopping
    ) -> BlockResult:
        """Tune ``block`` in place. ``on_epoch_end(epoch)`` (0-based) is called after every epoch;
        when it returns True, tuning stops there (the caller may then load other weights)."""
        raise NotImplementedError

    def masked_layers(
        self, block: nn.Module, masks: dict[str, torch.Tensor], dense_weights: dict[str, torch.Tensor] | None
    ) -> tuple[dict[str, nn.Parameter], dict[str, nn.Module], dict[str, torch.Tensor]]:
        """For tuners that need dense weights: the block's parameters by name, for each masked weight
        the module that owns it, and ``dense_weights``. Raises when they or a masked name are missing."""
        if dense_weights is None:
            raise EbftError(f"{self.name} needs the block's dense weights; the pipeline did not pass them")
        params = dict(block.named_parameters())
        missing = [key for key in masks if key not in params or key not in dense_weights]
        if missing:
            raise KeyError(f"masks name parameters the block or its dense weights lack: {missing[:3]}")
        modules = {key: block.get_submodule(key.removesuffix(".weight")) for key in masks}
        return params, modules, dense_weights


MaskedState = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (keep-mask, weight)


def save_masked(masks: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> MaskedState:
    """Copies of the masks and of the weights they apply to, for :func:`restore_masked`."""
    return {key: (mask.clone(), params[key].detach().clone()) for key, mask in masks.items()}


@torch.no_grad()
def restore_masked(masks: dict[str, torch.Tensor], params: dict[str, nn.Parameter], saved: MaskedState) -> None:
    """Put back the masks (in place) and weights that :func:`save_masked` copied."""
    for key, (mask, weight) in saved.items():
        masks[key].copy_(mask)
        params[key].copy_(weight)


@torch.no_grad()
def set_mask_(mask: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, dense: torch.Tensor) -> None:
    """Make ``mask`` (in place) ``keep`` and ``weight`` the ``dense`` weights under it (pruned ones exactly 0.0)."""
    mask.copy_(keep.to(mask.device))
    weight.copy_(torch.where(keep, dense, torch.zeros_like(dense)).to(weight.dtype))


def loss_lowered(init_loss: float, final_loss: float) -> bool:
    """Whether a mask change lowered the block's output MSE (by more than a relative 1e-6)."""
    return math.isfinite(final_loss) and final_loss < init_loss * (1 - 1e-6)


