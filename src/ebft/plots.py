"""PNG plots of runs and sweeps, drawn from their report data (never from inside a training loop).

matplotlib is optional (``pip install 'ebft[plot]'``) and imported lazily with the Agg back-end.
Without it every function here returns ``None``; :func:`pyplot` warns once per process that plots
were skipped. Every file is written atomically (``ebft.fsio.atomic_write``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ebft.fsio import atomic_write

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ebft[plot]' (or: pip install matplotlib)"
_warned = False


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg back-end, or ``None`` (with one warning per process) without matplotlib."""
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            logger.warning("matplotlib is not installed, so no plots were drawn (the Markdown is complete "
                           "without them); install it with: %s", INSTALL_HINT)
            _warned = True
        return None
    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def _plain_number(value: float, _: Any = None) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:.2g}"


def _plain_log_labels(ax: Any) -> None:
    """Label a log axis with plain numbers (300, 1,000, 100,000) instead of 3 x 10^2 or 1e+05; minor ticks
    too when the data span less than two decades (call after plotting)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
    low, high = ax.get_ylim()
    short = low > 0 and high / low < 100
    ax.yaxis.set_minor_formatter(FuncFormatter(_plain_number) if short else NullFormatter())


def _finite_positive(values: Sequence[Any]) -> bool:
    return any(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def block_losses(blocks: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Per-block reconstruction loss (MSE to the dense block) of the pruned block before and after tuning."""
    plt = pyplot()
    if plt is None or not blocks:
        return None
    index = [b["index"] for b in blocks]
    init = [b["init_loss"] for b in blocks]
    final = [b["final_loss"] for b in blocks]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(index, init, "o-", ms=3, label="pruned, before tuning")
    if any(f != i for f, i in zip(final, init)):
        ax.plot(index, final, "o-", ms=3, label="after tuning")
        restored = [b["index"] for b in blocks if b.get("restored")]
        if restored:
            ax.plot(restored, [final[index.index(i)] for i in restored], "x", color="red", ms=8,
                    label="restored (untuned weights kept)")
    if _finite_positive(init + final):
        ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("MSE to the dense block's output")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def loss_curves(blocks: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Each block's training loss per epoch, divided by its untuned loss (blocks differ in scale ~1000x)."""
    plt = pyplot()
    tuned = [b for b in blocks if b.get("epoch_losses") and b.get("init_loss")]
    if plt is None or not tuned:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    cmap = plt.get_cmap("viridis")
    n = max(len(blocks) - 1, 1)
    for b in tuned:
        losses = [b["init_loss"], *b["epoch_losses"]]
        ax.plot(range(len(losses)), [v / b["init_loss"] for v in losses], color=cmap(b["index"] / n), lw=1)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n))
    fig.colorbar(sm, ax=ax, label="block")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (0: untuned)")
    ax.set_ylabel("loss / untuned loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def stage_curve(losses: Sequence[float], path: Path, title: str) -> Path | None:
    """LoRA's mean causal-LM training loss per epoch."""
    plt = pyplot()
    if plt is None or not losses:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("causal-LM loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def series_styles(labels: Sequence[str]) -> dict[str, tuple[int, str]]:
    """``(colour index, line style)`` per ``"PRUNER"`` or ``"PRUNER + METHOD"`` label: one colour per
    pruner in order of appearance, dashed for pruning alone, then ``-``, ``:``, ``-.`` per method."""
    pruners = list(dict.fromkeys(label.partition(" + ")[0] for label in labels))
    methods = list(dict.fromkeys(label.partition(" + ")[2] for label in labels if " + " in label))
    method_styles = ["-", ":", "-."]
    out = {}
    for label in labels:
        pruner, _, method = label.partition(" + ")
        out[label] = (pruners.index(pruner), method_styles[methods.index(method) % 3] if method else "--")
    return out


def _finish_perplexity_axes(ax: Any, dense: float | None, xlabel: str, title: str) -> None:
    """The dense line, a log perplexity axis with plain labels, labels, grid and legend."""
    if dense is not None:
        ax.axhline(dense, color="gray", ls="--", lw=1, label=f"dense ({dense:.2f})")
    ax.set_yscale("log")
    _plain_log_labels(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def perplexity_vs_sparsity(series: dict[str, list[tuple[float, float, str | None]]], dense: float | None,
                           path: Path, title: str) -> Path | None:
    """One line per pruner + method through its unstructured points; N:M points as labelled markers.

    ``series``: label -> ``[(sparsity, perplexity, nm label or None), ...]``, labels as ``"PRUNER"``
    (pruning alone) or ``"PRUNER + METHOD"``. Each pruner has one colour; pruning alone is dashed
    and each repair method has its own line style.
    """
    plt = pyplot()
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = ["s", "^", "D", "v", "P", "X"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = series_styles(list(series))
    nm_labels: list[str] = []
    for label, points in series.items():
        line = sorted((x, y) for x, y, nm in points if nm is None)
        color_index, style = styles[label]
        color = colors[color_index % len(colors)]
        if line:
            ax.plot([x for x, _ in line], [y for _, y in line], marker="o", ls=style, ms=4, color=color, label=label)
        for x, y, nm in points:
            if nm is None:
                continue
            if nm not in nm_labels:
                nm_labels.append(nm)
            marker = markers[nm_labels.index(nm) % len(markers)]
            ax.plot([x], [y], marker, color=color, ms=7, label=None if line else label,
                    markerfacecolor="none" if line else None)
            ax.annotate(nm, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7, color=color)
    ax.set_xticks(sorted({x for points in series.values() for x, _, _ in points}))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    _finish_perplexity_axes(ax, dense, "sparsity (N:M patterns as hollow markers at their sparsity)" if nm_labels
                            else "sparsity", title)
    return _save(plt, fig, path)


def perplexity_vs_nsamples(series: dict[str, list[tuple[int, float]]], dense: float | None, seqlen: int | None,
                           path: Path, title: str) -> Path | None:
    """One line per pruner + method: perplexity against the number of calibration windows (log2 axis).

    ``series``: label -> ``[(nsamples, perplexity), ...]``, labelled as for :func:`perplexity_vs_sparsity`.
    """
    plt = pyplot()
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = series_styles(list(series))
    for label, points in series.items():
        points = sorted(points)
        color_index, style = styles[label]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ls=style, ms=4,
                color=colors[color_index % len(colors)], label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for points in series.values() for x, _ in points}))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(plt.NullLocator())
    _finish_perplexity_axes(ax, dense, "calibration windows" + (f" of {seqlen} tokens" if seqlen else ""), title)
    return _save(plt, fig, path)


def loss_ratio_by_block(cells: dict[str, Sequence[dict[str, Any]]], path: Path, title: str) -> Path | None:
    """final/init reconstruction loss per block, one line per tuned cell (comparable across blocks)."""
    plt = pyplot()
    cells = {k: v for k, v in cells.items() if v}
    if plt is None or not cells:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, blocks in cells.items():
        ratios = [(b["index"], b["final_loss"] / b["init_loss"]) for b in blocks if b.get("init_loss")]
        ax.plot([i for i, _ in ratios], [r for _, r in ratios], lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("final / init reconstruction loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(cells) <= 16:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, path)
