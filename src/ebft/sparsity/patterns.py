"""Sparsity patterns: recognise the structure of a keep-mask, and re-make masks with that structure.

A bool keep-mask [out, in] made by a pruner has one of three structures: N:M (every group of M
consecutive inputs keeps N), the same count in every output row (Wanda's per-row comparison), or
only a layer-wide count (magnitude, SparseGPT). Mask-refining methods (DSnoT, mask tuning) and
repairs of models pruned elsewhere read the structure from the mask itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ebft.sparsity.masks import keep_top

__all__ = ["MaskStructure", "describe_pattern", "detect_nm", "detect_structure", "topk_mask"]


def detect_nm(keep: Tensor) -> tuple[int, int] | None:
    """The smallest M (2, 4, 8, ..., 128 dividing the width) at which every group keeps the same N < M.

    An N:M mask made by a pruner is found; an unstructured mask practically never is (and if it
    were, swaps would merely be confined to groups, which keeps per-row counts as well).
    """
    rows, cols = keep.shape
    m = 2
    while m <= min(cols, 128):
        if cols % m == 0:
            counts = keep.reshape(rows, cols // m, m).sum(2)
            n = int(counts.reshape(-1)[0]) if counts.numel() else m
            if n < m and bool((counts == n).all()):
                return n, m
        m *= 2
    return None


@dataclass(frozen=True)
class MaskStructure:
    """What a learned mask must preserve: ``kind`` "nm" (n per group of m), "row" (n per row) or "layer" (n in all)."""

    kind: str
    n: int
    m: int = 0


def detect_structure(keep: Tensor) -> MaskStructure:
    """The structure of a bool keep-mask [out, in]: N:M (:func:`detect_nm`), else per-row, else per-layer count."""
    if keep.dim() != 2:
        raise ValueError(f"a keep-mask must be 2-D [out, in]; got shape {tuple(keep.shape)}")
    nm = detect_nm(keep)
    if nm is not None and nm[1] < keep.shape[1]:  # a group as wide as the row is a row count
        return MaskStructure("nm", nm[0], nm[1])
    counts = keep.sum(1)
    if counts.numel() and bool((counts == counts[0]).all()):
        return MaskStructure("row", int(counts[0]))
    return MaskStructure("layer", int(keep.sum()))


@torch.no_grad()
def topk_mask(scores: Tensor, structure: MaskStructure) -> Tensor:
    """The hard keep-mask of ``scores`` [out, in] under ``structure``: exact counts (NaN scores rank highest)."""
    s = torch.nan_to_num(scores.detach().float(), nan=math.inf)
    rows, cols = s.shape
    if structure.kind == "nm":
        return keep_top(s.reshape(rows, cols // structure.m, structure.m), structure.n).reshape(rows, cols)
    if structure.kind == "row":
        return keep_top(s, structure.n)
    if structure.kind == "layer":
        return keep_top(s.reshape(-1), structure.n).reshape(rows, cols)
    raise ValueError(f"unknown mask structure {structure.kind!r}")




def describe_pattern(masks: dict[str, Tensor] | Any) -> dict[str, Any]:
    """The pattern the masks share: ``{"pattern": "N:M", "n", "m"}``, ``"per row"`` (every output row keeps
    the same count) or ``"per layer"`` (only a layer-wide count), with a short ``label``."""
    structures = [detect_structure(mask) for mask in masks.values()]
    kinds = {s.kind for s in structures}
    if kinds == {"nm"} and len({(s.n, s.m) for s in structures}) == 1:
        return {"pattern": "N:M", "n": structures[0].n, "m": structures[0].m,
                "label": f"{structures[0].n}:{structures[0].m}"}
    if kinds == {"row"}:
        return {"pattern": "per row", "label": "unstructured, the same count in every row"}
    return {"pattern": "per layer", "label": "unstructured"}
