"""The block walk: compress every decoder block and repair it before the next one sees its outputs.

For block i, with X the outputs of the already compressed (and tuned) blocks before it:

1. **targets** = dense_block_i(X); the same pass feeds the compressor its activation statistics
   (a pruner's input norms or Hessians, structured pruning's channel variances). With
   ``--block-targets dense`` the targets are instead dense_block_i(D), D the dense model's own
   activations entering block i (a third buffer, D <- targets after each block), so that a block
   also makes up for the error the compressed blocks before it left in X;
2. **compress** block i: bool masks for its linear layers (fixed from now on), or whole heads and
   channels removed (:class:`Compressor`: :class:`MaskCompressor` wraps a pruner,
   :class:`ebft.structured.StructuredCompressor` shrinks);
3. **tune** the block's remaining weights on the training windows of X so that its outputs match the
   targets (a block fine-tuner, ``--finetune``); the held-out windows (``holdout_fraction``) only
   judge it: a block whose held-out loss tuning does not lower gets its untuned weights and masks back;
4. **propagate**: X <- tuned_block_i(X) on every window, which becomes block i+1's input.

Only one block is on the compute device at a time; activations live on the CPU, in RAM or (with
``offload_dir``) in memory-mapped files. Whatever else takes part joins through :class:`Callback`
hooks (walk start, block start, after the targets, after tuning, block end, walk end): the
checkpoint (:class:`ebft.checkpoint.CheckpointCallback`, which also resumes a run from its first
unfinished block, bit for bit as if it had never stopped), the progress bar, the bench scripts.
Under torchrun (``dist``) every process walks the blocks in lockstep and the training batches are
split between them (see :mod:`ebft.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ebft.capture import ActivationBuffers, calibration_context, capture_block_kwargs, capture_first_block_inputs
from ebft.errors import EbftError
from ebft.models.adapter import DecoderBlocks, find_blocks
from ebft.models.blocks import BlockChain, move_non_block_modules, move_to, record_inputs, run_block
from ebft.results import BlockReport
from ebft.sparsity import PackedMasks, share_counts

if TYPE_CHECKING:
    from ebft.config import FinetuneConfig, PruneConfig
    from ebft.distributed import DistContext
    from ebft.finetune.base import BlockFinetuner
    from ebft.pruners.base import Pruner

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- compressors


@dataclass
class Compression:
    """What compressing one block gave: its keep-masks by parameter name inside the block, and what was chosen."""

    masks: dict[str, torch.Tensor]  # e.g. "self_attn.q_proj.weight" -> bool [out, in]
    info: dict[str, Any] = field(default_factory=dict)  # goes to the block's report (structured: kept heads)


class Compressor:
    """Compresses one block at a time, from the statistics it records during the block's dense pass."""

    def check(self, blocks: DecoderBlocks) -> None:
        """Fail before any heavy work if the model does not suit this compression."""

    def check_tuner(self, method: str) -> None:
        """Fail if the block fine-tuner ``method`` cannot follow this compression."""

    def observe(self, block: nn.Module, index: int, blocks: DecoderBlocks) -> contextlib.AbstractContextManager:
        """Hooks that record what :meth:`compress` needs while the dense block runs on every window."""
        return contextlib.nullcontext()

    def compress(self, block: nn.Module, index: int, blocks: DecoderBlocks) -> Compression:
        """Compress ``block`` in place (it is on the compute device, in no-grad mode)."""
        raise NotImplementedError

    def reshape(self, block: nn.Module, index: int) -> None:
        """On resume: give a finished block the shapes its saved weights have (before they are loaded)."""

    def finish(self, model: nn.Module, blocks: DecoderBlocks) -> dict[str, Any] | None:
        """After the walk (the model back on the CPU): final changes, and a summary for the report."""
        return None


def check_nm_divisible(blocks: DecoderBlocks, nm: tuple[int, int] | None) -> None:
    """Fail before any heavy work if some layer's input width is not a multiple of M."""
    if nm is None:
        return
    n, m = nm
    for name, linear in blocks.all_linears().items():
        if linear.in_features % m:
            raise EbftError(
                f"--nm {n}:{m} needs every pruned layer's input width divisible by {m}; "
                f"{name} has {linear.in_features} inputs"
            )


