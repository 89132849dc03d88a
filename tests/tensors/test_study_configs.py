"""The study configs under experiments/ load, with the settings of BENCHMARKS.md's core runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebft.sweep import load_sweep

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.mark.parametrize("name", ["study_sparsity", "study_calib", "study_zeroshot", "study_methods", "study_dsnot"])
def test_study_configs_are_valid(name: str) -> None:
    sweep = load_sweep(EXPERIMENTS / f"{name}.yaml")
    counts = {"study_sparsity": 36, "study_calib": 10, "study_zeroshot": 4, "study_methods": 12, "study_dsnot": 6}
    assert len(sweep.cells) == counts[name]
    for cell in sweep.cells:  # the settings of BENCHMARKS.md's core runs
        cfg = cell.config
        assert (cfg.model, cfg.calib.source, cfg.calib.seqlen, cfg.calib.seed) == ("smollm2-135m", "c4", 256, 0)
        assert cfg.eval.sources == ["wikitext2:test"] and cfg.eval.max_windows == 16 and cfg.eval.seqlen == 1024
        if cfg.finetune.method == "dsnot":  # reads only the batch size (and the held-out fraction)
            assert cfg.finetune.batch_size == 4
        elif cfg.finetune.method != "none":
            assert (cfg.finetune.epochs, cfg.finetune.lr, cfg.finetune.batch_size) == (10, 1e-3, 4)
    if name == "study_zeroshot":
        assert sweep.options.tasks == ["boolq", "rte", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]
