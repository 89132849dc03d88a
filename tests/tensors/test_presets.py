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
    with pytest.raises(UsageError, match="--preset 'best9' is unknown; choose one of: paper, best-block, best"):
        build_run_config({"preset": "best9"}, model="m")


def test_a_sweep_cell_takes_its_preset_where_neither_fixed_nor_its_grid_sets_a_value(tmp_path) -> None:
    from ebft.sweep.schema import load_sweep

    config = tmp_path / "sweep.yaml"
    config.write_text("grid:\n  - finetune: [lora]\n    lr: [2.0e-3]\n  - preset: [paper]\n  - preset: [paper]\n"
                      "    lr: [1.0e-3]\nfixed:\n  model: m\n  batch_size: 4\n  eval: [wikitext2]\n")
    cells = {(c.settings["finetune"], c.settings.get("preset"), c.config.finetune.lr): c.config.finetune
             for c in load_sweep(config).cells}
    assert set(cells) == {("lora", None, 2e-3), ("ebft", "paper", 2e-4), ("ebft", "paper", 1e-3)}
    paper = cells[("ebft", "paper", 2e-4)]
    # the preset's holdout_fraction (0), not the default the other grids' union would give; fixed overrides it
    assert (paper.holdout_fraction, paper.batch_size, paper.betas) == (0.0, 4, (0.9, 0.95))
    assert cells[("lora", None, 2e-3)].holdout_fraction == 0.125


def test_best_block_is_ebft_with_the_lr_chosen_per_block_and_best_adds_the_distillation_stage() -> None:
    block = build_run_config({"preset": "best-block"}, model="m").finetune
    assert (block.method, block.lr, block.batch_size, block.epochs, block.holdout_fraction) == ("ebft", 1e-3, 4, 10,
                                                                                                 0.125)
    assert block.options.lr_search == (2.0, 1.0, 0.4, 0.2, 0.04)  # needs the held-out windows it keeps
    assert block.block_targets == "dense"
    # a method that does not train blocks, given beside it, drops the preset's --block-targets (refused otherwise)
    assert build_run_config({"preset": "best-block", "finetune": "dsnot"}, model="m").finetune.block_targets == \
        "repaired"
    assert build_run_config({"preset": "best-block", "block_targets": "repaired"}, model="m").finetune.block_targets \
        == "repaired"
    best = build_run_config({"preset": "best"}, model="m").finetune
    assert (best.method, best.options.block, best.options.block_lr_search) == ("kd", "ebft", block.options.lr_search)
    assert (best.options.lr, best.options.epochs) == (1e-4, 2)
    assert best.block_targets == "repaired"  # with the distillation stage after it, the repaired stream did better
    assert {k: getattr(best, k) for k in ("lr", "batch_size", "epochs", "holdout_fraction")} == \
        {k: getattr(block, k) for k in ("lr", "batch_size", "epochs", "holdout_fraction")}
    # another method given beside it keeps the preset's common settings and drops the options of kd
    other = build_run_config({"preset": "best", "finetune": "ebft"}, model="m").finetune
    assert (other.method, other.lr, other.options.lr_search) == ("ebft", 1e-3, ())


def test_a_sweep_cell_with_another_method_drops_the_presets_block_targets(tmp_path) -> None:
    from ebft.sweep.schema import load_sweep

    config = tmp_path / "sweep.yaml"
    config.write_text("grid:\n  finetune: [ebft, dsnot]\nfixed:\n  model: m\n  preset: best-block\n"
                      "  eval: [wikitext2]\n")
    cells = {c.settings["finetune"]: c.config.finetune for c in load_sweep(config).cells}
    assert (cells["ebft"].block_targets, cells["dsnot"].block_targets) == ("dense", "repaired")
