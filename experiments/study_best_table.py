"""The recipe study's rows as a table of BENCHMARKS.md, from the cell files of a sweep.

    python experiments/study_best_table.py                              # runs/study_best_rows
    python experiments/study_best_table.py --config study_best.yaml     # the whole study, once it has run
    python experiments/study_best_table.py --config study_best_seeds.yaml
    python experiments/study_best_table.py --zeroshot                   # runs/study_best_zeroshot

One line per (pruner, sparsity, method) cell: perplexity on WikiText-2 test, WikiText-2 validation and the
C4 validation sample, the share of the pruning gap closed in cross-entropy on each,
ln(ppl_pruned / ppl_repaired) / ln(ppl_pruned / ppl_dense), against the same sweep's pruning-alone cell of
that row and seed, and the cell's wall seconds, CPU seconds and peak memory. A gap needs the row's
pruning-alone cell under the same seed: without it the column shows a dash. Where a method finished under
two seeds or more, a second table gives its mean, spread and mean gap over them. ``--zeroshot`` prints the
zero-shot study's table instead (``study_best_zeroshot.yaml``: each task's accuracy with its standard error,
the mean and the mean's standard error, for the dense model and Wanda 50% / 2:4 alone, with LoRA and with
``--preset best``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from study_tables import label, table, zeroshot_table

from ebft.presets import PRESETS
from ebft.sweep import load_sweep, read_cell

SOURCES = ("wikitext2:test", "wikitext2:validation", "c4")
EXPERIMENTS = Path(__file__).resolve().parent
#: the zero-shot study's methods, as its cells record them, and their labels
ZEROSHOT_METHODS = (("none", ""), ("lora", " + LoRA"), ("kd", " + `--preset best`"))


def gap_closed(pruned: float, repaired: float, dense: float) -> float:
    """Share of the pruning gap closed in cross-entropy (1.0: back to dense, 0.0: as pruned)."""
    return math.log(pruned / repaired) / math.log(pruned / dense)


def spread_rows(cells: dict, dense: float) -> list[list[str]]:
    """Mean, sample standard deviation and range on the first source of each (pruner, sparsity, method)
    that finished under two seeds or more, and its mean gap closed against the same seed's pruning alone."""
    groups: dict[tuple, list] = {}
    for (pruner, sparsity, name, seed), record in sorted(cells.items()):
        groups.setdefault((pruner, sparsity, name), []).append((seed, record))
    rows = []
    for (pruner, sparsity, name), members in groups.items():
        if len(members) < 2:
            continue
        values = [record.report.eval[SOURCES[0]] for _, record in members]
        gaps = [gap_closed(pruned.report.eval[SOURCES[0]], value, dense)
                for (seed, _), value in zip(members, values)
                if name != "none" and (pruned := cells.get((pruner, sparsity, "none", seed))) is not None]
        rows.append([pruner, label(members[0][1].settings["sparsity"]), name,
                     ", ".join(str(seed) for seed, _ in members), f"{statistics.fmean(values):,.2f}",
                     f"{statistics.stdev(values):,.2f}", f"{min(values):,.2f}", f"{max(values):,.2f}",
                     f"{statistics.fmean(gaps):.1%}" if len(gaps) == len(members) else "—"])
    return rows


def method(settings: dict) -> str:
    """The cell's preset or repair method, and its --block-targets where that is not the preset's own."""
    preset = settings.get("preset")
    if preset and settings["finetune"] != PRESETS[preset].values.get("finetune", settings["finetune"]):
        preset = None  # another method given beside the preset (pruning alone in a config that fixes one)
    name = preset or settings["finetune"]
    if name == "none":
        return name
    own = PRESETS[preset].values.get("block_targets", "repaired") if preset else "repaired"
    targets = settings.get("block_targets") or own
    return name if targets == own else f"{name}, {targets} targets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="study_best_rows.yaml", help="a sweep config under experiments/")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="the folder holding the sweeps' outputs")
    p.add_argument("--zeroshot", action="store_true", help="the zero-shot study's table (study_best_zeroshot.yaml)")
    args = p.parse_args(argv)
    if args.zeroshot:
        print(zeroshot_table(args.runs, "study_best_zeroshot.yaml", ZEROSHOT_METHODS, with_stderr=True))
        return 0
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
            cells[(s["pruner"], str(s["sparsity"]), method(s), s["seed"])] = record
    header = ["pruner", "sparsity", "method", "seed", *SOURCES, *(f"gap {s}" for s in SOURCES), "wall s", "CPU s",
              "peak GB"]
    rows = []
    for (pruner, sparsity, name, seed), record in sorted(cells.items()):
        pruned = cells.get((pruner, sparsity, "none", seed))
        ppl = [record.report.eval[s] for s in SOURCES]
        gaps = ["—" if pruned is None or name == "none" else
                f"{gap_closed(pruned.report.eval[s], v, dense.report.eval[s]):.1%}" for s, v in zip(SOURCES, ppl)]
        memory = (record.memory or {}).get("peak_rss_gb")
        rows.append([pruner, label(record.settings["sparsity"]), name, str(seed), *(f"{v:,.2f}" for v in ppl),
                     *gaps, f"{record.seconds:,.0f}", f"{record.cpu_seconds:,.0f}",
                     "—" if memory is None else f"{memory:.2f}"])
    print(table(header, rows))
    spread = spread_rows(cells, dense.report.eval[SOURCES[0]])
    if spread:
        print(f"\nover the seeds, on {SOURCES[0]} (sample standard deviation):\n")
        print(table(["pruner", "sparsity", "method", "seeds", "mean", "std", "min", "max", "mean gap"], spread))
    print("\ndense: " + " / ".join(f"{dense.report.eval[s]:.2f}" for s in SOURCES) + f" ({', '.join(SOURCES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
