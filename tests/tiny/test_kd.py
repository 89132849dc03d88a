"""--finetune kd: the block walk, then distillation from the dense model, masks exact, never worse held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ebft.cli import main

WINDOWS = ("--nsamples", "32", "--precision", "fp32")  # 4 held out
KD = (*WINDOWS, "--finetune", "kd", "--kd-lr", "3e-4", "--kd-epochs", "3")


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_kd_after_ebft_lowers_the_kl_and_keeps_every_pruned_weight_zero(resume_setup, tmp_path: Path) -> None:
    ebft, kd = tmp_path / "ebft", tmp_path / "kd"
    assert main(resume_setup.argv(ebft, *WINDOWS)) == 0
    assert main(resume_setup.argv(kd, *KD)) == 0
    stage = _report(kd)["model_stage"]
    assert stage["method"] == "kd" and stage["loss"] == "KL to the dense model" and stage["restored"] is None
    assert stage["final_loss"] < stage["init_loss"]
    assert stage["details"]["holdout_kl_after"] < stage["details"]["holdout_kl_before"]
    assert stage["details"]["training_windows"] == 28
    # the walk before the stage is EBFT's own: its block reports are the plain ebft run's
    assert [b["final_loss"] for b in _report(kd)["blocks"]] == [b["final_loss"] for b in _report(ebft)["blocks"]]
    before, after = (load_file(str(p / "model" / "model.safetensors")) for p in (ebft, kd))
    changed = 0
    for key, weight in after.items():
        if key.startswith("model.layers.") and key.endswith("proj.weight"):
            assert torch.equal(weight == 0, before[key] == 0), key  # the same masks, every pruned weight 0.0
            changed += int(not torch.equal(weight, before[key]))
        elif not key.startswith("model.layers."):
            assert torch.equal(weight, before[key]), key  # embeddings, final norm and head stay
    assert changed == 28  # every linear of the 4 blocks moved


def test_kd_that_does_not_help_held_out_gives_the_walks_weights_back(resume_setup, tmp_path: Path) -> None:
    ebft, kd = tmp_path / "ebft", tmp_path / "kd"
    assert main(resume_setup.argv(ebft, *WINDOWS, "--no-model-guard")) == 0
    assert main(resume_setup.argv(kd, *WINDOWS, "--finetune", "kd", "--kd-lr", "5",
                                  "--no-model-guard")) == 0  # a learning rate that wrecks the model
    stage = _report(kd)["model_stage"]
    assert stage["restored"] and ("held-out KL" in stage["restored"] or "non-finite" in stage["restored"])
    assert (kd / "model" / "model.safetensors").read_bytes() == (ebft / "model" / "model.safetensors").read_bytes()


def test_kd_resumes_bitwise(resume_setup, tmp_path: Path, assert_resumes_bitwise) -> None:
    assert_resumes_bitwise(resume_setup, tmp_path, KD, stop_after=2)


def test_kd_options_are_refused_with_other_methods(resume_setup, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(resume_setup.argv(tmp_path / "x", "--kd-lr", "1e-4")) == 2
    assert "--kd-lr applies only to --finetune kd, not ebft; drop it" in capsys.readouterr().err


def test_kd_runs_on_a_structured_model(resume_setup, tmp_path: Path) -> None:
    out = tmp_path / "st"
    assert main(resume_setup.argv(out, *KD, "--structured", "0.25")) == 0
    report = _report(out)
    assert report["structured"] and report["model_stage"]["method"] == "kd"
    stage = report["model_stage"]
    assert stage["steps"] == 3 * 14 and stage["details"]["holdout_kl_before"] > 0  # 28 windows, batch 2
