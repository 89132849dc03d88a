"""The GPU tests run only where torch sees a CUDA device; elsewhere they are collected and skipped.

``EBFT_GPU_TESTS_DEVICE=cpu`` runs them on the CPU instead, against the CPU: a dry run of their own
logic on a machine without a GPU (the comparisons are then trivially close; the device paths are not
exercised).
"""

from __future__ import annotations

import os

import pytest
import torch

#: The device the GPU tests put their blocks and runs on.
DEVICE = os.environ.get("EBFT_GPU_TESTS_DEVICE", "cuda")


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def device() -> str:
    return DEVICE
