"""A small document model for reports and summaries: headings, paragraphs, tables, images, as Markdown or HTML.

``ebft report`` (:mod:`ebft.report`) renders one run with it, ``ebft sweep`` (:mod:`ebft.sweep`) the
summary of many; the number formats they share are here too.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any


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


def fmt_duration(seconds: float) -> str:
    """A time for a log line: ``1 h 02 min``, ``3 min 05 s`` or ``12 s``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def fmt_loss(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def sparsity_label(prune: dict[str, Any]) -> str:
    """``2:4`` for N:M, else the sparsity as a percentage (``50%``)."""
    nm = prune.get("nm")
    if nm:
        return f"{nm[0]}:{nm[1]}"
    sparsity = float(prune.get("sparsity", 0.0))
    return f"{sparsity:.0%}" if round(sparsity * 100, 6).is_integer() else f"{sparsity:.1%}"


def budget_label(finetune: dict[str, Any]) -> str:
    """A config's training budget: ``10 epochs, lr 0.001, batch 4`` (steps, warm-up and weight decay when set)."""
    text = f"{finetune['steps']} steps" if finetune.get("steps") else f"{finetune['epochs']} epochs"
    text += f", lr {finetune['lr']:g}"
    if finetune.get("warmup"):
        text += f" (warm-up {finetune['warmup']:g})"
    if finetune.get("weight_decay"):
        text += f", weight decay {finetune['weight_decay']:g}"
    return text + f", batch {finetune['batch_size']}"
