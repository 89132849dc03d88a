"""Peak memory of ``ebft prune --preset NAME`` by phase: loading, the block walk, and what follows it.

For each preset, a fresh subprocess (the child and its phase marks are ``memory_vs_depth``'s) runs

    ebft prune MODEL --out OUT --preset NAME --pruner wanda --sparsity 0.5 --calib c4 --nsamples N
        --seqlen L --precision fp32 --epochs 1 [--kd-epochs 1] --device cpu

The preset is used as it is except for the passes over the windows (``--epochs 1``, and ``--kd-epochs 1``
where the preset distils): memory does not depend on how many passes run, time does. The phases'
peaks are the child's ``VmHWM``, reset at each phase's start: ``load`` (checks, the model, the
calibration windows), ``blocks`` (the walk, with the learning-rate trials of the ``best`` presets)
and ``after`` (the model-level stage where there is one, the model guard, evaluation, saving).
Prints one JSON object on stdout; logs go to stderr.

    EBFT_DATA_DIR=../shared/data python bench/preset_memory.py --presets best-block,best
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
    parser.add_argument("--presets", default="best-block,best", help="comma-separated preset names")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    machine = C.start(threads=args.threads)
    from ebft.presets import PRESETS

    runs = []
    with tempfile.TemporaryDirectory(prefix="ebft-preset-") as tmp:
        for name in args.presets.split(","):
            out = Path(tmp) / name
            passes = ["--epochs", "1", *(["--kd-epochs", "1"] if PRESETS[name].values["finetune"] == "kd" else [])]
            flags = [args.model, "--out", str(out), "--preset", name, "--pruner", "wanda", "--sparsity", "0.5",
                     "--calib", "c4", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                     "--precision", "fp32", *passes, "--device", "cpu", "--threads", str(args.threads), "--quiet"]
            child = run_child(["prune", *flags], 0.05, Path(tmp) / f"phases-{name}.json")
            report = json.loads((out / "report.json").read_text())
            shutil.rmtree(out, ignore_errors=True)
            phases = child["phases"]
            runs.append({"preset": name, "finetune": report["config"]["finetune"]["method"],
                         "peak_rss_mb": C.r(child["peak_rss_mb"], 1), "load_peak_mb": phases["load"],
                         "walk_peak_mb": phases["blocks"], "after_walk_peak_mb": phases["save"],
                         "timings_s": {k: C.r(v, 1) for k, v in report["timings"].items()}})
    C.emit({"bench": "preset_memory", "machine": machine, "model": args.model, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "runs": runs})


if __name__ == "__main__":
    main()
