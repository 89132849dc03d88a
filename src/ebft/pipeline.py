"""Prune a model block by block and repair each block before the next one sees its outputs.

For block i, with X the outputs of the already pruned (and tuned) blocks before it:

1. targets = dense_block_i(X); the same pass feeds the pruner its activation statistics;
2. prune block i's linear layers (bool masks, fixed from now on);
3. fine-tune the block's remaining weights on the training windows of X so that pruned_block_i(X)
   matches the targets; the held-out windows (``FinetuneConfig.holdout_fraction``) only judge it:
   a block whose held-out loss tuning does not lower gets its untuned weights and masks back;
4. X <- tuned_block_i(X) on every window, which becomes block i+1's input.

Only one block is on the compute device at a time; activations live on the CPU, in RAM or (with
``offload_dir``) in memory-mapped files. With a :class:`~ebft.checkpoint.Checkpoint`, every finished
block is committed to disk and a resumed run continues from the first unfinished one, bit for bit as
if it had never stopped. Under torchrun (``dist``) every process walks the blocks in lockstep and
the training batches are split between them (see :mod:`ebft.distributed`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ebft.capture import ActivationBuffers, calibration_context, capture_block_kwargs, capture_first_block_inputs
from ebft.config import FinetuneConfig, PruneConfig
from ebft.errors import EbftError
from ebft.finetune import FINETUNERS
from ebft.models.adapter import DecoderBlocks, find_blocks
from ebft.models.blocks import move_non_block_modules, move_to, record_inputs, run_block
from ebft.pruners import PRUNERS
from ebft.sparsity import PackedMasks

if TYPE_CHECKING:
    from ebft.checkpoint import Checkpoint
    from ebft.distributed import DistContext

logger = logging.getLogger(__name__)


@dataclass
class BlockReport:
    index: int
    init_loss: float  # MSE of the pruned, untuned block against the dense block's outputs
    final_loss: float  # MSE after fine-tuning (equal to init_loss without fine-tuning)
    seconds: float  # wall time of the whole block: targets, pruning, tuning, propagation
    train_seconds: float = 0.0
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    restored: str | None = None
    holdout_init_loss: float | None = None  # init_loss on the held-out windows only (None: no held-out windows)
    holdout_final_loss: float | None = None  # final_loss on the held-out windows only
    holdout_epoch_losses: list[float] = field(default_factory=list)  # after each epoch, with --patience
    best_epoch: int | None = None  # with --patience: the epoch whose weights were kept (0: none beat the untuned block)


@dataclass
class PruneResult:
    blocks: list[BlockReport]
    masks: PackedMasks  # full module name -> bool keep-mask, packed eight to a byte on the CPU
    seconds: float

    def block_dicts(self) -> list[dict[str, Any]]:
        return [asdict(b) for b in self.blocks]


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


def _losses(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict[str, Any],
            batch_size: int, n_train: int, out: torch.Tensor | None = None,
            dist: DistContext | None = None) -> tuple[float, float | None]:
    """MSE against ``targets`` on all windows and on the held-out ones (``inputs[n_train:]``).

    With ``out``, the block's outputs are written there (it may be ``inputs`` or ``targets``).
    Under torchrun each process runs its share of the windows, and every process gets all outputs.
    """
    n = inputs.shape[0]
    losses = []
    for a, b in _parts(n, n_train):
        loss = _run_shared(block, inputs[a:b], kwargs, batch_size, None if out is None else out[a:b], targets[a:b],
                           dist)
        losses.append((loss, b - a))
    total = sum(loss * count for loss, count in losses) / n
    return total, losses[1][0] if len(losses) > 1 else None


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


def _parts(n: int, n_train: int) -> list[tuple[int, int]]:
    """Training and held-out window ranges; every pass over all windows runs them separately, in order."""
    return [(0, n_train), (n_train, n)] if 0 < n_train < n else [(0, n)]


def _propagate(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int, n_train: int,
               dist: DistContext | None = None) -> None:
    """``hidden <- block(hidden)`` in place, in the same batches as :func:`_losses`."""
    for a, b in _parts(hidden.shape[0], n_train):
        _run_shared(block, hidden[a:b], kwargs, batch_size, hidden[a:b], None, dist)


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


def prune_and_finetune(
    model: nn.Module,
    calib_ids: torch.Tensor,  # [nsamples, seqlen]
    prune: PruneConfig,
    finetune: FinetuneConfig,
    device: torch.device,
    seed: int = 0,
    forward_batch_size: int = 8,
    checkpoint: Checkpoint | None = None,
    dist: DistContext | None = None,
    offload_dir: Path | None = None,
) -> PruneResult:
    """Prune every decoder block of ``model`` in place and repair it with ``finetune.method``.

    With ``checkpoint``, each finished block is committed to it (by rank 0 only, under torchrun),
    and the blocks it already holds are loaded instead of recomputed. With ``offload_dir``, the two
    calibration activation buffers are memory-mapped files in that folder, removed on return.
    """
    start = time.perf_counter()
    blocks = find_blocks(model)
    check_nm_divisible(blocks, prune.nm)
    model.requires_grad_(False)
    pruner = PRUNERS[prune.pruner](sparsity=prune.sparsity, nm=prune.nm, **prune.pruner_options())
    tuner_cls = FINETUNERS[finetune.method]
    tuner = tuner_cls(finetune, seed=seed) if tuner_cls is not None else None
    if tuner is not None:
        tuner.dist = dist
    main = dist is None or dist.is_main
    if finetune.patience is not None and tuner is not None and not tuner.supports_early_stopping:
        raise EbftError(f"--patience does not work with --finetune {finetune.method}; use --finetune ebft")
    nsamples = calib_ids.shape[0]
    n_train = nsamples - holdout_count(nsamples, finetune.holdout_fraction)

    move_non_block_modules(model, blocks, device)
    block_kwargs = capture_block_kwargs(model, blocks, calib_ids[:1])
    reports: list[BlockReport] = []
    masks = PackedMasks()
    first = checkpoint.done if checkpoint is not None else 0
    buffers = ActivationBuffers(offload_dir, prefix=f"rank{dist.rank}" if dist is not None else "activations")
    try:
        if first:
            checkpoint.load_blocks(list(blocks.blocks), [blocks.block_name(i) + "." for i in range(first)], masks)
            reports = [BlockReport(**r) for r in checkpoint.reports]
            hidden = checkpoint.load_hidden()
            if hidden.shape[:2] != calib_ids.shape:
                raise EbftError("the checkpoint's activations do not match the calibration windows; "
                                "pass --overwrite to start over")
            if offload_dir is not None:
                hidden = buffers.new(tuple(hidden.shape), hidden.dtype).copy_(hidden)
            logger.info("resumed after block %d/%d", first, len(blocks))
        else:
            hidden = capture_first_block_inputs(model, blocks, calib_ids, batch_size=forward_batch_size,
                                                alloc=buffers.new)
        targets = buffers.new(tuple(hidden.shape), hidden.dtype)
        logger.info("calibration activations: %s windows x %s tokens x %s features (%.0f MB each, %s), %d held out",
                    *hidden.shape, hidden.numel() * hidden.element_size() / 2**20,
                    "in RAM" if offload_dir is None else f"memory-mapped in {offload_dir}", nsamples - n_train)

        progress = tqdm(range(first, len(blocks)), desc="blocks", disable=None if main else True, initial=first,
                        total=len(blocks))
        for index in progress:
            block_start = time.perf_counter()
            with _seeded(seed, index, device):
                report, hidden, targets = _prune_block(
                    model, blocks, index, hidden, targets, block_kwargs, pruner, tuner, finetune, device, masks,
                    n_train, forward_batch_size, dist,
                )
            report.seconds = time.perf_counter() - block_start
            reports.append(report)
            if checkpoint is not None and main:
                prefix = blocks.block_name(index) + "."
                checkpoint.save_block(index, blocks.blocks[index],
                                      {n: masks[n] for n in masks if n.startswith(prefix)}, hidden, asdict(report))
            progress.set_postfix(block=f"{index + 1}/{len(blocks)}", init=f"{report.init_loss:.4g}",
                                 final=f"{report.final_loss:.4g}")
            logger.info("block %d/%d: loss %.5g -> %.5g in %.1f s%s", index + 1, len(blocks),
                        report.init_loss, report.final_loss, report.seconds,
                        "" if report.holdout_init_loss is None else
                        f" (held out {report.holdout_init_loss:.5g} -> {report.holdout_final_loss:.5g})")
        if not torch.isfinite(hidden).all():
            raise EbftError("the pruned model produces non-finite activations; try a lower --sparsity or --lr")
        del hidden, targets
    finally:
        buffers.close()
    if dist is not None:
        dist.barrier()  # every process has finished every block
    move_non_block_modules(model, blocks, "cpu")
    return PruneResult(reports, masks, time.perf_counter() - start)


def _prune_block(
    model: nn.Module,
    blocks: DecoderBlocks,
    index: int,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    block_kwargs: list[dict[str, Any]],
    pruner: Any,
    tuner: Any,
    finetune: FinetuneConfig,
    device: torch.device,
    masks: PackedMasks,
    n_train: int,
    batch_size: int,
    dist: DistContext | None = None,
) -> tuple[BlockReport, torch.Tensor, torch.Tensor]:
    """Targets, prune, tune, propagate for one block; returns its report and the (swapped) buffers.

    ``masks`` gets the block's final masks; the returned ``hidden`` holds the next block's inputs.
    """
    block = blocks.blocks[index].to(device)
    kwargs = move_to(block_kwargs[index], device)
    linears = blocks.linears(index)
    prefix = blocks.block_name(index) + "."
    with calibration_context(model):
        # 1. dense targets and the pruner's activation statistics, in one pass over every window
        hooks = record_inputs(linears, pruner.add_batch) if pruner.needs_activations else contextlib.nullcontext()
        with hooks:
            run_block(block, hidden, kwargs, batch_size, out=targets)
        # 2. prune
        block_masks = {}
        dense_weights = None
        if tuner is not None and tuner.needs_dense_weights:
            dense_weights = {n[len(prefix):] + ".weight": l.weight.detach().clone() for n, l in linears.items()}
        for name, linear in linears.items():
            mask = pruner.prune(name, linear.weight.data)
            masks[name] = mask
            block_masks[name[len(prefix):] + ".weight"] = mask
        pruner.reset()

    if tuner is None:
        with calibration_context(model):
            # each batch is compared with its targets before its outputs overwrite them
            loss, holdout = _losses(block, hidden, targets, kwargs, batch_size, n_train, out=targets, dist=dist)
        report = BlockReport(index, loss, loss, 0.0, holdout_init_loss=holdout, holdout_final_loss=holdout)
        blocks.blocks[index].to("cpu")
        return report, targets, hidden

    report, hidden, targets = tune_block(model, block, index, hidden, targets, kwargs, tuner, finetune, block_masks,
                                         n_train, batch_size, dist=dist, dense_weights=dense_weights)
    for name in linears:  # mask-refining tuners (DSnoT, ebft-mask) change the masks in place
        masks[name] = block_masks[name[len(prefix):] + ".weight"]
    blocks.blocks[index].to("cpu")
    return report, hidden, targets


def tune_block(
    model: nn.Module,
    block: nn.Module,
    index: int,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    tuner: Any,
    finetune: FinetuneConfig,
    masks: dict[str, torch.Tensor],
    n_train: int,
    batch_size: int,
    dist: DistContext | None = None,
    dense_weights: dict[str, torch.Tensor] | None = None,
) -> tuple[BlockReport, torch.Tensor, torch.Tensor]:
    """Tune a pruned (or shrunken) block towards its targets, keep or restore it, and propagate.

    ``hidden`` holds the block's inputs and ``targets`` the dense block's outputs, for every window;
    the first ``n_train`` windows train it, the rest only judge it (:func:`restore_reason`). A block
    that tuning made worse gets its untuned weights and ``masks`` (which mask-refining tuners change in
    place) back. Returns the report (its ``seconds`` left for the caller) and the swapped buffers: the
    returned ``hidden`` holds the next block's inputs.
    """
    with calibration_context(model):
        untuned = {k: v.detach().clone() for k, v in block.state_dict().items()}
        untuned_masks = {k: v.clone() for k, v in masks.items()}
        init_loss, holdout_init = _losses(block, hidden, targets, kwargs, batch_size, n_train, dist=dist)
    stopper = None
    extra: dict[str, Any] = {}
    if finetune.patience is not None and holdout_init is not None:
        def measure() -> float:
            return run_block(block, hidden[n_train:], kwargs, batch_size, targets=targets[n_train:])

        stopper = EarlyStopping(block, measure, holdout_init, finetune.patience)
        extra["on_epoch_end"] = stopper
    result = tuner.tune(block, hidden[:n_train], targets[:n_train], masks, kwargs, index, dense_weights=dense_weights,
                        **extra)
    if stopper is not None and result.restored is None:
        stopper.keep_best(untuned)
    if dist is not None:  # the processes took the same steps; make them bitwise equal all the same
        dist.broadcast_([*block.state_dict().values(), *masks.values()])
    with calibration_context(model):
        # each batch is compared with its targets before its outputs overwrite them
        final_loss, holdout_final = _losses(block, hidden, targets, kwargs, batch_size, n_train, out=targets,
                                            dist=dist)
        if result.restored is None:
            result.restored = restore_reason(init_loss, final_loss, holdout_init, holdout_final)
        if result.restored is None:
            hidden, targets = targets, hidden  # the tuned outputs are the next block's inputs
        else:
            logger.warning("block %d: %s; restoring its untuned weights", index, result.restored)
            block.load_state_dict(untuned)
            for key, mask in untuned_masks.items():
                masks[key].copy_(mask)
            final_loss, holdout_final = init_loss, holdout_init
            _propagate(block, hidden, kwargs, batch_size, n_train, dist)
    return BlockReport(
        index, init_loss, final_loss, 0.0, result.train_seconds, result.steps, result.losses, result.restored,
        holdout_init_loss=holdout_init, holdout_final_loss=holdout_final,
        holdout_epoch_losses=stopper.losses if stopper is not None else [],
        best_epoch=stopper.best_epoch if stopper is not None else None,
    ), hidden, targets
