"""The recipe study's rows as a table of BENCHMARKS.md, from the cell files of a sweep.

    python experiments/study_best_table.py                              # runs/study_best_rows
    python experiments/study_best_table.py --config study_best.yaml     # the whole study, once it has run

One line per (pruner, sparsity, method) cell: perplexity on WikiText-2 test, WikiText-2 validation and the
C4 validation sample, the share of the pruning gap closed in cross-entropy on each,
ln(ppl_pruned / ppl_repaired) / ln(ppl_pruned / ppl_dense), against the same sweep's pruning-alone cell of
that row, and the cell's wall seconds, CPU seconds and peak memory. A gap needs the row's pruning-alone
cell: without it the column shows a dash.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from study_tables import label, table

from ebft.sweep import load_sweep, read_cell

SOURCES = ("wikitext2:test", "wikitext2:validation", "c4")
EXPERIMENTS = Path(__file__).resolve().parent


def gap_closed(pruned: float, repaired: float, dense: float) -> float:
    """Share of the pruning gap closed in cross-entropy (1.0: back to dense, 0.0: as pruned)."""
    return math.log(pruned / repaired) / math.log(pruned / dense)


def method(settings: dict) -> str:
    return settings.get("preset") or settings["finetune"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="study_best_rows.yaml", help="a sweep config under experiments/")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="the folder holding the sweeps' outputs")
    args = p.parse_args(argv)
    sweep = load_sweep(EXPERIMENTS / args.config, out=args.runs / Path(args.config).stem)
    dense = read_cell(sweep.cell_path(sweep.dense_id(sweep.models[0])))
    if dense is None:
        print(f"no dense baseline under {sweep.out}: run the sweep first", file=sys.stderr)
        return 1
    cells = {}
    for cell in sweep.cells:
        record = read_cell(sweep.cell_path(cell.id))
        if record is not None:
            s = cell.settings
            cells[(s["pruner"], str(s["sparsity"]), method(s))] = record
    header = ["pruner", "sparsity", "method", *SOURCES, *(f"gap {s}" for s in SOURCES), "wall s", "CPU s", "peak GB"]
    rows = []
    for (pruner, sparsity, name), record in sorted(cells.items()):
        pruned = cells.get((pruner, sparsity, "none"))
        ppl = [record.report.eval[s] for s in SOURCES]
        gaps = ["—" if pruned is None or name == "none" else
                f"{gap_closed(pruned.report.eval[s], v, dense.report.eval[s]):.1%}" for s, v in zip(SOURCES, ppl)]
        memory = (record.memory or {}).get("peak_rss_gb")
        rows.append([pruner, label(record.settings["sparsity"]), name, *(f"{v:,.2f}" for v in ppl), *gaps,
                     f"{record.seconds:,.0f}", f"{record.cpu_seconds:,.0f}", "—" if memory is None else f"{memory:.2f}"])
    print(table(header, rows))
    print("\ndense: " + " / ".join(f"{dense.report.eval[s]:.2f}" for s in SOURCES) + f" ({', '.join(SOURCES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
