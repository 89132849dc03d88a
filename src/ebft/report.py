"""``ebft report DIR``: render one run's ``report.json`` into ``report.md`` (and ``report.html``) with plots.

The page holds the settings, the perplexities (and the dense model's, with ``--eval-dense``), the
sparsity, the timings, a per-block table and two plots drawn from the report: each block's
reconstruction loss before and after tuning, and each block's training loss per epoch. Plots go to
``DIR/plots/``; every file is written atomically. :class:`Page` is the small document model that the
sweep summary (``ebft.sweep``) uses too.
"""

from __future__ import annotations

import html
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebft import plots
from ebft.checkpoint import read_report
from ebft.errors import EbftError, UsageError
from ebft.fsio import write_text

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- a tiny document model


@dataclass
class Page:
    """Headings, paragraphs, bullet lists, tables and images, rendered as Markdown or as standalone HTML.

    Text may use Markdown's ``code`` and **bold**; the HTML renderer escapes everything else.
    """

    title: str
    parts: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.parts.append(("para", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.parts.append(("bullets", list(items)))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.parts.append(("table", (list(header), [list(r) for r in rows])))

    def image(self, path: str, alt: str) -> None:
        self.parts.append(("image", (path, alt)))

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.parts:
            if kind == "heading":
                out += ["#" * value[0] + " " + value[1], ""]
            elif kind == "para":
                out += [value, ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                header, rows = value
                out.append("| " + " | ".join(_md_cell(c) for c in header) + " |")
                out.append("|" + " --- |" * len(header))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "image":
                out += [f"![{value[1]}]({value[0]})", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        body = [f"<h1>{_inline(self.title)}</h1>"]
        for kind, value in self.parts:
            if kind == "heading":
                body.append(f"<h{value[0]}>{_inline(value[1])}</h{value[0]}>")
            elif kind == "para":
                body.append(f"<p>{_inline(value)}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in value) + "</ul>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{_inline(c)}</th>" for c in header)
                lines = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>")
            elif kind == "image":
                body.append(f'<p><img src="{html.escape(value[0])}" alt="{html.escape(value[1])}"></p>')
        style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
                 "text-align:right}th{background:#f4f4f4}code{background:#f4f4f4}img{max-width:100%}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    escaped = html.escape(str(text))
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


# ----------------------------------------------------------------------------- number formatting


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a table: fixed digits, ``-`` for missing, ``nan``/``inf`` spelled out."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def fmt_loss(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def sparsity_label(prune: dict[str, Any]) -> str:
    """``2:4`` for N:M, else the sparsity as a percentage (``50%``)."""
    nm = prune.get("nm")
    if nm:
        return f"{nm[0]}:{nm[1]}"
    sparsity = float(prune.get("sparsity", 0.0))
    return f"{sparsity:.0%}" if round(sparsity * 100, 6).is_integer() else f"{sparsity:.1%}"


# ----------------------------------------------------------------------------- one run's report


def load_report(folder: Path) -> dict[str, Any]:
    """``folder/report.json``, or a one-line error that says what to give instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"report folder not found: {folder}; give the folder that ebft prune --out wrote")
    report = read_report(folder)
    if report is None:
        raise EbftError(f"{folder} holds no readable report.json of an ebft prune run; give the folder that "
                        "ebft prune --out wrote")
    return report


def run_plots(blocks: list[dict[str, Any]], lora: dict[str, Any] | None, folder: Path, stem: str,
              title: str) -> dict[str, Path]:
    """The per-run plots (block losses, loss curves, LoRA curve) as ``{kind: path}``; none without matplotlib."""
    made: dict[str, Path] = {}
    path = plots.block_losses(blocks, folder / f"{stem}blocks.png", f"{title}: per-block reconstruction loss")
    if path is not None:
        made["blocks"] = path
    path = plots.loss_curves(blocks, folder / f"{stem}loss_curves.png", f"{title}: training loss per block")
    if path is not None:
        made["curves"] = path
    if lora and lora.get("losses"):
        path = plots.lora_curve(lora["losses"], folder / f"{stem}lora.png", f"{title}: LoRA training loss")
        if path is not None:
            made["lora"] = path
    return made


def run_title(report: dict[str, Any]) -> str:
    cfg = report["config"]
    method = cfg["finetune"]["method"]
    tail = "" if method == "none" else f" + {method}"
    return f"{cfg['model']}: {cfg['prune']['pruner']} {sparsity_label(cfg['prune'])}{tail}"


def build_page(report: dict[str, Any], images: dict[str, str]) -> Page:
    """The report page; ``images`` maps plot kinds to paths relative to the page."""
    cfg = report["config"]
    ft = cfg["finetune"]
    page = Page(f"ebft run: {run_title(report)}")
    tuned = ft["method"] not in ("none",)

    page.heading("Settings")
    model = report.get("model", {})
    rows = [
        ["model", f"`{cfg['model']}` ({model.get('class', '?')}, {model.get('parameters', 0) / 1e6:.1f}M parameters, "
                  f"{model.get('blocks', '?')} blocks)"],
        ["pruning", f"{cfg['prune']['pruner']}, {sparsity_label(cfg['prune'])}"],
        ["calibration", f"`{cfg['calib']['source']}`, {cfg['calib']['nsamples']} windows x {cfg['calib']['seqlen']} "
                        f"tokens, seed {cfg['calib']['seed']}"],
        ["fine-tuning", ft["method"] if not tuned else
         f"{ft['method']}: {ft['epochs']} epochs, lr {ft['lr']:g}, batch {ft['batch_size']}, "
         f"held-out fraction {ft['holdout_fraction']:g}" + (f", patience {ft['patience']}" if ft.get("patience") else "")],
        ["evaluation", ", ".join(f"`{s}`" for s in cfg["eval"]["sources"]) + f"; windows of {cfg['eval']['seqlen']}"
                       + (f", first {cfg['eval']['max_windows']}" if cfg["eval"].get("max_windows") else "")
         if cfg["eval"]["sources"] else "none"],
        ["device / precision", f"{report.get('device', '?')} / {report.get('precision') or 'fp32 (no training)'}"],
        ["software", f"ebft {report.get('ebft_version', '?')}, torch {report.get('host', {}).get('torch', '?')}, "
                     f"{report.get('host', {}).get('threads', '?')} threads"],
    ]
    page.table(["setting", "value"], rows)

    page.heading("Results")
    evals = report.get("eval", {})
    dense = report.get("eval_dense", {})
    if evals:
        header = ["source"] + (["dense"] if dense else []) + [run_title(report).split(": ", 1)[1]]
        table = []
        for source, ppl in evals.items():
            details = report.get("eval_details", {}).get(source, {})
            row = [f"`{source}`"] + ([fmt(dense.get(source))] if dense else []) + [fmt(ppl)]
            if details.get("tokens"):
                row[0] += f" ({details['windows']} windows, {details['tokens']} tokens)"
            table.append(row)
        page.table(header, table)
    else:
        page.para("No evaluation was asked for (`--eval`).")
    sparsity = report.get("sparsity", {})
    if sparsity:
        page.para(f"Sparsity of the decoder blocks' linear layers: {sparsity.get('overall', 0):.2%} by mask, "
                  f"{sparsity.get('weights_zero', 0):.2%} of the weights exactly zero.")
    blocks = report.get("blocks", [])
    if blocks and tuned:
        improved = sum(1 for b in blocks if b["final_loss"] < b["init_loss"])
        restored = [str(b["index"]) for b in blocks if b.get("restored")]
        page.para(f"Blocks whose reconstruction loss dropped: {improved}/{len(blocks)}; restored to their untuned "
                  f"weights: {', '.join(restored) if restored else 'none'}.")
    lora = report.get("lora")
    if lora:
        page.para(f"LoRA: {lora.get('trainable_parameters')} trainable parameters, {lora.get('steps')} steps; "
                  f"causal-LM loss {fmt_loss(lora.get('init_loss'))} -> {fmt_loss(lora.get('final_loss'))} "
                  f"(merged, masks re-applied){'; ' + lora['restored'] if lora.get('restored') else ''}.")

    timings = report.get("timings", {})
    if timings:
        page.heading("Timings")
        page.table(["phase", "seconds"], [[k, fmt(v, 1)] for k, v in timings.items()])

    if images:
        page.heading("Plots")
        for kind, alt in (("blocks", "per-block reconstruction loss before and after tuning"),
                          ("curves", "training loss per epoch, per block"), ("lora", "LoRA training loss")):
            if kind in images:
                page.image(images[kind], alt)

    if blocks:
        page.heading("Blocks")
        page.para("Losses are the MSE between the block's output and the dense block's output on the same "
                  "inputs, on all calibration windows (held-out: the windows kept out of tuning).")
        rows = []
        for b in blocks:
            ratio = b["final_loss"] / b["init_loss"] if b.get("init_loss") else None
            rows.append([str(b["index"]), fmt_loss(b["init_loss"]), fmt_loss(b["final_loss"]), fmt(ratio, 3),
                         fmt_loss(b.get("holdout_init_loss")), fmt_loss(b.get("holdout_final_loss")),
                         str(b.get("steps", 0)), fmt(b.get("seconds"), 1), b.get("restored") or ""])
        page.table(["block", "init loss", "final loss", "final/init", "held-out init", "held-out final", "steps",
                    "seconds", "restored"], rows)
    return page


def render_report(folder: Path, html_page: bool = False) -> list[Path]:
    """Write ``folder/report.md`` (and ``report.html``) and the plots under ``folder/plots/``; returns the files."""
    folder = Path(folder)
    report = load_report(folder)
    made = run_plots(report.get("blocks", []), report.get("lora"), folder / "plots", "", run_title(report))
    images = {kind: path.relative_to(folder).as_posix() for kind, path in made.items()}
    page = build_page(report, images)
    written = [write_text(folder / "report.md", page.to_markdown())]
    if html_page:
        written.append(write_text(folder / "report.html", page.to_html()))
    logger.info("wrote %s", ", ".join(str(p) for p in written + list(made.values())))
    return written + list(made.values())
