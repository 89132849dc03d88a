"""OWL (Yin et al., 2023, arXiv 2310.05175): blocks with more outlier weights are pruned less.

For block ``l``, every weight of its linear layers gets its Wanda score ``|W_ij| * ||X_j||_2`` (dense
weights, the dense model's inputs to the block); the block's outlier ratio ``D_l`` is the share of
those scores above ``M`` times their mean over the block (``M``: ``--owl-threshold``, 5 in the paper).
The ratios are scaled to ``[0, 2λ]`` (``λ``: ``--owl-lambda``, 0.08 in the paper) and block ``l`` is
pruned at ``target - (scaled_l - mean(scaled))``: the sparsities average to the target and span ``2λ``
(none when every block has the same ratio). The pruner then prunes each block at its own sparsity.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ebft.allocation.base import Allocated, Allocation, register_allocation
from ebft.errors import UsageError
from ebft.models.blocks import record_inputs
from ebft.models.blockwise import BlockRunner, StateFor
from ebft.pruners.wanda import WandaPruner
from ebft.settings import check_finite, setting


@dataclass
class OWLOptions:
    """What only ``--allocation owl`` reads."""

    threshold: float = setting(5.0, help="M: a weight is an outlier when its Wanda score is above M times the mean "
                                         "score of its block")
    lam: float = setting(0.08, key="owl_lambda", help="λ: the blocks' sparsities span 2λ around --sparsity")

    def __post_init__(self) -> None:
        check_finite(self.threshold, "--owl-threshold", "a positive number (5 in the paper)", low=0.0, low_open=True)
        check_finite(self.lam, "--owl-lambda", "in [0, 0.5) (0.08 in the paper)", low=0.0, high=0.5)

    def check_target(self, target: float) -> None:
        """Every block's sparsity stays in [0, 1): ``target`` ± 2λ must (the widest the spread can fall)."""
        if target - 2 * self.lam < 0 or target + 2 * self.lam >= 1:
            raise UsageError(f"--allocation owl with --owl-lambda {self.lam:g} prunes blocks at up to --sparsity ± "
                             f"{2 * self.lam:g}, outside [0, 1) for --sparsity {target:g}; use a smaller --owl-lambda")


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """The share of ``scores`` (a block's layers, any shapes) above ``threshold`` times their joint mean."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    bar = threshold * total / count
    return sum(int((s.double() > bar).sum()) for s in scores) / count


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Each block's sparsity from its outlier ratio: ``target - (scaled - mean(scaled))``, ``scaled`` in [0, 2λ]."""
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0.0:
        return [float(target)] * len(ratios)
    scaled = (r - r.min()) / spread * (2 * lam)
    return (target - (scaled - scaled.mean())).tolist()


@register_allocation("owl", options=OWLOptions)
class OWL(Allocation):
    """Outlier-weighted layer-wise sparsity (see the module docstring)."""

    def allocate(self, runner: BlockRunner, ids: torch.Tensor, target: float, dense_state: StateFor) -> Allocated:
        start = time.perf_counter()
        options = self.options
        options.check_target(target)
        ratios: list[float] = []

        @contextlib.contextmanager
        def observe(index: int, block: nn.Module) -> Iterator[None]:
            linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
            stats = WandaPruner(target)
            with record_inputs(linears, stats.add_batch):
                yield
            ratios.append(outlier_ratio([stats.score(n, m.weight) for n, m in linears.items()], options.threshold))

        runner.run(runner.embed(ids), 0, len(runner.blocks), dense_state, observe=observe)
        sparsities = owl_sparsities(ratios, target, options.lam)
        return Allocated(self.name, sparsities, {"outlier_ratios": ratios, "threshold": options.threshold,
                                                  "lambda": options.lam}, time.perf_counter() - start)
