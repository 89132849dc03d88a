"""--preset: a named recipe fills in what is not given; given flags override it."""

from __future__ import annotations

import pytest

from ebft.errors import UsageError
from ebft.presets import PRESETS
from ebft.settings import build_run_config, flat_values


def test_paper_sets_the_published_recipe() -> None:
    cfg = build_run_config({"preset": "paper"}, model="m")
    ft = cfg.finetune
    assert (ft.preset, ft.method, ft.epochs, ft.batch_size, ft.lr, ft.betas) == ("paper", "ebft", 10, 8, 2e-4,
                                                                                    (0.9, 0.95))
    assert (ft.weight_decay, ft.warmup, ft.grad_clip, ft.holdout_fraction) == (0.0, 0.0, 1.0, 0.0)
    assert cfg.calib == build_run_config({}, model="m").calib  # a preset never sets the calibration
    values = flat_values(cfg)
    assert all(values[key] == (list(v) if isinstance(v, tuple) else v) for key, v in PRESETS["paper"].values.items())


def test_given_flags_override_the_preset() -> None:
    cfg = build_run_config({"preset": "paper", "lr": 1e-3, "holdout_fraction": 0.125}, model="m")
    assert (cfg.finetune.lr, cfg.finetune.holdout_fraction, cfg.finetune.batch_size) == (1e-3, 0.125, 8)
    # --steps excludes the preset's epochs instead of clashing with it
    cfg = build_run_config({"preset": "paper", "steps": 50}, model="m")
    assert cfg.finetune.steps == 50
    with pytest.raises(UsageError, match="--steps and --epochs exclude each other"):
        build_run_config({"preset": "paper", "steps": 50, "epochs": 2}, model="m")


def test_an_unknown_preset_is_refused() -> None:
    with pytest.raises(UsageError, match="--preset 'best9' is unknown; choose one of: paper"):
        build_run_config({"preset": "best9"}, model="m")
