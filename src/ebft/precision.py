"""Training precision: autocast for bf16/fp16 over fp32 master weights, and what ``auto`` means.

``auto`` on the CPU is decided by measurement, not by a CPU flag: a CPU can have bf16 instructions
and still run bf16 matrix products slower than fp32 (an Intel Xeon with avx512_bf16 but no AMX ran
them at 0.55x fp32, an AMD EPYC at about 4x). :func:`choose_precision` times the block's own GEMM
shapes for a few milliseconds in each candidate and takes the faster. On CUDA, ``auto`` is bf16
where the GPU supports it.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

__all__ = ["PrecisionChoice", "autocast_context", "choose_precision", "gemm_seconds", "resolve_precision"]

#: ``(precision, (in_features, out_features), tokens, device) -> seconds`` of one forward GEMM.
GemmTimer = Callable[[str, tuple[int, int], int, torch.device], float]


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class PrecisionChoice:
    """What ``--precision`` resolved to, and on what evidence."""

    precision: str
    reason: str
    gflops: dict[str, float] = field(default_factory=dict)  # measured rate per candidate (CPU ``auto`` only)

    def to_dict(self) -> dict[str, object]:
        return {"precision": self.precision, "reason": self.reason, "gflops": self.gflops}


def gemm_seconds(precision: str, shape: tuple[int, int], tokens: int, device: torch.device,
                 budget: float = 0.004) -> float:
    """Median seconds of ``x @ W.T`` for ``x`` [tokens, in] and ``W`` [out, in] in ``precision``, timed
    for about ``budget`` seconds after a warm-up."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, shape[0], generator=generator).to(device, dtype)
    w = torch.randn(shape[1], shape[0], generator=generator).to(device, dtype)
    torch.nn.functional.linear(x, w)  # warm-up
    times: list[float] = []
    spent = 0.0
    while spent < budget or len(times) < 3:
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def choose_precision(shapes: Sequence[tuple[int, int]], tokens: int, device: torch.device,
                     candidates: Sequence[str] = ("fp32", "bf16"), timer: GemmTimer = gemm_seconds) -> PrecisionChoice:
    """The candidate in which the GEMMs of ``shapes`` ([in, out] of the block's linear layers, at
    ``tokens`` rows) run fastest, with each candidate's rate in GFLOP/s. ``timer`` measures one GEMM."""
    shapes = list(dict.fromkeys(shapes))
    flops = sum(2.0 * tokens * fan_in * fan_out for fan_in, fan_out in shapes)
    gflops = {}
    for precision in candidates:
        seconds = sum(timer(precision, shape, tokens, device) for shape in shapes)
        gflops[precision] = flops / seconds / 1e9 if seconds > 0 else float("inf")
    best = max(gflops, key=lambda p: gflops[p])
    rates = ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in gflops.items())
    return PrecisionChoice(best, f"measured on the block's GEMM shapes at {tokens} tokens: {rates}", gflops)


def resolve_precision(precision: str, device: torch.device, shapes: Sequence[tuple[int, int]] | None = None,
                      tokens: int = 2048, timer: GemmTimer = gemm_seconds) -> str:
    """A concrete precision for ``precision`` (see :func:`describe_precision`)."""
    return describe_precision(precision, device, shapes, tokens, timer).precision


def describe_precision(precision: str, device: torch.device, shapes: Sequence[tuple[int, int]] | None = None,
                       tokens: int = 2048, timer: GemmTimer = gemm_seconds) -> PrecisionChoice:
    """What ``precision`` means on ``device``: itself unless ``auto``; ``auto`` is bf16 on a CUDA GPU that
    supports it, and on the CPU the faster of fp32 and bf16 on ``shapes`` (measured; without shapes,
    fp32); fp32 elsewhere."""
    if precision != "auto":
        return PrecisionChoice(precision, "asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "CUDA with bf16 support")
        return PrecisionChoice("fp32", "CUDA without bf16 support")
    if device.type == "cpu" and shapes:
        choice = choose_precision(shapes, tokens, device, timer=timer)
        logger.info("--precision auto: %s (%s)", choice.precision, choice.reason)
        return choice
    return PrecisionChoice("fp32", f"no measurement on {device.type}")


def block_shapes(block: torch.nn.Module) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of every linear layer of ``block``: the GEMMs that training runs."""
    return [(m.in_features, m.out_features) for m in block.modules() if isinstance(m, torch.nn.Linear)]


def resolve_for_block(finetune: object, block: torch.nn.Module, device: torch.device,
                      seqlen: int) -> tuple[object, PrecisionChoice]:
    """``finetune`` (a FinetuneConfig) with ``auto`` replaced by what it means for ``block``'s GEMMs at
    one training batch (``batch_size`` windows of ``seqlen`` tokens), and why."""
    import dataclasses

    choice = describe_precision(finetune.precision, device, block_shapes(block),  # type: ignore[attr-defined]
                                tokens=finetune.batch_size * seqlen)  # type: ignore[attr-defined]
    return dataclasses.replace(finetune, precision=choice.precision), choice  # type: ignore[type-var]
