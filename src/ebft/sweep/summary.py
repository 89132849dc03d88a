"""The summary of a sweep: tables like the paper's (perplexity per pruner x sparsity x method, calibration
size, zero-shot accuracy), the cells table and the plots, from the cell records that exist."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ebft import plots
from ebft.config import parse_nm
from ebft.fsio import write_text
from ebft.page import Page, fmt, sparsity_label
from ebft.report import run_plots
from ebft.sweep.cells import CellRecord, Plan, read_cell
from ebft.sweep.schema import UNCOMPARED, Cell, Sweep, _slug_model, _slug_source, ignored_by, run_keys

logger = logging.getLogger(__name__)




def _records(sweep: Sweep) -> tuple[list[tuple[Cell, CellRecord]], dict[str, CellRecord]]:
    cells = [(c, r) for c in sweep.cells if (r := read_cell(sweep.cell_path(c.id))) is not None]
    dense = {m: r for m in sweep.models if (r := read_cell(sweep.cell_path(sweep.dense_id(m)))) is not None}
    return cells, dense


def _value_label(key: str, value: Any) -> str:
    if key == "sparsity":
        return value if isinstance(value, str) else sparsity_label({"sparsity": value})
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sparsity_sort(value: Any) -> tuple[int, float]:
    if isinstance(value, str):
        n, m = parse_nm(value)  # type: ignore[misc]
        return (1, m + n / m)
    return (0, float(value))


def _mean_text(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return fmt(values[0])
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return fmt(statistics.mean(values))
    return f"{statistics.mean(finite):.2f} ± {statistics.stdev(finite):.2f} (n={len(finite)})"


def _varying(sweep: Sweep, exclude: tuple[str, ...]) -> list[str]:
    return [k for k, v in sweep.axes.items() if len(v) > 1 and k not in exclude]


def _ppl_tables(page: Page, sweep: Sweep, cells: list[tuple[Cell, CellRecord]],
                dense: dict[str, CellRecord]) -> None:
    methods = list(dict.fromkeys(c.settings["finetune"] for c, _ in cells))
    row_keys = [k for k in ("model", "pruner", "sparsity") if k != "model" or len(sweep.models) > 1]
    row_keys += _varying(sweep, ("model", "pruner", "sparsity", "finetune", "seed"))

    def untrained(key: tuple, method: str) -> tuple:  # where a method's cell sits: the settings it ignores are unset
        ignored = ignored_by(method)
        return tuple(None if k in ignored else v for k, v in zip(row_keys, key))

    for source in sweep.eval.sources:
        page.heading(f"Perplexity on `{source}`", 3)
        notes = [f"{'Dense' if len(sweep.models) < 2 else 'Dense ' + model}: **{fmt(r.report.eval[source])}**"
                 for model, r in dense.items() if r.report.eval.get(source) is not None]
        if len(sweep.axes.get("seed", [])) > 1:
            notes.append("mean ± standard deviation over seeds")
        if notes:
            page.para("; ".join(notes) + ".")
        groups: dict[tuple, dict[str, list[float]]] = {}
        for cell, record in cells:
            key = tuple(cell.settings.get(k) for k in row_keys)
            value = record.report.eval.get(source)
            groups.setdefault(key, {}).setdefault(cell.settings["finetune"], []).append(value)
        # a row whose methods all sit in another row (their ignored settings unset) merges into that row
        keys = sorted((k for k, by in groups.items()
                       if not any(t != k and all(untrained(t, m) == k for m in by) for t in groups)),
                      key=lambda k: _row_order(sweep, row_keys, k))
        rows = []
        for key in keys:
            row = [_value_label(k, v) for k, v in zip(row_keys, key)]
            values = [_mean_text(groups.get(untrained(key, m), {}).get(m, [])) for m in methods]
            rows.append(row + values)
        page.table([k.replace("_", " ") for k in row_keys] + methods, rows)


def _row_order(sweep: Sweep, row_keys: list[str], key: tuple) -> tuple:
    """Rows in the grid's order of each axis (sparsity ascending, N:M patterns last)."""
    out = []
    for name, value in zip(row_keys, key):
        if name == "sparsity":
            out.append(_sparsity_sort(value))
        elif name in sweep.axes and value in sweep.axes[name]:
            out.append((0, sweep.axes[name].index(value)))
        else:
            out.append((1, 0) if value is None else (0, -1))
    return tuple(out)


