"""Masks from a model another tool pruned: the exact zeros of its decoder-block linear weights.

``--pruner given --given-model SPARSE`` (what ``ebft repair SPARSE --dense DENSE`` runs) walks the dense
model as any run does, so every block's targets are the dense block's outputs, and compresses each
layer to the pruned model's own weights: the mask is where they are not exactly 0.0 and the kept
weights are the pruned model's values (SparseGPT, say, changed them). The block's other parameters
(norm weights, biases) are the pruned model's too, so a model whose norms were tuned after pruning (an
earlier ebft run, say) is repaired from where it stands, not from the dense norms. The mask's pattern (N:M,
the same count in every row, or a layer-wide count) is read from the masks and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ebft.errors import EbftError, UsageError
from ebft.pruners.base import Pruner, register_pruner
from ebft.settings import setting

__all__ = ["GivenOptions", "GivenPruner"]


@dataclass
class GivenOptions:
    """What only ``--pruner given`` reads."""

    model: str = setting("", metavar="SPARSE",
                         help="the pruned model whose zeros are the masks (a local folder of safetensors weights)")

    def __post_init__(self) -> None:
        if not isinstance(self.model, str):
            raise UsageError(f"--given-model must be a path; got {self.model!r}")


@register_pruner("given", options=GivenOptions)
class GivenPruner(Pruner):
    """Takes each layer's weights and mask from the pruned model ``--given-model``."""

    sets_sparsity = False  # the given model's zeros are the sparsity: --sparsity and --nm do not apply

    @classmethod
    def check_run(cls, cfg: Any, config: Any, skeleton: Any) -> None:
        from ebft.repair import check_repair

        if not cfg.prune.options.model:
            raise UsageError("--pruner given needs --given-model SPARSE: the pruned model whose zeros are the masks")
        check_repair(cfg.prune.options.model, cfg.model, config, skeleton)

    def __init__(self, sparsity: float = 0.0, nm: tuple[int, int] | None = None, options: GivenOptions | None = None,
                 **option_values: Any) -> None:
        super().__init__(sparsity, nm, options, **option_values)
        if not self.options.model:
            raise UsageError("--pruner given needs --given-model SPARSE: the pruned model whose zeros are the masks")
        from ebft.models.streaming import CheckpointFiles

        self.files = CheckpointFiles(Path(self.options.model))

    def _given(self, key: str, like: Tensor) -> Tensor:
        """The pruned model's tensor ``key``, on ``like``'s device and in its dtype; refused if absent or shaped
        otherwise."""
        if key not in self.files:
            raise EbftError(f"the pruned model {self.options.model} has no {key}; it does not match the dense model")
        given = self.files.get(key)
        if given.shape != like.shape:
            raise EbftError(f"{key} is {tuple(given.shape)} in the pruned model but {tuple(like.shape)} in the dense "
                            "one; they are not the same architecture")
        return given.to(device=like.device, dtype=like.dtype)

    def prune(self, name: str, weight: Tensor) -> Tensor:
        given = self._given(name + ".weight", weight)
        with torch.no_grad():
            weight.copy_(given)
        return given != 0

    def mask(self, name: str, weight: Tensor) -> Tensor:
        return self.prune(name, weight.detach().clone())

    def finish_block(self, prefix: str, block: Any) -> None:
        """The block's parameters other than its linear weights (norms, biases) from the pruned model."""
        linear_weights = {f"{name}.weight" for name, module in block.named_modules()
                          if isinstance(module, torch.nn.Linear)}
        with torch.no_grad():
            for local, param in block.named_parameters():
                if local not in linear_weights:
                    param.copy_(self._given(prefix + local, param))
