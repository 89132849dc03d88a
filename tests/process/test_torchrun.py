"""torchrun data parallelism (gloo, 2 processes) against a plain single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ebft.checkpoint import work_dir

NBLOCKS = 3
KILLER = Path(__file__).resolve().parent / "kill_after_block.py"


def _torchrun(argv: list[str], cwd: Path, nproc: int = 2, kill_after: int | None = None) -> subprocess.CompletedProcess:
    """``torchrun -m ebft ARGV``; with ``kill_after``, rank 0 is SIGKILLed right after that block's checkpoint."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    target = ["-m", "ebft"] if kill_after is None else [str(KILLER), str(kill_after)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *target, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def two(parallel_setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    proc = _torchrun(parallel_setup.argv(out), out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 reports
    assert not work_dir(out).exists()
    return out


def test_two_processes_match_one(parallel_setup, single_process_run: Path, two: Path) -> None:
    out = two
    one, two = _tensors(single_process_run), _tensors(out)
    assert one.keys() == two.keys()
    pruned = [k for k in one if k.endswith("proj.weight")]
    assert len(pruned) == 7 * NBLOCKS
    for key in pruned:  # identical masks: exactly the same weights are zero
        assert torch.equal(one[key] == 0, two[key] == 0), key
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    dense = load_file(str(parallel_setup.model_dir / "model.safetensors"))
    changed = max(float((one[k] - dense[k]).abs().max()) for k in pruned)
    assert diff < 1e-4 < changed  # tuning moved the weights far more than the processes disagree
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (single_process_run, out))
    assert [b["steps"] for b in r1["blocks"]] == [b["steps"] for b in r2["blocks"]] == [6] * NBLOCKS
    for b1, b2 in zip(r1["blocks"], r2["blocks"]):
        assert b2["final_loss"] == pytest.approx(b1["final_loss"], rel=1e-4)
        assert b2["epoch_losses"] == pytest.approx(b1["epoch_losses"], rel=1e-4)
    assert r1["sparsity"] == r2["sparsity"]


def test_a_failing_process_fails_the_job(parallel_setup, two: Path, tmp_path: Path) -> None:
    """A process that dies after its first block ends the whole job; --resume then gives the same model."""
    out = tmp_path / "run"
    argv = parallel_setup.argv(out)
    proc = _torchrun(argv, tmp_path, kill_after=0)
    assert proc.returncode != 0
    assert not out.exists()
    state = json.loads((work_dir(out) / "run.json").read_text())
    assert state["done"] == 1  # rank 0 committed block 0 before it died; --resume continues from there
    assert _torchrun([*argv, "--resume"], tmp_path).returncode == 0
    assert (out / "model" / "model.safetensors").read_bytes() == (two / "model" / "model.safetensors").read_bytes()


def test_structured_runs_under_torchrun_and_with_activations_on_disk(parallel_setup, tmp_path: Path) -> None:
    """Structured shrinking is a compressor of the one walk: torchrun and --offload disk work for it too."""
    from ebft.cli import main

    structured = ("--structured", "0.25")
    plain, disk, two = tmp_path / "plain", tmp_path / "disk", tmp_path / "two"
    assert main([*parallel_setup.argv(plain), *structured]) == 0
    assert main([*parallel_setup.argv(disk), *structured, "--offload", "disk"]) == 0
    assert (plain / "model" / "model.safetensors").read_bytes() == (disk / "model" / "model.safetensors").read_bytes()
    proc = _torchrun([*parallel_setup.argv(two), *structured], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, both = _tensors(plain), _tensors(two)
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in both.items()}
    assert one["model.layers.0.mlp.down_proj.weight"].shape[1] < 128  # shrunken, in both runs
    assert max(float((one[k] - both[k]).abs().max()) for k in one) < 1e-4
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (plain, two))
    assert [b["compression"] for b in r1["blocks"]] == [b["compression"] for b in r2["blocks"]]


def test_generated_calibration_under_torchrun(parallel_setup, tmp_path: Path) -> None:
    """--calib generated: every process samples the windows and takes rank 0's; rank 0 alone caches them."""
    from ebft.cli import main

    generated = ("--calib", "generated", "--gen-batch-size", "3")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(parallel_setup.argv(one, *generated)) == 0
    proc = _torchrun(parallel_setup.argv(two, *generated), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, both = _tensors(one), _tensors(two)
    for key in (k for k in single if k.endswith("proj.weight")):
        assert torch.equal(single[key] == 0, both[key] == 0), key  # the same windows give the same masks
    assert max(float((single[k] - both[k]).abs().max()) for k in single) < 1e-4
    assert not work_dir(two).exists()