class MaskCompressor(Compressor):
    """Pruning: a :class:`~ebft.pruners.base.Pruner` scores each linear layer and its weights are masked,
    at the pruner's sparsity or, with ``sparsities`` (an allocation's), at block ``i``'s own."""

    def __init__(self, pruner: Pruner, sparsities: Sequence[float] | None = None) -> None:
        self.pruner = pruner
        self.sparsities = list(sparsities) if sparsities is not None else None
        self.target = pruner.sparsity
        self._counts: dict[tuple[str, int], list[int]] = {}

    def _layer_sparsity(self, local_name: str, linear: nn.Linear, index: int) -> float:
        """Block ``index``'s share for this layer: its allocated sparsity, rounded so that the layer's pruned
        weights over all blocks are as many as the uniform target prunes (:func:`share_counts`)."""
        size = linear.in_features if self.pruner.per_row else linear.in_features * linear.out_features
        key = (local_name, size)
        if key not in self._counts:
            self._counts[key] = share_counts(self.sparsities, size, self.target)  # type: ignore[arg-type]
        return self._counts[key][index] / size

    def check(self, blocks: DecoderBlocks) -> None:
        check_nm_divisible(blocks, self.pruner.nm)
        if self.sparsities is not None and len(self.sparsities) != len(blocks):
            raise EbftError(f"the allocation gives {len(self.sparsities)} sparsities for {len(blocks)} blocks")

    def observe(self, block: nn.Module, index: int, blocks: DecoderBlocks) -> contextlib.AbstractContextManager:
        if not self.pruner.needs_activations:
            return contextlib.nullcontext()
        return record_inputs(blocks.linears(index), self.pruner.add_batch)

    def compress(self, block: nn.Module, index: int, blocks: DecoderBlocks) -> Compression:
        prefix = blocks.block_name(index) + "."
        masks = {}
        for name, linear in blocks.linears(index).items():
            if self.sparsities is not None:
                self.pruner.sparsity = self._layer_sparsity(name[len(prefix):], linear, index)
            masks[name[len(prefix):] + ".weight"] = self.pruner.prune(name, linear.weight.data)
        self.pruner.finish_block(prefix, block)
        self.pruner.reset()
        return Compression(masks)


def make_compressor(model: nn.Module, prune: PruneConfig, sparsities: Sequence[float] | None = None) -> Compressor:
    """The compressor ``prune`` asks for: structured shrinking with ``structured``, else its pruner's masks
    (``sparsities``: each block's, from an allocation)."""
    if prune.structured is not None:
        from ebft.structured import StructuredCompressor

        return StructuredCompressor(model, prune.structured, prune.structured_score)
    from ebft.pruners import make_pruner

    return MaskCompressor(make_pruner(prune.pruner, prune.sparsity, prune.nm, prune.options), sparsities)


# ----------------------------------------------------------------------------- callbacks


class Callback:
    """Joins the walk at its fixed points; every hook gets the :class:`BlockWalk` and may read its state.

    ``on_targets`` comes right after the dense pass (``walk.targets`` holds the dense outputs, the
    block is not compressed yet); ``on_compressed`` once it is (``walk.block`` holds its untuned
    compressed weights); ``on_tuned`` after the tuner and the keep-or-restore decision
    (``walk.block`` holds the weights that stay); ``on_block_end`` once ``walk.hidden`` holds the
    next block's inputs and ``walk.masks`` the block's final masks.
    """

    def on_walk_start(self, walk: BlockWalk) -> None: ...
    def on_block_start(self, walk: BlockWalk, index: int) -> None: ...
    def on_targets(self, walk: BlockWalk, index: int) -> None: ...
    def on_compressed(self, walk: BlockWalk, index: int) -> None: ...
    def on_tuned(self, walk: BlockWalk, index: int, report: BlockReport) -> None: ...
    def on_block_end(self, walk: BlockWalk, index: int, report: BlockReport) -> None: ...
    def on_walk_end(self, walk: BlockWalk, result: WalkResult) -> None: ...


