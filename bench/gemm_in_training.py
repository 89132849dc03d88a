"""Why a block's GEMMs run slower inside training than alone: the same GEMMs timed five ways.

For every linear layer of one decoder block (its shapes, at ``--batch-size`` x ``--seqlen`` tokens) and
one precision, the script times, best of ``--repeats``:

- ``mm_alone``: the three GEMMs training runs (forward ``X@W^T``, input gradient ``dY@W``, weight gradient
  ``dY^T@X``) back to back on the same operands, as ``_common.matmul_peak`` does for the benchmarks' peak;
  also each of the three on its own (``per_gemm``);
- ``linear_autograd``: ``F.linear`` forward and backward through autograd, as a block's layer trains:
  fp32 master weights with ``requires_grad``, a 3-D input, under autocast for bf16 (so the weight is cast
  every call and its gradient cast back);
- ``linear_autograd_cold``: the same with 64 MiB of memory written between calls, so that no operand is
  in cache when the GEMMs start;
- ``mm_after_elementwise``: the three GEMMs, each after an elementwise op over a tensor of the layer's
  output size (SiLU), as they alternate in a block;
- ``mm_after_sleep``: the three GEMMs, each after the threads have idled for 2 ms (the thread pool's
  wake-up).

Each rate counts 6 * tokens * in * out FLOPs per forward and backward (2 per GEMM). Prints one JSON
object: per shape and mode the GFLOP/s, and the FLOP-weighted rate of each mode over the block's layers,
with its ratio to ``mm_alone``.

    python bench/gemm_in_training.py [--model smollm2-135m --precision bf16 --batch-size 8 --seqlen 256 --threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def best_seconds(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.2,
                 between: Callable[[], Any] | None = None) -> float:
    """Best-of-``repeats`` mean time of ``fn``; ``between`` (untimed) runs before every call."""
    def one() -> float:
        if between is not None:
            between()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    one()
    once = one()
    n = max(1, int(min_seconds / max(once, 1e-6) / repeats))
    return min(sum(one() for _ in range(n)) / n for _ in range(repeats))


def shape_rates(fin: int, fout: int, tokens: int, batch: int, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(tokens, fin, dtype=dtype)
    w = torch.randn(fout, fin, dtype=dtype)
    dy = torch.randn(tokens, fout, dtype=dtype)
    gemms = {"fwd": lambda: torch.mm(x, w.t()), "dX": lambda: torch.mm(dy, w), "dW": lambda: torch.mm(dy.t(), x)}
    flops_one = 2.0 * tokens * fin * fout
    per_gemm = {name: flops_one / best_seconds(fn, repeats) / 1e9 for name, fn in gemms.items()}

    def three() -> None:
        for fn in gemms.values():
            fn()

    out: dict[str, Any] = {"per_gemm": per_gemm, "mm_alone": 3 * flops_one / best_seconds(three, repeats) / 1e9}

    master = torch.randn(fout, fin, requires_grad=True)  # fp32 master weight, as the walk keeps it
    x3 = torch.randn(batch, tokens // batch, fin, dtype=dtype, requires_grad=True)
    dy3 = torch.randn(batch, tokens // batch, fout, dtype=dtype)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext())
    weight = master if dtype == torch.bfloat16 else master.detach().to(dtype).requires_grad_(True)

    def linear() -> None:
        with amp:
            y = F.linear(x3, weight)
        y.backward(dy3)
        weight.grad = None
        x3.grad = None

    out["linear_autograd"] = 3 * flops_one / best_seconds(linear, repeats) / 1e9
    flush = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB, larger than any cache here
    out["linear_autograd_cold"] = 3 * flops_one / best_seconds(linear, repeats, between=lambda: flush.fill_(1.0)) / 1e9

    act = torch.randn(tokens, fout, dtype=dtype)

    def interleaved() -> None:
        for fn in gemms.values():
            F.silu(act)
            fn()

    silu_s = best_seconds(lambda: F.silu(act), repeats)
    out["mm_after_elementwise"] = 3 * flops_one / max(best_seconds(interleaved, repeats) - 3 * silu_s, 1e-9) / 1e9

    def after_sleep() -> None:
        for fn in gemms.values():
            time.sleep(0.002)
            start = time.perf_counter()
            fn()
            after_sleep.gemm_s += time.perf_counter() - start  # type: ignore[attr-defined]

    times = []
    for _ in range(repeats):
        after_sleep.gemm_s = 0.0  # type: ignore[attr-defined]
        for _ in range(5):
            after_sleep()
        times.append(after_sleep.gemm_s / 5)  # type: ignore[attr-defined]
    out["mm_after_sleep"] = 3 * flops_one / min(times) / 1e9
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec whose block 0 gives the shapes (default "
                                                            "smollm2-135m)")
    p.add_argument("--precision", default="bf16", choices=sorted(DTYPES), help="GEMM precision (default bf16)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="best of this many measurements (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    state = C.start(threads=args.threads)

    from ebft.models import find_blocks, load_model

    model = load_model(args.model).model
    shapes = C.block_linear_shapes(find_blocks(model).blocks[0])
    del model
    tokens = args.batch_size * args.seqlen
    per_shape: dict[str, Any] = {}
    total_flops = 0.0
    seconds: dict[str, float] = {}
    for name, fin, fout in shapes:
        rates = shape_rates(fin, fout, tokens, args.batch_size, DTYPES[args.precision], args.repeats)
        per_shape[f"{name} [{tokens}x{fin}]x[{fin}x{fout}]"] = {
            k: ({g: C.r(v) for g, v in rates[k].items()} if isinstance(rates[k], dict) else C.r(rates[k]))
            for k in rates}
        flops = 6.0 * tokens * fin * fout
        total_flops += flops
        for mode, rate in rates.items():
            if mode != "per_gemm":
                seconds[mode] = seconds.get(mode, 0.0) + flops / (rate * 1e9)
    weighted = {mode: total_flops / s / 1e9 for mode, s in seconds.items()}
    C.emit({"bench": "gemm_in_training", "model": args.model, "precision": args.precision, "tokens": tokens,
            "threads": torch.get_num_threads(), "machine_before": state,
            "gflops_flop_weighted": {k: C.r(v) for k, v in weighted.items()},
            "ratio_to_mm_alone": {k: C.r(v / weighted["mm_alone"]) for k, v in weighted.items()},
            "per_shape_gflops": per_shape,
            "how": "best of --repeats; 6*tokens*in*out FLOPs per layer and mode; FLOP-weighted over the block's "
                   "linear layers"})


if __name__ == "__main__":
    main()
