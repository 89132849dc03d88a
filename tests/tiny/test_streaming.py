"""Streamed runs (each block read from the checkpoint when the walk reaches it) and models kept in their dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ebft.cli import main
from ebft.models import find_blocks

NBLOCKS = 3


def _save(factory, tokenizer, folder: Path, dtype: torch.dtype, **overrides) -> Path:
    model = factory("llama", num_hidden_layers=NBLOCKS, **overrides).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_model(tiny_factory, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tiny_factory, tokenizer, tmp_path_factory.mktemp("bf16") / "tiny", torch.bfloat16)


@pytest.fixture(scope="module")
def fp32_model(tiny_factory, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tiny_factory, tokenizer, tmp_path_factory.mktemp("fp32") / "tiny", torch.float32,
                 tie_word_embeddings=False)


def _argv(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--calib", f"text:{text}", "--nsamples", "8", "--seqlen", "32", "--epochs", "2",
            "--batch-size", "2", "--lr", "1e-3", "--precision", "fp32", "--device", "cpu", "--threads", "1",
            "--eval", f"text:{text}", "--eval-seqlen", "32", "--max-windows", "3", "--eval-dense", "--quiet",
            "--out", str(out), *extra]


def _weights(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "model").glob("*.safetensors"))}


@pytest.mark.parametrize("extra", [(), ("--pruner", "sparsegpt"), ("--structured", "0.25"),
                                   ("--finetune", "dsnot")], ids=["wanda-ebft", "sparsegpt", "structured", "dsnot"])
def test_a_streamed_run_gives_the_bytes_of_an_in_memory_one(extra, bf16_model: Path, text_file: Path,
                                                             tmp_path: Path) -> None:
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    assert main(_argv(bf16_model, text_file, memory, "--stream", "off", *extra)) == 0
    assert main(_argv(bf16_model, text_file, streamed, "--stream", "on", *extra)) == 0
    assert _weights(memory) == _weights(streamed)
    a, b = (json.loads((p / "report.json").read_text()) for p in (memory, streamed))
    assert a["model"]["streamed"] is False and b["model"]["streamed"] is True
    assert a["eval"] == b["eval"] and a["eval_dense"] == b["eval_dense"] and a["sparsity"] == b["sparsity"]
    assert [x["final_loss"] for x in a["blocks"]] == [x["final_loss"] for x in b["blocks"]]
    guard_a, guard_b = (dict(r.get("model_guard") or {}, seconds=None) for r in (a, b))
    assert guard_a == guard_b


def test_a_bf16_model_stays_bf16_and_its_masks_exact(bf16_model: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_argv(bf16_model, text_file, out, "--stream", "on")) == 0
    source, saved = load_file(str(bf16_model / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert source.keys() == saved.keys() and all(t.dtype == torch.bfloat16 for t in saved.values())
    assert (out / "model" / "model.safetensors").stat().st_size == (bf16_model / "model.safetensors").stat().st_size
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["dtype"] == report["model"]["saved_dtype"] == "bfloat16"
    for name, weight in saved.items():
        if name.endswith("proj.weight"):  # Wanda 50%: exactly half of every row is 0.0
            assert ((weight == 0).sum(1) == weight.shape[1] // 2).all(), name
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype="auto")
    assert reloaded.dtype == torch.bfloat16 and len(find_blocks(reloaded)) == NBLOCKS
    assert main(_argv(bf16_model, text_file, tmp_path / "fp32", "--save-dtype", "fp32")) == 0
    as_fp32 = load_file(str(tmp_path / "fp32" / "model" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in as_fp32.values())


def test_a_streamed_run_resumes_bitwise(fp32_model: Path, text_file: Path, tmp_path: Path, interrupt_after) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(_argv(fp32_model, text_file, whole, "--stream", "on")) == 0
    with interrupt_after(1):
        assert main(_argv(fp32_model, text_file, resumed, "--stream", "on")) == 130
    assert main(_argv(fp32_model, text_file, resumed, "--stream", "on", "--resume")) == 0
    assert _weights(whole) == _weights(resumed)
    assert main(_argv(fp32_model, text_file, tmp_path / "memory", "--stream", "off")) == 0
    assert _weights(whole) == _weights(tmp_path / "memory")  # untied head: both are written from the model


def test_streaming_refusals(fp32_model: Path, tiny_model_dir: Path, text_file: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(fp32_model, text_file, tmp_path / "a", "--stream", "on", "--finetune", "lora")) == 2
    assert "trains the whole model at once, which needs it in memory" in capsys.readouterr().err
    gguf_like = tmp_path / "model.gguf"
    gguf_like.write_bytes(b"GGUF")
    assert main(_argv(gguf_like, text_file, tmp_path / "b", "--stream", "on")) in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
