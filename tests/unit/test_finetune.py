"""EBFT block fine-tuning: loss goes down, masks hold, the optimizer matches a hand-written AdamW."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from ebft import precision as precision_module
from ebft.capture import capture_block_kwargs, capture_first_block_inputs
from ebft.config import FinetuneConfig
from ebft.errors import EbftError
from ebft.finetune import FINETUNERS
from ebft.finetune.ebft import EBFT
from ebft.models import find_blocks
from ebft.models.blocks import run_block
from ebft.precision import resolve_precision
from ebft.sparsity import apply_mask_, unstructured_mask


class TinyBlock(nn.Module):
    """A residual two-layer MLP: the smallest thing shaped like a decoder block."""

    def __init__(self, width: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


def _random_masks(block: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in block.named_parameters():
        if name.endswith("weight") and p.dim() == 2:
            masks[name] = torch.rand(p.shape, generator=g) < 0.5
    return masks


def _tiny_problem(nsamples: int = 1, seqlen: int = 12) -> tuple[TinyBlock, torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    dense = TinyBlock()
    block = TinyBlock()
    block.load_state_dict(dense.state_dict())
    masks = _random_masks(block)
    for name, mask in masks.items():
        apply_mask_(dict(block.named_parameters())[name].data, mask)
    x = torch.randn(nsamples, seqlen, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = dense(x)
    block.requires_grad_(False)
    return block, x, y, masks


def _reference_adamw(
    block: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: dict[str, torch.Tensor], steps: int,
    lr: float, betas: tuple[float, float], weight_decay: float, clip: float, decay: bool = True,
) -> list[float]:
    """Full-batch masked AdamW with a linear decay to 0, written out by hand; returns the grad norms."""
    params = dict(block.named_parameters())
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    b1, b2 = betas
    norms = []
    for t in range(steps):
        lr_t = lr * (1 - t / steps) if decay else lr
        block.zero_grad(set_to_none=True)
        block.requires_grad_(True)
        loss = ((block(x) - y) ** 2).mean()
        loss.backward()
        grads = {n: p.grad * masks[n] if n in masks else p.grad.clone() for n, p in params.items()}
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        norms.append(norm)
        if clip > 0:
            coef = min(1.0, clip / (norm + 1e-6))
            grads = {n: g * coef for n, g in grads.items()}
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n]
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                p.mul_(1 - lr_t * weight_decay)
                m_hat = m[n] / (1 - b1 ** (t + 1))
                v_hat = v[n] / (1 - b2 ** (t + 1))
                p.sub_(lr_t * m_hat / (v_hat.sqrt() + 1e-8))
                if n in masks:
                    p.mul_(masks[n])
    block.requires_grad_(False)
    block.zero_grad(set_to_none=True)
    return norms


def _cfg(**kw: Any) -> FinetuneConfig:
    base = dict(method="ebft", epochs=5, lr=1e-2, batch_size=1, precision="fp32", grad_clip=0.0)
    base.update(kw)
    return FinetuneConfig(**base)


def test_registry() -> None:
    assert FINETUNERS["ebft"] is EBFT
    assert FINETUNERS["none"] is None


def test_matches_hand_written_masked_adamw_with_linear_decay() -> None:
    block, x, y, masks = _tiny_problem()
    reference = TinyBlock()
    reference.load_state_dict(block.state_dict())
    constant = TinyBlock()
    constant.load_state_dict(block.state_dict())
    # clip small enough to be active at every step: masked gradients leaking into the norm would show
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, clip=0.05)
    norms = _reference_adamw(reference, x, y, masks, steps=5, **kw)
    assert min(norms) > 0.05
    _reference_adamw(constant, x, y, masks, steps=5, decay=False, **kw)

    cfg = _cfg(epochs=5, lr=1e-2, weight_decay=0.1, grad_clip=0.05)
    result = EBFT(cfg, seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.restored is None
    assert result.steps == 5 and len(result.losses) == 5
    assert result.tokens == 5 * 12
    got, want, const = block.state_dict(), reference.state_dict(), constant.state_dict()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    # the check can tell a linear decay from a constant learning rate
    gap = max(float((want[n] - const[n]).abs().max()) for n in want)
    assert gap > 1e-3


def test_epoch_losses_are_the_training_losses() -> None:
    block, x, y, masks = _tiny_problem()
    with torch.no_grad():
        first = float(((block(x) - y) ** 2).mean())
    result = EBFT(_cfg(epochs=3), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.losses[0] == pytest.approx(first, rel=1e-6)
    assert result.losses[-1] < result.losses[0]


def test_state_after_tuning() -> None:
    block, x, y, masks = _tiny_problem(nsamples=5)
    EBFT(_cfg(epochs=2, batch_size=2), seed=0).tune(block, x, y, masks, {}, index=0)
    for p in block.parameters():
        assert not p.requires_grad
        assert p.grad is None


def test_steps_per_epoch_rounds_up() -> None:
    block, x, y, masks = _tiny_problem(nsamples=5)
    result = EBFT(_cfg(epochs=3, batch_size=2), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.steps == 9  # ceil(5 / 2) * 3
    assert result.tokens == 3 * 5 * 12


def test_unknown_mask_name() -> None:
    block, x, y, _ = _tiny_problem()
    with pytest.raises(KeyError, match="fc3.weight"):
        EBFT(_cfg(), seed=0).tune(block, x, y, {"fc3.weight": torch.ones(2, 2, dtype=torch.bool)}, {}, 0)


# ---------------------------------------------------------------- a real decoder block


@pytest.fixture
def llama_block_problem(tiny_llama: nn.Module) -> dict[str, Any]:
    blocks = find_blocks(tiny_llama)
    ids = torch.randint(0, 258, (8, 16), generator=torch.Generator().manual_seed(3))
    kwargs = capture_block_kwargs(tiny_llama, blocks, ids[:1])[0]
    inputs = capture_first_block_inputs(tiny_llama, blocks, ids)
    block = blocks.blocks[0]
    targets = torch.empty_like(inputs)
    run_block(block, inputs, kwargs, 8, out=targets)
    masks = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            mask = unstructured_mask(module.weight.abs(), 0.5, per_row=True)
            apply_mask_(module.weight.data, mask)
            masks[f"{name}.weight"] = mask
    return dict(block=block, inputs=inputs, targets=targets, masks=masks, kwargs=kwargs)


def _tune(problem: dict[str, Any], seed: int = 0, **kw: Any):
    cfg = _cfg(**{"epochs": 4, "lr": 2e-3, "batch_size": 2, "grad_clip": 1.0, **kw})
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


def test_same_seed_is_bitwise_reproducible(tiny_factory) -> None:
    states = []
    for seed in (0, 0, 1):
        model = tiny_factory("llama")
        blocks = find_blocks(model)
        ids = torch.randint(0, 258, (8, 16), generator=torch.Generator().manual_seed(3))
        kwargs = capture_block_kwargs(model, blocks, ids[:1])[0]
        inputs = capture_first_block_inputs(model, blocks, ids)
        block = blocks.blocks[0]
        targets = torch.empty_like(inputs)
        run_block(block, inputs, kwargs, 8, out=targets)
        masks = {}
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                masks[f"{name}.weight"] = unstructured_mask(module.weight.abs(), 0.5, per_row=True)
                apply_mask_(module.weight.data, masks[f"{name}.weight"])
        _tune(dict(block=block, inputs=inputs, targets=targets, masks=masks, kwargs=kwargs), seed=seed, epochs=2)
        states.append(block.state_dict())
    same, other = states[0], states[1]
    assert all(torch.equal(same[k], other[k]) for k in same)
    different = states[2]
    assert any(not torch.equal(same[k], different[k]) for k in same)


def test_non_finite_loss_restores_without_raising() -> None:
    block, x, y, masks = _tiny_problem(nsamples=4)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = x.clone()
    x[2, 3, 1] = math.inf
    result = EBFT(_cfg(epochs=2, batch_size=4), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.restored is not None and "non-finite" in result.restored
    assert result.steps == 0
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in block.parameters())


def test_huge_lr_is_reported_not_raised() -> None:
    block, x, y, masks = _tiny_problem(nsamples=4)
    # the first step is finite; it moves weights by ~1e30, and the next loss overflows float32
    result = EBFT(_cfg(epochs=3, batch_size=1, lr=1e30), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.steps == 1
    assert result.restored == "non-finite loss at epoch 1, step 2"


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, cpu) == explicit
    monkeypatch.setattr(precision_module, "_cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(precision_module, "_cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    monkeypatch.undo()
    assert resolve_precision("auto", cpu) in ("bf16", "fp32")
