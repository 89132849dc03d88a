"""Layer-wise sparsity allocation: how the target sparsity is shared out among the decoder blocks.

``--allocation uniform`` (the default) prunes every block at ``--sparsity``. Another allocation
measures the dense model once before the walk and gives each block its own sparsity, their mean
being ``--sparsity`` exactly (the blocks are alike, so the model's average is the target). Every
module in this package is imported here, so a new allocation is one new file holding an
``@register_allocation("name", options=...)`` subclass of :class:`Allocation`.
"""

from __future__ import annotations

import importlib
import pkgutil

from ebft.allocation.base import ALLOCATIONS, Allocated, Allocation, make_allocation, register_allocation

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["ALLOCATIONS", "Allocated", "Allocation", "make_allocation", "register_allocation"]
