"""The block walk for structured pruning (``ebft prune --structured RATIO``).

For block i, with X the outputs of the already shrunken (and tuned) blocks before it:

1. targets = dense_block_i(X); the same pass records the variance of every input channel of
   ``o_proj`` and ``down_proj`` (the importance statistics, see :mod:`ebft.structured`);
2. score heads and channels, keep the plan's number of each (chosen per block), and replace the
   block's linear layers by smaller ones;
3. fine-tune every remaining parameter of the shrunken block (the EBFT tuner with all-True masks)
   on the training windows so that its outputs match the dense targets; the held-out guard and
   ``--patience`` work as in :mod:`ebft.pipeline`;
4. X <- tuned_block_i(X), block i+1's input.

The block's widths are the same for every block (:func:`ebft.structured.plan_structure`), and the
model config is updated at the end, so the saved model loads with plain ``from_pretrained``.
With a checkpoint, a resumed run first gives the finished blocks the plan's shapes and then loads
their saved weights.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ebft.capture import calibration_context, capture_block_kwargs, capture_first_block_inputs
from ebft.config import FinetuneConfig, PruneConfig
from ebft.errors import EbftError, UsageError
from ebft.finetune import FINETUNERS
from ebft.models.adapter import DecoderBlocks, find_blocks
from ebft.models.blocks import move_non_block_modules, move_to, record_inputs, run_block
from ebft.pipeline import BlockReport, PruneResult, _losses, _seeded, holdout_count, tune_block
from ebft.sparsity import PackedMasks
from ebft.structured import (
    ChannelStats,
    StructuredPlan,
    apply_to_config,
    block_layout,
    block_parts,
    channel_scores,
    check_model_type,
    config_accepts,
    head_scores,
    plan_structure,
    select_channels,
    select_heads,
    shrink_block,
    shrink_to_plan,
)

if TYPE_CHECKING:
    from ebft.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

#: Block repair methods that make sense on a shrunken block (mask-refining methods have no masks to refine).
STRUCTURED_FINETUNERS = ("none", "ebft", "lora")


@dataclass
class StructuredBlockReport(BlockReport):
    kept_heads: list[int] = field(default_factory=list)  # original query-head indices, in their new order
    kept_kv_heads: list[int] = field(default_factory=list)


@dataclass
class StructuredResult(PruneResult):
    summary: dict[str, Any] = field(default_factory=dict)  # the plan, parameter counts, score


def make_plan(model: nn.Module, prune: PruneConfig) -> StructuredPlan:
    """The plan for ``model`` (its first block's widths) at ``prune.structured``."""
    check_model_type(getattr(model.config, "model_type", None))
    blocks = find_blocks(model)
    return plan_structure(block_layout(blocks.blocks[0], model.config), prune.structured, config_accepts(model.config))


def check_structured_run(prune: PruneConfig, finetune_method: str, model: nn.Module | None, config: Any) -> None:
    """Everything about a ``--structured`` run that can fail before loading weights."""
    if prune.structured is None:
        return
    if finetune_method not in STRUCTURED_FINETUNERS:
        raise UsageError(f"--finetune {finetune_method} refines pruning masks; with --structured use "
                         f"--finetune {', '.join(STRUCTURED_FINETUNERS)}")
    check_model_type(getattr(config, "model_type", None))
    if model is not None:
        plan = make_plan(model, prune)
        logger.info("structured plan: %d/%d heads, %d/%d kv heads, %d/%d channels; removes %.4f of the blocks' "
                    "linear parameters (asked %.4f)", plan.heads, plan.layout.num_heads, plan.kv_heads,
                    plan.layout.num_kv_heads, plan.intermediate, plan.layout.intermediate, plan.achieved,
                    plan.ratio)


def structured_prune_and_finetune(
    model: nn.Module,
    calib_ids: torch.Tensor,  # [nsamples, seqlen]
    prune: PruneConfig,
    finetune: FinetuneConfig,
    device: torch.device,
    seed: int = 0,
    forward_batch_size: int = 8,
    checkpoint: Checkpoint | None = None,
) -> StructuredResult:
    """Shrink every decoder block of ``model`` in place to ``prune.structured`` and repair it with
    ``finetune.method`` (``none`` or ``ebft``; LoRA runs afterwards on the whole model)."""
    start = time.perf_counter()
    if prune.structured is None:
        raise ValueError("structured_prune_and_finetune needs prune.structured")
    if finetune.method not in ("none", "ebft"):
        raise UsageError(f"--finetune {finetune.method} does not work block by block with --structured; "
                         "use none or ebft (lora runs after the walk)")
    blocks = find_blocks(model)
    plan = make_plan(model, prune)
    params_before = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    tuner_cls = FINETUNERS[finetune.method]
    tuner = tuner_cls(finetune, seed=seed) if tuner_cls is not None else None
    nsamples = calib_ids.shape[0]
    n_train = nsamples - holdout_count(nsamples, finetune.holdout_fraction)
    logger.info("structured: every block keeps %d/%d query heads (%d per group), %d/%d key/value heads and %d/%d "
                "MLP channels: %.4f of the blocks' linear parameters removed (asked %.4f), score %s",
                plan.heads, plan.layout.num_heads, plan.heads_per_group, plan.kv_heads, plan.layout.num_kv_heads,
                plan.intermediate, plan.layout.intermediate, plan.achieved, plan.ratio, prune.structured_score)

    move_non_block_modules(model, blocks, device)
    block_kwargs = capture_block_kwargs(model, blocks, calib_ids[:1])
    reports: list[StructuredBlockReport] = []
    first = checkpoint.done if checkpoint is not None else 0
    if first:
        for index in range(first):
            shrink_to_plan(blocks.blocks[index], plan)
        checkpoint.load_blocks(list(blocks.blocks), [blocks.block_name(i) + "." for i in range(first)])
        reports = [StructuredBlockReport(**r) for r in checkpoint.reports]
        hidden = checkpoint.load_hidden()
        if hidden.shape[:2] != calib_ids.shape:
            raise EbftError("the checkpoint's activations do not match the calibration windows; "
                            "pass --overwrite to start over")
        logger.info("resumed after block %d/%d", first, len(blocks))
    else:
        hidden = capture_first_block_inputs(model, blocks, calib_ids, batch_size=forward_batch_size)
    targets = torch.empty_like(hidden)

    progress = tqdm(range(first, len(blocks)), desc="blocks", disable=None, initial=first, total=len(blocks))
    for index in progress:
        block_start = time.perf_counter()
        with _seeded(seed, index, device):
            report, hidden, targets = _shrink_block(model, blocks, index, hidden, targets, block_kwargs, plan,
                                                    prune.structured_score, tuner, finetune, device, n_train,
                                                    forward_batch_size)
        report.seconds = time.perf_counter() - block_start
        reports.append(report)
        if checkpoint is not None:
            checkpoint.save_block(index, blocks.blocks[index], {}, hidden, asdict(report))
        progress.set_postfix(block=f"{index + 1}/{len(blocks)}", init=f"{report.init_loss:.4g}",
                             final=f"{report.final_loss:.4g}")
        logger.info("block %d/%d: heads %s; loss %.5g -> %.5g in %.1f s%s", index + 1, len(blocks),
                    report.kept_heads, report.init_loss, report.final_loss, report.seconds,
                    "" if report.holdout_init_loss is None else
                    f" (held out {report.holdout_init_loss:.5g} -> {report.holdout_final_loss:.5g})")
    if not torch.isfinite(hidden).all():
        raise EbftError("the pruned model produces non-finite activations; try a lower --structured or --lr")
    move_non_block_modules(model, blocks, "cpu")
    apply_to_config(model.config, plan)
    params_after = sum(p.numel() for p in model.parameters())
    summary = {**plan.to_dict(), "score": prune.structured_score,
               "parameters_before": params_before, "parameters_after": params_after,
               "parameters_removed_fraction": 1 - params_after / params_before}
    logger.info("structured: %d -> %d parameters (whole model, %.2f%% fewer); blocks' linear layers %.4f removed",
                params_before, params_after, 100 * summary["parameters_removed_fraction"], plan.achieved)
    masks = PackedMasks()
    for name, linear in blocks.all_linears().items():
        masks[name] = torch.ones(linear.weight.shape, dtype=torch.bool)
    return StructuredResult(reports, masks, time.perf_counter() - start, summary=summary)  # type: ignore[arg-type]


def _shrink_block(
    model: nn.Module,
    blocks: DecoderBlocks,
    index: int,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    block_kwargs: list[dict[str, Any]],
    plan: StructuredPlan,
    score: str,
    tuner: Any,
    finetune: FinetuneConfig,
    device: torch.device,
    n_train: int,
    batch_size: int,
) -> tuple[StructuredBlockReport, torch.Tensor, torch.Tensor]:
    """Targets + statistics, shrink, tune, propagate for one block; returns its report and the swapped buffers."""
    block = blocks.blocks[index].to(device)
    kwargs = move_to(block_kwargs[index], device)
    attn, mlp = block_parts(block)
    lay = plan.layout
    with calibration_context(model):
        # 1. dense targets and the input statistics of o_proj and down_proj, in one pass
        modules = {"o_proj": attn.o_proj, "down_proj": mlp.down_proj}
        stats = {name: ChannelStats(m.in_features) for name, m in modules.items()} if score == "fluctuation" else {}
        with record_inputs(modules, lambda name, x: stats[name].add(x)) if stats else contextlib.nullcontext():
            run_block(block, hidden, kwargs, batch_size, out=targets)
        # 2. score, select, shrink
        variance = {name: s.variance() for name, s in stats.items()}
        heads = head_scores(channel_scores(attn.o_proj.weight, variance.get("o_proj")), lay.num_heads)
        channels = channel_scores(mlp.down_proj.weight, variance.get("down_proj"))
        kept_q, kept_kv = select_heads(heads, lay.num_kv_heads, plan.kv_heads, plan.heads_per_group)
        shrink_block(block, lay, kept_q, kept_kv, select_channels(channels, plan.intermediate))

    report = StructuredBlockReport(index, 0.0, 0.0, 0.0, kept_heads=kept_q, kept_kv_heads=kept_kv)
    if tuner is None:
        with calibration_context(model):
            loss, holdout = _losses(block, hidden, targets, kwargs, batch_size, n_train, out=targets)
        report.init_loss = report.final_loss = loss
        report.holdout_init_loss = report.holdout_final_loss = holdout
        blocks.blocks[index].to("cpu")
        return report, targets, hidden

    masks = {name + ".weight": torch.ones_like(m.weight, dtype=torch.bool)
             for name, m in block.named_modules() if isinstance(m, nn.Linear)}  # every remaining weight is tuned
    tuned, hidden, targets = tune_block(model, block, index, hidden, targets, kwargs, tuner, finetune, masks, n_train,
                                        batch_size)
    report = StructuredBlockReport(**vars(tuned), kept_heads=kept_q, kept_kv_heads=kept_kv)
    blocks.blocks[index].to("cpu")
    return report, hidden, targets
