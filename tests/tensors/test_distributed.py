"""Data parallelism's pure pieces: shards of a batch, the torchrun environment, one device per process."""

from __future__ import annotations

import pytest
import torch

from ebft.distributed import DistContext, process_device, torchrun_world
from ebft.errors import EbftError, UsageError


def test_shards_cover_a_batch() -> None:
    for world in (1, 2, 3):
        ctx = DistContext(0, world, 0, torch.device("cpu"), "gloo")
        for n in range(7):
            parts = [list(range(n))[ctx.shard(n, r)] for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_torchrun_environment() -> None:
    assert torchrun_world({}) is None
    assert torchrun_world({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    assert torchrun_world({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(UsageError):
        torchrun_world({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(UsageError):
        torchrun_world({"RANK": "2", "WORLD_SIZE": "2"})
    assert process_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(UsageError, match="--device mps"):
        process_device("mps", 0)
    if not torch.cuda.is_available():
        with pytest.raises(EbftError, match="LOCAL_RANK 1"):
            process_device("cuda", 1)
    elif torch.cuda.device_count() > 1:
        assert process_device("cuda", 1) == torch.device("cuda", 1)  # never a hard-coded first GPU
