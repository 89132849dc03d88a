"""DSnoT through the block walk on a tiny Llama: exact per-row and N:M counts, never a worse block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ebft.config import FinetuneConfig, PruneConfig
from ebft.models import find_blocks
from ebft.sparsity import check_nm, mask_stats
from ebft.walk import prune_and_finetune

CPU = torch.device("cpu")


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_pipeline_wanda_dsnot(nm: tuple[int, int] | None, tiny_llama: nn.Module) -> None:
    ids = torch.randint(0, 258, (4, 16), generator=torch.Generator().manual_seed(5))
    result = prune_and_finetune(tiny_llama, ids, PruneConfig("wanda", 0.5, nm=nm),
                                FinetuneConfig(method="dsnot", batch_size=2), CPU)
    linears = find_blocks(tiny_llama).all_linears()
    assert set(mask_stats(result.masks)["per_layer"].values()) == {0.5}
    for name, mask in result.masks.items():
        weight = linears[name].weight.data
        assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0), name
        assert torch.equal(mask.sum(1), torch.full((mask.shape[0],), mask.shape[1] // 2))
        if nm is not None:
            assert check_nm(mask, *nm)
    for block in result.blocks:
        assert block.final_loss < block.init_loss or block.restored is not None
