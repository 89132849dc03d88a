"""The LoRA baseline's options: validated with messages that name the flag, and read from dicts or dataclasses."""

from __future__ import annotations

import pytest

from ebft.config import FinetuneConfig
from ebft.errors import UsageError
from ebft.finetune.ebft import EBFTOptions
from ebft.finetune.lora import LoraOptions


def _lora(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"method": "lora", "epochs": 4, "lr": 1e-2, "batch_size": 4, "precision": "fp32", **kw})


@pytest.mark.parametrize("kw,fragment", [
    ({"rank": 0}, "--lora-rank must be a positive"),
    ({"alpha": 0.0}, "--lora-alpha must be a positive"),
    ({"alpha": float("nan")}, "--lora-alpha must be a positive"),
    ({"dropout": 1.0}, "--lora-dropout must be in [0, 1)"),
    ({"targets": ""}, "--lora-targets expects"),
    ({"targets": ()}, "--lora-targets expects"),
])
def test_config_errors(kw: dict, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        _lora(options=kw)
    assert fragment in str(info.value)


def test_config_roundtrip() -> None:
    cfg = FinetuneConfig(method="lora", options={"targets": ["q_proj", "v_proj"]})
    assert cfg.options == LoraOptions(targets=("q_proj", "v_proj"))
    assert FinetuneConfig(method="lora", options=LoraOptions(targets="q_proj, v_proj")).options.targets == (
        "q_proj", "v_proj")
    with pytest.raises(UsageError, match="choose one of: .*lora"):
        FinetuneConfig(method="lora2")
    with pytest.raises(UsageError, match="--finetune lora has no option 'rnak'"):
        FinetuneConfig(method="lora", options={"rnak": 4})
    with pytest.raises(UsageError, match="takes LoraOptions options, not EBFTOptions"):
        FinetuneConfig(method="lora", options=EBFTOptions())
