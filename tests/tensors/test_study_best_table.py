"""experiments/study_best_table.py's arithmetic: the gap closed in cross-entropy and the spread over seeds."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture
def study(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    return importlib.import_module("study_best_table")


def record(ppl: float, sparsity: float | str = 0.5) -> SimpleNamespace:
    return SimpleNamespace(report=SimpleNamespace(eval={"wikitext2:test": ppl}), settings={"sparsity": sparsity})


def test_gap_closed_by_hand(study) -> None:
    assert study.gap_closed(80.0, 40.0, 20.0) == pytest.approx(0.5)  # ln 2 / ln 4
    assert study.gap_closed(80.0, 80.0, 20.0) == 0.0
    assert study.gap_closed(80.0, 20.0, 20.0) == pytest.approx(1.0)
    assert study.gap_closed(80.0, 100.0, 20.0) == pytest.approx(math.log(0.8) / math.log(4.0))  # worse than pruned


def test_spread_over_seeds_by_hand(study) -> None:
    cells = {("wanda", "0.5", "none", 1): record(80.0), ("wanda", "0.5", "none", 2): record(40.0),
             ("wanda", "0.5", "best", 1): record(40.0), ("wanda", "0.5", "best", 2): record(20.0),
             ("wanda", "2:4", "best", 1): record(50.0, "2:4")}  # one seed only: no spread row
    rows = study.spread_rows(cells, dense=20.0)
    by_method = {row[2]: row for row in rows}
    assert sorted(by_method) == ["best", "none"]
    # best: mean 30, sample std sqrt((10^2 + 10^2) / 1), gaps 0.5 (seed 1) and 1.0 (seed 2)
    assert by_method["best"] == ["wanda", "50%", "best", "1, 2", "30.00", f"{math.sqrt(200):,.2f}", "20.00",
                                 "40.00", "75.0%"]
    assert by_method["none"][4:8] == ["60.00", f"{math.sqrt(800):,.2f}", "40.00", "80.00"]
    assert by_method["none"][8] == "—"  # pruning alone has no gap of its own


def test_spread_needs_each_seeds_pruning_alone(study) -> None:
    cells = {("wanda", "0.5", "none", 1): record(80.0),
             ("wanda", "0.5", "best", 1): record(40.0), ("wanda", "0.5", "best", 2): record(20.0)}
    (row,) = study.spread_rows(cells, dense=20.0)
    assert row[8] == "—"  # seed 2 has no pruning-alone cell, so no mean gap


def test_cells_are_labelled_by_preset_and_by_targets_other_than_the_presets_own(study) -> None:
    assert study.method({"preset": "best-block", "finetune": "ebft", "block_targets": "dense"}) == "best-block"
    assert study.method({"preset": "best-block", "finetune": "ebft", "block_targets": "repaired"}) == \
        "best-block, repaired targets"
    assert study.method({"preset": "best", "finetune": "kd", "block_targets": "repaired"}) == "best"
    assert study.method({"finetune": "ebft", "block_targets": "dense"}) == "ebft, dense targets"
    assert study.method({"finetune": "lora"}) == "lora"
    assert study.method({"preset": "best-block", "finetune": "none", "block_targets": "dense"}) == "none"
