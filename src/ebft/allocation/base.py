"""The allocation interface, its registry (``--allocation``) and what an allocation hands the walk."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ebft.models.blockwise import BlockRunner, StateFor
from ebft.registry import registrar

#: ``--allocation`` name -> class (``uniform``: every block at the target sparsity, nothing to measure).
ALLOCATIONS: dict[str, type[Allocation] | None] = {"uniform": None}


@dataclass
class Allocated:
    """Each block's sparsity, and what the allocation measured to choose it (``report.json``'s ``allocation``)."""

    method: str
    sparsities: list[float]
    measured: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Allocation:
    """Chooses a sparsity per decoder block from one pass of the dense model over the calibration windows."""

    name: ClassVar[str] = ""
    Options: ClassVar[type | None] = None  # set by @register_allocation

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else (self.Options() if self.Options is not None else None)

    def allocate(self, runner: BlockRunner, ids: torch.Tensor, target: float, dense_state: StateFor) -> Allocated:
        """Per-block sparsities averaging ``target``, from the dense model (``dense_state``: where each
        block's dense weights come from) run over ``ids`` [n, seqlen] by ``runner``."""
        raise NotImplementedError


def make_allocation(name: str, options: Any = None) -> Allocation | None:
    """The registered allocation ``name`` (None for ``uniform``)."""
    cls = ALLOCATIONS[name]
    return None if cls is None else cls(options)


#: ``@register_allocation("name", options=OptionsDataclass)``: register an :class:`Allocation` subclass. Its
#: options become ``--NAME-FIELD`` flags and sweep keys that apply only with ``--allocation NAME``.
register_allocation = registrar(ALLOCATIONS, "allocation", (Allocation,))
