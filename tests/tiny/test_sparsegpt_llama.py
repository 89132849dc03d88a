"""SparseGPT through the block walk on a tiny Llama: every linear layer pruned, exact masks, a usable model."""

from __future__ import annotations

import pytest
import torch

from ebft.config import FinetuneConfig, PruneConfig
from ebft.models import find_blocks
from ebft.sparsity import check_nm, mask_stats
from ebft.walk import prune_and_finetune


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_pipeline_tiny_llama(nm: tuple[int, int] | None, tiny_llama: torch.nn.Module) -> None:
    ids = torch.randint(0, 258, (4, 16), generator=torch.Generator().manual_seed(5))
    result = prune_and_finetune(tiny_llama, ids, PruneConfig("sparsegpt", 0.5, nm=nm),
                                FinetuneConfig(method="none"), torch.device("cpu"))
    linears = find_blocks(tiny_llama).all_linears()
    assert set(result.masks) == set(linears)
    assert set(mask_stats(result.masks)["per_layer"].values()) == {0.5}
    for name, mask in result.masks.items():
        weight = linears[name].weight.data
        assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0), name
        if nm is not None:
            assert check_nm(weight, *nm)
    with torch.no_grad():
        assert torch.isfinite(tiny_llama(ids).logits).all()
