"""Never worse (held-out check, early stopping) and determinism, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ebft.config import CalibConfig, EvalConfig, FinetuneConfig, PruneConfig, RunConfig
from ebft.finetune import FINETUNERS
from ebft.finetune.base import BlockFinetuner, BlockResult
from ebft.finetune.ebft import EBFT
from ebft.models.loading import load_config
from ebft.runner import count_parameters, run_prune
from ebft.walk import holdout_count, prune_and_finetune

CPU = torch.device("cpu")


def _calib(n: int = 8, seqlen: int = 16, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 258, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _ebft(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"method": "ebft", "epochs": 3, "lr": 2e-3, "batch_size": 2, "precision": "fp32", **kw})


def _run_config(model_dir: Path, text: Path, out: Path | None, finetune: FinetuneConfig, seed: int = 0) -> RunConfig:
    return RunConfig(
        model=str(model_dir), out=out, prune=PruneConfig("wanda", 0.5),
        calib=CalibConfig(source=f"text:{text}", nsamples=8, seqlen=32, seed=seed), finetune=finetune,
        eval=EvalConfig(sources=[f"text:{text}"], seqlen=32, max_windows=4), device="cpu",
    )


def test_ebft_stops_when_on_epoch_end_says_so(tiny_llama: nn.Module) -> None:
    block = tiny_llama.model.layers[0]
    x = torch.randn(6, 8, 64)
    with torch.no_grad():
        y = x + 0.1 * torch.randn_like(x)
    position_ids = torch.arange(8)[None]
    kwargs = {"position_ids": position_ids,
              "position_embeddings": tiny_llama.model.rotary_emb(x, position_ids), "attention_mask": None}
    calls: list[int] = []
    tuner = EBFT(_ebft(epochs=5), seed=0)
    result = tuner.tune(block, x, y, {}, kwargs, 0, on_epoch_end=lambda epoch: calls.append(epoch) or epoch == 1)
    assert calls == [0, 1]
    assert len(result.losses) == 2 and result.steps == 2 * 3


# ------------------------------------------------------------------------------ never worse


def test_absurd_lr_is_restored_and_never_worse(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """lr 1e3 makes tuning diverge: the run finishes, the blocks are restored, the model is no worse."""
    plain = run_prune(_run_config(tiny_model_dir, text_file, tmp_path / "plain",
                                  FinetuneConfig(method="none"))).to_dict()
    wild = run_prune(_run_config(tiny_model_dir, text_file, tmp_path / "wild", _ebft(lr=1e3, epochs=2))).to_dict()
    assert any(b["restored"] for b in wild["blocks"])
    for block in wild["blocks"]:
        assert block["holdout_init_loss"] is not None
        if block["restored"]:
            assert block["final_loss"] == block["init_loss"]
            assert block["holdout_final_loss"] == block["holdout_init_loss"]
        else:  # kept only if it lowered the held-out loss
            assert block["holdout_final_loss"] < block["holdout_init_loss"]
    weights = load_file(str(tmp_path / "wild" / "model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    source = f"text:{text_file}"
    assert math.isfinite(wild["eval"][source])
    assert wild["eval"][source] <= plain["eval"][source] * (1 + 1e-9)
    assert wild["sparsity"] == plain["sparsity"]


class _Harmful(BlockFinetuner):
    """Makes every block worse and changes its masks, claiming success; records what it was given."""

    seen: list[int] = []

    def tune(self, block, inputs, targets, masks, block_kwargs, index, dense_weights=None) -> BlockResult:
        type(self).seen.append(inputs.shape[0])
        with torch.no_grad():
            for p in block.parameters():
                p.mul_(1.5)
            for mask in masks.values():
                mask.fill_(True)
        return BlockResult(losses=[0.0], steps=1)


@pytest.mark.parametrize("fraction,reason", [(0.25, "held-out loss"), (0.0, "did not lower the loss")])
def test_held_out_windows_decide_and_masks_come_back(fraction: float, reason: str, tiny_factory,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FINETUNERS, "harmful", _Harmful)
    monkeypatch.setattr(_Harmful, "seen", [])
    harmed, plain = tiny_factory("llama", num_hidden_layers=3), tiny_factory("llama", num_hidden_layers=3)
    ids = _calib(8)
    result = prune_and_finetune(harmed, ids, PruneConfig("wanda", 0.5),
                                FinetuneConfig(method="harmful", holdout_fraction=fraction), CPU)
    untuned = prune_and_finetune(plain, ids, PruneConfig("wanda", 0.5),
                                 FinetuneConfig(method="none", holdout_fraction=fraction), CPU)
    assert _Harmful.seen == [8 - holdout_count(8, fraction)] * 3  # it only ever saw the training windows
    for block in result.blocks:
        assert reason in block.restored
        assert (block.holdout_init_loss is None) == (fraction == 0)
    for name in result.masks:
        assert torch.equal(result.masks[name], untuned.masks[name])
    a, b = harmed.state_dict(), plain.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_patience_reports_and_stops(tiny_factory) -> None:
    epochs, patience = 8, 1
    model = tiny_factory("llama", num_hidden_layers=3)
    finetune = _ebft(epochs=epochs, lr=2e-3, patience=patience, holdout_fraction=0.25)
    result = prune_and_finetune(model, _calib(8), PruneConfig("wanda", 0.5), finetune, CPU)
    assert any(len(b.epoch_losses) < epochs for b in result.blocks)  # the held-out loss turned up: stopped early
    for block in result.blocks:
        ran = len(block.epoch_losses)
        assert len(block.holdout_epoch_losses) == ran
        assert block.steps == ran * 3  # 6 training windows, batches of 2
        best = min(range(ran), key=lambda i: block.holdout_epoch_losses[i])
        if block.holdout_epoch_losses[best] < block.holdout_init_loss:
            assert block.best_epoch == best + 1
        else:
            assert block.best_epoch == 0 and block.restored
        assert ran == epochs or ran == block.best_epoch + patience
        if block.restored is None:
            assert block.holdout_final_loss == pytest.approx(block.holdout_epoch_losses[block.best_epoch - 1], rel=1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------ determinism


def test_same_command_same_bytes(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    finetune = _ebft(epochs=2, patience=1, holdout_fraction=0.25)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_prune(_run_config(tiny_model_dir, text_file, tmp_path / name, finetune, seed=seed))
    weights = {name: (tmp_path / name / "model" / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]  # the seed matters, so the comparison means something


def test_count_parameters_from_the_config(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert count_parameters(load_config(str(tiny_model_dir))) == sum(p.numel() for p in model.parameters())


def test_report_records_held_out_losses(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    report = run_prune(_run_config(tiny_model_dir, text_file, tmp_path / "run", _ebft(epochs=2))).to_dict()
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["config"]["finetune"]["holdout_fraction"] == 0.125 and saved["config"]["finetune"]["patience"] is None
    for block in report["blocks"]:
        assert {"holdout_init_loss", "holdout_final_loss", "holdout_epoch_losses", "best_epoch"} <= set(block)
        assert block["steps"] == 2 * 4  # 7 of 8 windows train, in batches of 2
