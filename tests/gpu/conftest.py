"""The GPU tests run only where torch sees a CUDA device; elsewhere they are collected and skipped."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
