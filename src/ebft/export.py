"""Save a model in Hugging Face format (safetensors plus the tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


def save_model(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save in Hugging Face format (safetensors) with the tokenizer, loadable by ``from_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
