"""Named repair recipes (``--preset NAME``): one flag that sets the repair method and its settings.

A preset fills in the settings the command line (or a sweep cell) does not give; a flag given
explicitly overrides it, and a preset's value that the given flags exclude (its ``epochs`` when
``--steps`` is given) or that belongs to another method than the one chosen is dropped. The
calibration flags are never part of a preset, so one is used as it is at any calibration size.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
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

#: The per-block learning-rate trial of the ``best`` presets: around 1e-3 (SmolLM2's rate) down to 4e-5 (what
#: most of Gemma 3 270M's blocks chose), one pass over the training windows each (see BENCHMARKS).
_LR_FACTORS = (2.0, 1.0, 0.4, 0.2, 0.04)
_BLOCKS = {"epochs": 10, "batch_size": 4, "lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0, "warmup": 0.0,
           "grad_clip": 1.0, "holdout_fraction": 0.125}

PRESETS["best-block"] = Preset(
    "the best recipe found that holds one block at a time: EBFT with each block's learning rate chosen by trial "
    "among 2e-3, 1e-3, 4e-4, 2e-4 and 4e-5 on the held-out windows, 10 epochs of batch 4, each block trained "
    "towards the dense model's own activations (--block-targets dense)",
    {"finetune": "ebft", **_BLOCKS, "ebft_lr_search": _LR_FACTORS, "block_targets": "dense"})
PRESETS["best"] = Preset(
    "the best recipe found: best-block's walk (towards the repaired stream's dense outputs), then the whole model "
    "distilled from the dense model's next-token distribution on the training windows and 192 more that the dense "
    "model writes (--finetune kd, lr 1e-4, 2 epochs, --kd-gen-windows 192; needs the whole model with its "
    "gradients in memory)",
    {"finetune": "kd", **_BLOCKS, "kd_block_lr_search": _LR_FACTORS, "kd_lr": 1e-4, "kd_epochs": 2,
     "kd_gen_windows": 192})

#: Settings that exclude each other: a preset's value is dropped when the other is given.
_EXCLUDES = {"steps": ("epochs",), "epochs": ("steps",)}
#: Common settings only some repair methods take: a preset's value is dropped when another method is given.
_METHODS = {"block_targets": ("ebft", "kd")}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_values(name: str, given: Collection[str], finetune: str | None = None) -> dict[str, Any]:
    """Preset ``name``'s settings that the ``given`` ones neither set nor exclude (nor, with the repair
    method ``finetune`` given, that method does not take)."""
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    excluded = {other for key in given for other in _EXCLUDES.get(key, ())}
    if finetune is not None:
        excluded |= {key for key, methods in _METHODS.items() if finetune not in methods}
    return {k: v for k, v in PRESETS[name].values.items() if k not in given and k not in excluded}


def apply_preset(values: Mapping[str, Any], owner_of: Mapping[str, tuple[str, str] | None]) -> dict[str, Any]:
    """``values`` (flat, as given) with ``values["preset"]``'s settings filled in where none is given.

    ``owner_of[key]``: the (selector, method) a method option belongs to, or None for a common setting.
    """
    name = values.get("preset")
    if name is None:
        return dict(values)
    merged = {**preset_values(name, values, values.get("finetune")), **values}
    return {k: v for k, v in merged.items()
            if k in values or owner_of.get(k) is None or merged.get(owner_of[k][0]) == owner_of[k][1]}
