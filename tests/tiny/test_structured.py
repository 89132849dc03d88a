"""Structured pruning (--structured): allocation, surgery, the block walk, save/reload, CLI, resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ebft.checkpoint import work_dir
from ebft.cli import main
from ebft.config import FinetuneConfig, PruneConfig
from ebft.errors import EbftError, UsageError
from ebft.models import find_blocks
from ebft.models.blocks import call_block
from ebft.structured import (
    BlockLayout,
    block_layout,
    config_accepts,
    head_scores,
    plan_structure,
    select_channels,
    select_heads,
    shrink_block,
)
from ebft.walk import prune_and_finetune

CPU = torch.device("cpu")

#: (family, overrides): GQA (4 heads / 2 KV heads), plain multi-head attention, biases (qwen2), q/k norms (qwen3)
CASES = [
    ("llama", {}),
    ("llama", {"num_key_value_heads": 4}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
]
IDS = ["llama-gqa", "llama-mha", "mistral-gqa", "qwen2-bias", "qwen3-qknorm"]


def _calib(n: int = 8, seqlen: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _ebft(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"method": "ebft", "epochs": 3, "lr": 1e-3, "batch_size": 4, "precision": "fp32", **kw})


def _none() -> FinetuneConfig:
    return FinetuneConfig(method="none")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _layout(hidden: int = 64, heads: int = 4, kv: int = 2, head_dim: int = 16, inter: int = 128) -> BlockLayout:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim, num_hidden_layers=1, vocab_size=16)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return block_layout(find_blocks(model).blocks[0], config)


# ----------------------------------------------------------------------------- allocation


def test_smollm2_plan_removes_exactly_a_quarter_split_evenly() -> None:
    """SmolLM2-135M's widths at 0.25: 2 of 3 query heads per group, all KV heads, 1152/1536 channels."""
    lay = _layout(hidden=576, heads=9, kv=3, head_dim=64, inter=1536)
    assert lay.params == 3_538_944  # 3.54M linear weights per block (FACTS.md)
    assert (lay.q_head_params, lay.kv_head_params, lay.channel_params) == (2 * 64 * 576, 2 * 64 * 576, 3 * 576)
    plan = plan_structure(lay, 0.25)
    assert (plan.heads, plan.kv_heads, plan.heads_per_group, plan.intermediate) == (6, 3, 2, 1152)
    assert plan.achieved == 0.25
    d = plan.to_dict()
    assert d["attention_removed_fraction"] == d["mlp_removed_fraction"] == 0.25
    assert d["block_linear_params_after"] == 3_538_944 * 3 // 4


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8])
@pytest.mark.parametrize("shape", [dict(), dict(kv=4), dict(hidden=576, heads=9, kv=3, head_dim=64, inter=1536)],
                         ids=["gqa", "mha", "smollm2"])
def test_plan_reaches_the_ratio_within_one_channel(ratio: float, shape: dict) -> None:
    lay = _layout(**shape)
    plan = plan_structure(lay, ratio)
    assert abs(plan.achieved - ratio) <= 0.5 * lay.channel_params / lay.params + 1e-12
    assert 1 <= plan.kv_heads <= lay.num_kv_heads and 1 <= plan.heads_per_group <= lay.group_size
    assert 1 <= plan.intermediate <= lay.intermediate
    removed = (lay.num_heads - plan.heads) * lay.q_head_params + (lay.num_kv_heads - plan.kv_heads) * \
        lay.kv_head_params + (lay.intermediate - plan.intermediate) * lay.channel_params
    assert plan.achieved == removed / lay.params
    if ratio == 0.0:
        assert (plan.heads, plan.kv_heads, plan.intermediate) == (lay.num_heads, lay.num_kv_heads, lay.intermediate)


def test_plan_refuses_what_cannot_be_reached() -> None:
    lay = _layout()
    with pytest.raises(UsageError, match=r"--structured 0.99 cannot be reached .* at most 0\.8837 of"):
        plan_structure(lay, 0.99)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(UsageError, match=r"--structured must be in \[0, 1\)"):
            plan_structure(lay, bad)


