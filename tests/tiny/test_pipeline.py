"""prune_and_finetune and run_prune on tiny random models."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ebft.config import CalibConfig, EvalConfig, FinetuneConfig, PruneConfig, RunConfig
from ebft.errors import EbftError
from ebft.models import find_blocks
from ebft.runner import run_prune
from ebft.sparsity import check_nm, mask_stats
from ebft.walk import WalkResult, prune_and_finetune

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "smollm3"]
CPU = torch.device("cpu")


def _calib(n: int = 8, seqlen: int = 16, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, prune: PruneConfig, finetune: FinetuneConfig, n: int = 8) -> WalkResult:
    return prune_and_finetune(model, _calib(n), prune, finetune, CPU, seed=0)


def _ebft(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"method": "ebft", "epochs": 3, "lr": 2e-3, "batch_size": 2, "precision": "fp32", **kw})


def _assert_masks_in_model(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    linears = find_blocks(model).all_linears()
    assert set(masks) == set(linears)
    for name, mask in masks.items():
        weight = linears[name].weight.data
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert int((weight[~mask] != 0).sum()) == 0, name
        assert int((weight[mask] == 0).sum()) == 0, name  # random float weights are never exactly 0


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_ebft_every_block_improves(family: str, tiny_factory: Callable[..., nn.Module]) -> None:
    model = tiny_factory(family)
    result = _run(model, PruneConfig("wanda", 0.5), _ebft())
    assert [b.index for b in result.blocks] == [0, 1]
    for block in result.blocks:
        assert block.restored is None
        assert block.final_loss < block.init_loss
        assert block.steps == 3 * 4
        assert len(block.epoch_losses) == 3
        assert block.seconds > 0
    _assert_masks_in_model(model, result.masks)
    # the masks are kept packed, eight entries to a byte
    assert result.masks.nbytes() == sum(-(-mask.numel() // 8) for mask in result.masks.values())
    stats = mask_stats(result.masks)
    assert set(stats["per_layer"].values()) == {0.5}
    # every row keeps exactly half (Wanda compares within rows)
    for mask in result.masks.values():
        assert torch.equal(mask.sum(dim=1), torch.full((mask.shape[0],), mask.shape[1] // 2))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.device == CPU for p in model.parameters())


@pytest.mark.parametrize("pruner", ["wanda", "magnitude"])
def test_nm_2_4_with_ebft(pruner: str, tiny_llama: nn.Module) -> None:
    result = _run(tiny_llama, PruneConfig(pruner, nm=(2, 4)), _ebft(epochs=2))
    linears = find_blocks(tiny_llama).all_linears()
    for name, mask in result.masks.items():
        assert check_nm(mask, 2, 4)
        assert check_nm(linears[name].weight.data, 2, 4)
    assert set(mask_stats(result.masks)["per_layer"].values()) == {0.5}
    _assert_masks_in_model(tiny_llama, result.masks)


# ----------------------------------------------------------- reference: sequential Wanda, no tuning


def _reference_masks(model: nn.Module, ids: torch.Tensor, sparsity: float,
                     nm: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Sequential Wanda written out directly on ``model.model`` (pruned in place)."""
    inner = model.model
    position_ids = torch.arange(ids.shape[1])[None]
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        hidden = inner.embed_tokens(ids)
        rotary = inner.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(inner.layers):
            sq_sums: dict[str, torch.Tensor] = {}
            counts: dict[str, int] = {}
            handles = []
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            for name, linear in linears.items():
                def hook(mod, args, out, _name=name):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sq_sums[_name] = sq_sums.get(_name, 0) + (x * x).sum(0)
                    counts[_name] = counts.get(_name, 0) + x.shape[0]
                handles.append(linear.register_forward_hook(hook))
            layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rotary)  # dense
            for h in handles:
                h.remove()
            for name, linear in linears.items():
                norm = (sq_sums[name] / counts[name]).sqrt().float()
                score = linear.weight.abs() * norm[None, :]
                out_f, in_f = score.shape
                if nm is None:
                    k = math.floor(in_f * sparsity)
                    order = torch.sort(score, dim=1, stable=True).indices
                    mask = torch.ones_like(score, dtype=torch.bool)
                    mask.scatter_(1, order[:, :k], False)
                else:
                    n, m = nm
                    groups = score.reshape(out_f, in_f // m, m)
                    order = torch.sort(groups, dim=2, stable=True).indices
                    mask = torch.ones_like(groups, dtype=torch.bool)
                    mask.scatter_(2, order[..., : m - n], False)
                    mask = mask.reshape(out_f, in_f)
                linear.weight.mul_(mask)
                masks[f"model.layers.{index}.{name}"] = mask
            out = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
    return masks


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_no_finetune_equals_sequential_wanda_reference(
    family: str, nm: tuple[int, int] | None, tiny_factory: Callable[..., nn.Module]
) -> None:
    ids = _calib(8)
    model = tiny_factory(family, num_hidden_layers=3)
    reference = tiny_factory(family, num_hidden_layers=3)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    prune = PruneConfig("wanda", 0.5, nm=nm)
    result = prune_and_finetune(model, ids, prune, FinetuneConfig(method="none"), CPU)
    want = _reference_masks(reference, ids, 0.5, nm)
    assert set(result.masks) == set(want)
    for name in want:
        assert torch.equal(result.masks[name], want[name]), name
    got_state, ref_state = model.state_dict(), reference.state_dict()
    for key in got_state:
        assert torch.equal(got_state[key], ref_state[key]), key
    for key in dense:
        module = key.removesuffix(".weight")
        expected = dense[key] * result.masks[module] if module in result.masks else dense[key]
        assert torch.equal(got_state[key], expected), key
    for block in result.blocks:
        # without tuning the reported loss is the pruned block's, before and after
        assert math.isfinite(block.init_loss) and block.init_loss > 0
        assert block.final_loss == block.init_loss and block.steps == 0


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reported_losses_match_a_recomputation(family: str, tiny_factory: Callable[..., nn.Module]) -> None:
    """Block i is tuned on the outputs of the pruned and tuned blocks before it, against dense block i.

    Recompute both losses from the final model, the dense model and the masks: the inputs of block i
    are the final model's hidden states; the untuned block is the dense one times the masks.
    """
    ids = _calib(8)
    model = tiny_factory(family, num_hidden_layers=3)
    dense = tiny_factory(family, num_hidden_layers=3)
    result = prune_and_finetune(model, ids, PruneConfig("wanda", 0.5), _ebft(), CPU)
    assert all(b.restored is None for b in result.blocks)
    position_ids = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        inputs = model(ids, output_hidden_states=True).hidden_states
        rotary = dense.model.rotary_emb(inputs[0], position_ids)
        kw = dict(attention_mask=None, position_ids=position_ids, position_embeddings=rotary)
        for index, report in enumerate(result.blocks):
            x = inputs[index]
            target = dense.model.layers[index](x, **kw)
            final = model.model.layers[index](x, **kw)
            untuned = tiny_factory(family, num_hidden_layers=3).model.layers[index]
            for name, linear in untuned.named_modules():
                if isinstance(linear, nn.Linear):
                    linear.weight.mul_(result.masks[f"model.layers.{index}.{name}"])
            init = untuned(x, **kw)
            assert report.init_loss == pytest.approx(_mse(init, target), rel=1e-4)
            assert report.final_loss == pytest.approx(_mse(final, target), rel=1e-4)


def test_forward_batch_size_does_not_change_the_result(tiny_factory: Callable[..., nn.Module]) -> None:
    """Propagation writes outputs over its inputs batch by batch; uneven batches must not mix windows."""
    ids = _calib(7)
    results, states = [], []
    for forward_batch_size in (7, 3):
        model = tiny_factory("llama", num_hidden_layers=3)
        results.append(prune_and_finetune(model, ids, PruneConfig("wanda", 0.5), _ebft(batch_size=3), CPU,
                                          forward_batch_size=forward_batch_size))
        states.append(model.state_dict())
    whole, batched = results
    assert all(torch.equal(whole.masks[n], batched.masks[n]) for n in whole.masks)
    for a, b in zip(whole.blocks, batched.blocks):
        assert a.init_loss == pytest.approx(b.init_loss, rel=1e-4)
        assert a.final_loss == pytest.approx(b.final_loss, rel=1e-4)
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-5)


