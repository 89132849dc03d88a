"""Pruning criteria, registered by name in :data:`PRUNERS`.

Every module in this package is imported here, so a new pruner is one new file holding a
``@register_pruner("name")`` subclass of :class:`Pruner`.
"""

from __future__ import annotations

import importlib
import pkgutil

from ebft.pruners.base import PRUNERS, Pruner, make_pruner, register_pruner

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

from ebft.pruners.magnitude import MagnitudePruner, magnitude_scores  # noqa: E402
from ebft.pruners.sparsegpt import SparseGPTPruner, sparsegpt_prune  # noqa: E402
from ebft.pruners.wanda import WandaPruner, wanda_scores  # noqa: E402

__all__ = [
    "PRUNERS",
    "MagnitudePruner",
    "Pruner",
    "SparseGPTPruner",
    "WandaPruner",
    "magnitude_scores",
    "make_pruner",
    "register_pruner",
    "sparsegpt_prune",
    "wanda_scores",
]
