"""Helpers the benchmark scripts share: JSON output, machine state, matmul peaks, FLOP counts,
per-step timing of a block fine-tuner and resident-memory readings.

Nothing here changes how ``ebft`` trains: the scripts call the project's own code path (the block
walk ``ebft.walk``, ``ebft.finetune.ebft.EBFT.tune``, ``ebft.runner.run_prune``, the CLI) and only
observe it, through walk callbacks (:class:`ebft.walk.Callback`) and module hooks.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ebft.memory import reset_peak_memory, status_kb

log = logging.getLogger("bench")


def setup_logging(quiet: bool = False) -> None:
    """Logs (ours and ebft's) go to stderr; stdout carries only the final JSON object."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TQDM_DISABLE", "1")


def start(quiet: bool = False, threads: int | None = None) -> dict[str, Any]:
    """A script's first step: logging (:func:`setup_logging`), torch's thread count if given, and the
    machine state before the measurements (:func:`machine_state`)."""
    setup_logging(quiet)
    if threads:
        torch.set_num_threads(threads)
    return machine_state()


def emit(obj: dict[str, Any]) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def r(x: float, nd: int = 3) -> float:
    """Round for the JSON output, keeping a few significant digits."""
    if x == 0 or not isinstance(x, (int, float)):
        return x
    from math import floor, log10

    return round(x, max(0, nd - 1 - int(floor(log10(abs(x))))))


# --------------------------------------------------------------------------- machine state

def machine_state() -> dict[str, Any]:
    """Load average, thread count and any other busy processes, so a noisy measurement shows it."""
    busy = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "R" and cmd:
            busy.append(cmd[:120])
        elif "pytest" in cmd:
            busy.append(cmd[:120])
    return {
        "loadavg_1m": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "other_running_processes": busy,
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------- memory

def rss_mb() -> float:
    return (status_kb("VmRSS") or 0) / 1024


def peak_rss_mb() -> float:
    """VmHWM: the peak resident set of this process since start (or the last reset)."""
    return (status_kb("VmHWM") or 0) / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if not allowed."""
    return reset_peak_memory()


# --------------------------------------------------------------------------- FLOPs

def block_linear_shapes(block: nn.Module) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every nn.Linear inside a decoder block."""
    return [(n, m.in_features, m.out_features) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def block_linear_params(shapes: Iterable[tuple[str, int, int]]) -> int:
    """P_lin: the weights of the block's nn.Linear layers."""
    return sum(i * o for _, i, o in shapes)


def attention_width(config: Any) -> int:
    """n_heads * head_dim: the width of Q (and of the attention output) that QK^T and AV run over."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_attention_heads * head_dim)


FLOP_FORMULA = ("train_flops = 6 * P_lin * tokens + 12 * samples * seqlen^2 * n_heads * head_dim; "
                "P_lin = weights of the block's nn.Linear layers; forward = 2*P_lin*tokens (matmuls) + "
                "4*seqlen^2*n_heads*head_dim per sample (QK^T and AV, full square, causal half not subtracted); "
                "backward = 2 x forward. Norms, SiLU, RoPE, softmax, loss and optimizer are not counted.")


def train_flops(p_lin: int, samples: int, seqlen: int, attn_width: int) -> dict[str, float]:
    tokens = samples * seqlen
    linear = 6.0 * p_lin * tokens
    attn = 12.0 * samples * seqlen**2 * attn_width
    return {"linear": linear, "attention": attn, "total": linear + attn}


def forward_flops(p_lin: int, samples: int, seqlen: int, attn_width: int) -> float:
    return 2.0 * p_lin * samples * seqlen + 4.0 * samples * seqlen**2 * attn_width


# --------------------------------------------------------------------------- matmul peak

def matmul_peak(shapes: Iterable[tuple[str, int, int]], tokens: int, dtype: torch.dtype, repeats: int = 5,
                min_seconds: float = 0.3) -> dict[str, Any]:
    """Best-of-``repeats`` rate of the GEMMs one block's linear layers run in training, with ``tokens`` rows.

    For each layer (in -> out) with W [out, in] and X [tokens, in]: forward ``X @ W^T``, input
    gradient ``dY @ W`` and weight gradient ``dY^T @ X``, each 2*tokens*in*out FLOPs, in the
    same transposition as ``F.linear`` and its backward. Plain tensors of ``dtype`` (no autocast).
    """
    torch.manual_seed(0)
    per_shape = {}
    total_flops = 0.0
    total_best = 0.0
    for name, fin, fout in shapes:
        x = torch.randn(tokens, fin, dtype=dtype)
        w = torch.randn(fout, fin, dtype=dtype)
        dy = torch.randn(tokens, fout, dtype=dtype)
        gemms = {"fwd X@W^T": lambda: torch.mm(x, w.t()), "dX dY@W": lambda: torch.mm(dy, w),
                 "dW dY^T@X": lambda: torch.mm(dy.t(), x)}
        flops = 2.0 * tokens * fin * fout
        rates = {}
        for gname, fn in gemms.items():
            fn()  # warm-up
            n = 1
            t = _time(fn, n)
            n = max(1, int(min_seconds / max(t, 1e-6) / repeats))  # each measurement >= min_seconds/repeats
            best = min(_time(fn, n) for _ in range(repeats))
            rates[gname] = flops / best / 1e9
            total_flops += flops
            total_best += best
        per_shape[f"{name} [{tokens}x{fin}]x[{fin}x{fout}]"] = {k: round(v, 1) for k, v in rates.items()}
    return {"gflops": total_flops / total_best / 1e9, "per_shape_gflops": per_shape,
            "how": f"best of {repeats}; the forward, input-grad and weight-grad GEMM of each linear layer at "
                   f"{tokens} tokens, plain {str(dtype).replace('torch.', '')} tensors; FLOP-weighted over all layers"}


PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peaks(shapes: list[tuple[str, int, int]], tokens: int, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """:func:`matmul_peak` of the same GEMMs in fp32 and in bf16, by those names."""
    return {name: matmul_peak(shapes, tokens, dtype, **kwargs) for name, dtype in PEAK_DTYPES.items()}


def peak_for(precision: str) -> str:
    """Which matmul peak training in ``precision`` (resolved) is compared with: bf16 for half precisions."""
    return "bf16" if precision in ("bf16", "fp16") else "fp32"


def _time(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


# --------------------------------------------------------------------------- per-step timing

class StepTimer:
    """Observe a block fine-tuner's training steps through hooks only.

    Each training step does exactly one forward of the block with autograd on, so a forward
    pre-hook marks the start of a step (``on_first_step()`` runs just before the first one); the
    last ``post_accumulate_grad`` hook of a step (on the parameters that require grad when the first
    step starts) marks the end of its backward. The optimizer,
    clipping and mask re-application lie between the end of a backward and the next step's start.
    The last step ends at the first no-grad forward after it (the walk's loss pass after tuning) or
    at ``stop()``, whichever comes first; no-grad forwards before the first step are not steps.
    """

    def __init__(self, block: nn.Module, on_first_step: Callable[[], None] | None = None) -> None:
        self.starts: list[float] = []
        self.grad_done: list[float] = []
        self.end: float | None = None
        self._on_first_step = on_first_step
        self._block = block
        self._handles = [block.register_forward_pre_hook(self._pre)]

    def _pre(self, module: nn.Module, args: Any) -> None:
        if self.end is not None:
            return
        if not torch.is_grad_enabled():
            if self.starts:
                self.end = time.perf_counter()
            return
        if not self.starts:  # the tuner has just made the parameters require grad
            self._handles += [p.register_post_accumulate_grad_hook(self._grad) for p in self._block.parameters()
                              if p.requires_grad]
            if self._on_first_step is not None:
                self._on_first_step()
        self.starts.append(time.perf_counter())
        self.grad_done.append(float("nan"))

    def _grad(self, param: torch.Tensor) -> None:
        if self.end is None and self.grad_done:
            self.grad_done[-1] = time.perf_counter()

    def stop(self) -> None:
        if self.end is None:
            self.end = time.perf_counter()
        for h in self._handles:
            h.remove()

    def summary(self, warmup: int) -> dict[str, Any]:
        """Wall time of the steps after ``warmup``, and how each splits into forward+backward and the rest."""
        assert self.end is not None, "call stop() first"
        bounds = self.starts + [self.end]
        steps = [bounds[i + 1] - bounds[i] for i in range(len(self.starts))]
        fwd_bwd = [self.grad_done[i] - self.starts[i] for i in range(len(self.starts))]
        rest = [s - f for s, f in zip(steps, fwd_bwd)]
        timed = slice(warmup, None)
        return {
            "steps_total": len(steps),
            "steps_timed": len(steps[timed]),
            "timed_wall_s": self.end - self.starts[warmup],
            "step_s": steps,
            "median_step_s": statistics.median(steps[timed]),
            "fwd_bwd_s_timed": sum(fwd_bwd[timed]),
            "optimizer_and_masks_s_timed": sum(rest[timed]),
            "median_fwd_bwd_s": statistics.median(fwd_bwd[timed]),
            "median_optimizer_and_masks_s": statistics.median(rest[timed]),
        }


# --------------------------------------------------------------------------- saved activations

class SavedActivations:
    """Bytes autograd saves for backward inside the context (unique storages, so views count once)."""

    def __init__(self, weight_shapes: Iterable[tuple[int, ...]] = ()) -> None:
        self.bytes = 0  # activations
        self.weight_copy_bytes = 0  # autocast's low-precision copies of the weights, saved for backward
        self._weight_shapes = set(weight_shapes)
        self._seen: set[int] = set()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            key, size = id(t), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            if tuple(t.shape) in self._weight_shapes or tuple(reversed(t.shape)) in self._weight_shapes:
                self.weight_copy_bytes += size
            else:
                self.bytes += size
        return t

    def __enter__(self) -> SavedActivations:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def saved_activation_bytes(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], precision: str,
                           exclude: Iterable[torch.Tensor] = ()) -> tuple[int, int]:
    """Bytes of the tensors saved for backward by one forward of ``block`` on ``hidden`` (as in training:
    autocast for ``precision``, parameters requiring grad): (activations, autocast weight copies).
    The fp32 parameters themselves and ``exclude`` (the input) are not counted."""
    from ebft.models.blocks import call_block
    from ebft.precision import autocast_context

    params = [p for p in block.parameters() if p.dtype.is_floating_point]
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in params} | {
        t.untyped_storage().data_ptr() for t in exclude}
    try:
        counter = SavedActivations(tuple(p.shape) for p in params if p.dim() == 2)
        counter._seen |= param_ptrs  # weights are counted as weights, not activations
        with counter, autocast_context(hidden.device, precision):
            out = call_block(block, hidden, kwargs)
        del out
        return counter.bytes, counter.weight_copy_bytes
    finally:
        for p, o in zip(params, old):
            p.requires_grad_(o)


def byte_tokenizer():
    """A fast tokenizer whose ids are UTF-8 bytes, plus <eos> (256) and <bos> (257); adds no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)})
    tok = Tokenizer(models.BPE(vocab={ch: b for b, ch in table.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<bos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