def test_compile_matches_eager_over_blocks(tiny_factory: Callable[..., nn.Module]) -> None:
    """--compile through the pipeline: 3 blocks, a partial last batch (7 windows, 1 held out, batch 4),
    early stopping's held-out passes inside the compiled region; the same masks and weights as eager."""
    ids = _calib(7)
    results, states = [], []
    for compile_ in (False, True):
        model = tiny_factory("llama", num_hidden_layers=3)
        results.append(prune_and_finetune(model, ids, PruneConfig("wanda", 0.5),
                                          _ebft(batch_size=4, holdout_fraction=0.15, patience=5, options={"compile": compile_}),
                                          CPU))
        states.append(model.state_dict())
        assert all("forward" not in vars(block) for block in find_blocks(model).blocks)
    eager, compiled = results
    assert all(torch.equal(eager.masks[n], compiled.masks[n]) for n in eager.masks)
    for a, b in zip(eager.blocks, compiled.blocks):
        assert a.steps == b.steps == 3 * 2 and a.restored == b.restored and a.best_epoch == b.best_epoch
        assert b.final_loss == pytest.approx(a.final_loss, rel=1e-4)
        assert b.holdout_epoch_losses == pytest.approx(a.holdout_epoch_losses, rel=1e-4)
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-5)


