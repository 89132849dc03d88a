"""--block-targets dense: each block trains towards the dense model's own activations after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ebft.checkpoint import work_dir
from ebft.cli import main
from ebft.models.adapter import find_blocks
from ebft.models.blocks import call_block

FLAGS = ("--nsamples", "16", "--precision", "fp32", "--pruner", "wanda", "--no-model-guard")  # 2 held out


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _bytes(out: Path) -> bytes:
    return (out / "model" / "model.safetensors").read_bytes()


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).mean())


def test_each_block_is_judged_against_the_dense_models_own_activations(resume_setup, tmp_path: Path) -> None:
    """A plain reference: block i's losses are the MSE between the dense chain of blocks 0..i on the embeddings
    and block i as pruned (Wanda keeps the dense values: dense x mask) or as saved, on the saved blocks
    0..i-1's outputs; the walk's own outputs are the saved model's."""
    from tests.tiny.test_block_window import _calibration_ids, _dense_pruned_tuned, _first_block_inputs

    out = tmp_path / "dense"
    assert main(resume_setup.argv(out, *FLAGS, "--block-targets", "dense")) == 0
    reports = _report(out)["blocks"]
    assert _report(out)["config"]["finetune"]["block_targets"] == "dense"
    dense, pruned, tuned = _dense_pruned_tuned(resume_setup, out, ("model.layers.",))
    ids = _calibration_ids(out, resume_setup)
    hidden, kwargs = _first_block_inputs(dense, ids)
    target, stream = hidden, hidden
    blocks = [list(find_blocks(m).blocks) for m in (dense, pruned, tuned)]
    with torch.no_grad():
        for index, report in enumerate(reports):
            target = call_block(blocks[0][index], target, kwargs)
            assert _mse(call_block(blocks[1][index], stream, kwargs), target) == pytest.approx(report["init_loss"],
                                                                                                 rel=1e-4)
            stream = call_block(blocks[2][index], stream, kwargs)
            assert _mse(stream, target) == pytest.approx(report["final_loss"], rel=1e-4)
            assert report["final_loss"] < report["init_loss"] and not report["restored"]


def test_dense_targets_differ_from_repaired_ones_after_the_first_block(resume_setup, tmp_path: Path) -> None:
    """Block 0's targets are the same either way (both streams start at the embeddings); after it they differ."""
    repaired, dense = tmp_path / "repaired", tmp_path / "dense"
    assert main(resume_setup.argv(repaired, *FLAGS)) == 0
    assert main(resume_setup.argv(dense, *FLAGS, "--block-targets", "dense")) == 0
    a, b = _report(repaired)["blocks"], _report(dense)["blocks"]
    assert a[0]["init_loss"] == b[0]["init_loss"] and a[0]["final_loss"] == b[0]["final_loss"]
    assert a[1]["init_loss"] != b[1]["init_loss"]
    assert _bytes(repaired) != _bytes(dense)


@pytest.mark.parametrize("stop_after", [0, 2])
def test_dense_targets_resume_bitwise(stop_after: int, resume_setup, tmp_path: Path, interrupt_after) -> None:
    """Stopped after a block, a run resumes with both streams (the checkpoint keeps the dense one) to the same bytes."""
    flags = (*FLAGS, "--block-targets", "dense")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(resume_setup.argv(whole, *flags)) == 0
    with interrupt_after(stop_after):
        assert main(resume_setup.argv(broken, *flags)) == 130
    state = json.loads((work_dir(broken) / "run.json").read_text())
    assert state["done"] == stop_after + 1 and state["dense"] == f"dense-{stop_after:05d}.pt"
    assert sorted(p.name for p in work_dir(broken).glob("*.pt")) == [f"dense-{stop_after:05d}.pt",
                                                                      f"hidden-{stop_after:05d}.pt"]
    assert main(resume_setup.argv(broken, *flags, "--resume")) == 0
    assert _bytes(broken) == _bytes(whole)


@pytest.mark.parametrize(("flags", "fragment"), [
    (("--block-targets", "teacher"), "--block-targets 'teacher' is unknown; choose one of: repaired, dense"),
    (("--block-targets", "dense", "--finetune", "dsnot"), "--block-targets dense needs a method that tunes blocks"),
    (("--block-targets", "dense", "--finetune", "none"), "not none; drop it"),
    (("--block-targets", "dense", "--block-window", "2"), "--block-targets dense tunes block by block"),
])
def test_bad_block_targets_are_refused_in_one_line(flags: tuple[str, ...], fragment: str, resume_setup, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    assert main(resume_setup.argv(tmp_path / "x", *flags)) == 2
    one_line_error(capsys.readouterr().err, fragment)
