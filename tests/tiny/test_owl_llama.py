"""--allocation owl on a tiny Llama: the outlier ratios against a plain computation, each block pruned at its
own sparsity, the average kept, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ebft.cli import main
from ebft.data import calibration_windows
from ebft.models import load_tokenizer

FLAGS = ("--sparsity", "0.5", "--allocation", "owl", "--owl-threshold", "3", "--owl-lambda", "0.1")


def _reference_ratios(model_dir: Path, ids: torch.Tensor, threshold: float) -> list[float]:
    """Per block: the share of |W| * ||x||_2 scores above ``threshold`` x their mean, from the dense model's own
    forward pass (hooks on every linear of every block)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, args, _name=name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[_name] = sums.get(_name, 0) + (x * x).sum(0)
                counts[_name] = counts.get(_name, 0) + x.shape[0]
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    ratios = []
    for index in range(len(model.model.layers)):
        scores = [model.model.layers.get_submodule(n).weight.double().abs() * (sums[n] / counts[n]).sqrt()
                  for n in sums if n.split(".")[0] == str(index)]
        flat = torch.cat([s.flatten() for s in scores])
        ratios.append(float((flat > threshold * flat.mean()).sum()) / flat.numel())
    return ratios


def test_owl_follows_the_outlier_ratios_and_keeps_the_average(resume_setup, tmp_path: Path) -> None:
    out = tmp_path / "owl"
    assert main(resume_setup.argv(out, *FLAGS)) == 0
    report = json.loads((out / "report.json").read_text())
    allocation = report["allocation"]
    assert allocation["method"] == "owl"
    tokenizer = load_tokenizer(str(resume_setup.model_dir))
    ids = calibration_windows(tokenizer, f"text:{resume_setup.text_file}", 6, 32, 0)
    want = _reference_ratios(resume_setup.model_dir, ids, 3.0)
    assert allocation["measured"]["outlier_ratios"] == pytest.approx(want, abs=1e-9)
    assert len(set(want)) > 1  # the blocks differ, so the allocation is not uniform
    sparsities = allocation["sparsities"]
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.5, abs=1e-12)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.2, abs=1e-12)
    assert sparsities.index(min(sparsities)) == want.index(max(want))
    # each block's layers are pruned at its own sparsity (Wanda, row by row: within one weight per row), and
    # the whole model exactly as much as at uniform 50%
    for name, layer in report["sparsity"]["per_layer"].items():
        index = int(name.split(".")[2])
        width = 64 if name.endswith("down_proj") else 32
        assert layer == pytest.approx(sparsities[index], abs=1 / width + 1e-9), name
    assert report["sparsity"]["overall"] == 0.5


def test_owl_resumes_bitwise(resume_setup, tmp_path: Path, assert_resumes_bitwise) -> None:
    whole, broken = assert_resumes_bitwise(resume_setup, tmp_path, FLAGS, stop_after=1)
    first, resumed = (json.loads((p / "report.json").read_text()) for p in (whole, broken))
    assert resumed["allocation"]["sparsities"] == first["allocation"]["sparsities"]


def test_owl_refuses_nm_and_given_masks(resume_setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(resume_setup.argv(tmp_path / "nm", "--nm", "2:4", "--allocation", "owl")) == 2
    assert "--nm 2:4 prunes every block alike: drop --allocation or use --sparsity" in capsys.readouterr().err
    assert main(resume_setup.argv(tmp_path / "u", "--owl-lambda", "0.1")) == 2
    assert "--owl-lambda applies only to --allocation owl, not uniform; drop it" in capsys.readouterr().err
