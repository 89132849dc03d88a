"""Zero-shot evaluation's pure pieces: standard errors by hand, task names, the choice of back-end."""

from __future__ import annotations

import math
import statistics

import pytest

from ebft.eval import zeroshot as zs
from ebft.eval.tasks_local import parse_tasks
from ebft.eval.zeroshot import TaskResult, acc_stderr, mean_acc_stderr, select_backend


def test_acc_stderr_by_hand() -> None:
    assert acc_stderr(0.5, 5) == pytest.approx(0.25)  # sqrt(0.25 / 4)
    assert acc_stderr(0.6, 5) == pytest.approx(statistics.stdev([1, 1, 1, 0, 0]) / math.sqrt(5))
    assert acc_stderr(1.0, 7) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        acc_stderr(1.0, 1)
    assert mean_acc_stderr({"a": {"acc": 0.5, "n": 5}, "b": {"acc": 0.5, "n": 5}}) == pytest.approx(0.25 / math.sqrt(2))
    assert mean_acc_stderr({"a": {"acc": 0.5, "n": 5}, "b": {"acc": 1.0, "n": 1}}) is None
    assert TaskResult("rte", 1.0, None, 1).to_dict() == {"acc": 1.0, "n": 1}  # no error from one example


# --- task names, back-ends -------------------------------------------------------------------------

def test_parse_tasks() -> None:
    assert parse_tasks("boolq, RTE,boolq") == ["boolq", "rte"]
    with pytest.raises(ValueError, match="supported: boolq, rte, winogrande"):
        parse_tasks("boolq,mmlu")


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_backend("local")[0] == "local"
    monkeypatch.setattr(zs, "harness_installed", lambda: False)
    assert select_backend("auto") == ("local", "lm-eval is not installed")
    with pytest.raises(zs.EbftError, match="pip install 'ebft\\[eval\\]'"):
        select_backend("harness")
    monkeypatch.setattr(zs, "harness_installed", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert select_backend("auto") == ("local", "HF_HUB_OFFLINE is set")
    assert not zs.hub_reachable()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(zs, "hub_reachable", lambda timeout=3.0: False)
    assert select_backend("auto") == ("local", "the Hugging Face hub is unreachable")
    monkeypatch.setattr(zs, "hub_reachable", lambda timeout=3.0: True)
    assert select_backend("auto")[0] == "harness"
    with pytest.raises(ValueError, match="--zeroshot-backend 'x' is unknown"):
        select_backend("x")
