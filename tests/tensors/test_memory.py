"""ebft.memory: the resident set's high-water mark, and its reset between the cells of a sweep."""

from __future__ import annotations

import sys

import pytest
import torch

from ebft.memory import peak_memory, peak_rss_bytes, reset_peak_memory, status_kb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_the_peak_covers_a_freed_allocation_until_it_is_reset() -> None:
    size = 256 * 2**20
    before = peak_rss_bytes()
    block = torch.ones(size // 4)  # touched: resident
    assert peak_rss_bytes() >= before
    assert peak_rss_bytes() >= status_kb("VmRSS") * 1024 >= size
    high = peak_rss_bytes()
    del block
    assert peak_rss_bytes() >= high - 2**20  # freed, still the peak (to the kernel's page accounting)
    if not reset_peak_memory():
        pytest.skip("this kernel does not let a process reset its VmHWM")
    assert peak_rss_bytes() < high - size // 2  # from now on: the 256 MiB are gone from the mark
    assert peak_memory()["peak_rss_gb"] == round(peak_rss_bytes() / 1e9, 3)
