"""``ebft report DIR``: render one run's ``report.json`` into ``report.md`` (and ``report.html``) with plots.

The page holds the settings, the perplexities (and the dense model's, with ``--eval-dense``), the
sparsity, the timings, a per-block table and two plots drawn from the report: each block's
reconstruction loss before and after tuning, and each block's training loss per epoch. Plots go to
``DIR/plots/``; every file is written atomically. The page is an :class:`ebft.page.Page`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ebft import plots
from ebft.checkpoint import read_report
from ebft.errors import EbftError, UsageError
from ebft.finetune.base import ModelResult
from ebft.fsio import write_text
from ebft.page import Page, budget_label, fmt, fmt_loss, sparsity_label
from ebft.results import RunReport
from ebft.settings import options_label

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one run's report


def load_report(folder: Path) -> RunReport:
    """``folder/report.json``, or a one-line error that says what to give instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"report folder not found: {folder}; give the folder that ebft prune --out wrote")
    report = read_report(folder)
    if report is None:
        raise EbftError(f"{folder} holds no readable report.json of an ebft prune run; give the folder that "
                        "ebft prune --out wrote")
    return RunReport.from_dict(report)


def run_plots(blocks: list[dict[str, Any]], stage: dict[str, Any] | None, folder: Path, stem: str,
              title: str) -> dict[str, Path]:
    """The per-run plots (block losses, loss curves, the whole-model stage's curve) as ``{kind: path}``;
    none without matplotlib."""
    made: dict[str, Path] = {}
    path = plots.block_losses(blocks, folder / f"{stem}blocks.png", f"{title}: per-block reconstruction loss")
    if path is not None:
        made["blocks"] = path
    path = plots.loss_curves(blocks, folder / f"{stem}loss_curves.png", f"{title}: training loss per block")
    if path is not None:
        made["curves"] = path
    if stage and stage.get("losses"):
        method = stage.get("method", "model stage")
        path = plots.stage_curve(stage["losses"], folder / f"{stem}{method}.png", f"{title}: {method} training loss")
        if path is not None:
            made["stage"] = path
    return made


def run_title(report: RunReport) -> str:
    cfg = report.config
    method = cfg["finetune"]["method"]
    tail = "" if method == "none" else f" + {method}"
    return f"{cfg['model']}: {cfg['prune']['pruner']} {sparsity_label(cfg['prune'])}{tail}"


def build_page(report: RunReport, images: dict[str, str]) -> Page:
    """The report page; ``images`` maps plot kinds to paths relative to the page."""
    cfg = report.config
    ft = cfg["finetune"]
    page = Page(f"ebft run: {run_title(report)}")
    tuned = ft["method"] not in ("none",)

    page.heading("Settings")
    model = report.model
    rows = [
        ["model", f"`{cfg['model']}` ({model.get('class', '?')}, {model.get('parameters', 0) / 1e6:.1f}M parameters, "
                  f"{model.get('blocks', '?')} blocks)"],
        ["pruning", f"{cfg['prune']['pruner']}, {sparsity_label(cfg['prune'])}"],
        ["calibration", f"`{cfg['calib']['source']}`, {cfg['calib']['nsamples']} windows x {cfg['calib']['seqlen']} "
                        f"tokens, seed {cfg['calib']['seed']}"],
        ["fine-tuning", ft["method"] if not tuned else
         f"{ft['method']}" + (f" (preset `{ft['preset']}`)" if ft.get("preset") else "") + f": {budget_label(ft)}, "
         f"held-out fraction {ft['holdout_fraction']:g}" + (f", patience {ft['patience']}" if ft.get("patience") else "")
         + (f"; {options}" if (options := options_label(cfg)) else "")],
        ["evaluation", ", ".join(f"`{s}`" for s in cfg["eval"]["sources"]) + f"; windows of {cfg['eval']['seqlen']}"
                       + (f", first {cfg['eval']['max_windows']}" if cfg["eval"].get("max_windows") else "")
         if cfg["eval"]["sources"] else "none"],
        ["device / precision", f"{report.device or '?'} / {report.precision or 'fp32 (no training)'}"],
        ["software", f"ebft {report.ebft_version or '?'}, torch {report.host.get('torch', '?')}, "
                     f"{report.host.get('threads', '?')} threads"],
    ]
    page.table(["setting", "value"], rows)

    page.heading("Results")
    dense = report.eval_dense or {}
    if report.eval:
        header = ["source"] + (["dense"] if dense else []) + [run_title(report).split(": ", 1)[1]]
        table = []
        for source, ppl in report.eval.items():
            details = report.eval_details.get(source, {})
            row = [f"`{source}`"] + ([fmt(dense.get(source))] if dense else []) + [fmt(ppl)]
            if details.get("tokens"):
                row[0] += f" ({details['windows']} windows, {details['tokens']} tokens)"
            table.append(row)
        page.table(header, table)
    else:
        page.para("No evaluation was asked for (`--eval`).")
    sparsity = report.sparsity
    if sparsity:
        page.para(f"Sparsity of the decoder blocks' linear layers: {sparsity.get('overall', 0):.2%} by mask, "
                  f"{sparsity.get('weights_zero', 0):.2%} of the weights exactly zero.")
    if report.blocks and tuned:
        restored = ", ".join(map(str, report.restored_blocks)) or "none"
        page.para(f"Blocks whose reconstruction loss dropped: {report.improved_blocks}/{len(report.blocks)}; restored "
                  f"to their untuned weights: {restored}.")
    if report.model_stage:
        page.para(ModelResult(**report.model_stage).summary() + " (masks kept).")

    if report.timings:
        page.heading("Timings")
        page.table(["phase", "seconds"], [[k, fmt(v, 1)] for k, v in report.timings.items()])

    if images:
        page.heading("Plots")
        for kind, alt in (("blocks", "per-block reconstruction loss before and after tuning"),
                          ("curves", "training loss per epoch, per block"), ("stage", "whole-model stage's training loss")):
            if kind in images:
                page.image(images[kind], alt)

    if report.blocks:
        page.heading("Blocks")
        page.para("Losses are the MSE between the block's output and the dense block's output on the same "
                  "inputs, on all calibration windows (held-out: the windows kept out of tuning).")
        rows = []
        for b in report.blocks:
            ratio = b.final_loss / b.init_loss if b.init_loss else None
            rows.append([str(b.index), fmt_loss(b.init_loss), fmt_loss(b.final_loss), fmt(ratio, 3),
                         fmt_loss(b.holdout_init_loss), fmt_loss(b.holdout_final_loss), str(b.steps), fmt(b.seconds, 1),
                         b.restored or ""])
        page.table(["block", "init loss", "final loss", "final/init", "held-out init", "held-out final", "steps",
                    "seconds", "restored"], rows)
    return page


def render_report(folder: Path, html_page: bool = False) -> list[Path]:
    """Write ``folder/report.md`` (and ``report.html``) and the plots under ``folder/plots/``; returns the files."""
    folder = Path(folder)
    report = load_report(folder)
    made = run_plots(report.block_dicts(), report.model_stage, folder / "plots", "", run_title(report))
    images = {kind: path.relative_to(folder).as_posix() for kind, path in made.items()}
    page = build_page(report, images)
    written = [write_text(folder / "report.md", page.to_markdown())]
    if html_page:
        written.append(write_text(folder / "report.html", page.to_html()))
    logger.info("wrote %s", ", ".join(str(p) for p in written + list(made.values())))
    return written + list(made.values())
