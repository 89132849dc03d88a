"""Sparsity masks: build (unstructured, N:M), apply, pack and measure them; recognise their patterns."""

from __future__ import annotations

from ebft.sparsity import masks as _masks
from ebft.sparsity.masks import *  # noqa: F403 - the package re-exports the masks module
from ebft.sparsity.patterns import MaskStructure, describe_pattern, detect_nm, detect_structure, topk_mask

__all__ = [*_masks.__all__, "MaskStructure", "describe_pattern", "detect_nm", "detect_structure", "topk_mask"]
