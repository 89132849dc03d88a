"""ebft: prune Hugging Face causal LMs and recover their quality with block-wise fine-tuning."""

from __future__ import annotations

__version__ = "0.1.0"

from ebft.errors import EbftError, UsageError

__all__ = ["EbftError", "UsageError", "__version__"]
