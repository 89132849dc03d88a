"""Run folders are written atomically; GGUF-loaded models can be saved."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ebft.errors import UsageError
from ebft.fsio import atomic_dir, check_out_dir, write_json
from ebft.models import prepare_for_saving


def test_atomic_dir_success_replaces(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        assert tmp != out and tmp.parent == tmp_path
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # nothing is touched until the end
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_atomic_dir_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_the_old_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True):
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (out / "old.txt").read_text() == "old"


def test_check_out_dir(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "absent", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_out_dir(tmp_path / "file", overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="--overwrite"):
        check_out_dir(tmp_path / "full", overwrite=False)
    check_out_dir(tmp_path / "full", overwrite=True)


def test_write_json(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"a": [1, 2], "loss": math.nan})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    data = json.loads(path.read_text())
    assert data["a"] == [1, 2] and math.isnan(data["loss"])


def test_prepare_for_saving(tiny_llama: nn.Module, tmp_path: Path) -> None:
    tiny_llama.config.quantization_config = {"quant_method": "gguf"}
    tiny_llama.hf_quantizer = object()
    prepare_for_saving(tiny_llama)
    assert tiny_llama.hf_quantizer is None
    assert not hasattr(tiny_llama.config, "quantization_config")
    tiny_llama.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for (name, a), (_, b) in zip(tiny_llama.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