class Progress(Callback):
    """A progress bar over the blocks (rank 0 only) and a log line per finished block."""

    def on_walk_start(self, walk: BlockWalk) -> None:
        n = len(walk.blocks)
        self.bar = tqdm(total=n, initial=walk.first, desc="blocks", disable=None if walk.is_main else True)

    def on_block_end(self, walk: BlockWalk, index: int, report: BlockReport) -> None:
        n = len(walk.blocks)
        self.bar.update(1)
        self.bar.set_postfix(block=f"{index + 1}/{n}", init=f"{report.init_loss:.4g}", final=f"{report.final_loss:.4g}")
        chosen = "".join(f"; {k.replace('_', ' ')} {v}" for k, v in report.compression.items())
        logger.info("block %d/%d%s: loss %.5g -> %.5g in %.1f s%s", index + 1, n, chosen, report.init_loss,
                    report.final_loss, report.seconds, "" if report.holdout_init_loss is None else
                    f" (held out {report.holdout_init_loss:.5g} -> {report.holdout_final_loss:.5g})")

    def on_walk_end(self, walk: BlockWalk, result: WalkResult) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- the walk


@dataclass
class WalkResult:
    blocks: list[BlockReport]
    masks: PackedMasks  # full module name -> bool keep-mask, packed eight to a byte on the CPU
    seconds: float
    summary: dict[str, Any] | None = None  # the compressor's (structured: the plan and parameter counts)

    def block_dicts(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in self.blocks]


def holdout_count(nsamples: int, fraction: float) -> int:
    """How many calibration windows are held out: at least 1 when ``fraction > 0`` and ``nsamples >= 2``."""
    if fraction <= 0 or nsamples < 2:
        return 0
    return min(nsamples - 1, max(1, round(nsamples * fraction)))


def restore_reason(init_loss: float, final_loss: float, holdout_init: float | None,
                   holdout_final: float | None) -> str | None:
    """Why a tuned block must get its untuned weights back, or ``None`` to keep the tuning.

    The held-out loss decides when there is one; otherwise the loss on the (training) windows.
    """
    if not math.isfinite(final_loss):
        return f"tuning made the loss non-finite ({final_loss})"
    if holdout_init is not None and holdout_final is not None:
        if not holdout_final < holdout_init:
            return f"tuning did not lower the held-out loss ({holdout_final:.4g} >= {holdout_init:.4g})"
        return None
    if not final_loss < init_loss:
        return f"tuning did not lower the loss ({final_loss:.4g} >= {init_loss:.4g})"
    return None


class EarlyStopping:
    """``on_epoch_end`` for a tuner: held-out loss after every epoch, best weights, stop after ``patience``."""

    def __init__(self, block: nn.Module, measure: Callable[[], float], baseline: float, patience: int) -> None:
        self.block = block
        self.measure = measure
        self.best = baseline
        self.patience = patience
        self.best_epoch = 0  # 0: the untuned block
        self.best_state: dict[str, torch.Tensor] | None = None
        self.losses: list[float] = []

    def __call__(self, epoch: int) -> bool:
        loss = self.measure()
        self.losses.append(loss)
        if loss < self.best:  # False for NaN
            self.best, self.best_epoch = loss, epoch + 1
            self.best_state = {k: v.detach().clone() for k, v in self.block.state_dict().items()}
        return epoch + 1 - self.best_epoch >= self.patience

    def keep_best(self, untuned: dict[str, torch.Tensor]) -> None:
        """Load the best epoch's weights (the untuned ones if no epoch beat them) unless the last is best."""
        if self.losses and self.best_epoch != len(self.losses):
            self.block.load_state_dict(self.best_state if self.best_state is not None else untuned)