def _calib_table(page: Page, sweep: Sweep, cells: list[tuple[Cell, CellRecord]]) -> None:
    sizes = sweep.axes.get("nsamples", [])
    if len(sizes) < 2:
        return
    page.heading("Calibration samples", 3)
    page.para(f"Perplexity against the number of calibration windows of {sweep.fixed.get('seqlen', '?')} tokens "
              "(`nsamples`).")
    row_keys = [k for k in ("model", "pruner", "sparsity", "finetune") if k != "model" or len(sweep.models) > 1]
    row_keys += _varying(sweep, ("model", "pruner", "sparsity", "finetune", "seed", "nsamples"))
    for source in sweep.eval.sources:
        groups: dict[tuple, dict[int, list[float]]] = {}
        for cell, record in cells:
            key = tuple(cell.settings.get(k) for k in row_keys)
            groups.setdefault(key, {}).setdefault(cell.settings["nsamples"], []).append(
                record.report.eval.get(source))
        rows = [[_value_label(k, v) for k, v in zip(row_keys, key)] +
                [_mean_text(groups[key].get(n, [])) for n in sorted(sizes)] for key in groups]
        page.para(f"`{source}`:")
        page.table([k.replace("_", " ") for k in row_keys] + [str(n) for n in sorted(sizes)], rows)


def _zeroshot_table(page: Page, sweep: Sweep, cells: list[tuple[Cell, CellRecord]],
                    dense: dict[str, CellRecord]) -> None:
    from ebft.eval.zeroshot import mean_acc_stderr

    entries = [(["dense", "", ""] if len(sweep.models) < 2 else [f"dense {m}", "", ""], r.zeroshot)
               for m, r in dense.items() if r.zeroshot]
    extra = _varying(sweep, ("pruner", "sparsity", "finetune"))
    for cell, record in cells:
        if record.zeroshot:
            label = [cell.settings["pruner"], _value_label("sparsity", cell.settings["sparsity"]),
                     cell.settings["finetune"]]
            if extra:
                label[2] += " (" + ", ".join(f"{k} {_value_label(k, cell.settings.get(k))}" for k in extra) + ")"
            entries.append((label, record.zeroshot))
    if not entries:
        return
    tasks = list(dict.fromkeys(t for _, zs in entries for t in zs["tasks"]))
    page.heading("Zero-shot accuracy", 3)
    first = entries[0][1]
    limit = first.get("limit")
    page.para(f"`acc` per task ({first.get('backend')} back-end, "
              f"{'first ' + str(limit) + ' examples per task' if limit else 'all examples'}); mean: unweighted "
              "mean over the tasks; s.e.: its standard error (each task's `sqrt(acc (1 - acc) / (n - 1))`, "
              "combined as independent).")
    rows = []
    for label, zs in entries:
        stderr = mean_acc_stderr(zs["tasks"])  # from acc and n, so that older records get it too
        rows.append(label + [fmt(100 * zs["tasks"][t]["acc"]) if t in zs["tasks"] else "" for t in tasks]
                    + [fmt(100 * zs["mean_acc"]), fmt(100 * stderr) if stderr is not None else ""])
    page.table(["pruner", "sparsity", "finetune", *tasks, "mean", "s.e."], rows)


