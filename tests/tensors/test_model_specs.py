"""Model specs without a model: the supported types, missing paths, the smollm2-135m alias without its package."""

from __future__ import annotations

import importlib.metadata

import pytest
from torch import nn

from ebft.errors import EbftError
from ebft.models import SUPPORTED_MODEL_TYPES, find_blocks
from ebft.models.loading import ALIASES, resolve_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "smollm3"]


def test_all_supported_types_listed() -> None:
    assert set(FAMILIES) <= set(SUPPORTED_MODEL_TYPES)


def test_find_blocks_without_config() -> None:
    with pytest.raises(EbftError, match="not supported"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("spec", ["./nope", "/definitely/not/here", "a/b/c"])
def test_resolve_missing_path(spec: str) -> None:
    with pytest.raises(EbftError, match="model not found"):
        resolve_model(spec)


def test_alias_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    dist, _, hint, _ = ALIASES["smollm2-135m"]
    with pytest.raises(EbftError) as info:
        resolve_model("smollm2-135m")
    assert dist in str(info.value) and hint in str(info.value)


def test_alias_package_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    class EmptyDist:
        files: list = []

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: EmptyDist())
    with pytest.raises(EbftError, match="is missing from it"):
        resolve_model("smollm2-135m")
