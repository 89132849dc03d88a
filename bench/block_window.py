"""Peak memory and time of the block walk against the window size (``--block-window K``).

For each K, a fresh subprocess runs (the child and its phase marks are ``memory_vs_depth``'s)

    ebft prune MODEL --out OUT --pruner wanda --sparsity 0.5 --calib c4 --nsamples N --seqlen L
        --steps S --batch-size B --precision fp32 --block-window K --no-model-guard --device cpu

and the walk's own peak resident memory is its ``VmHWM`` between the walk's start and end (the high-water
mark is reset when the walk starts, after loading). Beside it: what the K blocks in hand add in theory,
fp32 weights, gradients and AdamW's two moments (16 bytes per parameter), so that the measured growth
per added block can be read against the parameters' share and the activations autograd keeps for the
backward pass through K blocks. Prints one JSON object on stdout; logs go to stderr.

    EBFT_DATA_DIR=../shared/data python bench/block_window.py --windows 1,2,4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from memory_vs_depth import run_child  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", default="1,2,4", help="the window sizes K to run, comma-separated")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per window")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    info = {"machine": C.start(threads=args.threads)}
    from ebft.models.adapter import find_blocks
    from ebft.models.loading import load_config

    config = load_config(args.model)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    runs = []
    with tempfile.TemporaryDirectory(prefix="ebft-window-") as tmp:
        for k in (int(x) for x in args.windows.split(",")):
            out = Path(tmp) / f"k{k}"
            flags = [args.model, "--out", str(out), "--pruner", "wanda", "--sparsity", "0.5", "--calib", "c4",
                     "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--steps", str(args.steps),
                     "--batch-size", str(args.batch_size), "--precision", "fp32", "--block-window", str(k),
                     "--no-model-guard", "--device", "cpu", "--threads", str(args.threads), "--quiet"]
            child = run_child(["prune", *flags], 0.05, Path(tmp) / f"phases-{k}.json")
            report = json.loads((out / "report.json").read_text())
            shutil.rmtree(out, ignore_errors=True)
            runs.append({"block_window": k, "walk_peak_rss_mb": child["phases"]["blocks"],
                         "load_peak_rss_mb": child["phases"]["load"],
                         "walk_s": C.r(report["timings"]["prune_finetune"], 1),
                         "windows_restored": sum(1 for b in report["blocks"] if b["restored"]) // k})
    import torch

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        block = find_blocks(AutoModelForCausalLM.from_config(config)).blocks[0]
    block_params = sum(p.numel() for p in block.parameters())
    base = runs[0]["walk_peak_rss_mb"]
    for run in runs:
        run["walk_peak_over_k1_mb"] = C.r(run["walk_peak_rss_mb"] - base, 1)
        run["k_blocks_training_state_mb"] = C.r(run["block_window"] * block_params * 16 / 2**20, 1)
    activation_mb = args.nsamples * args.seqlen * hidden * 4 / 2**20
    C.emit({"bench": "block_window", **info, "model": args.model, "layers": layers, "block_params": block_params,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "steps": args.steps, "batch_size": args.batch_size,
            "activation_buffer_mb": C.r(activation_mb, 1), "runs": runs})


if __name__ == "__main__":
    main()
