"""Run a list of ``ebft prune`` commands one after another and tabulate their reports.

    python experiments/grid.py experiments/issue2_defaults.txt --runs runs/issue2

Each non-comment line of the list file is ``NAME: FLAGS...`` (flags after ``ebft prune``, the model
included); ``{data}`` in a line is replaced by ``--data-dir`` (default ``$EBFT_DATA_DIR``). A run whose
``report.json`` exists is not run again. The table goes to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--data-dir", default=os.environ.get("EBFT_DATA_DIR", "../shared/data"))
    parser.add_argument("--keep-models", action="store_true", help="keep each run's saved model (540 MB each)")
    args = parser.parse_args()

    rows = []
    for line in args.grid.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, flags = line.split(":", 1)
        name = name.strip()
        out = args.runs / name
        report_path = out / "report.json"
        if not report_path.exists():
            cmd = [sys.executable, "-m", "ebft", "prune", *shlex.split(flags.replace("{data}", args.data_dir)),
                   "--out", str(out), "--quiet"]
            print("$", shlex.join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            if not args.keep_models:
                for f in (out / "model").glob("*.safetensors"):
                    f.unlink()
        report = json.loads(report_path.read_text())
        rows.append((name, report))

    sources = sorted({s for _, r in rows for s in r["eval"]})
    print("| run | " + " | ".join(sources) + " | blocks improved | prune+tune s | total s |")
    print("|---" * (len(sources) + 4) + "|")
    for name, r in rows:
        improved = sum(b["final_loss"] < b["init_loss"] for b in r["blocks"])
        ppl = " | ".join(f"{r['eval'].get(s, float('nan')):.2f}" for s in sources)
        print(f"| {name} | {ppl} | {improved}/{len(r['blocks'])} | {r['timings']['prune_finetune']:.0f} | "
              f"{r['timings']['total']:.0f} |")
        for s, p in r.get("eval_dense", {}).items():
            print(f"| dense ({name}) | {s}: {p:.2f} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