@contextlib.contextmanager
def _seeded(seed: int, index: int, device: torch.device) -> Iterator[None]:
    """Global RNG seeded from ``(seed, index)`` for one block, the caller's state restored after.

    Nothing in a block should draw from the global generator; if something does, a resumed run
    still draws exactly what an uninterrupted one would.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed * 1_000_003 + index + 7_919)
        yield


class BlockWalk:
    """One walk over a model's decoder blocks; :meth:`run` does it. Callbacks read its attributes:

    ``model``, ``blocks``, ``compressor``, ``tuner``, ``finetune``, ``device``, ``dist``;
    ``first`` (the first block this process computes; more than 0 on resume); ``hidden`` (the
    current block's inputs, then the next one's), ``targets``, ``block`` and ``kwargs`` (the block
    in hand, on the device), ``masks`` (every finished block's masks) and ``reports``.
    """

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, compressor: Compressor,
                 tuner: BlockFinetuner | None, finetune: FinetuneConfig, device: torch.device, seed: int = 0,
                 forward_batch_size: int = 8, callbacks: Sequence[Callback] = (), dist: DistContext | None = None,
                 offload_dir: Path | None = None, progress: bool = True,
                 store_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.calib_ids = calib_ids  # [nsamples, seqlen]
        self.compressor = compressor
        self.tuner = tuner
        self.finetune = finetune
        self.device = device
        self.seed = seed
        self.batch_size = forward_batch_size
        self.callbacks = [*callbacks, *([Progress()] if progress else [])]
        self.dist = dist
        self.offload_dir = offload_dir
        #: the dtype every finished block is kept (and saved) in; None: each block's own
        self.store_dtype = store_dtype
        self.blocks = find_blocks(model)
        nsamples = calib_ids.shape[0]
        self.n_train = nsamples - holdout_count(nsamples, finetune.holdout_fraction)
        self.first = 0
        self.masks = PackedMasks()
        self.reports: list[BlockReport] = []
        self.hidden: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.block: nn.Module | None = None
        self.kwargs: dict[str, Any] = {}
        self.current_store: torch.dtype | None = None  # the dtype the block in hand is kept in
        self.window = range(0)  # the blocks tuned together now (--block-window; one block by default)
        #: --block-targets dense: the dense model's own activations entering the current block (else None)
        self.dense: torch.Tensor | None = None
        self.dense_targets = tuner is not None and finetune.block_targets == "dense"
        self._buffers: ActivationBuffers | None = None

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def _notify(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def resume(self, done: int, reports: list[BlockReport], hidden: torch.Tensor,
               dense: torch.Tensor | None = None) -> None:
        """Continue after ``done`` finished blocks (already loaded into the model, their masks into
        ``self.masks``), whose reports and the activations leaving the last are given (with
        ``--block-targets dense``, also the dense model's own, ``dense``): for ``on_walk_start`` hooks
        (the checkpoint's)."""
        if hidden.shape[:2] != self.calib_ids.shape or (dense is not None and dense.shape != hidden.shape):
            raise EbftError("the checkpoint's activations do not match the calibration windows; "
                            "pass --overwrite to start over")
        if (dense is not None) != self.dense_targets:
            raise EbftError("the checkpoint was made with another --block-targets; pass --overwrite to start over")
        if self.offload_dir is not None:
            hidden = self._buffers.new(tuple(hidden.shape), hidden.dtype).copy_(hidden)  # type: ignore[union-attr]
            if dense is not None:
                dense = self._buffers.new(tuple(dense.shape), dense.dtype).copy_(dense)  # type: ignore[union-attr]
        self.first, self.reports, self.hidden, self.dense = done, list(reports), hidden, dense
        logger.info("resumed after block %d/%d", done, len(self.blocks))

    def run(self) -> WalkResult:
        """Compress and repair every block of the model in place; returns the reports and the masks."""
        start = time.perf_counter()
        self.compressor.check(self.blocks)
        self.model.requires_grad_(False)
        if self.tuner is not None:
            self.tuner.dist = self.dist
            self.compressor.check_tuner(self.tuner.name)
        if (self.finetune.patience is not None and self.tuner is not None
                and not self.tuner.supports_early_stopping):
            raise EbftError(f"--patience does not work with --finetune {self.finetune.method}; use --finetune ebft")
        move_non_block_modules(self.model, self.blocks, self.device)
        self.block_kwargs = capture_block_kwargs(self.model, self.blocks, self.calib_ids[:1])
        prefix = f"rank{self.dist.rank}" if self.dist is not None else "activations"
        self._buffers = ActivationBuffers(self.offload_dir, prefix=prefix)
        try:
            self._notify("on_walk_start")
            if self.hidden is None:
                self.hidden = capture_first_block_inputs(self.model, self.blocks, self.calib_ids,
                                                         batch_size=self.batch_size, alloc=self._buffers.new)
            self.targets = self._buffers.new(tuple(self.hidden.shape), self.hidden.dtype)
            if self.dense_targets and self.dense is None:  # before the first block both streams are the same
                self.dense = self._buffers.new(tuple(self.hidden.shape), self.hidden.dtype).copy_(self.hidden)
            nsamples = self.calib_ids.shape[0]
            logger.info("calibration activations: %s windows x %s tokens x %s features (%.0f MB each, %s), %d held out",
                        *self.hidden.shape, self.hidden.numel() * self.hidden.element_size() / 2**20,
                        "in RAM" if self.offload_dir is None else f"memory-mapped in {self.offload_dir}",
                        nsamples - self.n_train)
            size = self.finetune.block_window if self.tuner is not None else 1
            for first in range(self.first, len(self.blocks), size):
                self.window = range(first, min(first + size, len(self.blocks)))
                block_start = time.perf_counter()
                for index in self.window:
                    self._notify("on_block_start", index)
                with _seeded(self.seed, first, self.device):
                    reports = [self._block(first)] if len(self.window) == 1 else self._window()
                for index, report in zip(self.window, reports):
                    report.seconds = (time.perf_counter() - block_start) / len(reports)
                    self.reports.append(report)
                    self._notify("on_block_end", index, report)
            if not torch.isfinite(self.hidden).all():
                raise EbftError("the pruned model produces non-finite activations; try a lower --sparsity or --lr")
            self.hidden = self.targets = self.dense = None
        finally:
            self._buffers.close()
        if self.dist is not None:
            self.dist.barrier()  # every process has finished every block
        move_non_block_modules(self.model, self.blocks, "cpu")
        summary = self.compressor.finish(self.model, self.blocks)
        result = WalkResult(self.reports, self.masks, time.perf_counter() - start, summary)
        self._notify("on_walk_end", result)
        return result

    # ------------------------------------------------------------------------- one block

    def _block(self, index: int) -> BlockReport:
        """Targets, compress, tune, propagate for block ``index``; ``self.hidden`` then holds block index+1's inputs."""
        blocks = self.blocks
        block = blocks.blocks[index].to(self.device)
        store = self.current_store = self.store_dtype or next(block.parameters()).dtype
        block.float()  # fp32 master weights while the block is worked on, whatever it is kept in
        kwargs = move_to(self.block_kwargs[index], self.device)
        self.block, self.kwargs = block, kwargs
        with calibration_context(self.model):
            # 1. dense targets and the compressor's activation statistics, in one pass over every window
            with self.compressor.observe(block, index, blocks):
                run_block(block, self.hidden, kwargs, self.batch_size, out=self.targets if self.dense is None else None)
            if self.dense is not None:  # --block-targets dense: the dense model's own next activations
                run_block(block, self.dense, kwargs, self.batch_size, out=self.targets)
        self._notify("on_targets", index)
        with calibration_context(self.model):
            # 2. compress (the dense weights first, for tuners that start from them)
            dense_weights = None
            if self.tuner is not None and self.tuner.needs_dense_weights:
                dense_weights = {name + ".weight": m.weight.detach().clone() for name, m in block.named_modules()
                                 if isinstance(m, nn.Linear)}
            compression = self.compressor.compress(block, index, blocks)
            round_to(block, store)
        self._notify("on_compressed", index)
        if self.tuner is None:
            with calibration_context(self.model):
                # each batch is compared with its targets before its outputs overwrite them
                loss, holdout = self._losses(block, kwargs, out=self.targets)
            report = BlockReport(index, loss, loss, 0.0, holdout_init_loss=holdout, holdout_final_loss=holdout)
            self._notify("on_tuned", index, report)
            self.hidden, self.targets = self.targets, self.hidden
        else:
            report = self._tune(index, block, kwargs, compression.masks, dense_weights, store)
        report.compression = compression.info
        prefix = blocks.block_name(index) + "."
        for name, mask in compression.masks.items():  # mask-refining tuners changed them in place
            self.masks[prefix + name.removesuffix(".weight")] = mask
        blocks.blocks[index].to("cpu", store)
        self.block = None
        return report

    def _window(self) -> list[BlockReport]:
        """Blocks ``self.window`` compressed one after the other and tuned together (``--block-window``):
        the targets are the dense chain's outputs on ``self.hidden``; each block is compressed with the
        statistics of its dense pass in that chain (for the first, the repaired stream, as block by block);
        then the chain of compressed blocks trains towards the targets, and is kept or restored as one.
        Returns one report per block, each with the window's losses."""
        blocks, window = self.blocks, self.window
        chain, kwargs, compressions, stores = [], [], [], []
        for index in window:
            block = blocks.blocks[index].to(self.device)
            stores.append(self.store_dtype or next(block.parameters()).dtype)
            chain.append(block.float())
            kwargs.append(move_to(self.block_kwargs[index], self.device))
        for position, index in enumerate(window):
            self.block, self.kwargs, self.current_store = chain[position], kwargs[position], stores[position]
            with calibration_context(self.model):
                with self.compressor.observe(chain[position], index, blocks):
                    run_block(chain[position], self.hidden if position == 0 else self.targets, kwargs[position],
                              self.batch_size, out=self.targets)
            self._notify("on_targets", index)
            with calibration_context(self.model):
                compression = self.compressor.compress(chain[position], index, blocks)
                round_to(chain[position], stores[position])
            compressions.append(compression)
            self._notify("on_compressed", index)
        whole = BlockChain(chain, kwargs)
        window_masks = {f"{position}.{name}": mask for position, compression in enumerate(compressions)
                        for name, mask in compression.masks.items()}
        self.block, self.kwargs = whole, {}
        store = stores[0] if len(set(stores)) == 1 else torch.float32
        report = self._tune(window[0], whole, {}, window_masks, None, store, notify=False)
        reports = []
        for position, index in enumerate(window):
            block_report = dataclasses.replace(report, index=index, compression=compressions[position].info,
                                               window=[window[0], window[-1]])
            self.block, self.kwargs = chain[position], kwargs[position]
            self._notify("on_tuned", index, block_report)
            prefix = blocks.block_name(index) + "."
            for name, mask in compressions[position].masks.items():
                self.masks[prefix + name.removesuffix(".weight")] = mask
            blocks.blocks[index].to("cpu", stores[position])
            reports.append(block_report)
        self.block = None
        return reports

    def _tune(self, index: int, block: nn.Module, kwargs: dict[str, Any], masks: dict[str, torch.Tensor],
              dense_weights: dict[str, torch.Tensor] | None, store: torch.dtype = torch.float32,
              notify: bool = True) -> BlockReport:
        """Tune a compressed block towards its targets, keep or restore it, and propagate.

        The first ``n_train`` windows train it, the rest only judge it (:func:`restore_reason`). A block
        that tuning made worse gets its untuned weights and ``masks`` (which mask-refining tuners change
        in place) back. Returns the report (its ``seconds`` left for the caller).
        """
        tuner, finetune, n_train, dist = self.tuner, self.finetune, self.n_train, self.dist
        hidden, targets, dense = self.hidden, self.targets, self.dense
        free = targets if dense is None else dense  # the buffer the tuned outputs go to (dense's is used up)
        with calibration_context(self.model):  # the untuned state, in the dtype it is kept in (exact: rounded)
            untuned = {k: v.detach().to(store if v.is_floating_point() else v.dtype, copy=True)
                       for k, v in block.state_dict().items()}
            untuned_masks = PackedMasks(masks)  # a bit per weight: any tuner may have changed them
            init_loss, holdout_init = self._losses(block, kwargs)
        stopper = None
        extra: dict[str, Any] = {}
        if finetune.patience is not None and holdout_init is not None:
            def measure() -> float:
                return run_block(block, hidden[n_train:], kwargs, self.batch_size, targets=targets[n_train:])

            stopper = EarlyStopping(block, measure, holdout_init, finetune.patience)
            extra["on_epoch_end"] = stopper
        if tuner.uses_holdout and holdout_init is not None:  # type: ignore[union-attr]
            extra["holdout"] = (hidden[n_train:], targets[n_train:])
        result = tuner.tune(block, hidden[:n_train], targets[:n_train], masks, kwargs, index,  # type: ignore[union-attr]
                            dense_weights=dense_weights, **extra)
        if stopper is not None and result.restored is None:
            stopper.keep_best(untuned)
        round_to(block, store)  # judged as it will be kept
        if dist is not None:  # the processes took the same steps; make them bitwise equal all the same
            dist.broadcast_([*block.state_dict().values(), *masks.values()])
        with calibration_context(self.model):
            # each batch is compared with its targets before its outputs overwrite them
            final_loss, holdout_final = self._losses(block, kwargs, out=free)
            if result.restored is None:
                result.restored = restore_reason(init_loss, final_loss, holdout_init, holdout_final)
            if dense is not None:
                self.dense, self.targets = targets, free  # the dense outputs are the next block's dense inputs
            if result.restored is None:
                self.hidden, self.targets = free, hidden  # the tuned outputs are the next block's inputs
            else:
                logger.warning("block %d: %s; restoring its untuned weights", index, result.restored)
                block.load_state_dict(untuned)
                for key in masks:
                    masks[key].copy_(untuned_masks[key])
                final_loss, holdout_final = init_loss, holdout_init
                self._propagate(block, kwargs)
        report = BlockReport(
            index, init_loss, final_loss, 0.0, result.train_seconds, result.steps, result.losses, result.restored,
            holdout_init_loss=holdout_init, holdout_final_loss=holdout_final,
            holdout_epoch_losses=stopper.losses if stopper is not None else [],
            best_epoch=stopper.best_epoch if stopper is not None else None, lr=result.lr, lr_trials=result.lr_trials,
        )
        if notify:
            self._notify("on_tuned", index, report)
        return report

    def _losses(self, block: nn.Module, kwargs: dict[str, Any],
                out: torch.Tensor | None = None) -> tuple[float, float | None]:
        """MSE against the targets on all windows and on the held-out ones (``hidden[n_train:]``).

        With ``out``, the block's outputs are written there (it may be the inputs or the targets).
        Under torchrun each process runs its share of the windows, and every process gets all outputs.
        """
        hidden, targets = self.hidden, self.targets
        n = hidden.shape[0]
        losses = []
        for a, b in _parts(n, self.n_train):
            loss = _run_shared(block, hidden[a:b], kwargs, self.batch_size, None if out is None else out[a:b],
                               targets[a:b], self.dist)
            losses.append((loss, b - a))
        total = sum(loss * count for loss, count in losses) / n
        return total, losses[1][0] if len(losses) > 1 else None

    def _propagate(self, block: nn.Module, kwargs: dict[str, Any]) -> None:
        """``hidden <- block(hidden)`` in place, in the same batches as :meth:`_losses`."""
        hidden = self.hidden
        for a, b in _parts(hidden.shape[0], self.n_train):
            _run_shared(block, hidden[a:b], kwargs, self.batch_size, hidden[a:b], None, self.dist)


@torch.no_grad()
def round_to(block: nn.Module, dtype: torch.dtype) -> None:
    """Round ``block``'s floating weights to what ``dtype`` can hold, keeping their own dtype (a no-op for
    float32): the block is judged and propagated with the values it is saved with. Zeros stay exactly 0.0."""
    if dtype == torch.float32:
        return
    for param in block.parameters():
        if param.dtype.is_floating_point and param.dtype != dtype:
            param.copy_(param.to(dtype))


def _parts(n: int, n_train: int) -> list[tuple[int, int]]:
    """Training and held-out window ranges; every pass over all windows runs them separately, in order."""
    return [(0, n_train), (n_train, n)] if 0 < n_train < n else [(0, n)]


def _run_shared(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
                out: torch.Tensor | None, targets: torch.Tensor | None, dist: DistContext | None) -> float | None:
    """:func:`run_block`; under torchrun split over the processes (losses all-reduced, outputs shared)."""
    if dist is None:
        return run_block(block, inputs, kwargs, batch_size, out=out, targets=targets)
    n = inputs.shape[0]
    mine = dist.shard(n)
    rows = mine.stop - mine.start
    loss = None
    if rows:
        loss = run_block(block, inputs[mine], kwargs, batch_size, out=None if out is None else out[mine],
                         targets=None if targets is None else targets[mine])
    if out is not None:
        dist.share_rows_(out)
    if targets is None:
        return None
    per_row = targets[0].numel()
    stats = torch.tensor([loss * rows * per_row if rows else 0.0, float(rows * per_row)], dtype=torch.float64,
                         device=dist.device)
    dist.all_reduce_(stats)
    return float(stats[0] / stats[1])


def prune_and_finetune(model: nn.Module, calib_ids: torch.Tensor, prune: PruneConfig, finetune: FinetuneConfig,
                       device: torch.device, seed: int = 0, callbacks: Sequence[Callback] = (),
                       **options: Any) -> WalkResult:
    """Compress every decoder block of an already loaded ``model`` in place as ``prune`` says and repair
    it with ``finetune``'s block fine-tuner (a whole-model method runs after the walk, see
    :func:`ebft.runner.run_prune`). ``options``: the other :class:`BlockWalk` arguments."""
    from ebft.finetune import make_finetuner
    from ebft.precision import resolve_for_block

    tuner = make_finetuner(finetune, seed=seed)
    if tuner is not None and tuner.kind != "block":
        tuner = None
    if tuner is not None:  # --precision auto: decided once, for every block
        finetune, _ = resolve_for_block(finetune, find_blocks(model).blocks[0], device, calib_ids.shape[1])
        tuner.config = finetune
    return BlockWalk(model, calib_ids, make_compressor(model, prune), tuner, finetune, device, seed=seed,
                     callbacks=callbacks, **options).run()
