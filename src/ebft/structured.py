"""Structured pruning: physically remove whole attention heads and MLP channels from decoder blocks.

What a block loses (every block the same widths, so the saved model has one uniform config that
plain ``AutoModelForCausalLM.from_pretrained`` reads; *which* heads and channels go is chosen per
block by importance):

- **MLP channels**: channel ``j`` is row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j`` of
  ``down_proj``;
- **query heads**: head ``h`` is rows ``h*d:(h+1)*d`` of ``q_proj`` (and of its bias) and the same
  columns of ``o_proj`` (``d`` = head_dim, which never changes);
- **key/value groups** under grouped-query attention: key/value head ``k`` serves query heads
  ``k*g .. k*g+g-1`` (``g`` = heads per group). A key/value head only ever goes together with
  its whole query group, and inside the groups that stay, every group keeps the same number of
  query heads, so ``num_attention_heads`` stays a multiple of ``num_key_value_heads``.

**Allocation** (:func:`plan_structure`), decided from the widths alone before any block is seen:
the requested ratio ``R`` counts the weights and biases of the blocks' linear layers. Every way to
shrink attention (keep ``kv`` of the key/value groups and ``q`` query heads in each) is tried; for
each, the MLP loses however many channels bring the block closest to ``R``. Among the options whose
MLP part is feasible, the one whose attention and MLP lose the most similar fractions wins (ties:
the one closer to ``R``, then the one that keeps more attention). On SmolLM2-135M at ``R = 0.25``
that is exactly 25% of each: 2 of 3 query heads per group (6/9 heads, 3/3 KV heads) and
1152/1536 channels.

**Importance** (:func:`channel_scores`), from the calibration activations of the dense block,
collected in the same pass that computes the block's targets:

- ``fluctuation`` (FLAP, An et al. 2024): for input channel ``j`` of ``o_proj`` or ``down_proj``,
  the variance of ``x_j`` over all calibration tokens times ``||W[:, j]||^2``. A channel whose
  input barely varies contributes nearly a constant to the output, so removing it costs little;
- ``magnitude``: ``||W[:, j]||^2`` alone (no activations).

A head's score is the sum of its ``head_dim`` channels' scores, a key/value group's the sum of its
query heads' scores. FLAP's bias compensation (adding the removed channels' mean contribution to a
bias) is not done: the models have no ``o_proj``/``down_proj`` bias to put it in, and EBFT retunes
the block afterwards anyway.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ebft.errors import EbftError, UsageError
from ebft.models.blocks import record_inputs
from ebft.sparsity import keep_top
from ebft.walk import Compression, Compressor

logger = logging.getLogger(__name__)

#: Families whose blocks have self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj, tested end to end.
STRUCTURED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
SCORES = ("fluctuation", "magnitude")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def check_model_type(model_type: str | None) -> None:
    if model_type not in STRUCTURED_MODEL_TYPES:
        raise EbftError(f"--structured does not support model type {model_type!r}; it supports: "
                        f"{', '.join(STRUCTURED_MODEL_TYPES)}")


def block_parts(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The attention and MLP modules of a decoder block, checked to have the expected linear layers."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    for part, names, label in ((attn, _ATTN, "self_attn"), (mlp, _MLP, "mlp")):
        if part is None or not all(isinstance(getattr(part, n, None), nn.Linear) for n in names):
            raise EbftError(f"--structured needs decoder blocks with {label}.{{{','.join(names)}}} linear layers; "
                            f"{type(block).__name__} has a different layout")
    return attn, mlp  # type: ignore[return-value]


def _params(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


@dataclass(frozen=True)
class BlockLayout:
    """The widths of a decoder block and how many parameters one removed unit takes with it."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    q_head_params: int  # one query head: head_dim rows of q_proj (+ bias), head_dim columns of o_proj
    kv_head_params: int  # one key/value head: head_dim rows of k_proj and of v_proj (+ biases)
    channel_params: int  # one MLP channel: a row of gate_proj and up_proj (+ biases), a column of down_proj
    attention_params: int  # all four attention linears, weights and biases
    mlp_params: int  # all three MLP linears, weights and biases

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def params(self) -> int:
        return self.attention_params + self.mlp_params


