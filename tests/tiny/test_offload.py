"""--offload disk: activations in files under the work folder, bitwise the same model, counted in the disk check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ebft.capture
from ebft.checkpoint import work_dir
from ebft.cli import main


def test_offload_disk_is_bitwise_the_same(parallel_setup, single_process_run: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Path, bool]] = []
    new = ebft.capture.ActivationBuffers.new

    def spy(self, shape, dtype=torch.float32):
        tensor = new(self, shape, dtype)
        seen.append((self.files[-1] if self.folder is not None else None, tensor.untyped_storage().filename))
        return tensor

    monkeypatch.setattr(ebft.capture.ActivationBuffers, "new", spy)
    out = tmp_path / "run"
    assert main(parallel_setup.argv(out, "--offload", "disk")) == 0
    assert len(seen) == 2  # inputs and targets
    for path, filename in seen:
        assert path is not None and path.parent == work_dir(out) / "offload" and filename == str(path)
        assert not path.exists()
    assert not work_dir(out).exists()
    weights = "model/model.safetensors"
    assert (out / weights).read_bytes() == (single_process_run / weights).read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["offload"] == "disk"


def test_offload_disk_is_in_the_disk_space_check(parallel_setup, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import collections
    import shutil

    from ebft.models.loading import load_config
    from ebft.runner import estimate_out_bytes

    base = sum(estimate_out_bytes(load_config(str(parallel_setup.model_dir)), 8, 32).values())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, base + 1))
    out = tmp_path / "run"
    assert main(parallel_setup.argv(out, "--offload", "disk", "--finetune", "none")) == 1
    assert "offloaded activations" in capsys.readouterr().err
    assert main(parallel_setup.argv(out, "--finetune", "none")) == 0  # fits without the offload files


def test_the_dense_stream_doubles_the_checkpoints_activations_in_the_disk_estimate(parallel_setup) -> None:
    from ebft.models.loading import load_config
    from ebft.runner import estimate_out_bytes

    config = load_config(str(parallel_setup.model_dir))
    one, two = (estimate_out_bytes(config, 8, 32, streams=n)["activations"] for n in (1, 2))
    assert one == 2 * 8 * 32 * config.hidden_size * 4 and two == 2 * one