def test_plan_respects_what_the_config_accepts() -> None:
    """Llama's config wants hidden_size % num_attention_heads == 0: 64 wide with 4 heads never gets 3."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                         head_dim=16, num_hidden_layers=1, vocab_size=16)
    with torch.device("meta"):
        lay = block_layout(find_blocks(LlamaForCausalLM(config)).blocks[0], config)
    assert plan_structure(lay, 0.25).heads == 3  # 25% of attention and of the MLP, but 3 heads do not divide 64 ...
    assert plan_structure(lay, 0.25, config_accepts(config)).heads in (2, 4)  # ... so the config rules it out


# ----------------------------------------------------------------------------- surgery


@pytest.mark.parametrize("kept_q,kept_kv", [([0, 2, 4, 7], [0, 1, 2, 3]), ([2, 3, 6, 7], [1, 3]), ([5], [2])],
                         ids=["heads-in-every-group", "whole-groups", "one-head"])
def test_shrunken_block_equals_the_masked_dense_block(tiny_factory, kept_q: list[int], kept_kv: list[int]) -> None:
    """Removing heads/channels gives exactly the dense block with their o_proj/down_proj columns zeroed,
    so the surgery keeps every query head attached to its own key/value head."""
    model = tiny_factory("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    block = find_blocks(model).blocks[0]
    lay = block_layout(block, model.config)
    channels = list(range(0, 128, 3))
    masked = copy.deepcopy(block)
    with torch.no_grad():
        keep_cols = torch.zeros(lay.num_heads * lay.head_dim, dtype=torch.bool)
        for h in kept_q:
            keep_cols[h * lay.head_dim:(h + 1) * lay.head_dim] = True
        masked.self_attn.o_proj.weight[:, ~keep_cols] = 0
        keep_ch = torch.zeros(lay.intermediate, dtype=torch.bool)
        keep_ch[channels] = True
        masked.mlp.down_proj.weight[:, ~keep_ch] = 0
    shrink_block(block, lay, kept_q, kept_kv, channels)
    assert block.self_attn.q_proj.weight.shape == (len(kept_q) * 8, 64)
    assert block.self_attn.k_proj.weight.shape == block.self_attn.v_proj.weight.shape == (len(kept_kv) * 8, 64)
    assert block.self_attn.o_proj.weight.shape == (64, len(kept_q) * 8)
    assert block.mlp.gate_proj.weight.shape == block.mlp.up_proj.weight.shape == (len(channels), 64)
    assert block.mlp.down_proj.weight.shape == (64, len(channels))
    assert block.self_attn.num_key_value_groups == len(kept_q) // len(kept_kv)

    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    rotary = model.model.rotary_emb(x, torch.arange(10)[None])
    kwargs = {"position_embeddings": rotary, "attention_mask": None, "position_ids": torch.arange(10)[None]}
    with torch.no_grad():
        torch.testing.assert_close(call_block(block, x, kwargs), call_block(masked, x, kwargs), rtol=1e-5, atol=1e-5)


def test_shrink_refuses_a_query_head_outside_its_group(tiny_factory) -> None:
    model = tiny_factory("llama")
    block = find_blocks(model).blocks[0]
    with pytest.raises(ValueError, match="not in key/value group"):
        shrink_block(block, block_layout(block, model.config), [0, 2], [0], list(range(64)))


# ----------------------------------------------------------------------------- the walk


@pytest.mark.parametrize("family,overrides", CASES, ids=IDS)
def test_shapes_config_and_reload(family: str, overrides: dict, tiny_factory, tmp_path: Path) -> None:
    model = tiny_factory(family, **overrides)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    head_dim = model.config.hidden_size // heads
    ids = _calib()
    result = prune_and_finetune(model, ids, PruneConfig(structured=0.3), _none(), CPU)
    s = result.summary
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == \
        (s["heads"][1], s["kv_heads"][1], s["intermediate"][1], head_dim)
    assert s["heads"][0] == heads and s["kv_heads"][0] == kv and cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.num_attention_heads < heads or cfg.intermediate_size < 128
    assert abs(s["achieved"] - 0.3) < 0.02
    linear_after = 0
    for block in find_blocks(model).blocks:
        attn, mlp = block.self_attn, block.mlp
        assert attn.q_proj.out_features == attn.o_proj.in_features == cfg.num_attention_heads * head_dim
        assert attn.k_proj.out_features == attn.v_proj.out_features == cfg.num_key_value_heads * head_dim
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == cfg.intermediate_size
        if attn.q_proj.bias is not None:
            assert attn.q_proj.bias.shape == (attn.q_proj.out_features,)
        linear_after += sum(p.numel() for m in block.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    assert linear_after == 2 * s["block_linear_params_after"]
    assert s["parameters_after"] == sum(p.numel() for p in model.parameters()) < s["parameters_before"]
    assert [len(b.compression["kept_heads"]) for b in result.blocks] == [cfg.num_attention_heads] * 2

    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert type(reloaded) is type(model)
    assert sum(p.numel() for p in reloaded.parameters()) == s["parameters_after"]
    torch.testing.assert_close(_logits(reloaded, ids), logits, rtol=0, atol=0)


@pytest.mark.parametrize("family,overrides", CASES[:2], ids=IDS[:2])
def test_zero_removal_is_numerically_identical(family: str, overrides: dict, tiny_factory) -> None:
    model = tiny_factory(family, **overrides)
    original = copy.deepcopy(model)
    ids = _calib()
    result = prune_and_finetune(model, ids, PruneConfig(structured=0.0), _none(), CPU)
    assert result.summary["achieved"] == 0.0
    assert result.summary["parameters_after"] == result.summary["parameters_before"]
    assert all(b.init_loss == 0.0 for b in result.blocks)
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(_logits(model, ids), _logits(original, ids))


def test_fluctuation_keeps_the_heads_and_channels_it_scores_highest(tiny_factory) -> None:
    """The walk's choice for block 0 is the top of the fluctuation scores of the dense block's inputs."""
    model = tiny_factory("llama")
    reference = copy.deepcopy(model)
    ids = _calib()
    result = prune_and_finetune(model, ids, PruneConfig(structured=0.3), _none(), CPU)
    block = find_blocks(reference).blocks[0]
    seen: dict[str, list[torch.Tensor]] = {"o": [], "down": []}
    hooks = [block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["o"].append(a[0])),
             block.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0]))]
    _logits(reference, ids)
    for h in hooks:
        h.remove()
    o_in = torch.cat(seen["o"]).reshape(-1, 64).double()
    scores = head_scores(o_in.var(0) * block.self_attn.o_proj.weight.double().pow(2).sum(0), 4)
    s = result.summary
    kept_q, kept_kv = select_heads(scores, 2, s["kv_heads"][1], s["heads"][1] // s["kv_heads"][1])
    assert result.blocks[0].compression == {"kept_heads": kept_q, "kept_kv_heads": kept_kv}
    down_in = torch.cat(seen["down"]).reshape(-1, 128).double()
    channels = select_channels(down_in.var(0) * block.mlp.down_proj.weight.double().pow(2).sum(0), s["intermediate"][1])
    shrunk = find_blocks(model).blocks[0].mlp.down_proj.weight
    torch.testing.assert_close(shrunk, block.mlp.down_proj.weight[:, channels], rtol=0, atol=0)


@pytest.mark.parametrize("family,overrides", CASES[:2], ids=IDS[:2])
def test_ebft_lowers_the_loss_of_every_shrunken_block(family: str, overrides: dict, tiny_factory) -> None:
    untuned = prune_and_finetune(tiny_factory(family, **overrides), _calib(), PruneConfig(structured=0.3),
                                            _none(), CPU)
    model = tiny_factory(family, **overrides)
    tuned = prune_and_finetune(model, _calib(), PruneConfig(structured=0.3),
                                          _ebft(holdout_fraction=0.0), CPU)
    assert tuned.blocks[0].init_loss == pytest.approx(untuned.blocks[0].init_loss, rel=1e-6)
    assert tuned.blocks[0].compression == untuned.blocks[0].compression  # same dense inputs, same choice
    for block in tuned.blocks:
        assert block.restored is None and block.steps == 3 * 2
        assert block.final_loss < 0.9 * block.init_loss
    assert not any(p.requires_grad for p in model.parameters())


def test_magnitude_score_needs_no_activations(tiny_factory) -> None:
    model = tiny_factory("llama")
    w = find_blocks(model).blocks[0].mlp.down_proj.weight.detach().clone()
    result = prune_and_finetune(model, _calib(), PruneConfig(structured=0.3, structured_score="magnitude"),
                                           _none(), CPU)
    keep = select_channels(w.double().pow(2).sum(0), result.summary["intermediate"][1])
    torch.testing.assert_close(find_blocks(model).blocks[0].mlp.down_proj.weight, w[:, keep], rtol=0, atol=0)


def test_unsupported_architecture_and_mask_methods_are_refused(tiny_factory) -> None:
    with pytest.raises(EbftError, match=r"--structured does not support model type 'gemma3_text'; it supports: llama"):
        prune_and_finetune(tiny_factory("gemma3_text"), _calib(), PruneConfig(structured=0.2), _none(), CPU)
    with pytest.raises(UsageError, match="--finetune dsnot refines pruning masks; with --structured use --finetune "
                                         "ebft, kd, lora, none"):
        prune_and_finetune(tiny_factory("llama"), _calib(), PruneConfig(structured=0.2),
                                      FinetuneConfig(method="dsnot"), CPU)
    with pytest.raises(UsageError, match="does not combine with --sparsity or --nm"):
        PruneConfig(structured=0.2, nm=(2, 4))
    with pytest.raises(UsageError, match="--structured-score 'wanda' is unknown"):
        PruneConfig(structured=0.2, structured_score="wanda")


# ----------------------------------------------------------------------------- CLI, report, LoRA, resume


def _argv(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--out", str(out), "--calib", f"text:{text}", "--nsamples", "6", "--seqlen", "32",
            "--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--threads", "1", "--quiet",
            "--structured", "0.3", *extra]


@pytest.fixture(scope="module")
def model4(tiny_factory, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GQA Llama with 4 blocks, saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("structured") / "tiny4"
    tiny_factory("llama", num_hidden_layers=4, hidden_size=32, intermediate_size=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ebft_run(model4: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(_argv(model4, text_file, out, "--eval", f"text:{text_file}", "--eval-seqlen", "64")) == 0
    return out


def test_cli_run_saves_a_smaller_model_that_reloads(ebft_run: Path, model4: Path, capsys) -> None:
    report = json.loads((ebft_run / "report.json").read_text())
    s = report["structured"]
    assert report["config"]["prune"]["structured"] == 0.3 and report["config"]["prune"]["sparsity"] == 0.0
    assert s["requested"] == 0.3 and abs(s["achieved"] - 0.3) < 0.02 and s["score"] == "fluctuation"
    assert [b["compression"]["kept_heads"] for b in report["blocks"]] and all(b["final_loss"] < b["init_loss"] for b in report["blocks"])
    model = AutoModelForCausalLM.from_pretrained(ebft_run / "model", dtype=torch.float32)
    assert model.config.num_attention_heads == s["heads"][1] and model.config.intermediate_size == s["intermediate"][1]
    assert sum(p.numel() for p in model.parameters()) == s["parameters_after"]
    size = (ebft_run / "model" / "model.safetensors").stat().st_size
    assert report["saved_bytes"] == size < (model4 / "model.safetensors").stat().st_size
    assert report["eval"] and all(v == v for v in report["eval"].values())


def test_cli_lora_on_the_structured_model(model4: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert main(_argv(model4, text_file, out, "--finetune", "lora")) == 0
    printed = capsys.readouterr().out
    assert "removed 29." in printed and "lora:" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["model_stage"]["steps"] == 2 * 3 and report["model_stage"]["final_loss"] < report["model_stage"]["init_loss"]
    assert all(b["steps"] == 0 for b in report["blocks"])
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == report["structured"]["parameters_after"]


def test_resume_after_an_interruption_is_bitwise_identical(model4: Path, text_file: Path, ebft_run: Path,
                                                           tmp_path: Path, interrupt_after) -> None:
    """Stopped right after block 1's checkpoint, then resumed: the finished blocks get the plan's shapes
    back before their saved weights are loaded, and the model is byte for byte the uninterrupted one."""
    out = tmp_path / "run"
    argv = _argv(model4, text_file, out, "--eval", f"text:{text_file}", "--eval-seqlen", "64")

    with interrupt_after(1):
        assert main(argv) == 130
    assert json.loads((work_dir(out) / "run.json").read_text())["done"] == 2
    assert main([*argv, "--resume"]) == 0
    assert (out / "model" / "model.safetensors").read_bytes() == (ebft_run / "model" / "model.safetensors").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] == [2]
    expected = json.loads((ebft_run / "report.json").read_text())
    assert [b["compression"]["kept_heads"] for b in report["blocks"]] == [b["compression"]["kept_heads"] for b in expected["blocks"]]
    assert report["eval"] == expected["eval"]
