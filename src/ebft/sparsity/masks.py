"""Pure tensor functions that build, apply and check sparsity masks.

A mask is a bool tensor shaped like the weight it applies to, ``[out_features, in_features]``;
``True`` keeps a weight and ``False`` prunes it. Scores are compared in float32 whatever the
input dtype. Ties are broken deterministically, as by a *stable* ascending sort: among equal
scores the entry with the lower index (column within a row, or flat row-major index
layer-wise) is pruned first. NaN scores rank above everything, so they are pruned last.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, MutableMapping

import torch
from torch import Tensor

from ebft.errors import UsageError

__all__ = [
    "PackedMasks",
    "apply_mask_",
    "check_nm",
    "keep_top",
    "mask_stats",
    "nm_mask",
    "num_pruned",
    "pack_mask",
    "share_counts",
    "unpack_mask",
    "unstructured_mask",
    "weight_sparsity",
]


def _check_2d(tensor: Tensor, what: str) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out_features, in_features]; got shape {tuple(tensor.shape)}")


def num_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` entries a ``sparsity`` fraction prunes: ``floor(count * sparsity)``.

    A tiny tolerance absorbs binary floating-point error, so ``0.29 * 100`` gives 29, not 28.
    """
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity) and 0.0 <= sparsity <= 1.0):
        raise UsageError(f"sparsity must be in [0, 1]; got {sparsity!r}")
    return min(count, int(math.floor(count * sparsity + 1e-9)))


def share_counts(fractions: list[float], size: int, target: float) -> list[int]:
    """Whole counts of pruned entries (out of ``size`` each) for groups meant to be pruned at ``fractions``.

    They add up to what ``target`` prunes in every group, ``len(fractions) * num_pruned(size, target)``, so
    the overall sparsity is exactly the uniform one's; each is ``fraction * size`` rounded down or up, the
    largest remainders rounded up (the earlier group first on a tie).
    """
    total = len(fractions) * num_pruned(size, target)
    raw = [min(max(float(f), 0.0), 1.0) * size for f in fractions]
    counts = [min(size, int(math.floor(r + 1e-9))) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))  # largest remainder first
    missing = total - sum(counts)
    for i in (order[:missing] if missing > 0 else order[::-1][:-missing]):
        counts[i] += 1 if missing > 0 else -1
    return counts


def keep_top(scores: Tensor, k: int, dim: int = -1, *, ties: str = "later") -> Tensor:
    """Bool mask keeping the ``k`` highest ``scores`` along ``dim``: every top-k selection in ebft.

    Scores are compared in float32 (float64 ones as they are); NaN ranks above everything. Among equal scores at the boundary, ``ties="later"`` keeps the
    entries with the higher index (so the lower index is pruned first, the rule of every mask in
    this module, as a stable ascending sort gives), ``ties="earlier"`` those with the lower index.
    Linear time: everything below the boundary value is dropped, plus as many entries equal to it
    as are still needed, in index order.
    """
    if ties not in ("later", "earlier"):
        raise ValueError(f"ties must be 'later' or 'earlier'; got {ties!r}")
    s = scores.detach()
    s = torch.nan_to_num(s if s.dtype == torch.float64 else s.to(torch.float32), nan=math.inf)
    size = s.shape[dim] if s.dim() else 1
    drop = size - k
    if drop <= 0:
        return torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if k <= 0:
        return torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if ties == "earlier":  # reversed along dim, "later" is "earlier"
        return keep_top(s.flip(dim), k, dim, ties="later").flip(dim)
    thr = s.kthvalue(drop, dim=dim, keepdim=True).values
    below = s < thr
    need = drop - below.sum(dim=dim, keepdim=True)
    at = s == thr
    return ~(below | (at & (at.cumsum(dim=dim) <= need)))


def unstructured_mask(scores: Tensor, sparsity: float, per_row: bool) -> Tensor:
    """Prune the lowest-scoring ``sparsity`` fraction of ``scores`` [out, in].

    ``per_row=True`` prunes exactly ``num_pruned(in, sparsity)`` entries in every output row
    (Wanda's comparison group); ``per_row=False`` prunes exactly ``num_pruned(out * in, sparsity)``
    entries over the whole matrix (layer-wise, as in magnitude pruning). NaN scores rank highest.
    """
    _check_2d(scores, "scores")
    s = scores.detach().to(torch.float32)
    size = s.shape[1] if per_row else s.numel()
    if size == 0:
        return torch.ones(s.shape, dtype=torch.bool, device=s.device)
    keep = size - num_pruned(size, sparsity)
    if per_row:
        return keep_top(s, keep, dim=1)
    return keep_top(s.reshape(-1), keep, dim=0).reshape(s.shape)


