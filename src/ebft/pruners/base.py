"""The pruner interface and the registry that names pruners for ``--pruner``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from ebft.errors import UsageError
from ebft.registry import registrar
from ebft.sparsity import nm_mask, unstructured_mask

PRUNERS: dict[str, type[Pruner]] = {}

P = TypeVar("P", bound="type[Pruner]")


class Pruner:
    """Scores the linear layers of one decoder block and turns scores into keep-masks.

    The walk feeds each layer's inputs to :meth:`add_batch` (from a forward hook), then
    calls :meth:`mask` per layer, then :meth:`reset` before the next block.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type | None] = None  # set by @register_pruner
    needs_activations: ClassVar[bool] = False
    per_row: ClassVar[bool] = False  # unstructured comparison group: each output row, or the whole layer
    sets_sparsity: ClassVar[bool] = True  # False: the masks come from elsewhere (--sparsity and --nm do not apply)

    def __init__(self, sparsity: float, nm: tuple[int, int] | None = None, options: Any = None,
                 **option_values: Any) -> None:
        """``options`` (an instance of :attr:`Options`) or ``option_values`` (its fields by name) set the
        pruner's own options; those not given take their defaults."""
        if nm is None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity <= 1.0):
            raise UsageError(f"--sparsity must be in [0, 1]; got {sparsity!r}")
        self.sparsity = float(sparsity)
        self.nm = tuple(nm) if nm is not None else None
        if self.Options is None:
            if options is not None or option_values:
                raise TypeError(f"pruner {self.name!r} takes no options")
            self.options = None
        else:
            base = options if options is not None else self.Options()
            self.options = dataclasses.replace(base, **option_values) if option_values else base

    @classmethod
    def check_run(cls, cfg: Any, config: Any, skeleton: Any) -> None:
        """Before any weight loads: fail in one line if the run (a RunConfig; the model's config and meta
        skeleton) cannot work with this pruner. Nothing to check by default."""

    def add_batch(self, name: str, inputs: Tensor) -> None:
        """Record ``inputs`` [..., in_features] seen by layer ``name``; no-op unless overridden."""

    def score(self, name: str, weight: Tensor) -> Tensor:
        """Importance of every weight of layer ``name``, [out, in] float32; higher is kept."""
        raise NotImplementedError

    def mask(self, name: str, weight: Tensor) -> Tensor:
        """Keep-mask for layer ``name``: N:M if configured, else unstructured at ``sparsity``."""
        scores = self.score(name, weight)
        if self.nm is not None:
            n, m = self.nm
            return nm_mask(scores, n, m, name=name)
        return unstructured_mask(scores, self.sparsity, per_row=self.per_row)

    def prune(self, name: str, weight: Tensor) -> Tensor:
        """Prune layer ``name`` in place and return its keep-mask.

        The default zeroes what :meth:`mask` drops; pruners that also update the kept weights
        (SparseGPT) override this.
        """
        mask = self.mask(name, weight).to(weight.device)
        weight.mul_(mask)
        return mask

    def finish_block(self, prefix: str, block: Any) -> None:
        """Called once a block's linear layers are pruned (``prefix``: the block's module name and a dot);
        a pruner that sets more of the block than its linear weights does it here."""

    def reset(self) -> None:
        """Drop collected statistics (called after each block)."""

    def __repr__(self) -> str:
        target = f"nm={self.nm[0]}:{self.nm[1]}" if self.nm else f"sparsity={self.sparsity}"
        return f"{type(self).__name__}({target})"


def make_pruner(name: str, sparsity: float, nm: tuple[int, int] | None = None, options: Any = None) -> Pruner:
    """Instantiate the registered pruner ``name``; :class:`UsageError` if unknown."""
    if name not in PRUNERS:
        raise UsageError(f"--pruner {name!r} is unknown; choose one of: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name](sparsity, nm, options)


#: ``@register_pruner("name", options=OptionsDataclass)``: register a :class:`Pruner` subclass in :data:`PRUNERS`.
#: The options are the settings only this pruner reads (fields declared with :func:`ebft.settings.setting`);
#: they become ``--NAME-FIELD`` flags and sweep keys, and the pruner finds their values in ``self.options``.
register_pruner = registrar(PRUNERS, "pruner", (Pruner,))
