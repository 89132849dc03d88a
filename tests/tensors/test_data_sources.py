"""Data sources: spec parsing, the default split of each role, the Hugging Face hub path (faked), the registry."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from ebft.data import SOURCES, SourceSpec, load_documents, parse_source, resolve_split
from ebft.errors import EbftError, UsageError


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EBFT_DATA_DIR", raising=False)


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("c4", SourceSpec("c4")),
        ("c4:train", SourceSpec("c4", "train")),
        ("C4:Validation", SourceSpec("c4", "validation")),
        ("c4:valid", SourceSpec("c4", "validation")),
        ("wikitext2", SourceSpec("wikitext2")),
        ("wikitext2:test", SourceSpec("wikitext2", "test")),
        ("wikitext2:valid", SourceSpec("wikitext2", "validation")),
        ("wikitext2:train", SourceSpec("wikitext2", "train")),
        ("pydoc:test", SourceSpec("pydoc", "test")),
        ("text:a.txt", SourceSpec("text", None, Path("a.txt"))),
        ("jsonl:dir/x:y.jsonl", SourceSpec("jsonl", None, Path("dir/x:y.jsonl"))),
    ],
)
def test_parse_source(spec: str, expected: SourceSpec) -> None:
    assert parse_source(spec) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("x", "unknown data source 'x'; use one of: c4, generated, pydoc, wikitext2, text:PATH, jsonl:PATH"),
        ("", "empty data source"),
        ("text:", "needs a file path"),
        ("jsonl:  ", "needs a file path"),
        ("c4:test", "unknown split 'test' for data source 'c4'; use one of: train, validation"),
        ("pydoc:validation", "unknown split"),
        ("wikitext2:", "unknown split"),
    ],
)
def test_parse_source_errors(spec: str, fragment: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_source(spec)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_default_splits_per_role() -> None:
    expected = {"c4": ("train", "validation"), "wikitext2": ("train", "test"), "pydoc": ("train", "test")}
    for name, (calib, evaluation) in expected.items():
        assert resolve_split(parse_source(name), "calibration") == calib
        assert resolve_split(parse_source(name), "evaluation") == evaluation
    assert resolve_split(parse_source("c4:validation"), "calibration") == "validation"
    with pytest.raises(UsageError):
        load_documents("pydoc", "training")


# ---------------------------------------------------------------------------- hub path


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, rows: list[str] | None = None, fail: bool = False) -> list[Any]:
    calls: list[Any] = []

    def load_dataset(*args: Any, **kwargs: Any) -> dict[str, list[str]]:
        calls.append((args, kwargs))
        if fail:
            raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")
        return {"text": list(rows or [])}

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hub_wikitext_and_c4(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, ["", " = T = \n"])
    assert load_documents("wikitext2:valid", "evaluation") == ["", " = T = \n"]
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "validation"})
    load_documents("c4", "evaluation")
    assert calls[-1] == (
        ("allenai/c4",),
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
    )
    load_documents("c4", "calibration")
    assert calls[-1][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}


def test_hub_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, fail=True)
    with pytest.raises(EbftError, match="could not load wikitext2:test from the Hugging Face hub") as info:
        load_documents("wikitext2", "evaluation")
    assert "\n" not in str(info.value) and "EBFT_DATA_DIR" in str(info.value)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(EbftError, match=r"install datasets \(pip install 'ebft\[hub\]'\)"):
        load_documents("c4", "calibration")


def test_registry_is_extensible() -> None:
    assert {"c4", "wikitext2", "pydoc", "text", "jsonl"} <= set(SOURCES)
