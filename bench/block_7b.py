"""One Llama-2-7B-shaped decoder block trained with EBFT on this CPU, and what that implies for 7B.

Builds ``LlamaForCausalLM`` from a ``LlamaConfig`` with Llama-2-7B's block dimensions (hidden 4096,
intermediate 11008, 32 heads, 32 KV heads, head_dim 128) but one decoder layer and a 256-token
vocabulary, so that the block is the only large part (random weights), and runs the real block walk
on it (``ebft.walk.prune_and_finetune``) with ``--batch-size`` random windows as calibration data:
dense targets (fp32, no grad), magnitude 50%, ``--finetune ebft`` for ``--warmup + --steps`` steps
(one step per epoch, no held-out windows), propagation. Walk callbacks take the measurements.

Measured: time per step (``_common.StepTimer`` hooks on the block from ``on_targets``; each step
split into forward+backward and optimizer/clip/masks), the fp32 no-grad forward rate of the dense
pass (the walk's own, from ``on_block_start`` to ``on_targets``, and one more ``run_block`` there;
the faster counts), peak resident memory (VmHWM) of the setup (up to the first training step) and
of the training (reset at the first step, read at ``on_tuned``), the bytes autograd saves per token
at ``--seqlen`` and at ``--act-seqlen``, and the matmul peak of the block's GEMM shapes in fp32 and
bf16 (measured before the walk).

Extrapolated, with every formula and number written out as strings in the JSON: a full 32-block
EBFT run at the paper's budget (256 windows x 1024 tokens, 10 epochs, batch 8) (i) on this CPU and
(ii) on stated GPUs (16 GB ones first), taking a FLOP-efficiency ratio (``--ratio-from`` the JSON of
``bench/block_throughput.py``, or ``--ratio``) times each GPU's datasheet peak.

Prints one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from ebft.walk import Callback  # noqa: E402

if TYPE_CHECKING:
    from ebft.results import BlockReport
    from ebft.walk import BlockWalk

log = logging.getLogger("bench.block_7b")
GiB = 2**30

# name, half-precision (bf16/fp16) dense tensor peak TFLOP/s, fp32 (non-TF32) peak TFLOP/s, memory GB,
# memory bandwidth GB/s -- vendor datasheet figures, dense (no 2:4 sparsity speed-up)
DEFAULT_GPUS = [
    "V100-SXM2-16GB:125:15.7:16:900",
    "T4-16GB:65:8.1:16:320",
    "A100-40GB (reference, not 16 GB):312:19.5:40:1555",
]

LLAMA2_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps before them (default 1)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per step (default 1)")
    p.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (default auto: the faster on the block's GEMMs, as ebft prune)")
    p.add_argument("--act-seqlen", type=int, default=1024,
                   help="also measure saved activations for one window of this many tokens (default 1024; 0 skips)")
    p.add_argument("--ratio-from", type=Path, default=None,
                   help="JSON printed by bench/block_throughput.py; its 'ratio' is the FLOP efficiency used for the GPUs")
    p.add_argument("--ratio", type=float, default=None, help="FLOP efficiency for the GPUs, instead of --ratio-from")
    p.add_argument("--gpu", action="append", default=None, metavar="NAME:HALF_TFLOPS:FP32_TFLOPS:MEM_GB:BW_GBPS",
                   help="a GPU to extrapolate to (repeatable); default: " + ", ".join(DEFAULT_GPUS))
    p.add_argument("--pcie-gbps", type=float, default=12.0,
                   help="assumed host<->device copy rate for the per-step batches, GB/s (default 12)")
    p.add_argument("--paper-minutes", type=float, default=30.0, help="the paper's time for 7B (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    return p.parse_args(argv)


def gib(x: float) -> float:
    return round(x / GiB, 2)


class Probe(Callback):
    """Measures the walk on the block: its dense pass, its training steps, the resident memory around them."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.forward_s: list[float] = []  # the walk's dense pass, then one more
        self.timer: C.StepTimer | None = None
        self.memory: dict[str, Any] = {}
        self.report: BlockReport | None = None

    def on_block_start(self, walk: BlockWalk, index: int) -> None:
        self._start = time.perf_counter()

    def on_targets(self, walk: BlockWalk, index: int) -> None:
        from ebft.capture import calibration_context
        from ebft.models.blocks import run_block

        self.forward_s.append(time.perf_counter() - self._start)
        with calibration_context(walk.model):
            start = time.perf_counter()
            run_block(walk.block, walk.hidden, walk.kwargs, self.batch_size)  # the same pass, timed clean
            self.forward_s.append(time.perf_counter() - start)
        self.timer = C.StepTimer(walk.block, on_first_step=self._training_starts)

    def _training_starts(self) -> None:
        self.memory.update(peak_setup=C.peak_rss_mb(), rss_before=C.rss_mb(), reset=C.reset_peak_rss())

    def on_tuned(self, walk: BlockWalk, index: int, report: BlockReport) -> None:
        self.timer.stop()  # type: ignore[union-attr]
        self.memory.update(peak_train=C.peak_rss_mb(), rss_after=C.rss_mb())
        self.report = report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state_before = C.start(args.quiet, args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft.capture import capture_block_kwargs, capture_first_block_inputs
    from ebft.config import FinetuneConfig, PruneConfig
    from ebft.models import find_blocks
    from ebft.precision import block_shapes, resolve_precision
    from ebft.walk import prune_and_finetune

    rss_baseline = C.rss_mb()
    device = torch.device("cpu")
    bs, seqlen = args.batch_size, args.seqlen

    # ------------------------------------------------------------------ the 7B-shaped block
    t = time.perf_counter()
    config = LlamaConfig(hidden_size=LLAMA2_7B["hidden"], intermediate_size=LLAMA2_7B["intermediate"],
                         num_attention_heads=LLAMA2_7B["heads"], num_key_value_heads=LLAMA2_7B["kv_heads"],
                         num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    build_s = time.perf_counter() - t
    blocks = find_blocks(model)
    block = blocks.blocks[0]
    shapes = C.block_linear_shapes(block)
    p_lin = C.block_linear_params(shapes)
    precision = resolve_precision(args.precision, device, block_shapes(block), bs * seqlen)  # as the walk resolves auto
    p_block = sum(p.numel() for p in block.parameters())
    attn_width = C.attention_width(config)
    log.info("built a 7B-shaped block: %.1fM linear weights (%.2f GiB fp32) in %.1f s", p_lin / 1e6, p_block * 4 / GiB,
             build_s)

    log.info("matmul peak on the 7B block's GEMM shapes at %d tokens", bs * seqlen)
    peaks = C.matmul_peaks(shapes, bs * seqlen, repeats=3, min_seconds=0.2)
    match = C.peak_for(precision)

    # ------------------------------------------------------------------ the walk: targets, prune, train, propagate
    log.info("walk: magnitude 50%%, then %d warm-up + %d timed steps of %d x %d tokens, %s", args.warmup, args.steps,
             bs, seqlen, precision)
    ids = torch.randint(0, 256, (bs, seqlen), generator=torch.Generator().manual_seed(0))
    prune = PruneConfig(pruner="magnitude", sparsity=0.5)
    finetune = FinetuneConfig(method="ebft", epochs=args.warmup + args.steps, batch_size=bs, lr=2e-4,
                              precision=args.precision, holdout_fraction=0.0)
    probe = Probe(bs)
    prune_and_finetune(model, ids, prune, finetune, device, seed=0, callbacks=[probe], forward_batch_size=bs,
                       progress=False)
    report, mem = probe.report, probe.memory
    assert report is not None and probe.timer is not None, "the walk did not reach on_tuned"
    if report.steps != args.warmup + args.steps:
        raise SystemExit(f"training did not run all steps: {report.steps}, restored={report.restored}")
    if report.restored:
        log.warning("the walk gave the block its untuned weights back (%s); the timings stand", report.restored)
    timing = probe.timer.summary(args.warmup)
    fwd_fp32_gflops = C.forward_flops(p_lin, bs, seqlen, attn_width) / min(probe.forward_s) / 1e9
    peak_setup, rss_before_train, can_reset = mem["peak_setup"], mem["rss_before"], mem["reset"]
    peak_train, rss_after_train = mem["peak_train"], mem["rss_after"]
    flops_step = C.train_flops(p_lin, bs, seqlen, attn_width)
    train_gflops = flops_step["total"] * args.steps / timing["timed_wall_s"] / 1e9
    fwd_bwd_gflops = flops_step["total"] * args.steps / timing["fwd_bwd_s_timed"] / 1e9
    t_opt = timing["median_optimizer_and_masks_s"]
    ratio_7b = train_gflops / peaks[match]["gflops"]

    # ------------------------------------------------------------------ saved activations per token
    act = {}
    for n, s in ((bs, seqlen), (1, args.act_seqlen)):
        if s <= 0 or f"{n}x{s}" in act:
            continue
        ids_s = torch.randint(0, 256, (n, s), generator=torch.Generator().manual_seed(1))
        kw_s = capture_block_kwargs(model, blocks, ids_s[:1])[0]
        h_s = capture_first_block_inputs(model, blocks, ids_s, batch_size=n)
        acts, wcopies = C.saved_activation_bytes(block, h_s, kw_s, precision, exclude=[h_s])
        act[f"{n}x{s}"] = {"tokens": n * s, "saved_bytes": acts, "bytes_per_token": round(acts / (n * s)),
                           "autocast_weight_copies_bytes": wcopies}
        del h_s
    per_token_key = f"1x{args.act_seqlen}" if f"1x{args.act_seqlen}" in act else f"{bs}x{seqlen}"
    act_per_token = act[per_token_key]["bytes_per_token"]
    wcopy_bytes = act[per_token_key]["autocast_weight_copies_bytes"]

    # ------------------------------------------------------------------ extrapolation
    ratio_src = "measured on the 7B block in this run (achieved / matching matmul peak)"
    ratio = ratio_7b
    if args.ratio_from is not None:
        ratio = float(json.loads(args.ratio_from.read_text())["ratio"])
        ratio_src = f"'ratio' of {args.ratio_from} (bench/block_throughput.py)"
    elif args.ratio is not None:
        ratio, ratio_src = args.ratio, "--ratio"

    L, H, I, V = LLAMA2_7B["layers"], LLAMA2_7B["hidden"], LLAMA2_7B["intermediate"], LLAMA2_7B["vocab"]
    N, S, E, B = 256, 1024, 10, 8
    steps_block = E * math.ceil(N / B)
    train_f = E * (6 * p_lin * N * S + 12 * N * S**2 * attn_width)
    fwd_f = 3 * C.forward_flops(p_lin, N, S, attn_width)
    total_train_f, total_fwd_f = L * train_f, L * fwd_f
    model_params = L * p_block + 2 * V * H + H  # blocks + embedding + lm_head (untied) + final norm
    budget = {
        "windows": N, "seqlen": S, "epochs": E, "batch_size": B, "blocks": L,
        "steps_per_block": steps_block,
        "steps_per_block_arith": f"{E} epochs * ceil({N}/{B}) = {steps_block} (the paper trains on all 256 windows; "
                                 f"ebft's default --holdout-fraction 0.125 would train on 224: 280 steps)",
        "train_flops_per_block": f"{E} * (6*{p_lin}*{N}*{S} + 12*{N}*{S}^2*{attn_width}) = {train_f:.4g}",
        "forward_flops_per_block": (f"3 no-grad fp32 passes over all windows (dense targets, initial loss, final "
                                    f"loss + propagation): 3 * (2*{p_lin}*{N}*{S} + 4*{N}*{S}^2*{attn_width}) = {fwd_f:.4g}"),
        "total_flops": f"{L} * ({train_f:.4g} + {fwd_f:.4g}) = {total_train_f + total_fwd_f:.4g}",
        "sustained_rate_for_paper_time": (f"{total_train_f + total_fwd_f:.4g} / ({args.paper_minutes:g}*60 s) = "
                                          f"{(total_train_f + total_fwd_f) / (args.paper_minutes * 60) / 1e12:.1f} TFLOP/s"),
    }

    # (i) this CPU
    cpu_fwd_bwd_s = total_train_f / (fwd_bwd_gflops * 1e9)
    cpu_opt_s = L * steps_block * t_opt
    cpu_fwd_s = total_fwd_f / (fwd_fp32_gflops * 1e9)
    cpu_total_s = cpu_fwd_bwd_s + cpu_opt_s + cpu_fwd_s
    buffers = 2 * N * S * H * 4
    train_state = 3 * p_block * 4  # grads + AdamW exp_avg, exp_avg_sq (fp32)
    act_full = act_per_token * B * S
    masks_all = L * -(-p_lin // 8)  # every block's masks, kept on the CPU by the walk packed 8 to a byte
    rss_torch = rss_baseline
    cpu_mem = model_params * 4 + masks_all + buffers + train_state + act_full + wcopy_bytes + rss_torch * 2**20
    cpu = {
        "time_s": round(cpu_total_s),
        "time_hours": round(cpu_total_s / 3600, 1),
        "time_arith": (f"fwd+bwd {total_train_f:.4g} FLOP / {fwd_bwd_gflops:.1f} GFLOP/s = {cpu_fwd_bwd_s:.4g} s; "
                       f"optimizer+clip+masks {L}*{steps_block} steps * {t_opt:.3f} s = {cpu_opt_s:.4g} s; "
                       f"fp32 forward passes {total_fwd_f:.4g} FLOP / {fwd_fp32_gflops:.1f} GFLOP/s = {cpu_fwd_s:.4g} s; "
                       f"total {cpu_total_s:.4g} s = {cpu_total_s / 3600:.1f} h "
                       f"(rates measured here at {bs}x{seqlen} tokens; larger batches may run faster)"),
        "peak_memory_gib": gib(cpu_mem),
        "memory_arith": (f"fp32 model {model_params}*4 B = {gib(model_params * 4)} GiB + masks of all blocks, packed "
                         f"8 to a byte, {L}*{p_lin}/8 B = {gib(masks_all)} GiB + inputs/targets buffers 2*{N}*{S}*{H}*4 B = "
                         f"{gib(buffers)} GiB + one block's grads and AdamW states 3*{p_block}*4 B = {gib(train_state)} GiB "
                         f"+ saved activations {act_per_token} B/token * {B}*{S} = {gib(act_full)} GiB + autocast "
                         f"weight copies {gib(wcopy_bytes)} GiB + python/torch baseline {rss_torch:.0f} MiB "
                         f"= {gib(cpu_mem)} GiB"),
    }

    # (ii) GPUs
    gpus = []
    for spec in args.gpu or DEFAULT_GPUS:
        name, half, fp32, mem, bw = spec.rsplit(":", 4)
        half, fp32, mem, bw = float(half), float(fp32), float(mem), float(bw)
        r_train = ratio * half * 1e12
        r_fwd = ratio * fp32 * 1e12
        opt_bytes = 40 * p_lin  # per step: read/write param, m, v (fp32) + read grad + mask the grad and re-mask
        t_opt_gpu = opt_bytes / (bw * 1e9)
        copy_bytes_step = 2 * B * S * H * 4  # one batch of inputs + targets, fp32
        t_copy = L * steps_block * copy_bytes_step / (args.pcie_gbps * 1e9)
        t_copy_fwd = L * 3 * 2 * N * S * H * 4 / (args.pcie_gbps * 1e9)  # in and out of each no-grad pass (targets read too)
        g_train = total_train_f / r_train
        g_fwd = total_fwd_f / r_fwd
        g_opt = L * steps_block * t_opt_gpu
        g_total = g_train + g_fwd + g_opt + t_copy + t_copy_fwd
        g_mem = (16 * p_block + p_lin + wcopy_bytes + act_per_token * B * S + copy_bytes_step)
        ctx = 0.5 * GiB
        gpus.append({
            "gpu": name,
            "assumed": f"{half:g} TFLOP/s bf16/fp16 dense peak, {fp32:g} TFLOP/s fp32 (no TF32), {mem:g} GB, "
                       f"{bw:g} GB/s; PCIe {args.pcie_gbps:g} GB/s, no copy/compute overlap; FLOP efficiency {ratio:.3f} "
                       f"({ratio_src}) applied to both peaks",
            "time_min": round(g_total / 60, 1),
            "time_arith": (f"training {total_train_f:.4g} / ({ratio:.3f}*{half:g}e12) = {g_train:.0f} s; fp32 forward "
                           f"passes {total_fwd_f:.4g} / ({ratio:.3f}*{fp32:g}e12) = {g_fwd:.0f} s; AdamW+masks "
                           f"{L}*{steps_block} steps * 40 B*{p_lin}/{bw:g} GB/s = {g_opt:.0f} s; batch copies "
                           f"{L}*{steps_block}*{copy_bytes_step / 1e6:.0f} MB + {L}*3 passes*{2 * N * S * H * 4 / 1e9:.1f} GB "
                           f"at {args.pcie_gbps:g} GB/s = {t_copy + t_copy_fwd:.0f} s; total {g_total:.0f} s = "
                           f"{g_total / 60:.1f} min vs the paper's {args.paper_minutes:g} min"),
            "time_if_forward_passes_in_bf16_min": round((g_total - g_fwd + total_fwd_f / r_train) / 60, 1),
            "device_memory_gib": gib(g_mem + ctx),
            "device_memory_arith": (f"one block's fp32 weights + grads + AdamW m, v 16*{p_block} B = {gib(16 * p_block)} "
                                    f"GiB + bool masks {gib(p_lin)} GiB + autocast weight copies {gib(wcopy_bytes)} GiB "
                                    f"+ saved activations {act_per_token} B/token*{B}*{S} = {gib(act_per_token * B * S)} "
                                    f"GiB + one batch of inputs and targets {gib(copy_bytes_step)} GiB + CUDA context "
                                    f"~0.5 GiB (assumed) = {gib(g_mem + ctx)} GiB of {mem:g} GB"),
            "host_memory_gib": gib(cpu_mem - train_state - act_full - wcopy_bytes),
        })

    out = {
        "benchmark": "block_7b",
        "command": "python bench/block_7b.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "block": {"hidden": H, "intermediate": I, "heads": LLAMA2_7B["heads"], "kv_heads": LLAMA2_7B["kv_heads"],
                  "linear_params": p_lin, "params": p_block, "fp32_gib": gib(p_block * 4),
                  "built_s": round(build_s, 1), "note": "LlamaConfig num_hidden_layers=1, vocab 256, random weights"},
        "batch_size": bs,
        "seqlen": seqlen,
        "precision": precision,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step_s": [round(x, 2) for x in timing["step_s"]],
        "time_per_step_s": round(timing["median_step_s"], 2),
        "step_split_s": {"fwd_bwd": round(timing["median_fwd_bwd_s"], 2),
                         "optimizer_clip_masks": round(t_opt, 2)},
        "tokens_per_s": round(args.steps * bs * seqlen / timing["timed_wall_s"], 1),
        "train_gflops": round(train_gflops, 1),
        "fwd_bwd_gflops": round(fwd_bwd_gflops, 1),
        "fp32_forward_gflops": round(fwd_fp32_gflops, 1),
        "peak_gflops_fp32": round(peaks["fp32"]["gflops"], 1),
        "peak_gflops_bf16": round(peaks["bf16"]["gflops"], 1),
        "ratio_7b_block": round(ratio_7b, 3),
        "ratio_7b_block_arith": f"{train_gflops:.1f} / {peaks[match]['gflops']:.1f} ({match} peak, same run)",
        "flops_formula": C.FLOP_FORMULA,
        "memory": {
            "rss_python_torch_baseline_mib": round(rss_baseline),
            "peak_rss_setup_mib": round(peak_setup),
            "rss_before_training_mib": round(rss_before_train),
            "peak_rss_training_mib": round(peak_train) if can_reset else None,
            "training_peak_over_before_mib": round(peak_train - rss_before_train) if can_reset else None,
            "training_peak_over_before_expected": (f"grads + AdamW m, v = 3*{p_block}*4 B = {gib(train_state)} GiB, + "
                                                   f"autocast copies and activations at {bs}x{seqlen}"),
            "rss_after_training_mib": round(rss_after_train),
            "peak_rss_mib": round(max(peak_setup, peak_train)),
            "saved_activations": act,
            "note": "VmHWM reset before training via /proc/self/clear_refs" if can_reset else "VmHWM not resettable",
        },
        "extrapolation_7b": {
            "model": "Llama-2-7B: 32 blocks of this shape, vocab 32000, untied embeddings",
            "model_params": model_params,
            "budget": budget,
            "this_cpu": cpu,
            "gpus": gpus,
            "efficiency_ratio_used": ratio,
            "efficiency_ratio_source": ratio_src,
            "caveats": ("FLOP efficiency measured on a 2-core CPU is assumed to carry over to GPU tensor cores; "
                        "the walk runs its non-training passes (targets, loss, propagation) in fp32 without "
                        "autocast, which on GPUs without TF32 costs as much as the training; activations are "
                        "measured on the CPU's attention kernel; no overlap of copies and compute is assumed"),
        },
        "loss_first_last": [C.r(report.epoch_losses[0], 4), C.r(report.epoch_losses[-1], 4)],
        "machine_before": state_before,
        "machine_after": C.machine_state(),
    }
    C.emit(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
