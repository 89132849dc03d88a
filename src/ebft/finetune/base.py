"""The repair methods' registry and their two interfaces: block fine-tuners and whole-model fine-tuners.

A **block** fine-tuner (:class:`BlockFinetuner`: EBFT, mask tuning, DSnoT) repairs one pruned block
at a time inside the block walk (:mod:`ebft.walk`), towards the dense block's outputs. A **model**
fine-tuner (:class:`ModelFinetuner`: LoRA) runs once the walk has pruned every block, on the whole
model. Both register with :func:`register_finetuner`, each with the dataclass of the options only
it reads; ``--finetune NAME`` picks one, and ``none`` is pruning alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebft.errors import EbftError
from ebft.models.blocks import run_block
from ebft.registry import registrar

logger = logging.getLogger(__name__)

#: ``--finetune`` name -> class (``none``: no repair, pruning alone).
FINETUNERS: dict[str, type[BlockFinetuner] | type[ModelFinetuner] | None] = {"none": None}


def make_finetuner(config: Any, seed: int = 0) -> BlockFinetuner | ModelFinetuner | None:
    """The fine-tuner ``config.method`` (a FinetuneConfig) names, or ``None`` for ``none``."""
    cls = FINETUNERS[config.method]
    return None if cls is None else cls(config, seed=seed)


def reads(method: str) -> frozenset[str] | None:
    """The common training settings (``FinetuneConfig`` fields) that ``method`` reads; ``None``: all of them."""
    cls = FINETUNERS[method]
    return frozenset() if cls is None else cls.reads


class _Method:
    """What both kinds share: the common training settings, the method's own options and a seed."""

    name = "base"
    kind = ""
    tunes_windows = False  # whether the walk may tune several consecutive blocks at once (--block-window)
    Options: type | None = None  # set by @register_finetuner
    #: the common training settings this method reads (None: all); sweeps collapse cells over the others
    reads: frozenset[str] | None = None

    @classmethod
    def takes_windows(cls, options: Any) -> bool:
        """Whether ``--block-window`` above 1 works with this method and its ``options``."""
        return cls.tunes_windows

    def __init__(self, config: Any, seed: int = 0, **option_values: Any) -> None:
        """``config``: a FinetuneConfig (its ``options`` are this method's); ``option_values`` replace some."""
        self.config = config
        self.seed = seed
        options = getattr(config, "options", None)
        if self.Options is not None and not isinstance(options, self.Options):
            options = self.Options()
        self.options = dataclasses.replace(options, **option_values) if option_values else options
        #: under torchrun, the job's :class:`ebft.distributed.DistContext`: tuners that train with
        #: :func:`ebft.finetune.loop.train_steps` pass it on; the others run whole on every process
        self.dist: Any = None

    @classmethod
    def check_available(cls) -> None:
        """Fail with a one-line error if something the method needs is missing (before any model loads)."""

    @classmethod
    def check_calibration(cls, options: Any, nsamples: int, seqlen: int) -> None:
        """Fail with a one-line error if ``options`` do not suit windows of this count and length."""


@dataclass
class BlockResult:
    """What tuning one block did; ``losses`` is the mean training loss of each epoch."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    restored: str | None = None  # why the untuned weights were put back, if they were
    lr: float | None = None  # the learning rate chosen for this block, when the tuner chose one
    lr_trials: dict[str, float | None] = field(default_factory=dict)  # tried lr -> held-out loss after its trial


class BlockFinetuner(_Method):
    """Repairs one pruned block so that its outputs match the dense block's (``targets``)."""

    kind = "block"
    needs_dense_weights = False  # whether tune() wants the block's weights from before pruning
    supports_early_stopping = False  # whether tune() takes on_epoch_end (the walk's --patience)
    uses_holdout = False  # whether tune() takes holdout (the held-out windows' inputs and targets)
    refines_masks = False  # whether tune() changes the masks (then a structured walk cannot use it)

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
        holdout: tuple[torch.Tensor, torch.Tensor] | None = None,  # only when uses_holdout: inputs, targets
    ) -> BlockResult:
        """Tune ``block`` in place. ``on_epoch_end(epoch)`` (0-based) is called after every epoch;
        when it returns True, tuning stops there (the caller may then load other weights). ``holdout``
        (when there are held-out windows) may judge choices the tuner makes, never train it."""
        raise NotImplementedError