def block_layout(block: nn.Module, config: Any) -> BlockLayout:
    """Read the widths from one block's linear layers (works on the meta device too)."""
    attn, mlp = block_parts(block)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    q, k, v, o = (getattr(attn, n) for n in _ATTN)
    gate, up, down = (getattr(mlp, n) for n in _MLP)
    if heads % kv_heads or q.out_features % heads:
        raise EbftError(f"--structured: {heads} attention heads do not split into {kv_heads} key/value groups "
                        f"of equal width")
    head_dim = q.out_features // heads
    if k.out_features != kv_heads * head_dim or v.out_features != kv_heads * head_dim or o.in_features != q.out_features:
        raise EbftError("--structured: the attention projections' widths do not match the config's head counts")
    if down.in_features != gate.out_features or up.out_features != gate.out_features:
        raise EbftError("--structured: the MLP projections' widths do not match each other")

    def per_row(linear: nn.Linear) -> int:
        return linear.in_features + (1 if linear.bias is not None else 0)

    return BlockLayout(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=gate.out_features,
        q_head_params=head_dim * (per_row(q) + o.out_features),
        kv_head_params=head_dim * (per_row(k) + per_row(v)),
        channel_params=per_row(gate) + per_row(up) + down.out_features,
        attention_params=sum(_params(m) for m in (q, k, v, o)),
        mlp_params=sum(_params(m) for m in (gate, up, down)),
    )


@dataclass(frozen=True)
class StructuredPlan:
    """How many heads, key/value heads and channels every block keeps."""

    ratio: float  # requested fraction of the blocks' linear parameters to remove
    kv_heads: int  # key/value heads (= groups) kept
    heads_per_group: int  # query heads kept in each kept group
    intermediate: int  # MLP channels kept
    layout: BlockLayout

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group

    @property
    def attention_removed(self) -> int:
        lay = self.layout
        return (lay.num_heads - self.heads) * lay.q_head_params + (lay.num_kv_heads - self.kv_heads) * lay.kv_head_params

    @property
    def mlp_removed(self) -> int:
        return (self.layout.intermediate - self.intermediate) * self.layout.channel_params

    @property
    def achieved(self) -> float:
        """The fraction of the blocks' linear parameters actually removed."""
        return (self.attention_removed + self.mlp_removed) / self.layout.params

    def to_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "requested": self.ratio,
            "achieved": self.achieved,
            "block_linear_params_before": lay.params,
            "block_linear_params_after": lay.params - self.attention_removed - self.mlp_removed,
            "heads": [lay.num_heads, self.heads],
            "kv_heads": [lay.num_kv_heads, self.kv_heads],
            "intermediate": [lay.intermediate, self.intermediate],
            "head_dim": lay.head_dim,
            "attention_removed_fraction": self.attention_removed / lay.attention_params,
            "mlp_removed_fraction": self.mlp_removed / lay.mlp_params,
            "layout": asdict(lay),
        }


def config_accepts(config: Any) -> Callable[[StructuredPlan], bool]:
    """Whether the model's config class accepts a plan's widths (transformers validates configs on
    load; Llama's, for one, wants ``hidden_size`` divisible by ``num_attention_heads``)."""

    def accepts(plan: StructuredPlan) -> bool:
        trial = copy.deepcopy(config)
        apply_to_config(trial, plan)
        validate = getattr(trial, "validate", None)
        if validate is None:
            return True
        try:
            validate()
        except Exception:  # noqa: BLE001 - any validation failure rules the option out
            return False
        return True

    return accepts


