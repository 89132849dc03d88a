"""Repair methods, registered by name (``--finetune``): block fine-tuners and whole-model fine-tuners.

Every module in this package is imported here, so a new method is one new file holding a
``@register_finetuner("name")`` subclass of :class:`BlockFinetuner` or :class:`ModelFinetuner`.
"""

from __future__ import annotations

import importlib
import pkgutil

from ebft.finetune.base import (
    FINETUNERS,
    BlockFinetuner,
    BlockResult,
    ModelFinetuner,
    ModelResult,
    make_finetuner,
    reads,
    register_finetuner,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["FINETUNERS", "BlockFinetuner", "BlockResult", "ModelFinetuner", "ModelResult", "make_finetuner", "reads",
           "register_finetuner"]
