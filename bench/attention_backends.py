"""Forward+backward time of causal scaled-dot-product attention per SDPA backend, at SmolLM2's shapes.

    python bench/attention_backends.py [--batch 8 --heads 9 --seqlen 256 --head-dim 64 --threads 1 --rounds 3]

Prints one JSON object: for each round, dtype and backend (the CPU flash kernel and the math
fallback), the mean wall and CPU milliseconds of 10 timed fwd+bwd passes after 2 warm-up passes.
The rounds alternate the backends, so drifting load hits both alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from _common import emit, machine_state  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def fwd_bwd_ms(backend: SDPBackend, dtype: torch.dtype, shape: tuple[int, ...], steps: int = 10) -> tuple[float, float]:
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    with sdpa_kernel(backend):
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return (time.perf_counter() - wall) / steps * 1e3, (time.process_time() - cpu) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, args.heads, args.seqlen, args.head_dim)
    before = machine_state()
    rows = []
    for r in range(args.rounds):
        for dtype in (torch.bfloat16, torch.float32):
            for name, backend in BACKENDS.items():
                wall, cpu = fwd_bwd_ms(backend, dtype, shape)
                rows.append({"round": r, "dtype": str(dtype).removeprefix("torch."), "backend": name,
                             "wall_ms": round(wall, 1), "cpu_ms": round(cpu, 1)})
    emit({"benchmark": "attention_backends", "command": "python bench/attention_backends.py " + " ".join(sys.argv[1:]),
          "shape_bhsd": list(shape), "threads": args.threads, "runs": rows,
          "machine_before": before, "machine_after": machine_state()})


if __name__ == "__main__":
    main()
