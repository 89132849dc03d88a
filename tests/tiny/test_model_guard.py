"""The model-level guard: the repaired model is kept only where it is closer to the dense model than pruning alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ebft.cli import main
from ebft.config import CalibConfig, EvalConfig, FinetuneConfig, PruneConfig, RunConfig
from ebft.guard import reference_from_logits, score_sums
from ebft.runner import run_prune
from ebft.walk import Callback


def test_kl_and_cross_entropy_against_a_plain_computation() -> None:
    g = torch.Generator().manual_seed(0)
    dense, model = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    p, q = torch.softmax(dense[:, :-1].double(), -1), torch.log_softmax(model[:, :-1].double(), -1)
    full_kl = float((p * (p.log() - q)).sum())
    ce = float(-q.gather(-1, ids[:, 1:, None]).sum())
    exact = reference_from_logits(dense, ids, k=7)  # every token kept: the KL is the full one
    kl, got_ce, count = score_sums(model, exact, slice(0, 2))
    assert count == 8 and kl == pytest.approx(full_kl, rel=1e-5) and got_ce == pytest.approx(ce, rel=1e-6)
    coarse = reference_from_logits(dense, ids, k=2)  # 2 tokens + the rest: a lower bound of the full KL
    assert 0 <= score_sums(model, coarse, slice(0, 2))[0] <= full_kl + 1e-6
    assert score_sums(dense, coarse, slice(0, 2))[0] == pytest.approx(0.0, abs=1e-5)  # the dense model itself


class _Corrupt(Callback):
    """After block ``index`` is tuned (and kept by the block guard), scramble its kept weights."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_tuned(self, walk, index: int, report) -> None:
        if index == self.index:
            with torch.no_grad():
                for module in walk.block.modules():
                    if isinstance(module, torch.nn.Linear):
                        g = torch.Generator().manual_seed(index)
                        noise = torch.randn(module.weight.shape, generator=g).to(module.weight.device) * 0.5
                        module.weight.mul_(1 + noise).mul_(module.weight != 0)  # pruned weights stay 0.0


def _cfg(model: Path, text: Path, out: Path | None, guard: bool = True) -> RunConfig:
    return RunConfig(model=str(model), out=out, prune=PruneConfig("wanda", 0.5),
                     calib=CalibConfig(source=f"text:{text}", nsamples=16, seqlen=32),  # 2 held out
                     finetune=FinetuneConfig(epochs=2, lr=1e-3, batch_size=2, precision="fp32", model_guard=guard),
                     eval=EvalConfig(sources=[f"text:{text}"], seqlen=32, max_windows=4), device="cpu")


@pytest.fixture(scope="module")
def four_blocks(tiny_factory, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("guard") / "tiny4"
    tiny_factory("llama", num_hidden_layers=4, hidden_size=32, intermediate_size=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_corrupted_block_goes_back_to_its_pruned_weights(four_blocks: Path, text_file: Path, tmp_path: Path) -> None:
    pruned = run_prune(dataclass_replace(_cfg(four_blocks, text_file, tmp_path / "none"), "none"))
    assert pruned.model_guard is None  # nothing was repaired: nothing to guard
    guarded = run_prune(_cfg(four_blocks, text_file, tmp_path / "guarded"), callbacks=[_Corrupt(1)])
    unguarded = run_prune(_cfg(four_blocks, text_file, tmp_path / "unguarded", guard=False), callbacks=[_Corrupt(1)])
    g = guarded.model_guard
    assert g["repaired"]["kl"] > g["pruned"]["kl"]  # the corruption made the model worse than pruning alone
    assert 1 in g["reverted_blocks"] and g["kept"]["kl"] <= g["pruned"]["kl"]
    assert set(g["tuned_blocks"]) | set(g["reverted_blocks"]) == {0, 1, 2, 3} and "went back" in g["decision"]
    assert unguarded.model_guard is None
    assert guarded.sparsity == unguarded.sparsity  # the masks are the run's, whatever the guard chose
    # a reverted block holds exactly its untuned pruned weights (for Wanda: the dense ones under the mask)
    dense = load_file(str(four_blocks / "model.safetensors"))
    kept, scrambled = (load_file(str(tmp_path / name / "model" / "model.safetensors"))
                       for name in ("guarded", "unguarded"))
    for key in (k for k in kept if k.startswith("model.layers.1.") and k.endswith("proj.weight")):
        assert torch.equal(kept[key] == 0, scrambled[key] == 0)
        assert torch.equal(kept[key], dense[key] * (kept[key] != 0)) and not torch.equal(kept[key], scrambled[key])
    saved = json.loads((tmp_path / "guarded" / "report.json").read_text())
    assert saved["model_guard"] == g


def dataclass_replace(cfg: RunConfig, method: str) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, finetune=FinetuneConfig(method=method))


def test_a_good_repair_is_kept_as_it_is(four_blocks: Path, text_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prune", str(four_blocks), "--calib", f"text:{text_file}", "--nsamples", "8", "--seqlen", "32",
            "--epochs", "2", "--lr", "1e-3", "--batch-size", "2", "--precision", "fp32", "--device", "cpu",
            "--threads", "1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "on")]) == 0
    assert "model guard: KL to the dense model" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "off"), "--no-model-guard"]) == 0
    on, off = (tmp_path / name / "model" / "model.safetensors" for name in ("on", "off"))
    assert on.read_bytes() == off.read_bytes()  # kept: the guard changed nothing
    report = json.loads((tmp_path / "on" / "report.json").read_text())
    assert report["model_guard"]["tuned_blocks"] == [0, 1, 2, 3] and report["model_guard"]["reverted_blocks"] == []
    assert report["model_guard"]["windows"] == 1 and report["model_guard"]["top_k"] == 64  # 1 of 8 held out
    assert "model_guard" in report["timings"]


class _Spy(Callback):
    """At the walk's start (after the guard's), the guard's reference and the dense model's own logits."""

    def on_walk_start(self, walk) -> None:
        from ebft.guard import ModelGuard

        self.reference = next(c for c in walk.callbacks if isinstance(c, ModelGuard)).reference
        with torch.no_grad():
            self.ids = walk.calib_ids[walk.n_train:]
            self.logits = walk.model(self.ids).logits


def test_the_reference_is_the_dense_models_own_forward_window_by_window(four_blocks: Path, text_file: Path,
                                                                        tmp_path: Path) -> None:
    cfg = _cfg(four_blocks, text_file, tmp_path / "spy")
    cfg.calib.nsamples = 32  # 4 held out: the guard scores them one window at a time
    spy = _Spy()
    run_prune(cfg, callbacks=[spy])
    ref, whole = spy.reference, reference_from_logits(spy.logits, spy.ids)
    assert ref.ids.shape[0] == 4 and torch.equal(ref.ids, spy.ids)
    assert torch.equal(ref.top_ids, whole.top_ids)
    for got, want in ((ref.top_logp, whole.top_logp), (ref.rest_logp, whole.rest_logp)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
