"""EBFT on a CUDA device: a block step gives the CPU's losses, and the pruned weights stay exactly 0.0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from ebft.config import FinetuneConfig
from ebft.finetune.base import BlockResult
from ebft.finetune.ebft import EBFT
from ebft.models.blocks import move_to, run_block


def _tune_block_on(device: str, tiny_factory: Callable[..., torch.nn.Module],
                   first_block_problem: Callable[..., dict[str, Any]]) -> tuple[BlockResult, float, dict[str, Any]]:
    """One fp32 epoch of EBFT on block 0 of the tiny Llama, on ``device``; its result, final loss and problem."""
    ids = torch.randint(0, 258, (8, 16), generator=torch.Generator().manual_seed(3))
    p = first_block_problem(tiny_factory("llama"), ids)  # captured on the CPU, as the block walk does
    p["block"].to(device)
    kwargs = move_to(p["kwargs"], device)  # the block's kwargs live on its device; the activations may stay put
    cfg = FinetuneConfig(method="ebft", epochs=1, lr=2e-3, batch_size=2, precision="fp32", grad_clip=1.0)
    result = EBFT(cfg, seed=0).tune(p["block"], p["inputs"], p["targets"], p["masks"], kwargs, index=0)
    final = run_block(p["block"], p["inputs"], kwargs, 8, targets=p["targets"])
    return result, final, p


def test_a_block_step_on_cuda_matches_the_cpu(tiny_factory, first_block_problem) -> None:
    assert torch.get_float32_matmul_precision() == "highest"  # no TF32: fp32 on both sides
    cpu, cpu_final, _ = _tune_block_on("cpu", tiny_factory, first_block_problem)
    cuda, cuda_final, problem = _tune_block_on("cuda", tiny_factory, first_block_problem)
    assert cpu.restored is None and cuda.restored is None
    assert cuda.steps == cpu.steps == 4 and len(cuda.losses) == 1
    assert cuda.losses == pytest.approx(cpu.losses, rel=1e-4)
    assert cuda_final == pytest.approx(cpu_final, rel=1e-4)
    assert cuda_final < cuda.losses[0]  # the step lowered the block's loss
    params = dict(problem["block"].named_parameters())
    for name, mask in problem["masks"].items():
        weight = params[name].detach()
        assert weight.device.type == "cuda", name
        assert int((weight[~mask.to(weight.device)] != 0).sum()) == 0, name  # exactly 0.0, not just small
        assert int((weight[mask.to(weight.device)] == 0).sum()) == 0, name  # and every kept weight still there
