"""Named repair recipes (``--preset NAME``): one flag that sets the repair method and its settings.

A preset fills in the settings the command line (or a sweep cell) does not give; a flag given
explicitly overrides it, and a preset's value that the given flags exclude (its ``epochs`` when
``--steps`` is given) or that belongs to another method than the one chosen is dropped. The
calibration flags are never part of a preset, so one is used as it is at any calibration size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ebft.errors import UsageError


@dataclass(frozen=True)
class Preset:
    help: str
    values: dict[str, Any] = field(default_factory=dict)  # flat {sweep key: value}


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "EBFT as published (arXiv 2402.12419): AdamW lr 2e-4, betas 0.9/0.95, no weight decay, linear decay, "
        "clip 1.0, 10 epochs of batch 8, every calibration window trains every block (no held-out windows)",
        {"finetune": "ebft", "epochs": 10, "batch_size": 8, "lr": 2e-4, "betas": (0.9, 0.95), "weight_decay": 0.0,
         "warmup": 0.0, "grad_clip": 1.0, "holdout_fraction": 0.0}),
}

#: Settings that exclude each other: a preset's value is dropped when the other is given.
_EXCLUDES = {"steps": ("epochs",), "epochs": ("steps",)}


def preset_names() -> list[str]:
    return list(PRESETS)


def apply_preset(values: Mapping[str, Any], owner_of: Mapping[str, tuple[str, str] | None]) -> dict[str, Any]:
    """``values`` (flat, as given) with ``values["preset"]``'s settings filled in where none is given.

    ``owner_of[key]``: the (selector, method) a method option belongs to, or None for a common setting.
    """
    name = values.get("preset")
    if name is None:
        return dict(values)
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    excluded = {other for key in values for other in _EXCLUDES.get(key, ())}
    filled = {k: v for k, v in PRESETS[name].values.items() if k not in values and k not in excluded}
    merged = {**filled, **values}
    return {k: v for k, v in merged.items()
            if k in values or owner_of.get(k) is None or merged.get(owner_of[k][0]) == owner_of[k][1]}