def _cells_table(page: Page, sweep: Sweep, cells: list[tuple[Cell, CellRecord]]) -> None:
    page.heading("Cells", 2)
    finished = {c.id for c, _ in cells}
    missing = [c.id for c in sweep.cells if c.id not in finished]
    listed = ", ".join(f"`{m}`" for m in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    page.para(f"{len(finished)} of {len(sweep.cells)} cells finished" +
              (f"; not run yet: {listed}." if missing else ".") +
              " Each cell's settings and full report are in `cells/<cell>.json`.")
    rows = []
    for cell, record in cells:
        report = record.report
        tuned = cell.settings["finetune"] != "none"
        improved = f"{report.improved_blocks}/{len(report.blocks)}" if tuned else ""
        restored = len(report.restored_blocks) if tuned else ""
        timings = report.timings
        links = []
        for kind, suffix in (("blocks", "blocks.png"), ("curves", "loss_curves.png")):
            path = sweep.out / "plots" / "cells" / f"{cell.id}.{suffix}"
            if path.exists():
                links.append(f"[{kind}]({path.relative_to(sweep.out).as_posix()})")
        rows.append([f"`{cell.id}`"] + [fmt(report.eval.get(s)) for s in sweep.eval.sources] +
                    [improved, str(restored), fmt(timings.get("prune_finetune"), 0), fmt(record.seconds, 0),
                     fmt(record.cpu_seconds, 0), fmt((record.memory or {}).get("peak_rss_gb")), " ".join(links)])
    page.table(["cell", *sweep.eval.sources, "blocks improved", "restored", "prune+tune s", "cell s", "cell CPU s",
                "peak RSS GB", "plots"], rows)


def _line_points(sweep: Sweep, cells: list[tuple[Cell, CellRecord]], source: str, model: str,
                 along: str) -> Iterator[tuple[str, Cell, float]]:
    """``(line label, cell, perplexity)`` for each cell of ``model`` with a finite ``source`` perplexity,
    for a plot along the axis ``along``: the label is the pruner, `` + METHOD`` unless the method is
    none, and the cell's other varying settings."""
    varying = _varying(sweep, ("model", "pruner", along, "finetune", "seed"))
    for cell, record in cells:
        value = record.report.eval.get(source)
        if cell.model != model or value is None or not math.isfinite(value):
            continue
        method = cell.settings["finetune"]
        label = cell.settings["pruner"] + ("" if method == "none" else f" + {method}")
        extra = [k for k in varying if cell.settings.get(k) is not None]
        if extra:
            label += " (" + ", ".join(f"{k} {_value_label(k, cell.settings.get(k))}" for k in extra) + ")"
        yield label, cell, value


def _summary_plots(sweep: Sweep, cells: list[tuple[Cell, CellRecord]],
                   dense: dict[str, CellRecord]) -> list[tuple[str, str]]:
    made: list[tuple[str, str]] = []
    folder = sweep.out / "plots"
    multi_model = len(sweep.models) > 1
    for source in sweep.eval.sources:
        for model in sweep.models:
            series: dict[str, list[tuple[float, float, str | None]]] = {}
            for label, cell, value in _line_points(sweep, cells, source, model, "sparsity"):
                sparsity = cell.settings["sparsity"]
                nm = sparsity if isinstance(sparsity, str) else None
                x = cell.config.prune.sparsity
                series.setdefault(label, []).append((x, value, nm))
            if not series or len({x for pts in series.values() for x, _, _ in pts}) < 2:
                continue
            dense_value = dense[model].report.eval.get(source) if model in dense else None
            stem = f"ppl_vs_sparsity.{_slug_source(source)}" + (f".{_slug_model(model)}" if multi_model else "")
            path = plots.perplexity_vs_sparsity(series, dense_value, folder / f"{stem}.png",
                                                f"{model}: perplexity on {source}")
            if path is not None:
                made.append((path.relative_to(sweep.out).as_posix(), f"perplexity vs sparsity on {source}"))
    if len(sweep.axes.get("nsamples", [])) > 1:
        made += _nsamples_plots(sweep, cells, dense)
    tuned = {c.id: r.report.block_dicts() for c, r in cells if c.settings["finetune"] != "none"}
    if tuned:
        path = plots.loss_ratio_by_block(tuned, folder / "block_loss_ratio.png",
                                         "reconstruction loss after / before tuning, per block")
        if path is not None:
            made.append((path.relative_to(sweep.out).as_posix(), "final / init reconstruction loss per block"))
    for cell, record in cells:  # per-cell plots that an earlier run could not draw (no matplotlib then)
        if cell.settings["finetune"] != "none" and not (folder / "cells" / f"{cell.id}.blocks.png").exists():
            cell_plots(sweep, cell.id, record)
    return made


def _nsamples_plots(sweep: Sweep, cells: list[tuple[Cell, CellRecord]],
                    dense: dict[str, CellRecord]) -> list[tuple[str, str]]:
    """Perplexity against the number of calibration windows, per eval source and model."""
    made: list[tuple[str, str]] = []
    multi_model = len(sweep.models) > 1
    for source in sweep.eval.sources:
        for model in sweep.models:
            series: dict[str, list[tuple[int, float]]] = {}
            for label, cell, value in _line_points(sweep, cells, source, model, "nsamples"):
                series.setdefault(label, []).append((cell.settings["nsamples"], value))
            if not any(len(points) > 1 for points in series.values()):
                continue
            dense_value = dense[model].report.eval.get(source) if model in dense else None
            stem = f"ppl_vs_nsamples.{_slug_source(source)}" + (f".{_slug_model(model)}" if multi_model else "")
            path = plots.perplexity_vs_nsamples(series, dense_value, sweep.fixed.get("seqlen"), sweep.out / "plots" /
                                                f"{stem}.png", f"{model}: perplexity on {source}")
            if path is not None:
                made.append((path.relative_to(sweep.out).as_posix(), f"perplexity vs calibration windows on {source}"))
    return made


def build_summary(sweep: Sweep) -> Page:
    """The summary page from the cell files that exist (plots are drawn as a side effect)."""
    cells, dense = _records(sweep)
    keys = run_keys()
    page = Page(f"Sweep: {Path(sweep.source).name}")
    settings = ", ".join(f"{k} {_value_label(k, v)}" for k, v in sweep.fixed.items()
                         if k in keys and k in sweep.given and v is not None and k not in UNCOMPARED)
    axes = "; ".join(f"{k}: {', '.join(_value_label(k, v) for v in vs)}" for k, vs in sweep.axes.items())
    page.bullets([
        f"Config: `{sweep.source}`; {len(sweep.cells)} cells ({len(cells)} finished).",
        f"Grid: {axes or 'no axes'}.",
        f"Fixed: {settings or 'defaults'} (every other setting at the `ebft prune` default).",
        "Evaluation: " + (", ".join(f"`{s}`" for s in sweep.eval.sources) or "none") +
        f", windows of {sweep.eval.seqlen}" + (f", first {sweep.eval.max_windows}" if sweep.eval.max_windows else "")
        + (f"; zero-shot tasks {', '.join(sweep.options.tasks)}" + (f" (limit {sweep.options.limit})" if sweep.options.limit else "")
           if sweep.options.tasks else "") + ".",
        "`finetune none` cells ignore the training settings; their rows hold pruning alone." +
        (" `dsnot` cells read only `batch_size` and `holdout_fraction` of them."
         if any(c.settings["finetune"] == "dsnot" for c in sweep.cells) else ""),
    ])
    images = _summary_plots(sweep, cells, dense)
    page.heading("Results", 2)
    if sweep.eval.sources:
        _ppl_tables(page, sweep, cells, dense)
        _calib_table(page, sweep, cells)
    _zeroshot_table(page, sweep, cells, dense)
    if images:
        page.heading("Plots", 2)
        for path, alt in images:
            page.image(path, alt)
    _cells_table(page, sweep, cells)
    return page


def write_summary(sweep: Sweep) -> Path:
    """Write ``OUT/summary.md`` (atomically) and the plots; returns the summary's path."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    path = write_text(sweep.out / "summary.md", build_summary(sweep).to_markdown())
    logger.info("wrote %s", path)
    return path


def describe(sweep: Sweep, plan: Plan) -> list[str]:
    """One line per cell: its id and whether it is finished (for ``--dry-run``)."""
    done = set(plan.done)
    lines = [f"{'done' if c.id in done else 'todo'}  {c.id}" for c in sweep.cells]
    lines += [f"todo  {sweep.dense_id(m)}" for m in plan.dense_todo]
    return lines




def cell_plots(sweep: Sweep, cell_id_: str, record: CellRecord) -> dict[str, Path]:
    """A tuned cell's own plots (block losses, loss curves), under ``OUT/plots/cells/``."""
    report = record.report
    if report.config.get("finetune", {}).get("method", "none") == "none":
        return {}
    return run_plots(report.block_dicts(), report.model_stage, sweep.out / "plots" / "cells", f"{cell_id_}.",
                     cell_id_)
