"""EBFT on a CUDA device: a block step gives the CPU's losses, the pruned weights stay exactly 0.0 in fp32,
under bf16 autocast and compiled, and a whole ``ebft prune`` runs there (in memory and streamed, to the
same bytes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ebft.cli import main
from ebft.config import FinetuneConfig
from ebft.finetune.base import BlockResult
from ebft.finetune.ebft import EBFT
from ebft.models.blocks import move_to, run_block


def _tune_block_on(device: str, tiny_factory: Callable[..., torch.nn.Module],
                   first_block_problem: Callable[..., dict[str, Any]], precision: str = "fp32",
                   **options: Any) -> tuple[BlockResult, float, dict[str, Any]]:
    """One epoch of EBFT on block 0 of the tiny Llama, on ``device``; its result, final loss and problem."""
    ids = torch.randint(0, 258, (8, 16), generator=torch.Generator().manual_seed(3))
    p = first_block_problem(tiny_factory("llama"), ids)  # captured on the CPU, as the block walk does
    p["block"].to(device)
    kwargs = move_to(p["kwargs"], device)  # the block's kwargs live on its device; the activations may stay put
    cfg = FinetuneConfig(method="ebft", epochs=1, lr=2e-3, batch_size=2, precision=precision, grad_clip=1.0,
                         options=options or None)
    result = EBFT(cfg, seed=0).tune(p["block"], p["inputs"], p["targets"], p["masks"], kwargs, index=0)
    final = run_block(p["block"], p["inputs"], kwargs, 8, targets=p["targets"])
    return result, final, p


def _assert_masks_exact(problem: dict[str, Any], device: str) -> None:
    params = dict(problem["block"].named_parameters())
    for name, mask in problem["masks"].items():
        weight = params[name].detach()
        assert weight.device.type == torch.device(device).type and weight.dtype == torch.float32, name
        assert int((weight[~mask.to(weight.device)] != 0).sum()) == 0, name  # exactly 0.0, not just small
        assert int((weight[mask.to(weight.device)] == 0).sum()) == 0, name  # and every kept weight still there


def test_a_block_step_on_cuda_matches_the_cpu(device, tiny_factory, first_block_problem) -> None:
    assert torch.get_float32_matmul_precision() == "highest"  # no TF32: fp32 on both sides
    cpu, cpu_final, _ = _tune_block_on("cpu", tiny_factory, first_block_problem)
    cuda, cuda_final, problem = _tune_block_on(device, tiny_factory, first_block_problem)
    assert cpu.restored is None and cuda.restored is None
    assert cuda.steps == cpu.steps == 4 and len(cuda.losses) == 1
    assert cuda.losses == pytest.approx(cpu.losses, rel=1e-4)
    assert cuda_final == pytest.approx(cpu_final, rel=1e-4)
    assert cuda_final < cuda.losses[0]  # the step lowered the block's loss
    _assert_masks_exact(problem, device)


def test_bf16_autocast_on_cuda_keeps_fp32_masters_and_exact_masks(device, tiny_factory, first_block_problem) -> None:
    fp32, fp32_final, _ = _tune_block_on(device, tiny_factory, first_block_problem)
    bf16, bf16_final, problem = _tune_block_on(device, tiny_factory, first_block_problem, precision="bf16")
    assert bf16.restored is None and bf16.steps == 4
    assert bf16_final < bf16.losses[0]
    assert bf16.losses == pytest.approx(fp32.losses, rel=5e-2)  # bf16 rounding, not another computation
    assert bf16_final == pytest.approx(fp32_final, rel=5e-2)
    _assert_masks_exact(problem, device)


def test_compiled_steps_on_cuda_match_eager(device, tiny_factory, first_block_problem) -> None:
    eager, eager_final, _ = _tune_block_on(device, tiny_factory, first_block_problem)
    compiled, compiled_final, problem = _tune_block_on(device, tiny_factory, first_block_problem, compile=True)
    assert "forward" not in vars(problem["block"])  # the compiled forward is gone after tuning
    assert compiled.steps == eager.steps == 4
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3)
    assert compiled_final == pytest.approx(eager_final, rel=1e-3)
    _assert_masks_exact(problem, device)


def test_a_whole_run_on_cuda_in_memory_and_streamed_gives_the_same_bytes(device, tiny_model_dir: Path,
                                                                          text_file: Path, tmp_path: Path) -> None:
    common = ["prune", str(tiny_model_dir), "--calib", f"text:{text_file}", "--nsamples", "8", "--seqlen", "32",
              "--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--device", device, "--quiet",
              "--eval", f"text:{text_file}", "--eval-seqlen", "32", "--max-windows", "2"]
    assert main([*common, "--stream", "off", "--out", str(tmp_path / "memory")]) == 0
    assert main([*common, "--stream", "on", "--out", str(tmp_path / "streamed")]) == 0
    report = json.loads((tmp_path / "memory" / "report.json").read_text())
    assert report["device"].startswith(device)
    assert report["sparsity"]["overall"] == 0.5
    assert any(b["final_loss"] < b["init_loss"] for b in report["blocks"])
    memory = load_file(str(tmp_path / "memory" / "model" / "model.safetensors"))
    streamed = load_file(str(tmp_path / "streamed" / "model" / "model.safetensors"))
    assert memory.keys() == streamed.keys() and all(torch.equal(memory[k], streamed[k]) for k in memory)
    for name, weight in memory.items():
        if name.endswith("proj.weight"):
            assert abs(float((weight == 0).float().mean()) - 0.5) < 1e-9, name  # 50% exactly 0.0 after tuning
