"""How fast, and how briefly, ``ebft prune`` refuses bad input on a real model.

Each case runs ``ebft prune MODEL ...`` in a fresh process (as a user would), with no ``--quiet``, and
records the wall time from start to exit, the exit code and every line it printed (stdout and stderr
together). A refusal is meant to come before the weights load: in seconds, in one line.

    python bench/fail_fast.py --model smollm2-135m --data-dir ../shared/data > fail_fast.json

Prints one JSON object: per case the command's flags, ``seconds``, ``exit``, ``lines`` and the line itself.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: (case, flags after ``ebft prune MODEL --out OUT``); ``{short}`` is a text of a few tokens.
CASES = [
    ("calibration text shorter than one window", "--calib text:{short}"),
    ("--sparsity with --nm", "--sparsity 0.5 --nm 2:4"),
    ("--structured with --nm", "--structured 0.25 --nm 2:4"),
    ("--structured with --sparsity", "--structured 0.25 --sparsity 0.5"),
    ("--lora-rank with --finetune ebft", "--lora-rank 4"),
    ("--percdamp with --pruner wanda", "--percdamp 0.02"),
    ("--eval text shorter than one window", "--eval text:{short}"),
    ("--nm 2:7 (widths not divisible by 7)", "--nm 2:7"),
    ("--steps with --epochs", "--steps 100 --epochs 2"),
    ("--allocation owl with --nm", "--allocation owl --nm 2:4"),
    ("--kd-lr with --finetune ebft", "--kd-lr 1e-4"),
    ("--calib-windows document, no document that long", "--calib-windows document --calib text:{short}"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (for the default --calib c4)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ebft-fail-") as tmp:
        short = Path(tmp) / "short.txt"
        short.write_text("hello world", encoding="utf-8")
        for case, flags in CASES:
            argv = [sys.executable, "-m", "ebft", "prune", args.model, "--out", str(Path(tmp) / "out"),
                    *shlex.split(flags.format(short=short))]
            if args.data_dir:
                argv += ["--data-dir", args.data_dir]
            start = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            results.append({"case": case, "flags": flags, "seconds": round(seconds, 2), "exit": done.returncode,
                            "lines": len(lines), "output": lines[:3]})
            print(f"{case}: exit {done.returncode}, {len(lines)} line(s), {seconds:.1f} s", file=sys.stderr)
    print(json.dumps({"model": args.model, "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
