"""The method comparison as one table: pruner x pattern rows, repair-method columns.

    python experiments/compare_table.py                 # reads runs/compare_* and runs/core_*
    python experiments/compare_table.py runs/compare_50 runs/core_final ...

Reads the cell records (``OUT/cells/*.json``) of the sweep folders given, by default those of
``experiments/compare_{50,rest,baselines,lora_tuned,ebft_tuned}.yaml`` and
``experiments/core_{final,nm,lr}.yaml`` under ``--runs``. A table cell is the record whose settings
are the column's (method, learning rate, batch size; the default held-out guard) at the row's pruner
and pattern; where several folders have one, the first folder given wins. Each table cell: WikiText-2
test perplexity, then the wall seconds of pruning plus repair (a whole-model stage such as LoRA's
training included) and the cell's CPU seconds (its pruning, repair and evaluation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebft.sweep import read_cell
from ebft.sweep.schema import default_of

if TYPE_CHECKING:
    from ebft.sweep.cells import CellRecord

SOURCE = "wikitext2:test"
SWEEPS = ("compare_50", "compare_rest", "compare_baselines", "compare_lora_tuned", "compare_ebft_tuned",
          "core_final", "core_nm", "core_lr")
PRUNERS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = {0.5: "50%", "2:4": "2:4"}
#: Every column's cells have the default held-out guard (core_lr.yaml's and core_nm.yaml's EBFT cells,
#: tuned on all 64 windows, are not in the table).
BASE = {"holdout_fraction": 0.125}
METHODS: dict[str, dict[str, Any]] = {
    "none": {"finetune": "none"},
    "dsnot": {"finetune": "dsnot"},
    "lora": {"finetune": "lora", "lr": 5e-4},
    "lora-lr2e-3": {"finetune": "lora", "lr": 2e-3},
    "ebft": {"finetune": "ebft", "lr": 1e-3, "batch_size": 4},
    "ebft-lr2e-3": {"finetune": "ebft", "lr": 2e-3, "batch_size": 4},
    "ebft-mask": {"finetune": "ebft-mask", "lr": 2e-4},
}
HEADERS = {"lora": "lora (lr 5e-4)", "lora-lr2e-3": "lora (lr 2e-3, chosen on validation)", "ebft": "ebft (lr 1e-3)",
           "ebft-lr2e-3": "ebft (lr 2e-3, chosen on validation)"}


def read_records(folders: list[Path]) -> list[CellRecord]:
    """The finished cells (not the dense baselines) of each sweep folder, in the order of ``folders``."""
    records = []
    for folder in folders:
        for path in sorted((folder / "cells").glob("*.json")):
            record = read_cell(path)
            if record is not None and record.kind == "cell":
                records.append(record)
    return records


def setting(record: CellRecord, key: str) -> Any:
    """A cell's setting; absent means the default (a cell keeps only the settings it reads)."""
    return record.settings.get(key, default_of(key))


def matches(record: CellRecord, pruner: str, pattern: float | str, method: str) -> bool:
    if record.settings.get("structured") is not None or SOURCE not in record.report.eval:
        return False
    wanted = {"pruner": pruner, "sparsity": pattern, **BASE, **METHODS[method]}
    return all(setting(record, k) == v for k, v in wanted.items())


def find(records: list[CellRecord], pruner: str, pattern: float | str, method: str) -> CellRecord | None:
    return next((r for r in records if matches(r, pruner, pattern, method)), None)


def cell(record: CellRecord | None) -> str:
    if record is None:
        return "—"
    report = record.report
    timings = report.timings
    stage = (report.model_stage or {}).get("method")
    tune = timings["prune_finetune"] + (timings.get(stage, 0.0) if stage else 0.0)
    cpu = f", {record.cpu_seconds:.0f} CPU s" if record.cpu_seconds is not None else ""
    return f"{report.eval[SOURCE]:.2f} ({tune:.0f} s{cpu})"


def table(records: list[CellRecord]) -> str:
    lines = ["| pruner | pattern | " + " | ".join(HEADERS.get(m, m) for m in METHODS) + " |",
             "| --- | --- |" + " --- |" * len(METHODS)]
    for pattern, label in PATTERNS.items():
        for pruner in PRUNERS:
            cells = [cell(find(records, pruner, pattern, m)) for m in METHODS]
            lines.append(f"| {pruner} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="*", help="sweep output folders (default: the SWEEPS under --runs)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the folder holding the sweeps' outputs")
    args = parser.parse_args(argv)
    folders = args.folders or [args.runs / name for name in SWEEPS]
    print(table(read_records(folders)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
