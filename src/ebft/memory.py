"""Peak memory of this process: the resident set's high-water mark (Linux), and the CUDA allocator's."""

from __future__ import annotations

import torch

__all__ = ["peak_memory", "peak_rss_bytes", "reset_peak_memory", "status_kb"]


def status_kb(key: str) -> int | None:
    """A ``/proc/self/status`` figure in kB (``VmRSS``, ``VmHWM``, ...); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """VmHWM: the peak resident set since the process started or :func:`reset_peak_memory`; None off Linux."""
    kb = status_kb("VmHWM")
    return None if kb is None else kb * 1024


def reset_peak_memory() -> bool:
    """Start both high-water marks again from now (VmHWM: writing 5 to /proc/self/clear_refs); False if the
    resident set's could not be reset (then the next peak counts from the process's start)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory() -> dict[str, float]:
    """``{"peak_rss_gb": ..., "peak_cuda_gb": ...}``, those that are known (see :func:`reset_peak_memory`)."""
    out: dict[str, float] = {}
    rss = peak_rss_bytes()
    if rss is not None:
        out["peak_rss_gb"] = round(rss / 1e9, 3)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return out
