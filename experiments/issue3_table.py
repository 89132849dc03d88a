"""The method comparison of issue 3 as one table: pruner x pattern rows, repair-method columns.

    python experiments/issue3_table.py runs/issue3 runs/issue2

Reads ``RUNS/<pruner><50|24>-<method>/report.json`` (and ``cpu.json`` when the grid wrote one) from each
folder given, the first folder that has a run winning. Each cell: WikiText-2 test perplexity, then the
wall seconds of pruning plus repair (LoRA's training included) and, when known, the CPU seconds of the
whole command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PRUNERS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = {"50": "50%", "24": "2:4"}
METHODS = ("none", "dsnot", "lora", "lora-lr2e-3", "ebft", "ebft-lr2e-3", "ebft-mask")
HEADERS = {"lora": "lora (lr 5e-4)", "lora-lr2e-3": "lora (lr 2e-3, chosen on validation)", "ebft": "ebft (lr 1e-3)",
           "ebft-lr2e-3": "ebft (lr 2e-3, chosen on validation)"}
ALIASES = {"ebft": ("ebft", "ebft-final"), "none": ("none",)}


def find(folders: list[Path], pruner: str, pattern: str, method: str) -> Path | None:
    for folder in folders:
        for suffix in ALIASES.get(method, (method,)):
            report = folder / f"{pruner}{pattern}-{suffix}" / "report.json"
            if report.exists():
                return report
    return None


def cell(report_path: Path | None) -> str:
    if report_path is None:
        return "—"
    report = json.loads(report_path.read_text())
    ppl = report["eval"].get("wikitext2:test")
    tune = report["timings"]["prune_finetune"] + report["timings"].get("lora", 0.0)
    cpu_path = report_path.parent / "cpu.json"
    cpu = f", {json.loads(cpu_path.read_text())['cpu_seconds']:.0f} CPU s" if cpu_path.exists() else ""
    return f"{ppl:.2f} ({tune:.0f} s{cpu})" if ppl is not None else "—"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    print("| pruner | pattern | " + " | ".join(HEADERS.get(m, m) for m in METHODS) + " |")
    print("| --- | --- |" + " --- |" * len(METHODS))
    for pattern, label in PATTERNS.items():
        for pruner in PRUNERS:
            cells = [cell(find(args.runs, pruner, pattern, m)) for m in METHODS]
            print(f"| {pruner} | {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