def test_nm_width_not_divisible_fails_before_any_block(tiny_factory: Callable[..., nn.Module]) -> None:
    model = tiny_factory("llama", hidden_size=36, intermediate_size=72, num_attention_heads=3,
                         num_key_value_heads=1, head_dim=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    for block in find_blocks(model).blocks:
        block.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    with pytest.raises(EbftError) as info:
        _run(model, PruneConfig("wanda", nm=(2, 8)), _ebft())
    message = str(info.value)
    assert "2:8" in message and "36" in message and "model.layers.0." in message
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_divergent_lr_restores_every_block(tiny_factory: Callable[..., nn.Module]) -> None:
    diverged = tiny_factory("llama")
    result = _run(diverged, PruneConfig("wanda", 0.5), _ebft(lr=1e6, epochs=2))
    plain = tiny_factory("llama")
    untuned = _run(plain, PruneConfig("wanda", 0.5), FinetuneConfig(method="none"))
    for block in result.blocks:
        assert block.restored is not None
        assert block.final_loss == block.init_loss
        assert math.isfinite(block.init_loss)
    assert all(torch.isfinite(p).all() for p in diverged.parameters())
    # restoring puts back the untuned pruned block, so the result is exactly pruning without tuning
    for name in result.masks:
        assert torch.equal(result.masks[name], untuned.masks[name])
    a, b = diverged.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_leaves_model_usable(tiny_llama: nn.Module) -> None:
    _run(tiny_llama, PruneConfig("magnitude", 0.3), _ebft(epochs=1))
    assert not any(p.requires_grad for p in tiny_llama.parameters())
    assert all("forward" not in b.__dict__ for b in find_blocks(tiny_llama).blocks)
    with torch.no_grad():
        logits = tiny_llama(_calib(2)).logits
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------- run_prune


def _run_config(model_dir: Path, text: Path, out: Path | None, **prune) -> RunConfig:
    return RunConfig(
        model=str(model_dir),
        out=out,
        prune=PruneConfig(**({"pruner": "wanda", "sparsity": 0.5} | prune)),
        calib=CalibConfig(source=f"text:{text}", nsamples=4, seqlen=32, seed=0),
        finetune=FinetuneConfig(epochs=2, lr=1e-3, batch_size=2, precision="fp32"),
        eval=EvalConfig(sources=[f"text:{text}"], seqlen=32, max_windows=2),
        device="cpu",
    )


def test_run_prune_end_to_end(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    returned = run_prune(_run_config(tiny_model_dir, text_file, out)).to_dict()
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no partial folders left behind
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(returned))
    assert {"config", "blocks", "sparsity", "eval", "timings", "model"} <= set(report)
    assert report["config"]["prune"] == {"pruner": "wanda", "sparsity": 0.5, "nm": None, "structured": None,
                                         "structured_score": "fluctuation", "allocation": "uniform",
                                         "options": None, "allocation_options": None}
    assert report["config"]["calib"]["nsamples"] == 4
    assert report["model"]["blocks"] == 2
    assert [b["index"] for b in report["blocks"]] == [0, 1]
    for block in report["blocks"]:
        assert {"index", "init_loss", "final_loss", "seconds"} <= set(block)
        assert block["final_loss"] < block["init_loss"]
        assert block["seconds"] > 0
    sparsity = report["sparsity"]
    assert sparsity["overall"] == 0.5
    assert len(sparsity["per_layer"]) == 14 and set(sparsity["per_layer"].values()) == {0.5}
    assert sparsity["weights_zero"] == 0.5
    source = f"text:{text_file}"
    assert set(report["eval"]) == {source}
    assert 1.0 < report["eval"][source] < 1000.0
    assert report["eval_details"][source]["tokens"] == 2 * 31
    assert {"checks", "load", "prune_finetune", "eval", "save", "total"} <= set(report["timings"])
    assert report["timings"]["total"] < 120  # seconds, on a busy 2-core machine

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    linears = find_blocks(reloaded).all_linears()
    assert set(linears) == set(sparsity["per_layer"])
    for name, linear in linears.items():
        weight = linear.weight.data
        assert float((weight == 0).float().mean()) == sparsity["per_layer"][name]
        assert torch.equal((weight == 0).sum(dim=1), torch.full((weight.shape[0],), weight.shape[1] // 2))


def test_run_prune_nm_and_refuses_to_overwrite(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = run_prune(_run_config(tiny_model_dir, text_file, out, nm=(2, 4)))
    assert report.config["prune"]["nm"] == [2, 4]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    for linear in find_blocks(reloaded).all_linears().values():
        assert check_nm(linear.weight.data, 2, 4)
    stamp = (out / "report.json").read_bytes()
    with pytest.raises(EbftError, match="--overwrite"):
        run_prune(_run_config(tiny_model_dir, text_file, out))
    assert (out / "report.json").read_bytes() == stamp


def test_run_prune_without_out(tiny_model_dir: Path, text_file: Path) -> None:
    report = run_prune(_run_config(tiny_model_dir, text_file, None, pruner="magnitude"))
    assert "save" not in report.timings and report.saved_bytes is None
    assert report.sparsity["overall"] == 0.5


def test_percdamp_reaches_sparsegpt(tiny_factory: Callable[..., nn.Module]) -> None:
    """--percdamp changes SparseGPT's weight updates; the same value reproduces them exactly."""
    none = FinetuneConfig(method="none")
    weights = {}
    for damp in (0.01, 0.01, 10.0):
        model = tiny_factory("llama")
        _run(model, PruneConfig("sparsegpt", 0.5, options={"percdamp": damp}), none)
        weights.setdefault(damp, []).append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0.01][0], weights[0.01][1])
    assert not torch.equal(weights[0.01][0], weights[10.0][0])
