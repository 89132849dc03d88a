"""The LoRA baseline (--finetune lora): end-to-end adapters on the pruned model, merged and re-masked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from ebft.cli import main
from ebft.config import CalibConfig, EvalConfig, FinetuneConfig, PruneConfig, RunConfig
from ebft.errors import EbftError, UsageError
from ebft.finetune.lora import causal_lm_loss, lora_finetune
from ebft.models import find_blocks
from ebft.runner import run_prune
from ebft.walk import prune_and_finetune

CPU = torch.device("cpu")


def _calib(n: int = 8, seqlen: int = 16, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _lora(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"method": "lora", "epochs": 4, "lr": 1e-2, "batch_size": 4, "precision": "fp32", **kw})


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: linear.weight.detach().clone() for name, linear in find_blocks(model).all_linears().items()}


def _zeros(model: nn.Module) -> int:
    return sum(int((w == 0).sum()) for w in _weights(model).values())


@pytest.fixture
def pruned(tiny_llama: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    calib = _calib()
    result = prune_and_finetune(tiny_llama, calib, PruneConfig("wanda", 0.5), FinetuneConfig(method="none"), CPU)
    return tiny_llama, result.masks, calib


def test_lora_lowers_loss_keeps_sparsity_and_unwraps(pruned, tmp_path: Path) -> None:
    model, masks, calib = pruned
    before = _weights(model)
    zeros_before = _zeros(model)
    head = model.lm_head.weight.detach().clone()
    loss_before = causal_lm_loss(model, calib, CPU, 4)

    tuned, result = lora_finetune(model, calib, masks, _lora(), CPU, seed=0)

    # a plain transformers model again: the same object, no peft modules or attributes left
    assert tuned is model and type(tuned) is LlamaForCausalLM
    assert not any("lora" in name or "base_layer" in name for name, _ in tuned.named_modules())
    assert not any("lora" in name for name in tuned.state_dict())
    assert not hasattr(tuned, "peft_config")
    assert not any(p.requires_grad for p in tuned.parameters())
    assert all(p.device == CPU for p in tuned.parameters())

    # training lowered the causal-LM loss, and the merged, re-masked model keeps most of the gain
    assert result.steps == 4 * 2 and len(result.losses) == 4
    assert result.losses[-1] < result.losses[0]
    assert result.init_loss == pytest.approx(loss_before)
    assert result.final_loss == pytest.approx(causal_lm_loss(tuned, calib, CPU, 4))
    assert result.final_loss < loss_before
    # rank 8 on 7 layer types x 2 blocks: r * (in + out) each
    linears = find_blocks(tuned).all_linears()
    assert result.details["trainable_parameters"] == sum(8 * (l.in_features + l.out_features) for l in linears.values())
    assert result.details["targets"] == 14

    # exactly as sparse as the pruned model: every pruned weight 0.0, every kept weight moved
    after = _weights(tuned)
    assert _zeros(tuned) == zeros_before
    for name, mask in masks.items():
        assert int((after[name][~mask] != 0).sum()) == 0, name
        assert torch.equal(after[name] == 0, ~mask), name
        assert not torch.equal(after[name], before[name]), name
    assert torch.equal(tuned.lm_head.weight, head)  # no adapters on the (tied) head / embeddings

    tuned.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(reloaded) is LlamaForCausalLM
    for name, weight in _weights(reloaded).items():
        assert torch.equal(weight, after[name]), name


def test_lora_is_seeded(tiny_factory) -> None:
    outs = []
    for _ in range(2):
        model = tiny_factory("llama")
        calib = _calib()
        result = prune_and_finetune(model, calib, PruneConfig("magnitude", 0.5), FinetuneConfig(method="none"), CPU)
        lora_finetune(model, calib, result.masks, _lora(epochs=1, options={"dropout": 0.1}), CPU, seed=3)
        outs.append(_weights(model))
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name


def test_lora_targets_subset_and_unknown(pruned) -> None:
    model, masks, calib = pruned
    before = _weights(model)
    _, result = lora_finetune(model, calib, masks, _lora(epochs=1, options={"targets": "q_proj,v_proj"}), CPU)
    assert result.details["targets"] == 4
    after = _weights(model)
    for name in after:
        changed = not torch.equal(after[name], before[name])
        assert changed == name.endswith(("q_proj", "v_proj")), name
    with pytest.raises(UsageError, match="--lora-targets wq matches no linear layer"):
        lora_finetune(model, calib, masks, _lora(options={"targets": ("wq",)}), CPU)
    assert type(model) is LlamaForCausalLM


def test_nonfinite_loss_drops_the_adapters(pruned) -> None:
    model, masks, calib = pruned
    before = _weights(model)
    _, result = lora_finetune(model, calib, masks, _lora(lr=1e30, grad_clip=0.0, epochs=3), CPU)
    assert result.restored is not None and "non-finite" in result.restored
    assert not any("lora" in name for name, _ in model.named_modules())
    for name, weight in _weights(model).items():
        assert torch.equal(weight, before[name]), name


def test_missing_peft_is_one_line(pruned, monkeypatch: pytest.MonkeyPatch) -> None:
    model, masks, calib = pruned
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(EbftError, match=r"install peft \(pip install 'ebft\[lora\]'\)"):
        lora_finetune(model, calib, masks, _lora(), CPU)


def test_run_prune_lora(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    cfg = RunConfig(
        model=str(tiny_model_dir), out=tmp_path / "run",
        prune=PruneConfig("wanda", 0.5), calib=CalibConfig(source=f"text:{text_file}", nsamples=4, seqlen=32),
        finetune=_lora(epochs=2, batch_size=2), eval=EvalConfig(sources=[f"text:{text_file}"], seqlen=32,
                                                                max_windows=2),
        device="cpu",
    )
    report = run_prune(cfg).to_dict()
    lora = report["model_stage"]
    assert lora["steps"] == 4 and len(lora["losses"]) == 2 and lora["details"]["trainable_parameters"] > 0
    assert lora["final_loss"] < lora["init_loss"] and lora["seconds"] > 0
    assert report["sparsity"]["weights_zero"] == pytest.approx(0.5)
    assert report["config"]["finetune"]["method"] == "lora"
    assert "lora" in report["timings"]
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["model_stage"]["steps"] == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert type(model) is LlamaForCausalLM
    linears = find_blocks(model).all_linears()
    zeros = sum(int((l.weight == 0).sum()) for l in linears.values())
    assert zeros == sum(l.weight.numel() for l in linears.values()) // 2


def _prune_args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--calib", f"text:{text}", "--nsamples", "4", "--seqlen", "32", "--epochs", "1",
            "--device", "cpu", "--threads", "1", "--out", str(out), "--finetune", "lora", *extra]


def test_cli_lora(tiny_model_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = _prune_args(tiny_model_dir, text_file, out, "--lr", "1e-2", "--batch-size", "2", "--lora-rank", "4",
                       "--lora-alpha", "8", "--quiet")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "lora:" in printed and "trainable parameters" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["finetune"]["options"]["rank"] == 4
    assert report["config"]["finetune"]["options"]["alpha"] == 8.0
    assert report["model_stage"]["steps"] == 2


@pytest.mark.parametrize("extra,fragment", [
    (("--lora-rank", "0"), "--lora-rank must be a positive whole number"),
    (("--lora-alpha", "-1"), "--lora-alpha must be a positive number"),
    (("--lora-dropout", "1"), "--lora-dropout must be in [0, 1)"),
    (("--lora-targets", "q_proj,,v_proj"), "--lora-targets expects"),
    (("--lora-targets", "wq"), "--lora-targets wq matches no linear layer"),
])
def test_cli_bad_lora_flags(extra: tuple[str, ...], fragment: str, tiny_model_dir: Path, text_file: Path,
                            tmp_path: Path, capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    out = tmp_path / "out"
    assert main(_prune_args(tiny_model_dir, text_file, out, *extra)) == 2
    one_line_error(capsys.readouterr().err, fragment)
    assert not out.exists()


def test_bf16_autocast(pruned) -> None:
    model, masks, calib = pruned
    _, result = lora_finetune(model, calib, masks, _lora(precision="bf16"), CPU)
    assert result.final_loss < result.init_loss
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, linear in find_blocks(model).all_linears().items():
        assert int((linear.weight[~masks[name]] != 0).sum()) == 0, name
