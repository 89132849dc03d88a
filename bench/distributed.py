"""One ``ebft prune`` run as 1 process (2 threads, then 1 thread) and as K processes under torchrun.

    python bench/distributed.py [--nproc 2] [--out DIR] [-- extra ebft prune flags]

Prints one JSON object: for each run its wall time, its ``prune_finetune`` time from ``report.json``
and its CPU seconds, the speedup of the torchrun run over both one-process runs, and how far each
final model is from the 1-process, 2-thread one: the largest absolute weight difference, the number
of mask entries (zero or not) that differ, per decoder block and in all. The default run is the
one of BENCHMARKS.md (d): SmolLM2-135M, Wanda 50%, EBFT, 16 x 256 ``pydoc`` windows, 2 epochs, fp32.
The runs go one after another; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, machine_state, r, setup_logging

DEFAULT_ARGS = ["smollm2-135m", "--calib", "pydoc", "--nsamples", "16", "--seqlen", "256", "--epochs", "2",
                "--precision", "fp32", "--device", "cpu", "--quiet"]


def run(name: str, cmd: list[str], out: Path, env: dict[str, str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    report = json.loads((out / "report.json").read_text())
    return {
        "command": " ".join(cmd),
        "wall_s": r(wall, 4),
        "prune_finetune_s": r(report["timings"]["prune_finetune"], 4),
        "cpu_s": r((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 4),
    }


def compare(reference: Path, other: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(reference / "model" / "model.safetensors"), load_file(other / "model" / "model.safetensors")
    per_block: dict[int, dict] = {}
    total_max, total_masks = 0.0, 0
    for name, x in a.items():
        y = b[name]
        diff = float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        masks = int(((x == 0) != (y == 0)).sum())
        total_max, total_masks = max(total_max, diff), total_masks + masks
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            entry = per_block.setdefault(int(m.group(1)), {"max_abs_diff": 0.0, "mask_entries_differing": 0})
            entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)
            entry["mask_entries_differing"] += masks
    first = next((i for i in sorted(per_block) if per_block[i]["mask_entries_differing"]), None)
    return {
        "max_abs_diff": total_max,
        "mask_entries_differing": total_masks,
        "first_block_with_mask_difference": first,
        "per_block": {i: {"max_abs_diff": float(f"{v['max_abs_diff']:.3g}"),
                          "mask_entries_differing": v["mask_entries_differing"]} for i, v in sorted(per_block.items())},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run (default 2)")
    p.add_argument("--out", type=Path, default=None, help="keep the three runs here (default: a temporary folder)")
    p.add_argument("extra", nargs="*", help="ebft prune flags after --, replacing the default run's")
    args = p.parse_args()
    setup_logging(quiet=True)
    prune = args.extra or DEFAULT_ARGS
    work = args.out or Path(tempfile.mkdtemp(prefix="ebft-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    ebft = [sys.executable, "-m", "ebft", "prune", *prune, "--overwrite"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                "-m", "ebft", "prune", *prune, "--overwrite"]
    machine_before = machine_state()
    runs = {
        "one_process_2_threads": run("one", ebft, work / "one", env),
        "one_process_1_thread": run("one_t1", [*ebft, "--threads", "1"], work / "one_t1", env),
        f"{args.nproc}_processes_1_thread_each": run("torchrun", torchrun, work / "torchrun", env),
    }
    k = f"{args.nproc}_processes_1_thread_each"
    result = {
        "benchmark": "distributed",
        "command": "python bench/distributed.py " + " ".join(sys.argv[1:]),
        "ebft_prune_flags": prune,
        "runs": runs,
        "speedup_over_one_process_2_threads": r(runs["one_process_2_threads"]["prune_finetune_s"]
                                                / runs[k]["prune_finetune_s"]),
        "speedup_over_one_process_1_thread": r(runs["one_process_1_thread"]["prune_finetune_s"]
                                               / runs[k]["prune_finetune_s"]),
        "one_thread_vs_two_threads_model": compare(work / "one", work / "one_t1"),
        "torchrun_vs_one_process_model": compare(work / "one", work / "torchrun"),
        "machine_before": machine_before,
        "machine_after": machine_state(),
    }
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