def plan_structure(layout: BlockLayout, ratio: float,
                   accepts: Callable[[StructuredPlan], bool] | None = None) -> StructuredPlan:
    """The attention/MLP split that reaches ``ratio`` (see the module docstring for the rule).

    ``accepts`` rules out widths the model's config would refuse (see :func:`config_accepts`).
    """
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise UsageError(f"--structured must be in [0, 1) (0.25 removes a quarter of the blocks' parameters); "
                         f"got {ratio!r}")
    target = ratio * layout.params
    options = []
    for kv in range(1, layout.num_kv_heads + 1):
        for per_group in range(1, layout.group_size + 1):
            plan = StructuredPlan(ratio, kv, per_group, layout.intermediate, layout)
            channels = round((target - plan.attention_removed) / layout.channel_params)
            if not 0 <= channels <= layout.intermediate - 1:
                continue
            plan = StructuredPlan(ratio, kv, per_group, layout.intermediate - channels, layout)
            if accepts is not None and not accepts(plan):
                continue
            att = plan.attention_removed / layout.attention_params
            mlp = plan.mlp_removed / layout.mlp_params
            options.append(((abs(att - mlp), abs(plan.achieved - ratio), att), plan))
    if not options:
        most = StructuredPlan(ratio, 1, 1, 1, layout).achieved
        raise UsageError(f"--structured {ratio:g} cannot be reached with this model's head counts; at most "
                         f"{most:.4f} of the blocks' parameters can be removed (one head and one MLP channel left)")
    return min(options, key=lambda o: o[0])[1]


# ----------------------------------------------------------------------------- importance


