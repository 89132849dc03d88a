"""Throughput of EBFT block training against the machine's measured matmul peak.

Loads a real model, captures the real inputs of one decoder block (pydoc calibration text, through
``ebft.capture`` and the dense blocks before it, ``ebft.models.blocks.run_block``), prunes the block
as the walk does (``ebft.walk.make_compressor``: magnitude 50%, fixed masks) and trains it with the
project's EBFT code path (``ebft.finetune.ebft.EBFT.tune``: AdamW, fused where available, gradient
masking, clipping, mask re-application, autocast) for ``--warmup + --steps`` steps. Only the steps
after the warm-up are timed. In the same run it measures the dense matmul rate of the same GEMM
shapes in fp32 and bf16, and (``--profile-steps``) profiles a few more steps to say where the time
outside the GEMMs goes.

Prints one JSON object on stdout; logs go to stderr.

    python bench/block_throughput.py --model smollm2-135m [--batch-size 8 --seqlen 256 --steps 20 --precision auto]
                                     [--compile] [--adamw fused|foreach]

``--compile`` turns on EBFT's own ``compile`` option (``FinetuneConfig(options={"compile": True})``:
``torch.compile`` of the block's forward, inductor, the backward compiled by AOTAutograd), so the
compile happens in the first warm-up step and the timing hooks stay outside the compiled code.
``--adamw foreach`` swaps the fused AdamW kernel for the multi-tensor one (ebft has no setting for
it: the script replaces ``ebft.finetune.loop.fused_kwargs``, the one thing here that is not ebft's
own code path).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402

if TYPE_CHECKING:
    from ebft.config import FinetuneConfig

log = logging.getLogger("bench.block_throughput")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec for ebft.models.load_model (default smollm2-135m)")
    p.add_argument("--block", type=int, default=1, help="index of the decoder block to train (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per optimizer step (default 8, ebft's default)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps before them (default 3)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 (as --precision of ebft prune; default auto)")
    p.add_argument("--calib", default="pydoc", help="calibration text source for the block's inputs (default pydoc)")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="extra steps run under torch.profiler to split the time by op kind (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the block's forward (and so its backward)")
    p.add_argument("--ab-rounds", type=int, default=0,
                   help="also compare eager and torch.compile in one process: this many alternating rounds of "
                        "--ab-steps timed steps each (0: skip); robust to other load that drifts over minutes")
    p.add_argument("--ab-steps", type=int, default=5, help="timed steps per round of --ab-rounds (default 5)")
    p.add_argument("--adamw", default="fused", choices=("fused", "foreach"),
                   help="AdamW implementation: fused (ebft's default where torch has it) or foreach")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    return p.parse_args(argv)


# op-name classification for the profile: self CPU time of every aten op falls in exactly one kind
def op_kind(name: str) -> str:
    n = name.lower()
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation") or "mkldnn_matmul" in n:
        return "gemm"
    if "scaled_dot_product" in n or "flash_attention" in n:
        return "attention_kernel"
    if "adam" in n or "foreach" in n or "norm" in n and "rms" not in n and "layer" not in n:
        return "optimizer_and_clip"
    if n in ("aten::_to_copy", "aten::copy_", "aten::to", "aten::_copy_from"):
        return "dtype_casts_and_copies"
    return "other_elementwise"


def ebft_config(args: argparse.Namespace, steps: int, compile: bool) -> FinetuneConfig:
    """The FinetuneConfig of every training run here: ``steps`` steps of ``--batch-size`` windows (one epoch each)."""
    from ebft.config import FinetuneConfig

    return FinetuneConfig(method="ebft", epochs=steps, batch_size=args.batch_size, lr=1e-3, precision=args.precision,
                          holdout_fraction=0.0, options={"compile": compile})


def profile_steps(args: argparse.Namespace, block: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  masks: dict[str, torch.Tensor], kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """``--profile-steps`` more EBFT steps under torch.profiler: self CPU time by op kind."""
    from torch.profiler import ProfilerActivity, profile

    from ebft.finetune.ebft import EBFT

    cfg = ebft_config(args, args.profile_steps, args.compile)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        EBFT(cfg, seed=1).tune(block, hidden, targets, masks, kwargs, index)
    kinds: dict[str, float] = {}
    top = []
    for evt in prof.key_averages():
        if not evt.key.startswith("aten::"):
            continue
        us = evt.self_cpu_time_total
        kinds[op_kind(evt.key)] = kinds.get(op_kind(evt.key), 0.0) + us
        top.append((us, evt.key))
    total = sum(kinds.values())
    top.sort(reverse=True)
    return {
        "steps": args.profile_steps,
        "share_of_op_time": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops_share": {name: round(us / total, 3) for us, name in top[:10]},
        "op_time_s": total / 1e6,
    }


def compile_ab(args: argparse.Namespace, block: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               masks: dict[str, torch.Tensor], kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """Two copies of the block, trained without and with EBFT's ``compile`` option in alternating rounds."""
    from ebft.finetune.ebft import EBFT

    copies = {"eager": copy.deepcopy(block), "compiled": copy.deepcopy(block)}
    bs = args.batch_size

    def train(name: str, steps: int) -> float:
        cfg = ebft_config(args, steps, name == "compiled")
        t = time.perf_counter()
        EBFT(cfg, seed=0).tune(copies[name], hidden, targets, dict(masks), kwargs, index)
        return time.perf_counter() - t

    warm = {name: train(name, args.warmup) for name in copies}  # includes compiling
    wall = {name: 0.0 for name in copies}
    for r in range(args.ab_rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            wall[name] += train(name, args.ab_steps)
    tokens = args.ab_rounds * args.ab_steps * bs * args.seqlen
    rate = {name: tokens / w for name, w in wall.items()}
    return {"rounds": args.ab_rounds, "steps_per_round": args.ab_steps, "warmup_s": {k: C.r(v, 3) for k, v in warm.items()},
            "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
            "compiled_over_eager": round(rate["compiled"] / rate["eager"], 3),
            "note": "each round trains both copies for the same steps, alternating which goes first; "
                    "wall time includes each tune call's optimizer set-up"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state_before = C.start(args.quiet, args.threads)
    from ebft.capture import calibration_context, capture_block_kwargs, capture_first_block_inputs
    from ebft.config import PruneConfig
    from ebft.data import calibration_windows
    from ebft.finetune.ebft import EBFT
    from ebft.models import find_blocks, load_model
    from ebft.models.blocks import run_block
    from ebft.precision import block_shapes, describe_precision
    from ebft.walk import make_compressor

    t0 = time.perf_counter()
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    load_s = time.perf_counter() - t0
    blocks = find_blocks(model)
    index = args.block
    bs, seqlen = args.batch_size, args.seqlen
    device = torch.device("cpu")
    # auto as the walk resolves it: measured on this block's GEMM shapes at one training batch
    precision_choice = describe_precision(args.precision, device, block_shapes(blocks.blocks[index]), bs * seqlen)
    precision = precision_choice.precision
    args.precision = precision  # decided once, as `ebft prune` does: the tuner (and the profile) must not time it again

    # real inputs of block `index`: the calibration windows through the dense blocks before it
    calib = calibration_windows(tokenizer, args.calib, bs, seqlen, seed=0)
    all_kwargs = capture_block_kwargs(model, blocks, calib[:1])
    hidden = capture_first_block_inputs(model, blocks, calib, batch_size=bs)
    targets = torch.empty_like(hidden)
    with calibration_context(model):
        for i in range(index):
            run_block(blocks.blocks[i], hidden, all_kwargs[i], bs, out=hidden)
        run_block(blocks.blocks[index], hidden, all_kwargs[index], bs, out=targets)  # dense targets
        # the block pruned in place with fixed masks, as the walk hands it to the tuner
        masks = make_compressor(model, PruneConfig(pruner="magnitude", sparsity=0.5)).compress(
            blocks.blocks[index], index, blocks).masks
    kwargs = all_kwargs[index]
    block = blocks.blocks[index]
    shapes = C.block_linear_shapes(block)
    block_for_ab = copy.deepcopy(block) if args.ab_rounds > 0 else None
    if args.adamw == "foreach":
        import ebft.finetune.loop as loop

        loop.fused_kwargs = lambda device: {"foreach": True}
    p_lin = C.block_linear_params(shapes)
    attn_width = C.attention_width(model.config)
    del model, blocks  # only the block is needed from here on

    tokens_per_step = bs * seqlen
    log.info("measuring the matmul peak on the block's GEMM shapes (%d tokens)", tokens_per_step)
    peaks_before = C.matmul_peaks(shapes, tokens_per_step)

    log.info("training block %d: %d warm-up + %d timed steps of %d x %d tokens, %s",
             index, args.warmup, args.steps, bs, seqlen, precision)
    timer = C.StepTimer(block)
    result = EBFT(ebft_config(args, args.warmup + args.steps, args.compile), seed=0).tune(
        block, hidden, targets, masks, kwargs, index)
    timer.stop()
    timing = timer.summary(args.warmup)
    if result.steps != args.warmup + args.steps or result.restored:
        raise SystemExit(f"training did not run all steps: {result.steps} steps, restored={result.restored}")

    peaks_after = C.matmul_peaks(shapes, tokens_per_step)
    peak = {k: max(peaks_before[k]["gflops"], peaks_after[k]["gflops"]) for k in C.PEAK_DTYPES}

    flops_step = C.train_flops(p_lin, bs, seqlen, attn_width)
    timed_tokens = args.steps * tokens_per_step
    wall = timing["timed_wall_s"]
    achieved = flops_step["total"] * args.steps / wall / 1e9
    achieved_fwd_bwd = flops_step["total"] * args.steps / timing["fwd_bwd_s_timed"] / 1e9
    match = C.peak_for(precision)
    ratio = achieved / peak[match]

    prof = None
    if args.profile_steps > 0:
        log.info("profiling %d more steps", args.profile_steps)
        prof = profile_steps(args, block, hidden, targets, masks, kwargs, index)
        gemm = prof["share_of_op_time"].get("gemm", 0.0)
        gemm_flops = 6.0 * p_lin * tokens_per_step * args.profile_steps
        prof["gemm_rate_inside_training_gflops"] = round(gemm_flops / (gemm * prof["op_time_s"]) / 1e9, 1) if gemm else None
        prof["note"] = ("self CPU time of aten ops over the profiled steps (profiler overhead included); "
                        "gemm = mm/addmm/bmm; optimizer_and_clip = fused AdamW, foreach ops, grad-norm; "
                        "dtype_casts_and_copies = autocast casts and batch copies")

    opt_share = timing["optimizer_and_masks_s_timed"] / wall
    limits = (f"fwd+bwd takes {timing['fwd_bwd_s_timed'] / wall:.0%} of the timed wall and runs at "
              f"{achieved_fwd_bwd:.0f} GFLOP/s ({achieved_fwd_bwd / peak[match]:.0%} of the {match} peak); "
              f"AdamW step + grad clip + mask re-application take the other {opt_share:.0%}")
    if prof is not None:
        s = prof["share_of_op_time"]
        outside = 1 - s.get("gemm", 0.0)
        limits += (f". Profile: {outside:.0%} of op time is outside GEMMs "
                   f"(" + ", ".join(f"{k} {v:.0%}" for k, v in s.items() if k != "gemm") + ")")
        if prof.get("gemm_rate_inside_training_gflops"):
            limits += (f"; the GEMMs themselves run at {prof['gemm_rate_inside_training_gflops']:.0f} GFLOP/s "
                       f"inside training vs {peak[match]:.0f} measured alone")

    ab = compile_ab(args, block_for_ab, hidden, targets, masks, kwargs, index) if block_for_ab is not None else None

    out = {
        "benchmark": "block_throughput",
        "compile_ab": ab,
        "command": "python bench/block_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "block": index,
        "block_linear_params": p_lin,
        "linear_shapes": [f"{n}: {i}->{o}" for n, i, o in shapes],
        "batch_size": bs,
        "seqlen": seqlen,
        "tokens_per_step": tokens_per_step,
        "precision": precision,
        "precision_choice": precision_choice.to_dict(),
        "compile": args.compile,
        "adamw": args.adamw,
        "warmup_step_s": [C.r(s, 3) for s in timing["step_s"][: args.warmup]],
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "timed_wall_s": C.r(wall, 4),
        "median_step_s": C.r(timing["median_step_s"], 4),
        "step_split_s": {"fwd_bwd": C.r(timing["median_fwd_bwd_s"], 3),
                         "optimizer_clip_masks": C.r(timing["median_optimizer_and_masks_s"], 3)},
        "tokens_per_s": round(timed_tokens / wall, 1),
        "flops_formula": C.FLOP_FORMULA,
        "flops_per_step": {k: C.r(v, 4) for k, v in flops_step.items()},
        "flops_per_step_arith": (f"6*{p_lin}*{tokens_per_step} + 12*{bs}*{seqlen}^2*{attn_width} = "
                                 f"{flops_step['linear']:.4g} + {flops_step['attention']:.4g} = {flops_step['total']:.4g}"),
        "achieved_gflops": round(achieved, 1),
        "achieved_gflops_fwd_bwd_only": round(achieved_fwd_bwd, 1),
        "peak_gflops": round(peak[match], 1),
        "peak_precision": match,
        "peak_gflops_fp32": round(peak["fp32"], 1),
        "peak_gflops_bf16": round(peak["bf16"], 1),
        "peak_runs": {"before_training": {k: round(v["gflops"], 1) for k, v in peaks_before.items()},
                      "after_training": {k: round(v["gflops"], 1) for k, v in peaks_after.items()},
                      "used": "the higher of the two"},
        "peak_how": peaks_before["fp32"]["how"],
        "peak_per_shape_gflops": {k: v["per_shape_gflops"] for k, v in peaks_after.items()},
        "ratio": round(ratio, 3),
        "ratio_arith": f"{achieved:.1f} / {peak[match]:.1f} ({match} peak, same run)",
        "ratio_vs_fp32_peak": round(achieved / peak["fp32"], 3),
        "limits": limits,
        "profile": prof,
        "loss_first_last": [C.r(result.losses[0], 4), C.r(result.losses[-1], 4)],
        "model_load_s": round(load_s, 1),
        "machine_before": state_before,
        "machine_after": C.machine_state(),
    }
    C.emit(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
