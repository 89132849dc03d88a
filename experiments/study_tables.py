"""The issue 5 studies as the tables of BENCHMARKS.md, from the sweeps' cell files.

    python experiments/study_tables.py            # reads runs/study_{sparsity,dsnot,calib,zeroshot}

Each sweep's own ``summary.md`` has its tables; this script joins them: the DSnoT column of
``study_dsnot`` beside ``study_sparsity``'s none and EBFT columns, with EBFT's gain over pruning alone;
the calibration sizes with EBFT's gain; zero-shot accuracy with the mean's standard error. A cell that
has not finished shows as a dash.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ebft.eval.zeroshot import mean_acc_stderr
from ebft.sweep import load_sweep, read_cell

if TYPE_CHECKING:
    from ebft.sweep.cells import CellRecord

SOURCE = "wikitext2:test"
EXPERIMENTS = Path(__file__).resolve().parent


def records(config: str, runs: Path) -> dict[tuple, CellRecord]:
    """``{(pruner, sparsity, finetune, nsamples): record}`` of a sweep's finished cells (``OUT/cells/*.json``),
    and ``{("dense",): record}`` for its dense baseline."""
    name = Path(config).stem
    sweep = load_sweep(EXPERIMENTS / config, out=runs / name)
    out = {}
    for cell in sweep.cells:
        record = read_cell(sweep.cell_path(cell.id))
        if record is not None:
            s = cell.settings
            out[(s["pruner"], s["sparsity"], s["finetune"], s["nsamples"])] = record
    for model in sweep.models:
        dense = read_cell(sweep.cell_path(sweep.dense_id(model)))
        if dense is not None:
            out[("dense",)] = dense
    return out


def ppl(record: CellRecord | None) -> float | None:
    return None if record is None else record.report.eval.get(SOURCE)


def num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def label(sparsity: float | str) -> str:
    return sparsity if isinstance(sparsity, str) else f"{sparsity * 100:g}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def sparsity_table(runs: Path) -> str:
    main, dsnot = records("study_sparsity.yaml", runs), records("study_dsnot.yaml", runs)
    rows = []
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        for sparsity in (0.5, 0.6, 0.7, 0.8, "2:4", "4:8"):
            none = ppl(main.get((pruner, sparsity, "none", 64)))
            ebft = ppl(main.get((pruner, sparsity, "ebft", 64)))
            refined = ppl(dsnot.get((pruner, sparsity, "dsnot", 64)))
            gain = f"{none / ebft:,.1f}×" if none and ebft else "—"
            rows.append([pruner, label(sparsity), num(none), num(refined) if pruner == "wanda" else "",
                         f"**{num(ebft)}**" if ebft else "—", gain])
    return table(["pruner", "sparsity", "none", "DSnoT", "EBFT", "none / EBFT"], rows)


def calib_table(runs: Path) -> str:
    calib = records("study_calib.yaml", runs)
    rows = []
    sizes = (16, 32, 64, 128, 256)
    for method in ("none", "ebft"):
        rows.append(["Wanda 50%" + ("" if method == "none" else " + EBFT")] +
                    [num(ppl(calib.get(("wanda", 0.5, method, n)))) for n in sizes])
    seconds = [calib.get(("wanda", 0.5, "ebft", n)) for n in sizes]
    rows.append(["EBFT cell, CPU s"] + [num(r and r.cpu_seconds, 0) for r in seconds])
    return table(["windows of 256 tokens"] + [str(n) for n in sizes], rows)


#: the zero-shot study's methods: (finetune as a cell records it, the label after the pruned row's name)
ZEROSHOT_METHODS = (("none", ""), ("ebft", " + EBFT"))
TASKS = ("boolq", "rte", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")


def zeroshot_table(runs: Path, config: str = "study_zeroshot.yaml",
                   methods: tuple[tuple[str, str], ...] = ZEROSHOT_METHODS, with_stderr: bool = False) -> str:
    """Accuracy per task, the mean and its standard error, for the dense model and Wanda 50% / 2:4 under each
    method; ``with_stderr`` writes each task's standard error beside its accuracy."""
    zs = records(config, runs)
    entries = [("dense", zs.get(("dense",)))]
    for sparsity in (0.5, "2:4"):
        for method, suffix in methods:
            entries.append((f"Wanda {label(sparsity)}{suffix}", zs.get(("wanda", sparsity, method, 64))))
    rows = []
    for name, record in entries:
        result = record.zeroshot if record else None
        if result is None:
            rows.append([name, "—"] + ["—"] * (len(TASKS) + 3))
            continue
        found = [result["tasks"].get(t) for t in TASKS]
        accs = [r and r["acc"] for r in found]
        stderr = mean_acc_stderr(result["tasks"])
        no_boolq = [a for t, a in zip(TASKS, accs) if t != "boolq" and a is not None]
        cells = [num(r and 100 * r["acc"], 1) + (f" ± {100 * r['acc_stderr']:.1f}" if with_stderr and r else "")
                 for r in found]
        rows.append([name, num(ppl(record))] + cells +
                    [f"**{100 * result['mean_acc']:.2f}**", num(stderr and 100 * stderr),
                     f"{100 * sum(no_boolq) / len(no_boolq):.2f}"])
    return table(["model", "WikiText-2"] + list(TASKS) + ["mean", "s.e.", "mean without boolq"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the folder holding the sweeps' outputs")
    args = parser.parse_args(argv)
    for title, text in (("pruners x sparsity", sparsity_table(args.runs)),
                        ("calibration windows", calib_table(args.runs)),
                        ("zero-shot", zeroshot_table(args.runs))):
        print(f"### {title}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
