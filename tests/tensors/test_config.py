"""Config dataclasses validate their values with messages that name the flag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ebft.config import CalibConfig, EvalConfig, FinetuneConfig, PruneConfig, RunConfig, parse_nm
from ebft.errors import UsageError


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), ("4:8", (4, 8)), ("1:2", (1, 2)), (None, None), ("", None)])
def test_parse_nm(text: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_nm(text) == expected


@pytest.mark.parametrize("text", ["x", "2", "2:4:8", "a:b", "-1:4", "2.0:4", "4:4", "3:2", "0:4", "1:1"])
def test_parse_nm_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--nm"):
        parse_nm(text)


def test_prune_config() -> None:
    assert PruneConfig("magnitude", 0.0).sparsity == 0.0
    nm = PruneConfig("wanda", 0.1, nm=(2, 4))
    assert nm.sparsity == 0.5 and nm.label == "2:4"
    assert PruneConfig("wanda", nm="1:4").nm == (1, 4)
    assert PruneConfig("wanda", 0.5).label == "50%"
    for bad in (1.0, -0.1, math.nan, math.inf, "0.5"):
        with pytest.raises(UsageError, match="--sparsity"):
            PruneConfig("wanda", bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--pruner"):
        PruneConfig("random")
    with pytest.raises(UsageError, match="--nm"):
        PruneConfig("wanda", nm=(4, 2))


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(method="lora9"), "--finetune"),
        (dict(epochs=0), "--epochs"),
        (dict(epochs=True), "--epochs"),
        (dict(batch_size=0), "--batch-size"),
        (dict(lr=0.0), "--lr"),
        (dict(lr=math.nan), "--lr"),
        (dict(betas=(1.0, 0.9)), "--betas"),
        (dict(weight_decay=-1.0), "--weight-decay"),
        (dict(grad_clip=math.inf), "--grad-clip"),
        (dict(precision="fp8"), "--precision"),
    ],
)
def test_finetune_config_rejects(kwargs: dict, flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        FinetuneConfig(**kwargs)


@pytest.mark.parametrize(
    "make,flag",
    [
        (lambda: CalibConfig(nsamples=0), "--nsamples"),
        (lambda: CalibConfig(seqlen=1), "--seqlen"),
        (lambda: CalibConfig(seed=-1), "--seed"),
        (lambda: EvalConfig(seqlen=1), "--eval-seqlen"),
        (lambda: EvalConfig(max_windows=0), "--max-windows"),
        (lambda: RunConfig(model="m", device="tpu"), "--device"),
    ],
)
def test_other_configs_reject(make, flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        make()


def test_run_config_to_dict_is_json_ready() -> None:
    cfg = RunConfig(model="m", out=Path("/tmp/x"), prune=PruneConfig("wanda", nm=(2, 4)),
                    eval=EvalConfig(sources=["pydoc"], seqlen=8))
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["out"] == "/tmp/x"
    assert data["prune"] == {"pruner": "wanda", "sparsity": 0.5, "nm": [2, 4], "structured": None,
                             "structured_score": "fluctuation", "allocation": "uniform", "options": None,
                             "allocation_options": None}
    assert data["finetune"]["betas"] == [0.9, 0.95]
    assert data["eval"] == {"sources": ["pydoc"], "seqlen": 8, "max_windows": None}
