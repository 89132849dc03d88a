"""EBFT block fine-tuning of a tiny Llama's decoder block: loss drops, masks hold, autocast, torch.compile, seeds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ebft.config import FinetuneConfig
from ebft.errors import EbftError
from ebft.finetune.ebft import EBFT
from ebft.models.blocks import run_block


def _ids() -> torch.Tensor:
    return torch.randint(0, 258, (8, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def llama_block_problem(tiny_llama: nn.Module, first_block_problem) -> dict[str, Any]:
    return first_block_problem(tiny_llama, _ids())


def _tune(problem: dict[str, Any], seed: int = 0, **kw: Any):
    cfg = FinetuneConfig(**{"method": "ebft", "epochs": 4, "lr": 2e-3, "batch_size": 2, "precision": "fp32",
                            "grad_clip": 1.0, **kw})
    return EBFT(cfg, seed=seed).tune(
        problem["block"], problem["inputs"], problem["targets"], problem["masks"], problem["kwargs"], index=0
    )


def test_llama_block_loss_drops_and_masks_hold(llama_block_problem: dict[str, Any]) -> None:
    p = llama_block_problem
    block = p["block"]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    init = run_block(block, p["inputs"], p["kwargs"], 8, targets=p["targets"])
    result = _tune(p)
    final = run_block(block, p["inputs"], p["kwargs"], 8, targets=p["targets"])
    assert result.restored is None
    assert result.steps == 16
    assert final < 0.8 * init
    params = dict(block.named_parameters())
    for name, mask in p["masks"].items():
        weight = params[name].data
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))  # exactly 0.0, not just small
        kept_changed = (weight[mask] != before[name][mask]).float().mean()
        assert kept_changed > 0.99
    assert not torch.equal(params["input_layernorm.weight"], before["input_layernorm.weight"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_keeps_masks_and_fp32_weights(precision: str, llama_block_problem: dict[str, Any]) -> None:
    p = llama_block_problem
    init = run_block(p["block"], p["inputs"], p["kwargs"], 8, targets=p["targets"])
    result = _tune(p, precision=precision)
    final = run_block(p["block"], p["inputs"], p["kwargs"], 8, targets=p["targets"])
    assert result.restored is None and final < init
    params = dict(p["block"].named_parameters())
    for name, mask in p["masks"].items():
        assert params[name].dtype == torch.float32
        assert int((params[name].data[~mask] != 0).sum()) == 0


def test_compiled_training_matches_eager(llama_block_problem: dict[str, Any]) -> None:
    """--compile: the same steps as eager up to kernel rounding, masks exact, the class forward back after."""
    p = llama_block_problem
    block = p["block"]
    start = {k: v.clone() for k, v in block.state_dict().items()}
    eager = _tune(p, epochs=2)
    eager_state = {k: v.clone() for k, v in block.state_dict().items()}
    block.load_state_dict(start)
    compiled = _tune(p, epochs=2, options={"compile": True})
    assert "forward" not in vars(block)  # the instance attribute torch.compile set is gone
    assert compiled.steps == eager.steps == 8
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    for name, value in block.state_dict().items():
        torch.testing.assert_close(value, eager_state[name], atol=1e-5, rtol=1e-4)
    params = dict(block.named_parameters())
    for name, mask in p["masks"].items():
        assert int((params[name].data[~mask] != 0).sum()) == 0


def test_compile_failure_is_one_line(llama_block_problem: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo.exc

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("no C++ compiler found"), None)
        return call

    monkeypatch.setattr(torch, "compile", broken)
    message = r"^torch.compile failed \(RuntimeError: no C\+\+ compiler found\); run without --compile$"
    with pytest.raises(EbftError, match=message):
        _tune(llama_block_problem, options={"compile": True})
    assert "forward" not in vars(llama_block_problem["block"])


def test_same_seed_is_bitwise_reproducible(tiny_factory, first_block_problem) -> None:
    states = []
    for seed in (0, 0, 1):
        problem = first_block_problem(tiny_factory("llama"), _ids())
        _tune(problem, seed=seed, epochs=2)
        states.append(problem["block"].state_dict())
    same, other = states[0], states[1]
    assert all(torch.equal(same[k], other[k]) for k in same)
    different = states[2]
    assert any(not torch.equal(same[k], different[k]) for k in same)
