"""torchrun data parallelism (gloo, 2 processes) and --offload disk, against plain single-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ebft.capture
from ebft.checkpoint import work_dir
from ebft.cli import main
from ebft.distributed import DistContext, process_device, torchrun_world
from ebft.errors import EbftError, UsageError

NBLOCKS = 3
KILLER = Path(__file__).resolve().parents[1] / "kill_after_block.py"


@pytest.fixture(scope="module")
def model_dir(tiny_factory, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dist") / "tiny3"
    tiny_factory("llama", num_hidden_layers=NBLOCKS).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _argv(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    # 8 windows, 1 held out: batches of 3, 3 and 1 windows, so one process gets an empty shard each epoch
    return ["prune", str(model), "--out", str(out), "--calib", f"text:{text}", "--nsamples", "8", "--seqlen", "32",
            "--epochs", "2", "--batch-size", "3", "--lr", "1e-3", "--precision", "fp32", "--device", "cpu",
            "--threads", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def single(model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(_argv(model_dir, text_file, out)) == 0
    return out


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
def two(model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    proc = _torchrun(_argv(model_dir, text_file, out), out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 reports
    assert not work_dir(out).exists()
    return out


def test_two_processes_match_one(model_dir: Path, single: Path, two: Path) -> None:
    out = two
    one, two = _tensors(single), _tensors(out)
    assert one.keys() == two.keys()
    pruned = [k for k in one if k.endswith("proj.weight")]
    assert len(pruned) == 7 * NBLOCKS
    for key in pruned:  # identical masks: exactly the same weights are zero
        assert torch.equal(one[key] == 0, two[key] == 0), key
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    changed = max(float((one[k] - load_file(str(model_dir / "model.safetensors"))[k]).abs().max()) for k in pruned)
    assert diff < 1e-4 < changed  # tuning moved the weights far more than the processes disagree
    r1, r2 = (json.loads((p / "report.json").read_text()) for p in (single, out))
    assert [b["steps"] for b in r1["blocks"]] == [b["steps"] for b in r2["blocks"]] == [6] * NBLOCKS
    for b1, b2 in zip(r1["blocks"], r2["blocks"]):
        assert b2["final_loss"] == pytest.approx(b1["final_loss"], rel=1e-4)
        assert b2["epoch_losses"] == pytest.approx(b1["epoch_losses"], rel=1e-4)
    assert r1["sparsity"] == r2["sparsity"]


def test_a_failing_process_fails_the_job(model_dir: Path, text_file: Path, two: Path, tmp_path: Path) -> None:
    """A process that dies after its first block ends the whole job; --resume then gives the same model."""
    out = tmp_path / "run"
    argv = _argv(model_dir, text_file, out)
    proc = _torchrun(argv, tmp_path, kill_after=0)
    assert proc.returncode != 0
    assert not out.exists()
    state = json.loads((work_dir(out) / "run.json").read_text())
    assert state["done"] == 1  # rank 0 committed block 0 before it died; --resume continues from there
    assert _torchrun([*argv, "--resume"], tmp_path).returncode == 0
    assert (out / "model" / "model.safetensors").read_bytes() == (two / "model" / "model.safetensors").read_bytes()


def test_shards_cover_a_batch() -> None:
    for world in (1, 2, 3):
        ctx = DistContext(0, world, 0, torch.device("cpu"), "gloo")
        for n in range(7):
            parts = [list(range(n))[ctx.shard(n, r)] for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_torchrun_environment() -> None:
    assert torchrun_world({}) is None
    assert torchrun_world({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    assert torchrun_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(UsageError):
        torchrun_world({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(UsageError):
        torchrun_world({"RANK": "2", "WORLD_SIZE": "2"})
    assert process_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(UsageError, match="--device mps"):
        process_device("mps", 0)
    if not torch.cuda.is_available():
        with pytest.raises(EbftError, match="LOCAL_RANK 1"):
            process_device("cuda", 1)
    elif torch.cuda.device_count() > 1:
        assert process_device("cuda", 1) == torch.device("cuda", 1)  # never a hard-coded first GPU


def test_offload_disk_is_bitwise_the_same(model_dir: Path, text_file: Path, single: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Path, bool]] = []
    new = ebft.capture.ActivationBuffers.new

    def spy(self, shape, dtype=torch.float32):
        tensor = new(self, shape, dtype)
        seen.append((self.files[-1] if self.folder is not None else None, tensor.untyped_storage().filename))
        return tensor

    monkeypatch.setattr(ebft.capture.ActivationBuffers, "new", spy)
    out = tmp_path / "run"
    assert main(_argv(model_dir, text_file, out, "--offload", "disk")) == 0
    assert len(seen) == 2  # inputs and targets
    for path, filename in seen:
        assert path is not None and path.parent == work_dir(out) / "offload" and filename == str(path)
        assert not path.exists()
    assert not work_dir(out).exists()
    assert (out / "model" / "model.safetensors").read_bytes() == (single / "model" / "model.safetensors").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["offload"] == "disk"


def test_offload_disk_is_in_the_disk_space_check(model_dir: Path, text_file: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import collections
    import shutil

    from ebft.models.loading import load_config
    from ebft.runner import estimate_out_bytes

    base = sum(estimate_out_bytes(load_config(str(model_dir)), 8, 32).values())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, base + 1))
    out = tmp_path / "run"
    assert main(_argv(model_dir, text_file, out, "--offload", "disk", "--finetune", "none")) == 1
    assert "offloaded activations" in capsys.readouterr().err
    assert main(_argv(model_dir, text_file, out, "--finetune", "none")) == 0  # fits without the offload files
