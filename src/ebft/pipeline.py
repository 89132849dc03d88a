"""Prune a model block by block and repair each block before the next one sees its outputs.

For block i, with X the outputs of the already pruned (and tuned) blocks before it:

1. targets = dense_block_i(X); the same pass feeds the pruner its activation statistics;
2. prune block i's linear layers (bool masks, fixed from now on);
3. fine-tune the block's remaining weights so that pruned_block_i(X) matches the targets;
4. X <- tuned_block_i(X), which becomes block i+1's input.

Only one block is on the compute device at a time; activations live on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ebft.capture import calibration_context, capture_block_kwargs, capture_first_block_inputs, move_to
from ebft.config import FinetuneConfig, PruneConfig
from ebft.errors import EbftError
from ebft.finetune import FINETUNERS
from ebft.finetune.base import run_block
from ebft.models.adapter import DecoderBlocks, find_blocks
from ebft.pruners import PRUNERS

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


@dataclass
class PruneResult:
    blocks: list[BlockReport]
    masks: dict[str, torch.Tensor]  # full module name -> bool keep-mask, on the CPU
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


@contextlib.contextmanager
def _collect_activations(linears: dict[str, nn.Linear], pruner) -> Iterator[None]:
    handles = []
    for name, linear in linears.items():
        def hook(module: nn.Module, args: tuple, output: Any, _name: str = name) -> None:
            pruner.add_batch(_name, args[0].detach())

        handles.append(linear.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prune_and_finetune(
    model: nn.Module,
    calib_ids: torch.Tensor,  # [nsamples, seqlen]
    prune: PruneConfig,
    finetune: FinetuneConfig,
    device: torch.device,
    seed: int = 0,
    forward_batch_size: int = 8,
) -> PruneResult:
    """Prune every decoder block of ``model`` in place and repair it with ``finetune.method``."""
    start = time.perf_counter()
    blocks = find_blocks(model)
    check_nm_divisible(blocks, prune.nm)
    model.requires_grad_(False)
    pruner = PRUNERS[prune.pruner](sparsity=prune.sparsity, nm=prune.nm)
    tuner_cls = FINETUNERS[finetune.method]
    tuner = tuner_cls(finetune, seed=seed) if tuner_cls is not None else None

    _move_non_block_modules(model, blocks, device)
    block_kwargs = capture_block_kwargs(model, blocks, calib_ids[:1])
    hidden = capture_first_block_inputs(model, blocks, calib_ids, batch_size=forward_batch_size)
    targets = torch.empty_like(hidden)
    logger.info("calibration activations: %s windows x %s tokens x %s features (%.0f MB each)",
                *hidden.shape, hidden.numel() * hidden.element_size() / 2**20)

    reports: list[BlockReport] = []
    masks: dict[str, torch.Tensor] = {}
    progress = tqdm(range(len(blocks)), desc="blocks", disable=None)
    for index in progress:
        block_start = time.perf_counter()
        block = blocks.blocks[index].to(device)
        kwargs = move_to(block_kwargs[index], device)
        linears = blocks.linears(index)
        with calibration_context(model):
            # 1. dense targets and the pruner's activation statistics, in one pass
            hooks = _collect_activations(linears, pruner) if pruner.needs_activations else contextlib.nullcontext()
            with hooks:
                run_block(block, hidden, kwargs, forward_batch_size, out=targets)
            # 2. prune
            block_masks = {}
            prefix = blocks.block_name(index) + "."
            dense_weights = None
            if tuner is not None and tuner.needs_dense_weights:
                dense_weights = {n[len(prefix):] + ".weight": l.weight.detach().clone() for n, l in linears.items()}
            for name, linear in linears.items():
                mask = pruner.prune(name, linear.weight.data)
                masks[name] = mask.cpu()
                block_masks[name[len(prefix):] + ".weight"] = mask
            pruner.reset()

        if tuner is None:
            with calibration_context(model):
                # each batch is compared with its targets before its outputs overwrite them
                loss = run_block(block, hidden, kwargs, forward_batch_size, out=targets, targets=targets)
            hidden, targets = targets, hidden
            report = BlockReport(index, loss, loss, 0.0)
        else:
            with calibration_context(model):
                untuned = {k: v.detach().clone() for k, v in block.state_dict().items()}
                untuned_masks = {k: v.clone() for k, v in block_masks.items()}
                init_loss = run_block(block, hidden, kwargs, forward_batch_size, targets=targets)
            result = tuner.tune(block, hidden, targets, block_masks, kwargs, index, dense_weights=dense_weights)
            with calibration_context(model):
                # each batch is compared with its targets before its outputs overwrite them
                final_loss = run_block(block, hidden, kwargs, forward_batch_size, out=targets, targets=targets)
                if result.restored is None and not final_loss < init_loss:
                    result.restored = f"tuning did not lower the loss ({final_loss:.4g} >= {init_loss:.4g})"
                if result.restored is None:
                    hidden, targets = targets, hidden  # the tuned outputs are the next block's inputs
                else:
                    logger.warning("block %d: %s; restoring its untuned pruned weights", index, result.restored)
                    block.load_state_dict(untuned)
                    for key, mask in untuned_masks.items():
                        block_masks[key].copy_(mask)
                    final_loss = init_loss
                    run_block(block, hidden, kwargs, forward_batch_size, out=hidden)
            for name in linears:  # mask-refining tuners (DSnoT, ebft-mask) change the masks in place
                masks[name] = block_masks[name[len(prefix):] + ".weight"].cpu()
            report = BlockReport(
                index, init_loss, final_loss, 0.0, result.train_seconds, result.steps,
                result.losses, result.restored,
            )
        blocks.blocks[index].to("cpu")
        report.seconds = time.perf_counter() - block_start
        reports.append(report)
        progress.set_postfix(block=f"{index + 1}/{len(blocks)}", init=f"{report.init_loss:.4g}",
                             final=f"{report.final_loss:.4g}")
        logger.info("block %d/%d: loss %.5g -> %.5g in %.1f s", index + 1, len(blocks),
                    report.init_loss, report.final_loss, report.seconds)
    if not torch.isfinite(hidden).all():
        raise EbftError("the pruned model produces non-finite activations; try a lower --sparsity or --lr")
    _move_non_block_modules(model, blocks, "cpu")
    return PruneResult(reports, masks, time.perf_counter() - start)


def _move_non_block_modules(model: nn.Module, blocks: DecoderBlocks, device: torch.device | str) -> None:
    """Move everything except the decoder blocks (embeddings, rotary tables, norm, head)."""
    block_params = {id(p) for p in blocks.blocks.parameters()}
    block_buffers = {id(b) for b in blocks.blocks.buffers()}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in block_params and param.device != torch.device(device):
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if id(buf) not in block_buffers and buf.device != torch.device(device):
                module._buffers[name] = buf.to(device)