class MaskRefiner(BlockFinetuner):
    """A block fine-tuner that changes which weights are kept, not their values (DSnoT, mask tuning).

    Subclasses choose the new masks (:meth:`refine`); this class does the rest: every kept weight
    becomes its dense value and every pruned one exactly 0.0, and a change that does not lower the
    block's output MSE against ``targets`` (no-grad passes over ``inputs``) is undone, so that the
    masks stay those of the weights the walk keeps. The ``masks`` tensors are updated in place.
    """

    needs_dense_weights = True
    refines_masks = True
    what = "mask refinement"  # how the restore message names the method

    def observe(self, modules: dict[str, nn.Module]) -> contextlib.AbstractContextManager:
        """Hooks for the pass that measures the starting loss (``modules``: the masked layers by weight name)."""
        return contextlib.nullcontext()

    def refine(self, block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, masks: dict[str, torch.Tensor],
               block_kwargs: dict[str, Any], index: int, dense: dict[str, torch.Tensor],
               modules: dict[str, nn.Module], result: BlockResult) -> dict[str, torch.Tensor] | None:
        """The new keep-masks by weight name, or None to keep the starting ones (``result.restored`` says why)."""
        raise NotImplementedError

    def tune(self, block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, masks: dict[str, torch.Tensor],
             block_kwargs: dict[str, Any], index: int, dense_weights: dict[str, torch.Tensor] | None = None,
             on_epoch_end: Callable[[int], bool] | None = None) -> BlockResult:
        if dense_weights is None:
            raise EbftError(f"{self.name} needs the block's dense weights; the walk did not pass them")
        params = dict(block.named_parameters())
        missing = [key for key in masks if key not in params or key not in dense_weights]
        if missing:
            raise KeyError(f"masks name parameters the block or its dense weights lack: {missing[:3]}")
        modules = {key: block.get_submodule(key.removesuffix(".weight")) for key in masks}
        batch_size = self.config.batch_size
        result = BlockResult()
        start = time.perf_counter()
        with self.observe(modules):
            init_loss = run_block(block, inputs, block_kwargs, batch_size, targets=targets)
        saved = {key: (mask.clone(), params[key].detach().clone()) for key, mask in masks.items()}
        dense = {key: dense_weights[key].to(device=params[key].device, dtype=params[key].dtype) for key in masks}
        try:
            new = self.refine(block, inputs, targets, masks, block_kwargs, index, dense, modules, result)
        finally:
            result.train_seconds = time.perf_counter() - start
        if new is None:
            logger.warning("block %d: %s; keeping its starting masks", index, result.restored)
            _restore(masks, params, saved)
            return result
        changed = sum(int((new[key] != mask.to(new[key].device)).sum()) for key, mask in masks.items())
        with torch.no_grad():
            for key, mask in masks.items():  # the dense weights under the new mask, the pruned ones exactly 0.0
                mask.copy_(new[key].to(mask.device))
                params[key].copy_(torch.where(new[key], dense[key], torch.zeros_like(dense[key])))
        final_loss = run_block(block, inputs, block_kwargs, batch_size, targets=targets)
        logger.info("block %d %s: %d of %d mask entries changed, mse %.5g -> %.5g", index, self.name, changed,
                    sum(mask.numel() for mask in masks.values()), init_loss, final_loss)
        if not (math.isfinite(final_loss) and final_loss < init_loss * (1 - 1e-6)):  # lowered by more than 1e-6
            result.restored = f"{self.what} did not lower the loss ({final_loss:.4g} >= {init_loss:.4g})"
            _restore(masks, params, saved)
        result.train_seconds = time.perf_counter() - start
        return result


@torch.no_grad()
def _restore(masks: dict[str, torch.Tensor], params: dict[str, nn.Parameter],
             saved: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put back the masks (in place) and the weights they applied to."""
    for key, (mask, weight) in saved.items():
        masks[key].copy_(mask)
        params[key].copy_(weight)


@dataclass
class ModelResult:
    """What a whole-model fine-tuner did: its losses before and after (on the calibration windows)."""

    method: str
    loss: str  # what ``init_loss`` and ``final_loss`` measure, e.g. "causal-LM loss"
    init_loss: float = float("nan")
    final_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)  # mean training loss of each epoch
    steps: int = 0
    seconds: float = 0.0
    restored: str | None = None  # why the model stayed as the walk left it, if it did
    details: dict[str, Any] = field(default_factory=dict)  # method-specific figures (trainable parameters, ...)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line for the console and the report page."""
        extra = "".join(f", {k.replace('_', ' ')} {_figure(v)}" for k, v in self.details.items()
                        if not isinstance(v, dict))
        tail = f"; {self.restored}" if self.restored else ""
        return (f"{self.method}: {self.steps} steps{extra}, {self.loss} {self.init_loss:.4f} -> "
                f"{self.final_loss:.4f}{tail}")


def _figure(value: Any) -> str:
    """A detail as the summary shows it: floats to four significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ModelFinetuner(_Method):
    """Repairs the whole pruned model after the block walk (masks kept: a pruned weight stays exactly 0.0)."""

    kind = "model"
    #: whether the stage changes only the decoder blocks (then the model guard may judge it block by block)
    changes_only_blocks = False
    #: the ids the tokenizer knows, set by the runner before the walk (a model's embeddings may be padded past
    #: them); None: every embedding row
    vocab: int | None = None
    #: the run's work folder (where ``--resume`` finds what the stage keeps), set by the runner; None: no --out
    work_folder: Path | None = None

    def check(self, model: nn.Module) -> None:
        """Everything about ``model`` that can fail before pruning starts."""

    def block_finetuner(self) -> BlockFinetuner | None:
        """The block fine-tuner the walk runs before this stage (None: the walk prunes only)."""
        return None

    def tune_model(
        self,
        model: nn.Module,  # pruned, on the CPU
        calib_ids: torch.Tensor,  # [nsamples, seqlen] token ids
        masks: Any,  # full module name -> bool keep-mask (a Mapping, e.g. PackedMasks)
        device: torch.device,
    ) -> tuple[nn.Module, ModelResult]:
        """Tune ``model``; returns the (plain, unwrapped) model, on the CPU, and what was done."""
        raise NotImplementedError


#: ``@register_finetuner("name", options=OptionsDataclass)``: register a :class:`BlockFinetuner` or
#: :class:`ModelFinetuner` under ``name``. The options are the settings only this method reads (fields
#: declared with :func:`ebft.settings.setting`); they become ``--NAME-FIELD`` flags and sweep keys, and
#: the method finds their values in ``self.options``.
register_finetuner = registrar(FINETUNERS, "finetuner", (BlockFinetuner, ModelFinetuner))