def nm_mask(scores: Tensor, n: int, m: int, *, name: str | None = None) -> Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input columns of each row.

    Raises :class:`UsageError` if the input width is not a multiple of ``m``; ``name`` (the layer)
    is then included in the message.
    """
    _check_2d(scores, "scores")
    if not (isinstance(n, int) and isinstance(m, int) and m >= 1 and 0 <= n <= m):
        raise UsageError(f"--nm {n}:{m}: N must satisfy 0 <= N <= M")
    out_features, in_features = scores.shape
    if in_features % m != 0:
        layer = f"layer {name!r}" if name else "layer"
        raise UsageError(
            f"--nm {n}:{m} needs every pruned layer's input width divisible by {m}; "
            f"{layer} has {in_features} inputs"
        )
    s = scores.detach().to(torch.float32).reshape(out_features, in_features // m, m)  # group g: columns g*m ..
    return keep_top(s, n, dim=2).reshape(out_features, in_features)


def apply_mask_(weight: Tensor, mask: Tensor) -> Tensor:
    """Zero ``weight`` in place wherever ``mask`` is False; returns ``weight``."""
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    with torch.no_grad():
        weight.masked_fill_(~mask.to(device=weight.device, dtype=torch.bool), 0)
    return weight


def mask_stats(masks: dict[str, Tensor]) -> dict:
    """Pruned fractions: ``{"overall": float, "per_layer": {name: float}}``.

    ``overall`` weighs each layer by its size (pruned entries over all masked entries).
    """
    per_layer: dict[str, float] = {}
    pruned_total = 0
    total = 0
    for layer, mask in masks.items():
        numel = mask.numel()
        pruned = numel - int(mask.to(torch.bool).sum().item())
        per_layer[layer] = pruned / numel if numel else 0.0
        pruned_total += pruned
        total += numel
    return {"overall": pruned_total / total if total else 0.0, "per_layer": per_layer}


def check_nm(weight_or_mask: Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive inputs in each row holds at most ``n`` non-zeros.

    A bool tensor is read as a mask (True = kept); any other tensor as weights (non-zero = kept).
    A width that is not a multiple of ``m`` never satisfies N:M.
    """
    _check_2d(weight_or_mask, "weight_or_mask")
    out_features, in_features = weight_or_mask.shape
    if m < 1 or in_features % m != 0:
        return False
    kept = weight_or_mask if weight_or_mask.dtype == torch.bool else weight_or_mask != 0
    per_group = kept.reshape(out_features, in_features // m, m).sum(dim=2)  # [out, groups]
    return bool((per_group <= n).all().item())


def weight_sparsity(weight: Tensor) -> float:
    """Fraction of ``weight`` entries that are exactly zero (0.0 for an empty tensor)."""
    numel = weight.numel()
    if numel == 0:
        return 0.0
    return int((weight == 0).sum().item()) / numel


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """Eight mask entries per byte, in row-major order, least significant bit first (``numpy.packbits``
    with ``bitorder="little"``); the last byte is padded with zeros. Returns a flat uint8 CPU tensor."""
    flat = mask.detach().to(device="cpu", dtype=torch.bool).reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The bool mask of ``shape`` that :func:`pack_mask` packed into ``packed``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != -(-numel // 8):
        raise ValueError(f"{packed.numel()} packed {packed.dtype} bytes cannot hold a mask of shape {tuple(shape)}")
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:numel].reshape(shape)


class PackedMasks(MutableMapping[str, Tensor]):
    """A ``{name: bool mask}`` dict that keeps each mask packed eight entries to a byte.

    A bool tensor spends a byte per entry, so the masks of every layer of a 7B model take half as much
    host memory as its bf16 weights (6 GiB); packed, they take an eighth of that. Storing a mask packs a CPU
    copy of it; reading one unpacks a new tensor, so changing what was read leaves the store as it was.
    """

    def __init__(self, masks: Mapping[str, Tensor] | None = None) -> None:
        self._packed: dict[str, tuple[Tensor, torch.Size]] = {}
        if masks is not None:
            self.update(masks)

    def __setitem__(self, name: str, mask: Tensor) -> None:
        self._packed[name] = (pack_mask(mask), mask.shape)

    def __getitem__(self, name: str) -> Tensor:
        packed, shape = self._packed[name]
        return unpack_mask(packed, shape)

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def nbytes(self) -> int:
        """Bytes held by the packed masks."""
        return sum(packed.numel() for packed, _ in self._packed.values())

    def __repr__(self) -> str:
        return f"PackedMasks({len(self)} masks, {self.nbytes()} bytes)"
