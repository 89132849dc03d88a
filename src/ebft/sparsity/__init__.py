"""Sparsity masks: build (unstructured, N:M), apply, and measure them."""

from __future__ import annotations

from ebft.sparsity.masks import (
    PackedMasks,
    apply_mask_,
    check_nm,
    keep_top,
    mask_stats,
    nm_mask,
    num_pruned,
    pack_mask,
    unpack_mask,
    unstructured_mask,
    weight_sparsity,
)

__all__ = [
    "PackedMasks",
    "apply_mask_",
    "check_nm",
    "keep_top",
    "mask_stats",
    "nm_mask",
    "num_pruned",
    "pack_mask",
    "unpack_mask",
    "unstructured_mask",
    "weight_sparsity",
]
