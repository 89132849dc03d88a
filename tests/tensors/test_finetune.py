"""EBFT block fine-tuning on a residual MLP: loss goes down, masks hold, the optimizer matches a hand-written AdamW."""

from __future__ import annotations

import logging
import math
import re
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ebft import precision as precision_module
from ebft.config import FinetuneConfig
from ebft.finetune import FINETUNERS
from ebft.finetune.ebft import EBFT
from ebft.finetune import loop
from ebft.finetune.loop import lr_factor, planned_steps
from ebft.precision import describe_precision, resolve_precision
from ebft.sparsity import apply_mask_


def _random_masks(block: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in block.named_parameters():
        if name.endswith("weight") and p.dim() == 2:
            masks[name] = torch.rand(p.shape, generator=g) < 0.5
    return masks


@pytest.fixture
def tiny_problem(residual_mlp) -> Callable[..., tuple[nn.Module, torch.Tensor, torch.Tensor, dict]]:
    """``tiny_problem(nsamples=1, seqlen=12)``: a residual MLP randomly pruned, its inputs, the dense outputs, masks."""

    def make(nsamples: int = 1, seqlen: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
        torch.manual_seed(0)
        dense = residual_mlp()
        block = residual_mlp()
        block.load_state_dict(dense.state_dict())
        masks = _random_masks(block)
        for name, mask in masks.items():
            apply_mask_(dict(block.named_parameters())[name].data, mask)
        x = torch.randn(nsamples, seqlen, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = dense(x)
        block.requires_grad_(False)
        return block, x, y, masks

    return make


def _reference_adamw(
    block: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: dict[str, torch.Tensor], steps: int,
    lr: float, betas: tuple[float, float], weight_decay: float, clip: float, decay: bool = True,
    schedule: list[float] | None = None,
) -> list[float]:
    """Full-batch masked AdamW with a linear decay to 0 (or the learning rate ``lr * schedule[t]`` at
    step ``t``), written out by hand; returns the grad norms."""
    params = dict(block.named_parameters())
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    b1, b2 = betas
    norms = []
    for t in range(steps):
        lr_t = lr * schedule[t] if schedule is not None else lr * (1 - t / steps) if decay else lr
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


def test_matches_hand_written_masked_adamw_with_linear_decay(tiny_problem, residual_mlp) -> None:
    block, x, y, masks = tiny_problem()
    reference = residual_mlp()
    reference.load_state_dict(block.state_dict())
    constant = residual_mlp()
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


def test_lr_factor_warms_up_then_decays_by_hand() -> None:
    # 6 steps, 2 of warm-up: 1/2, 2/2, then 1 - k/4 for k = 0..3
    assert [lr_factor(t, 6, 2) for t in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(t, 4, 0) for t in range(4)] == [1 - t / 4 for t in range(4)]  # no warm-up: as before


def test_warmup_and_a_fixed_step_count_match_hand_written_adamw(tiny_problem, residual_mlp) -> None:
    block, x, y, masks = tiny_problem()
    reference = residual_mlp()
    reference.load_state_dict(block.state_dict())
    _reference_adamw(reference, x, y, masks, steps=6, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, clip=0.0,
                     schedule=[0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cfg = _cfg(epochs=1, steps=6, warmup=0.34, lr=1e-2, weight_decay=0.1)  # round(0.34 * 6) = 2 warm-up steps
    result = EBFT(cfg, seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.steps == 6 and len(result.losses) == 6  # one window: 6 epochs of one step
    got, want = block.state_dict(), reference.state_dict()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_steps_stop_part_way_through_the_last_pass(tiny_problem) -> None:
    block, x, y, masks = tiny_problem(nsamples=5)
    result = EBFT(_cfg(steps=7, batch_size=2), seed=0).tune(block, x, y, masks, {}, index=0)
    assert planned_steps(_cfg(steps=7, batch_size=2), 5) == (7, 3, 3)
    assert result.steps == 7 and len(result.losses) == 3  # 3 + 3 + 1 steps
    assert result.tokens == (5 + 5 + 2) * 12  # the last pass took one batch of 2 windows
    assert planned_steps(_cfg(epochs=4, batch_size=2), 5) == (12, 3, 4)


def test_without_a_progress_bar_a_long_run_logs_its_step_and_time_left(
    tiny_problem, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No bar (not a terminal): a line once PROGRESS_LOG_SECONDS have passed since the last, none at the end."""
    clock = iter(range(0, 1000, 10))  # every reading of the clock 10 s after the one before
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(loop, "PROGRESS_LOG_SECONDS", 25.0)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    block, x, y, masks = tiny_problem(nsamples=5)
    with caplog.at_level(logging.INFO, logger="ebft.finetune.loop"):
        EBFT(_cfg(epochs=2, batch_size=2), seed=0).tune(block, x, y, masks, {}, index=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "ebft.finetune.loop"]
    # steps end at 10, 20, ..., 60 s: only step 3 (30 s) is 25 s past the last line; 3 steps left at 10 s each
    assert len(lines) == 1, lines
    assert re.fullmatch(r"block 0 ebft: step 3/6 \(epoch 1/2\), loss [0-9.e+-]+, about 30 s left", lines[0]), lines
    assert loop.fmt_duration(3725) == "1 h 02 min" and loop.fmt_duration(185) == "3 min 05 s"


def test_epoch_losses_are_the_training_losses(tiny_problem) -> None:
    block, x, y, masks = tiny_problem()
    with torch.no_grad():
        first = float(((block(x) - y) ** 2).mean())
    result = EBFT(_cfg(epochs=3), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.losses[0] == pytest.approx(first, rel=1e-6)
    assert result.losses[-1] < result.losses[0]


def test_state_after_tuning(tiny_problem) -> None:
    block, x, y, masks = tiny_problem(nsamples=5)
    EBFT(_cfg(epochs=2, batch_size=2), seed=0).tune(block, x, y, masks, {}, index=0)
    for p in block.parameters():
        assert not p.requires_grad
        assert p.grad is None


def test_steps_per_epoch_rounds_up(tiny_problem) -> None:
    block, x, y, masks = tiny_problem(nsamples=5)
    result = EBFT(_cfg(epochs=3, batch_size=2), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.steps == 9  # ceil(5 / 2) * 3
    assert result.tokens == 3 * 5 * 12


def test_unknown_mask_name(tiny_problem) -> None:
    block, x, y, _ = tiny_problem()
    with pytest.raises(KeyError, match="fc3.weight"):
        EBFT(_cfg(), seed=0).tune(block, x, y, {"fc3.weight": torch.ones(2, 2, dtype=torch.bool)}, {}, 0)


def test_non_finite_loss_restores_without_raising(tiny_problem) -> None:
    block, x, y, masks = tiny_problem(nsamples=4)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = x.clone()
    x[2, 3, 1] = math.inf
    result = EBFT(_cfg(epochs=2, batch_size=4), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.restored is not None and "non-finite" in result.restored
    assert result.steps == 0
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in block.parameters())


def test_huge_lr_is_reported_not_raised(tiny_problem) -> None:
    block, x, y, masks = tiny_problem(nsamples=4)
    # the first step is finite; it moves weights by ~1e30, and the next loss overflows float32
    result = EBFT(_cfg(epochs=3, batch_size=1, lr=1e30), seed=0).tune(block, x, y, masks, {}, index=0)
    assert result.steps == 1
    assert result.restored == "non-finite loss at epoch 1, step 2"


def _fake_timer(rates: dict[str, float]):
    """A GEMM timer whose seconds are the FLOPs over a fixed rate (GFLOP/s) per precision; records its calls."""
    calls: list[tuple[str, tuple[int, int], int]] = []

    def timer(precision: str, shape: tuple[int, int], tokens: int, device: torch.device) -> float:
        calls.append((precision, shape, tokens))
        return 2.0 * tokens * shape[0] * shape[1] / (rates[precision] * 1e9)

    return timer, calls


def test_auto_precision_is_the_faster_one_measured() -> None:
    cpu = torch.device("cpu")
    shapes = [(576, 1536), (1536, 576), (576, 576), (576, 1536)]  # the repeat is timed once
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, cpu, shapes) == explicit
    faster_bf16, calls = _fake_timer({"fp32": 300.0, "bf16": 900.0})  # an AMD EPYC with avx512_bf16
    choice = describe_precision("auto", cpu, shapes, tokens=2048, timer=faster_bf16)
    assert choice.precision == "bf16" and choice.gflops == pytest.approx({"fp32": 300.0, "bf16": 900.0})
    assert sorted(calls) == sorted((p, s, 2048) for p in ("fp32", "bf16") for s in dict.fromkeys(shapes))
    assert "bf16 900 GFLOP/s" in choice.reason
    slower_bf16, _ = _fake_timer({"fp32": 307.0, "bf16": 178.0})  # a Xeon with avx512_bf16 but no AMX
    assert resolve_precision("auto", cpu, shapes, timer=slower_bf16) == "fp32"
    assert resolve_precision("auto", cpu) == "fp32"  # nothing to measure: the safe choice
    assert resolve_precision("auto", torch.device("mps"), shapes) == "fp32"
    real = describe_precision("auto", cpu, [(64, 128)], tokens=64)  # the real timer, on this machine
    assert real.precision in ("fp32", "bf16") and all(v > 0 for v in real.gflops.values())


def test_the_walk_decides_auto_once_for_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(precision="auto")
    faster_bf16, calls = _fake_timer({"fp32": 1.0, "bf16": 2.0})
    monkeypatch.setattr(precision_module.describe_precision, "__defaults__", (None, 2048, faster_bf16))
    block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    resolved, choice = precision_module.resolve_for_block(cfg, block, torch.device("cpu"), seqlen=32)
    assert resolved.precision == "bf16" and cfg.precision == "auto" and choice.precision == "bf16"
    assert {tokens for _, _, tokens in calls} == {cfg.batch_size * 32}
