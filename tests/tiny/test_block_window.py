"""--block-window K: K consecutive blocks tuned together against the dense output of the last of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ebft.checkpoint import work_dir
from ebft.cli import main
from ebft.models.adapter import find_blocks
from ebft.models.blocks import call_block
from ebft.walk import BlockWalk

WINDOWS = ("--nsamples", "16", "--precision", "fp32", "--pruner", "wanda")  # 2 held out


def _bytes(out: Path) -> bytes:
    return (out / "model" / "model.safetensors").read_bytes()


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_a_window_of_one_block_is_todays_ebft_bitwise(resume_setup, tmp_path: Path) -> None:
    """The window machinery (a chain of one block) gives block-by-block EBFT's model, byte for byte."""
    plain, chained = tmp_path / "plain", tmp_path / "chained"
    assert main(resume_setup.argv(plain, *WINDOWS)) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockWalk, "_block", lambda walk, index: walk._window()[0])
        assert main(resume_setup.argv(chained, *WINDOWS, "--block-window", "1")) == 0
    assert _bytes(chained) == _bytes(plain)
    assert [b["window"] for b in _report(chained)["blocks"]] == [[i, i] for i in range(4)]
    assert [b["window"] for b in _report(plain)["blocks"]] == [None] * 4


def _chain(blocks: list[torch.nn.Module], hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    for block in blocks:
        hidden = call_block(block, hidden, kwargs)
    return hidden


def test_two_block_windows_train_the_pair_against_the_dense_pair(resume_setup, tmp_path: Path) -> None:
    out = tmp_path / "k2"
    assert main(resume_setup.argv(out, *WINDOWS, "--block-window", "2", "--no-model-guard")) == 0
    blocks = _report(out)["blocks"]
    assert [b["window"] for b in blocks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert blocks[0]["final_loss"] == blocks[1]["final_loss"] < blocks[0]["init_loss"] == blocks[1]["init_loss"]
    assert not blocks[0]["restored"]

    # a plain reference: the first window's losses are the MSE between the dense pair and the pair as pruned
    # (Wanda keeps the dense values: dense x mask) and as saved, on the embeddings of the calibration windows
    dense, pruned, tuned = _dense_pruned_tuned(resume_setup, out, ("model.layers.0.", "model.layers.1."))
    ids = _calibration_ids(out, resume_setup)
    hidden, kwargs = _first_block_inputs(dense, ids)
    with torch.no_grad():
        target = _chain(list(find_blocks(dense).blocks)[:2], hidden, kwargs)
        before = _chain(list(find_blocks(pruned).blocks)[:2], hidden, kwargs)
        after = _chain(list(find_blocks(tuned).blocks)[:2], hidden, kwargs)
    assert float((before - target).double().pow(2).mean()) == pytest.approx(blocks[0]["init_loss"], rel=1e-4)
    assert float((after - target).double().pow(2).mean()) == pytest.approx(blocks[0]["final_loss"], rel=1e-4)


def _dense_pruned_tuned(setup, out: Path, prefixes: tuple[str, ...]) -> tuple[torch.nn.Module, ...]:
    """The dense model, the dense model with the saved masks applied to the linears under ``prefixes``
    (Wanda's pruned block before tuning: dense x mask), and the saved model; each such mask is 50% exactly."""
    saved = load_file(str(out / "model" / "model.safetensors"))
    dense = AutoModelForCausalLM.from_pretrained(setup.model_dir).float().eval()
    pruned = AutoModelForCausalLM.from_pretrained(setup.model_dir).float().eval()
    tuned = AutoModelForCausalLM.from_pretrained(out / "model").float().eval()
    with torch.no_grad():
        for name, weight in pruned.named_parameters():
            if name.startswith(prefixes) and name.endswith("proj.weight"):
                assert (saved[name] == 0).float().mean() == 0.5  # masks exact in the output
                weight.mul_(saved[name] != 0)
    return dense, pruned, tuned


def _calibration_ids(out: Path, setup) -> torch.Tensor:
    from ebft.data import calibration_windows
    from ebft.models.loading import load_tokenizer

    cfg = _report(out)["config"]
    tokenizer = load_tokenizer(str(setup.model_dir))
    return calibration_windows(tokenizer, cfg["calib"]["source"], cfg["calib"]["nsamples"], cfg["calib"]["seqlen"],
                               cfg["calib"]["seed"])


def _first_block_inputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from ebft.capture import capture_block_kwargs, capture_first_block_inputs

    blocks = find_blocks(model)
    return capture_first_block_inputs(model, blocks, ids), capture_block_kwargs(model, blocks, ids[:1])[0]


@pytest.mark.parametrize(("stop_after", "done"), [(0, 0), (1, 2), (2, 2)])
def test_windows_resume_bitwise_from_their_first_block(stop_after: int, done: int, resume_setup, tmp_path: Path,
                                                       interrupt_after) -> None:
    """Stopped inside a window (after block 0 or 2) or at its end (after block 1), a run resumes from the
    window's first block to the same bytes; inside the first window nothing is committed, nothing kept."""
    flags = (*WINDOWS, "--block-window", "2")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(resume_setup.argv(whole, *flags)) == 0
    with interrupt_after(stop_after):
        assert main(resume_setup.argv(broken, *flags)) == 130
    state = work_dir(broken) / "run.json"
    assert (json.loads(state.read_text())["done"] if state.exists() else 0) == done  # a window commits at its end
    assert main(resume_setup.argv(broken, *flags, "--resume")) == 0
    assert _bytes(broken) == _bytes(whole)


def test_a_window_larger_than_the_model_tunes_every_block_at_once(resume_setup, tmp_path: Path) -> None:
    out = tmp_path / "all"
    assert main(resume_setup.argv(out, *WINDOWS, "--block-window", "9")) == 0
    assert [b["window"] for b in _report(out)["blocks"]] == [[0, 3]] * 4


@pytest.mark.parametrize(("flags", "fragment"), [
    (("--block-window", "0"), "--block-window must be a positive whole number; got 0"),
    (("--block-window", "2", "--finetune", "dsnot"), "--block-window 2 needs a method that tunes blocks by training"),
    (("--block-window", "2", "--finetune", "kd", "--kd-block", "none"), "not kd; drop it"),
])
def test_bad_windows_are_refused_in_one_line(flags: tuple[str, ...], fragment: str, resume_setup, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    assert main(resume_setup.argv(tmp_path / "x", *flags)) == 2
    one_line_error(capsys.readouterr().err, fragment)
