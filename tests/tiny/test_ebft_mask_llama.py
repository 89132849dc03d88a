"""EBFT mask tuning on a tiny Llama: a bad mask of a decoder block gets better; the block walk keeps exact masks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ebft.config import FinetuneConfig, PruneConfig
from ebft.finetune.ebft_mask import EBFTMask
from ebft.models import find_blocks
from ebft.models.blocks import run_block
from ebft.sparsity import check_nm, mask_stats
from ebft.walk import prune_and_finetune

CPU = torch.device("cpu")


def _cfg(**kw: Any) -> FinetuneConfig:
    base = dict(method="ebft-mask", epochs=4, lr=2e-3, batch_size=2, precision="fp32", grad_clip=0.0)
    base.update(kw)
    return FinetuneConfig(**base)


def test_llama_block_bad_mask_gets_better(tiny_llama: nn.Module, first_block_problem, assert_refined_masks) -> None:
    ids = torch.randint(0, 258, (4, 16), generator=torch.Generator().manual_seed(3))
    p = first_block_problem(tiny_llama, ids, score=lambda w: -w.abs())  # inverted magnitude: a bad mask
    block, masks = p["block"], p["masks"]
    start = {n: m.clone() for n, m in masks.items()}
    init = run_block(block, p["inputs"], p["kwargs"], 4, targets=p["targets"])
    result = EBFTMask(_cfg(epochs=3), seed=0).tune(block, p["inputs"], p["targets"], masks, p["kwargs"], 0,
                                                   dense_weights=p["dense"])
    final = run_block(block, p["inputs"], p["kwargs"], 4, targets=p["targets"])
    assert result.restored is None
    assert final < 0.8 * init
    assert_refined_masks(block, masks, start, p["dense"], "row")


@pytest.mark.parametrize("pruner,nm", [("wanda", None), ("magnitude", None), ("wanda", (2, 4))])
def test_pipeline_ebft_mask(pruner: str, nm: tuple[int, int] | None, tiny_llama: nn.Module) -> None:
    ids = torch.randint(0, 258, (4, 16), generator=torch.Generator().manual_seed(5))
    result = prune_and_finetune(tiny_llama, ids, PruneConfig(pruner, 0.5, nm=nm),
                                _cfg(epochs=2, lr=1e-3), CPU)
    linears = find_blocks(tiny_llama).all_linears()
    assert set(mask_stats(result.masks)["per_layer"].values()) == {0.5}
    for name, mask in result.masks.items():
        weight = linears[name].weight.data
        assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0), name
        if pruner == "wanda":
            assert torch.equal(mask.sum(1), torch.full((mask.shape[0],), mask.shape[1] // 2))
        if nm is not None:
            assert check_nm(mask, *nm)
    for block in result.blocks:
        assert block.final_loss < block.init_loss or block.restored is not None
        assert block.steps == 4
