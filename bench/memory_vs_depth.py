"""Peak resident memory of a full ``ebft prune`` run as a function of model depth.

Builds tiny random Llama models of one width (default hidden 512, intermediate 1536, 8 heads, a
byte-level vocabulary of 258 so that the blocks hold nearly all the weights) with 4, 8, 16 and 32
decoder blocks, saves each with its tokenizer, and runs ``ebft prune`` on it in a fresh subprocess:

    ebft prune MODEL_DIR --out OUT --calib pydoc --nsamples 64 --seqlen 256 --epochs 1 --device cpu

The child (:func:`child`, imported from this file by a fresh interpreter) parses these flags with
ebft's own parser (``ebft.cli.build_parser``) and calls ``ebft.runner.run_prune`` with a walk
callback. Its peak RSS is its own ``VmHWM`` (``/proc/self/status``), read at four points: at the
walk's start (``on_walk_start``: checks, model load, calibration data), at its end (``on_walk_end``:
the block walk), after ``run_prune`` returns (sparsity statistics, staging and publishing the final
model) and just before the child exits; the high-water mark is reset (``/proc/self/clear_refs``) at
each, so each phase's peak is its own. (``ru_maxrss`` from
``wait4`` is not used: Linux carries the parent's resident size at fork into the child's value.)
A sampler polling the child's ``VmRSS`` every 50 ms cross-checks the peak. A least-squares line
``peak = a + b * blocks`` is fitted and its slope ``b`` compared with the per-block fp32 weight
size, the weights plus the masks the walk keeps (packed, one bit per prunable weight), and the
activation buffers (what the slope would carry if activations were kept per block). The default sizes
make one activation buffer (64 x 256 x 512 fp32 = 32 MiB) about twice a block's weights (13 MiB), so the two
hypotheses give clearly different slopes. ``--offload disk`` runs every child with the activation
buffers in memory-mapped files; the sampler also records the child's peak ``RssAnon``, the part of
the resident memory that is not file-backed. A control series (``--control-nsamples``, default 16)
repeats the smallest and largest depth with 4x fewer windows: the slope should not move, only the
intercept.

Prints one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from ebft.walk import Callback  # noqa: E402

if TYPE_CHECKING:
    from ebft.walk import BlockWalk, WalkResult

log = logging.getLogger("bench.memory_vs_depth")
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="4,8,16,32", help="comma-separated block counts (default 4,8,16,32)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    p.add_argument("--intermediate", type=int, default=1536, help="MLP intermediate size (default 1536)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--calib", default="pydoc", help="calibration source (default pydoc, offline)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--control-nsamples", type=int, default=16,
                   help="rerun the smallest and largest depth with this many windows (default 16; 0 skips)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--epochs", type=int, default=1, help="EBFT epochs per block (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="EBFT batch size (default 8)")
    p.add_argument("--pruner", default="wanda", help="pruner (default wanda)")
    p.add_argument("--workdir", type=Path, default=None, help="where models and runs go (default: a temp folder, removed)")
    p.add_argument("--offload", default="none", choices=("none", "disk"),
                   help="ebft prune --offload: activations in RAM (none) or in memory-mapped files (disk)")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between RSS samples of the child (default 0.05)")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    return p.parse_args(argv)


# ---------------------------------------------------------------- a byte-level tokenizer (no download)

def build_model(folder: Path, depth: int, args: argparse.Namespace) -> dict[str, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=258, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=depth, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.seqlen, 256), bos_token_id=257, eos_token_id=256,
                         pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(depth)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder)
    C.byte_tokenizer().save_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    block_linear = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    return {"params": total, "block_params": block, "block_linear_params": block_linear}


# ---------------------------------------------------------------- one run in a child process

PHASES = ("load", "blocks", "save", "exit")


class PhaseMarks(Callback):
    """Calls ``mark("load")`` when the walk starts and ``mark("blocks")`` when it ends."""

    def __init__(self, mark: Callable[[str], None]) -> None:
        self.mark = mark

    def on_walk_start(self, walk: BlockWalk) -> None:
        self.mark("load")

    def on_walk_end(self, walk: BlockWalk, result: WalkResult) -> None:
        self.mark("blocks")


def child(phases_path: str, argv: list[str]) -> int:
    """In the child process: ``ebft prune`` with the flags ``argv``; VmHWM per phase goes to ``phases_path`` (JSON)."""
    from ebft.cli import build_parser
    from ebft.runner import run_prune
    from ebft.settings import all_settings, build_run_config, given_values

    phases: dict[str, float | bool] = {}

    def mark(name: str) -> None:
        phases[f"{name}_peak_mb"] = C.peak_rss_mb()
        phases[f"{name}_end_rss_mb"] = C.rss_mb()
        phases["reset_ok"] = C.reset_peak_rss()

    args = build_parser().parse_args(argv)
    C.setup_logging(args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_run_config(given_values(args, all_settings().values()), model=args.model, out=args.out)
    run_prune(cfg, overwrite=args.overwrite, resume=args.resume, callbacks=[PhaseMarks(mark)])
    mark("save")
    mark("exit")  # the last reading: where VmHWM cannot be reset, the whole run's peak
    Path(phases_path).write_text(json.dumps(phases))
    return 0


#: ``python -c CHILD BENCH_DIR PHASES_JSON ebft-prune-flags...``: :func:`child` in a fresh interpreter
CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); import memory_vs_depth; "
         "sys.exit(memory_vs_depth.child(sys.argv[2], sys.argv[3:]))")


def run_child(cmd: list[str], poll: float, phases_path: Path) -> dict[str, float]:
    cmd = [sys.executable, "-c", CHILD, str(Path(__file__).resolve().parent), str(phases_path), *cmd]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []
    anon: list[float] = []  # RssAnon: memory only the process holds (file-backed pages can be dropped by the kernel)
    stop = threading.Event()

    def sampler() -> None:
        path = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            samples.append((time.perf_counter() - start, int(line.split()[1]) / 1024))
                        elif line.startswith("RssAnon:"):
                            anon.append(int(line.split()[1]) / 1024)
                            break
            except OSError:
                break
            stop.wait(poll)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    stderr_chunks: list[str] = []
    reader = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(stderr_chunks)[-3000:]}")
    peak_t, peak_sampled = max(samples, key=lambda s: s[1]) if samples else (0.0, 0.0)
    phases = json.loads(phases_path.read_text())
    peak = max(phases[f"{n}_peak_mb"] for n in PHASES) if phases["reset_ok"] else phases["exit_peak_mb"]
    return {"peak_rss_mb": peak, "phases": {n: round(phases[f"{n}_peak_mb"], 1) for n in PHASES},
            "peak_rss_sampled_mb": peak_sampled, "peak_rss_anon_sampled_mb": max(anon, default=0.0),
            "peak_at_fraction_of_run": peak_t / wall, "wall_s": wall, "stderr_tail": "".join(stderr_chunks)[-400:]}


def run_depth(work: Path, depth: int, nsamples: int, args: argparse.Namespace) -> dict:
    folder, out = work / f"llama-{depth}", work / f"run-{depth}-{nsamples}"
    for path in (folder, out):
        if path.exists():
            shutil.rmtree(path)
    sizes = build_model(folder, depth, args)
    cmd = ["prune", str(folder), "--out", str(out), "--calib", args.calib,
           "--nsamples", str(nsamples), "--seqlen", str(args.seqlen), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--pruner", args.pruner, "--device", "cpu", "--quiet",
           "--offload", args.offload]
    log.info("depth %d, %d windows: ebft %s", depth, nsamples, " ".join(cmd))
    child = run_child(cmd, args.poll, work / f"phases-{depth}-{nsamples}.json")
    report = json.loads((out / "report.json").read_text())
    row = {
        "blocks": depth,
        "peak_rss_mb": round(child["peak_rss_mb"], 1),
        "weights_mb": round(sizes["params"] * 4 / MB, 1),
        "activations_mb": round(2 * nsamples * args.seqlen * args.hidden * 4 / MB, 1),
        "nsamples": nsamples,
        "peak_rss_by_phase_mb": child["phases"],
        "peak_rss_sampled_mb": round(child["peak_rss_sampled_mb"], 1),
        "peak_rss_anon_sampled_mb": round(child["peak_rss_anon_sampled_mb"], 1),
        "peak_at_fraction_of_run": round(child["peak_at_fraction_of_run"], 2),
        "params": sizes["params"],
        "wall_s": round(child["wall_s"], 1),
        "ebft_steps": sum(b["steps"] for b in report["blocks"]),
        "blocks_with_lower_loss": sum(b["final_loss"] < b["init_loss"] for b in report["blocks"]),
        "_sizes": sizes,
    }
    log.info("depth %d: peak RSS %.0f MB, weights %.0f MB, %.0f s", depth, child["peak_rss_mb"], row["weights_mb"],
             child["wall_s"])
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return row


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    resid = [y - (intercept + slope * x) for x, y in zip(xs, ys)]
    return slope, intercept, max(abs(e) for e in resid)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.setup_logging(args.quiet)
    depths = [int(d) for d in args.depths.split(",")]
    if len(depths) < 2:
        raise SystemExit("--depths needs at least two values to fit a line")
    state_before = C.machine_state()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ebft-memdepth-"))
    work.mkdir(parents=True, exist_ok=True)
    act_buffer_mb = args.nsamples * args.seqlen * args.hidden * 4 / MB  # one [nsamples, seqlen, hidden] fp32 buffer
    rows, control_rows = [], []
    try:
        for depth in depths:
            rows.append(run_depth(work, depth, args.nsamples, args))
        if args.control_nsamples:
            for depth in (min(depths), max(depths)):
                control_rows.append(run_depth(work, depth, args.control_nsamples, args))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    sizes = rows[-1].pop("_sizes")
    for row in rows + control_rows:
        row.pop("_sizes", None)

    xs = [float(r["blocks"]) for r in rows]
    slope, intercept, max_resid = fit_line(xs, [r["peak_rss_mb"] for r in rows])
    block_w_mb = sizes["block_params"] * 4 / MB
    block_mask_mb = sizes["block_linear_params"] / 8 / MB  # masks, packed 8 to a byte
    out = {
        "benchmark": "memory_vs_depth",
        "command": "python bench/memory_vs_depth.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "width": {"hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                  "kv_heads": args.kv_heads, "vocab": 258},
        "run": {"calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "epochs": args.epochs,
                "batch_size": args.batch_size, "pruner": args.pruner, "finetune": "ebft", "device": "cpu",
                "offload": args.offload},
        "rows": rows,
        "rows_columns": "(blocks, peak_rss_mb, weights_mb, activations_mb): peak RSS of the child (its VmHWM), "
                        "peak_rss_anon_sampled_mb: the highest RssAnon seen by the sampler (RSS minus file-backed and "
                        "shared pages: what the kernel cannot drop; --offload disk moves the activations out of it), "
                        "fp32 weights of the whole model, and the walk's two [nsamples, seqlen, hidden] fp32 "
                        "activation buffers (inputs + targets)",
        "fit": {
            "slope_mb_per_block": round(slope, 2),
            "intercept_mb": round(intercept, 1),
            "max_abs_residual_mb": round(max_resid, 1),
            "formula": "least squares peak_rss_mb = intercept + slope * blocks",
        },
        "fit_by_phase": {
            phase: dict(zip(("slope_mb_per_block", "intercept_mb", "max_abs_residual_mb"),
                            (round(v, 2) for v in fit_line(xs, [r["peak_rss_by_phase_mb"][phase] for r in rows]))))
            for phase in ("load", "blocks", "save")
        },
        "phases": "load: from start to the walk's start (checks, model load, calibration data); blocks: the block walk "
                  "(first-block inputs, targets, pruning, EBFT, propagation, per-block checkpoints); save: from the "
                  "walk's end until run_prune returns (sparsity statistics, staging and publishing the final model); "
                  "exit: after run_prune returns, the child's last reading",
        "per_block_fp32_weights_mb": round(block_w_mb, 2),
        "per_block_weights_plus_packed_masks_mb": round(block_w_mb + block_mask_mb, 2),
        "activation_buffer_mb": round(act_buffer_mb, 2),
        "activation_buffers_both_mb": round(2 * act_buffer_mb, 2),
        "slope_over_block_weights": round(slope / block_w_mb, 3),
        "slope_over_weights_plus_masks": round(slope / (block_w_mb + block_mask_mb), 3),
        "slope_over_activation_buffer": round(slope / act_buffer_mb, 3),
        "machine_before": state_before,
        "machine_after": C.machine_state(),
    }
    if len(control_rows) == 2:
        (a, b) = control_rows
        c_slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["blocks"] - a["blocks"])
        same = [r for r in rows if r["blocks"] in (a["blocks"], b["blocks"])]
        m_slope = (same[1]["peak_rss_mb"] - same[0]["peak_rss_mb"]) / (same[1]["blocks"] - same[0]["blocks"])
        shift = sum(r["peak_rss_mb"] for r in same) / 2 - (a["peak_rss_mb"] + b["peak_rss_mb"]) / 2
        out["control"] = {
            "rows": control_rows,
            "nsamples": args.control_nsamples,
            "slope_mb_per_block": round(c_slope, 2),
            "main_series_slope_same_depths_mb_per_block": round(m_slope, 2),
            "mean_peak_shift_mb": round(shift, 1),
            "activation_buffers_difference_mb": round(2 * (args.nsamples - args.control_nsamples) * args.seqlen
                                                      * args.hidden * 4 / MB, 1),
            "reading": f"{args.nsamples // max(1, args.control_nsamples)}x more activations shift the peak by a "
                       "constant and leave the per-block slope alone if activations are not kept per block",
        }
    C.emit(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