class ChannelStats:
    """Running count, sum and sum of squares (float64) of each input channel of a linear layer."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sumsq = torch.zeros(width, dtype=torch.float64)

    def add(self, x: Tensor) -> None:  # x: [..., width]
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.pow(2).sum(0)

    def variance(self) -> Tensor:
        """Sample variance over every token seen: [width], float64."""
        if self.count < 2:
            raise ValueError("ChannelStats.variance needs at least two tokens")
        mean = self.sum / self.count
        return ((self.sumsq - self.count * mean.pow(2)) / (self.count - 1)).clamp_min(0.0)


def channel_scores(weight: Tensor, variance: Tensor | None) -> Tensor:
    """Importance of each input channel of a linear layer with ``weight`` [out, in]: [in], float64.

    ``variance`` (the channel's input variance over the calibration tokens) gives FLAP's
    fluctuation ``var_j * ||W[:, j]||^2``; ``None`` gives the magnitude score ``||W[:, j]||^2``.
    """
    norms = weight.detach().to("cpu", torch.float64).pow(2).sum(0)
    return norms if variance is None else norms * variance.to(torch.float64)


def head_scores(scores: Tensor, num_heads: int) -> Tensor:
    """Per-head sums of the channel scores of ``o_proj``'s inputs: [num_heads]."""
    return scores.reshape(num_heads, -1).sum(1)


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores in ascending index order (ties keep the lower index)."""
    return keep_top(scores, k, ties="earlier").nonzero().flatten().tolist()


def select_heads(scores: Tensor, num_kv_heads: int, kv_keep: int, per_group_keep: int) -> tuple[list[int], list[int]]:
    """Which query heads and key/value heads stay, from per-query-head ``scores``.

    The ``kv_keep`` groups with the highest summed scores stay; in each, the ``per_group_keep``
    best query heads. Returns (query heads, key/value heads), both in their original order.
    """
    groups = scores.reshape(num_kv_heads, -1)  # [kv, group_size]
    size = groups.shape[1]
    kept_kv = _top(groups.sum(1), kv_keep)
    kept_q = [kv * size + h for kv in kept_kv for h in _top(groups[kv], per_group_keep)]
    return kept_q, kept_kv


def select_channels(scores: Tensor, keep: int) -> list[int]:
    return _top(scores, keep)


# ----------------------------------------------------------------------------- surgery


def _slice_linear(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``linear``'s weight rows ``rows`` and columns ``cols`` (bias follows rows)."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = bias.index_select(0, rows.to(weight.device)) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.requires_grad_(linear.weight.requires_grad)
    new.train(linear.training)
    return new


def _head_rows(heads: list[int], head_dim: int) -> Tensor:
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def shrink_block(block: nn.Module, layout: BlockLayout, kept_q: list[int], kept_kv: list[int],
                 kept_channels: list[int]) -> None:
    """Replace the block's attention and MLP linears by ones holding only the kept heads and channels.

    ``kept_q`` must list, for each kept key/value head in order, the kept query heads of its group
    (as :func:`select_heads` returns them), so that new query head ``i`` reads key/value head
    ``i // heads_per_group``.
    """
    attn, mlp = block_parts(block)
    if not kept_kv or len(kept_q) % len(kept_kv):
        raise ValueError("every kept key/value group must keep the same number of query heads")
    per_group = len(kept_q) // len(kept_kv)
    for i, head in enumerate(kept_q):
        if head // layout.group_size != kept_kv[i // per_group]:
            raise ValueError(f"query head {head} is not in key/value group {kept_kv[i // per_group]}")
    q_rows = _head_rows(kept_q, layout.head_dim)
    kv_rows = _head_rows(kept_kv, layout.head_dim)
    channels = torch.tensor(kept_channels, dtype=torch.long)
    attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
    attn.num_key_value_groups = per_group  # read by the attention kernels (repeat_kv / enable_gqa)
    for name, value in (("num_heads", len(kept_q)), ("num_key_value_heads", len(kept_kv))):
        if hasattr(attn, name):  # older transformers keep these on the module
            setattr(attn, name, value)
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=channels)
    mlp.up_proj = _slice_linear(mlp.up_proj, rows=channels)
    mlp.down_proj = _slice_linear(mlp.down_proj, cols=channels)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept_channels)


def shrink_to_plan(block: nn.Module, plan: StructuredPlan) -> None:
    """Give ``block`` the plan's shapes, keeping the first heads and channels (before loading saved weights)."""
    lay = plan.layout
    kept_kv = list(range(plan.kv_heads))
    kept_q = [kv * lay.group_size + h for kv in kept_kv for h in range(plan.heads_per_group)]
    shrink_block(block, lay, kept_q, kept_kv, list(range(plan.intermediate)))


def apply_to_config(config: Any, plan: StructuredPlan) -> None:
    """Write the plan's widths into the model config (head_dim explicitly: it no longer is hidden/heads)."""
    config.num_attention_heads = plan.heads
    config.num_key_value_heads = plan.kv_heads
    config.intermediate_size = plan.intermediate
    config.head_dim = plan.layout.head_dim


# ----------------------------------------------------------------------------- the walk's compressor


def make_plan(model: nn.Module, ratio: float) -> StructuredPlan:
    """The plan for ``model`` (its first block's widths; a model on the meta device will do) at ``ratio``."""
    from ebft.models.adapter import find_blocks

    check_model_type(getattr(model.config, "model_type", None))
    blocks = find_blocks(model)
    return plan_structure(block_layout(blocks.blocks[0], model.config), ratio, config_accepts(model.config))


def check_tuner(method: str) -> None:
    """Refuse a mask-refining fine-tuner: a structured walk leaves no masks to refine."""
    from ebft.finetune import FINETUNERS

    if getattr(FINETUNERS[method], "refines_masks", False):
        usable = [name for name, cls in FINETUNERS.items() if not getattr(cls, "refines_masks", False)]
        raise UsageError(f"--finetune {method} refines pruning masks; with --structured use "
                         f"--finetune {', '.join(sorted(usable))}")


def check_structured_run(ratio: float, finetune_method: str, model: nn.Module | None, config: Any) -> None:
    """Everything about a ``--structured`` run that can fail before loading weights (``model``: a skeleton)."""
    check_tuner(finetune_method)
    check_model_type(getattr(config, "model_type", None))
    if model is not None:
        plan = make_plan(model, ratio)
        logger.info("structured plan: %d/%d heads, %d/%d kv heads, %d/%d channels; removes %.4f of the blocks' "
                    "linear parameters (asked %.4f)", plan.heads, plan.layout.num_heads, plan.kv_heads,
                    plan.layout.num_kv_heads, plan.intermediate, plan.layout.intermediate, plan.achieved,
                    plan.ratio)


class StructuredCompressor(Compressor):
    """Shrinks every block to the plan's widths, keeping the heads and channels its own statistics rank highest.

    The dense pass records the variance of every input channel of ``o_proj`` and ``down_proj``
    (``fluctuation``); the block's linear layers are then replaced by smaller ones, every weight of
    which stays trainable (all-True masks). After the walk the model config gets the new widths, so
    the saved model loads with plain ``from_pretrained``.
    """

    def __init__(self, model: nn.Module, ratio: float, score: str = "fluctuation") -> None:
        if score not in SCORES:
            raise UsageError(f"--structured-score {score!r} is unknown; choose one of: {', '.join(SCORES)}")
        self.plan = make_plan(model, ratio)
        self.score = score
        self.params_before = sum(p.numel() for p in model.parameters())
        self._stats: dict[str, ChannelStats] = {}
        plan = self.plan
        logger.info("structured: every block keeps %d/%d query heads (%d per group), %d/%d key/value heads and %d/%d "
                    "MLP channels: %.4f of the blocks' linear parameters removed (asked %.4f), score %s",
                    plan.heads, plan.layout.num_heads, plan.heads_per_group, plan.kv_heads, plan.layout.num_kv_heads,
                    plan.intermediate, plan.layout.intermediate, plan.achieved, plan.ratio, score)

    def check_tuner(self, method: str) -> None:
        check_tuner(method)

    def observe(self, block: nn.Module, index: int, blocks: Any) -> contextlib.AbstractContextManager:
        if self.score != "fluctuation":
            return contextlib.nullcontext()
        attn, mlp = block_parts(block)
        modules = {"o_proj": attn.o_proj, "down_proj": mlp.down_proj}
        self._stats = {name: ChannelStats(m.in_features) for name, m in modules.items()}
        return record_inputs(modules, lambda name, x: self._stats[name].add(x))

    def compress(self, block: nn.Module, index: int, blocks: Any) -> Compression:
        attn, mlp = block_parts(block)
        lay, plan = self.plan.layout, self.plan
        variance = {name: s.variance() for name, s in self._stats.items()}
        self._stats = {}
        heads = head_scores(channel_scores(attn.o_proj.weight, variance.get("o_proj")), lay.num_heads)
        channels = channel_scores(mlp.down_proj.weight, variance.get("down_proj"))
        kept_q, kept_kv = select_heads(heads, lay.num_kv_heads, plan.kv_heads, plan.heads_per_group)
        shrink_block(block, lay, kept_q, kept_kv, select_channels(channels, plan.intermediate))
        masks = {name + ".weight": torch.ones_like(m.weight, dtype=torch.bool)  # every remaining weight is tuned
                 for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        return Compression(masks, {"kept_heads": kept_q, "kept_kv_heads": kept_kv})

    def reshape(self, block: nn.Module, index: int) -> None:
        shrink_to_plan(block, self.plan)

    def finish(self, model: nn.Module, blocks: Any) -> dict[str, Any]:
        apply_to_config(model.config, self.plan)
        params_after = sum(p.numel() for p in model.parameters())
        summary = {**self.plan.to_dict(), "score": self.score, "parameters_before": self.params_before,
                   "parameters_after": params_after, "parameters_removed_fraction": 1 - params_after / self.params_before}
        logger.info("structured: %d -> %d parameters (whole model, %.2f%% fewer); blocks' linear layers %.4f removed",
                    self.params_before, params_after, 100 * summary["parameters_removed_fraction"], self.plan.achieved)
        return summary
