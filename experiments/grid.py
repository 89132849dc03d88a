"""Run a list of ``ebft prune`` commands one after another and tabulate their reports.

    python experiments/grid.py experiments/issue2_defaults.txt --runs runs/issue2

Each non-comment line of the list file is ``NAME: FLAGS...`` (flags after ``ebft prune``, the model
included); ``{data}`` in a line is replaced by ``--data-dir`` (default ``$EBFT_DATA_DIR``). A run whose
``report.json`` exists is not run again. Each run's CPU seconds (user + system, from ``getrusage``) go to
its ``cpu.json``: unlike wall time, they hold when other work shares the machine. The table goes to
stdout as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    parser.add_argument("--threads", type=int, default=None,
                        help="pass --threads N to every run (1 lets two grids share a 2-core machine without "
                             "oversubscribing it)")
    parser.add_argument("--only", default=None, help="comma-separated run names: run just these, in this order")
    args = parser.parse_args()

    lines = {}
    for line in args.grid.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, flags = line.split(":", 1)
            lines[name.strip()] = flags
    names = list(lines) if args.only is None else [n.strip() for n in args.only.split(",")]
    rows = []
    for name in names:
        flags = lines[name]
        out = args.runs / name
        report_path = out / "report.json"
        if not report_path.exists():
            cmd = [sys.executable, "-m", "ebft", "prune", *shlex.split(flags.replace("{data}", args.data_dir)),
                   "--out", str(out), "--quiet"]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            print("$", shlex.join(cmd), file=sys.stderr, flush=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            if subprocess.run(cmd).returncode != 0:
                print(f"! {name} failed; its row is left out", file=sys.stderr, flush=True)
                continue
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            # CPU seconds are the cost figure that survives a busy machine; wall times do not
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            (out / "cpu.json").write_text(json.dumps({"cpu_seconds": cpu}) + "\n")
            if not args.keep_models:
                for f in (out / "model").glob("*.safetensors"):
                    f.unlink()
        report = json.loads(report_path.read_text())
        rows.append((name, report))

    sources = sorted({s for _, r in rows for s in r["eval"]})
    print("| run | " + " | ".join(sources) + " | blocks improved | prune+tune s | total s | CPU s |")
    print("|---" * (len(sources) + 5) + "|")
    for name, r in rows:
        improved = sum(b["final_loss"] < b["init_loss"] for b in r["blocks"])
        ppl = " | ".join(f"{r['eval'].get(s, float('nan')):.2f}" for s in sources)
        cpu_path = args.runs / name / "cpu.json"
        cpu = f"{json.loads(cpu_path.read_text())['cpu_seconds']:.0f}" if cpu_path.exists() else ""
        tune = r["timings"]["prune_finetune"] + r["timings"].get("lora", 0.0)
        print(f"| {name} | {ppl} | {improved}/{len(r['blocks'])} | {tune:.0f} | {r['timings']['total']:.0f} | {cpu} |")
        for s, p in r.get("eval_dense", {}).items():
            print(f"| dense ({name}) | {s}: {p:.2f} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
