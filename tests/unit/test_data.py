"""Unit tests for ebft.data: spec parsing, loaders, and token windows (offline, no model)."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ebft.data import (
    SOURCES,
    SourceSpec,
    calibration_stream,
    calibration_windows,
    evaluation_stream,
    evaluation_tokens,
    load_documents,
    parse_source,
    resolve_split,
    wikitext_rows,
)
from ebft.errors import EbftError, UsageError


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table, as the ByteLevel pre-tokenizer uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def _byte_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A real fast tokenizer whose ids are the UTF-8 bytes, plus <eos> (256) and <bos> (257)."""
    vocab = {ch: b for b, ch in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<bos>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 257)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def _bytes(text: str) -> list[int]:
    """Token ids the byte tokenizer gives for ``text`` without special tokens."""
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _byte_tokenizer()


@pytest.fixture(scope="module")
def bos_tok() -> PreTrainedTokenizerFast:
    return _byte_tokenizer(bos=True)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EBFT_DATA_DIR", raising=False)


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _data_dir(root: Path) -> Path:
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "test.txt").write_text(" \n = Title = \n \n Body one . \n", encoding="utf-8")
    (root / "wikitext2" / "valid.txt").write_text(" \n = Valid = \n", encoding="utf-8")
    (root / "c4").mkdir()
    _write_jsonl(root / "c4" / "train.jsonl", ["alpha doc", "beta doc", "gamma doc"])
    _write_jsonl(root / "c4" / "validation.jsonl", ["val one", "val two"])
    return root


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
        ("x", "unknown data source 'x'; use one of: c4, pydoc, wikitext2, text:PATH, jsonl:PATH"),
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


# ---------------------------------------------------------------------------- loaders


def test_wikitext_rows_reconstruction(tmp_path: Path) -> None:
    root = _data_dir(tmp_path)
    rows = load_documents("wikitext2", "evaluation", data_dir=root)
    assert rows == ["", " = Title = \n", "", " Body one . \n"]
    assert "\n\n".join(rows) == "\n\n = Title = \n\n\n\n\n Body one . \n"
    assert wikitext_rows("a\n \nb") == ["a\n", "", "b"]
    assert load_documents("wikitext2:valid", "calibration", data_dir=root) == ["", " = Valid = \n"]


def test_missing_data_file_names_it(tmp_path: Path) -> None:
    root = _data_dir(tmp_path)
    with pytest.raises(EbftError, match=r"^data file not found: .*wikitext2/train\.txt; .*pydoc"):
        load_documents("wikitext2", "calibration", data_dir=root)
    with pytest.raises(EbftError, match=r"^data file not found: .*nope\.txt"):
        load_documents("text:" + str(tmp_path / "nope.txt"), "evaluation")
    with pytest.raises(EbftError, match="data directory not found"):
        load_documents("c4", "evaluation", data_dir=tmp_path / "absent")


def test_data_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _data_dir(tmp_path)
    monkeypatch.setenv("EBFT_DATA_DIR", str(root))
    assert load_documents("c4", "calibration") == ["alpha doc", "beta doc", "gamma doc"]
    assert load_documents("c4", "evaluation") == ["val one", "val two"]
    other = _data_dir(tmp_path / "other")
    _write_jsonl(other / "c4" / "validation.jsonl", ["explicit"])
    assert load_documents("c4", "evaluation", data_dir=other) == ["explicit"]


def test_jsonl_parsing_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a\\u2028b", "id": 1}\n\n   \n{"text": "c"}\r\n', encoding="utf-8")
    assert load_documents(f"jsonl:{good}", "calibration") == ["a\u2028b", "c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(EbftError, match=r"bad\.jsonl line 2: not valid JSON") as info:
        load_documents(f"jsonl:{bad}", "evaluation")
    assert "\n" not in str(info.value)
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "ok"}\n\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(EbftError, match=r"notext\.jsonl line 3: no \"text\" field"):
        load_documents(f"jsonl:{notext}", "evaluation")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(EbftError, match="no documents"):
        load_documents(f"jsonl:{empty}", "evaluation")


def test_text_source_is_used_as_is(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("line one\r\nline two\n".encode())
    for role in ("calibration", "evaluation"):
        assert load_documents(f"text:{path}", role) == ["line one\r\nline two\n"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(EbftError, match="not UTF-8"):
        load_documents(f"text:{latin}", "evaluation")


def test_pydoc_split_is_disjoint_and_complete() -> None:
    from pydoc_data.topics import topics

    names = sorted(topics)
    test = load_documents("pydoc", "evaluation")
    train = load_documents("pydoc", "calibration")
    assert test == [topics[n] for n in names[::5]]
    assert train == [topics[n] for i, n in enumerate(names) if i % 5]
    assert len(test) + len(train) == len(names)
    assert sorted(test + train) == sorted(topics.values())
    assert load_documents("pydoc:train", "evaluation") == train


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


# ---------------------------------------------------------------------------- tokens


def test_byte_tokenizer_helper(tok: PreTrainedTokenizerFast) -> None:
    assert set(_byte_to_char().values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert tok("hé \n", add_special_tokens=False)["input_ids"] == _bytes("hé \n")
    assert tok.eos_token_id == 256


def test_calibration_stream_puts_eos_between_documents(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", ["ab", "c", "dé"])
    stream = calibration_stream(tok, f"jsonl:{path}").tolist()
    assert stream == _bytes("ab") + [256] + _bytes("c") + [256] + _bytes("dé")


def test_calibration_uses_no_special_tokens(tmp_path: Path, bos_tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hello world", encoding="utf-8")
    assert calibration_stream(bos_tok, f"text:{path}").tolist() == _bytes("hello world")
    # evaluation follows the standard protocol: default special tokens, so one BOS at the start
    assert evaluation_stream(bos_tok, f"text:{path}", 4).tolist() == [257] + _bytes("hello world")


def test_calibration_windows(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    texts = [f"document number {i} " * (i % 4 + 1) for i in range(40)]
    path = _write_jsonl(tmp_path / "d.jsonl", texts)
    spec = f"jsonl:{path}"
    stream = calibration_stream(tok, spec)
    windows = calibration_windows(tok, spec, nsamples=12, seqlen=16, seed=3)
    assert windows.shape == (12, 16) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_windows(tok, spec, nsamples=12, seqlen=16, seed=3))
    assert not torch.equal(windows, calibration_windows(tok, spec, nsamples=12, seqlen=16, seed=4))
    unfolded = stream.unfold(0, 16, 1)
    for row in windows:
        assert (unfolded == row).all(dim=1).any()
    assert (stream == 256).sum() == len(texts) - 1


def test_calibration_window_offsets_cover_the_end(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abcdef", encoding="utf-8")
    windows = calibration_windows(tok, f"text:{path}", nsamples=200, seqlen=6, seed=0)
    assert (windows == torch.tensor(_bytes("abcdef"))).all()
    starts = {row[0].item() for row in calibration_windows(tok, f"text:{path}", nsamples=200, seqlen=5, seed=0)}
    assert starts == set(_bytes("ab"))


def test_evaluation_windows(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "t.txt"
    text = "".join(chr(ord("a") + i % 26) for i in range(103))
    path.write_text(text, encoding="utf-8")
    windows = evaluation_tokens(tok, f"text:{path}", seqlen=10)
    assert windows.shape == (10, 10)
    assert windows.flatten().tolist() == _bytes(text[:100])
    assert torch.equal(evaluation_tokens(tok, f"text:{path}", seqlen=10, max_windows=3), windows[:3])
    assert evaluation_tokens(tok, f"text:{path}", seqlen=10, max_windows=99).shape == (10, 10)


def test_evaluation_joins_documents(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    root = _data_dir(tmp_path)
    wiki = evaluation_stream(tok, "wikitext2", 4, data_dir=root).tolist()
    assert wiki == _bytes("\n\n = Title = \n\n\n\n\n Body one . \n")
    path = _write_jsonl(tmp_path / "d.jsonl", ["one", "two"])
    assert evaluation_stream(tok, f"jsonl:{path}", 4).tolist() == _bytes("one\n\ntwo")


def test_c4_evaluation_protocol(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    root = _data_dir(tmp_path)
    _write_jsonl(root / "c4" / "validation.jsonl", [f"d{i}" for i in range(1200)])
    joined = " ".join(f"d{i}" for i in range(1100))
    assert evaluation_stream(tok, "c4", 10**6, data_dir=root).tolist() == _bytes(joined)
    capped = evaluation_tokens(tok, "c4", seqlen=4, data_dir=root)
    assert capped.shape == (256, 4)
    assert capped.flatten().tolist() == _bytes(joined)[: 256 * 4]


def test_too_short_errors(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x" * 123, encoding="utf-8")
    spec = f"text:{path}"
    with pytest.raises(EbftError, match=r"has 123 tokens, fewer than one window of --seqlen 1024; .*smaller --seqlen"):
        calibration_windows(tok, spec, nsamples=4, seqlen=1024, seed=0)
    with pytest.raises(EbftError, match=r"has 123 tokens, fewer than one window of 124") as info:
        evaluation_tokens(tok, spec, seqlen=124)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError):
        calibration_windows(tok, spec, nsamples=0, seqlen=8, seed=0)
    with pytest.raises(UsageError):
        evaluation_tokens(tok, spec, seqlen=8, max_windows=0)


def test_registry_is_extensible() -> None:
    assert {"c4", "wikitext2", "pydoc", "text", "jsonl"} <= set(SOURCES)


# ---------------------------------------------------------------------------- real data


_REAL_DIR = os.environ.get("EBFT_DATA_DIR", "")


@pytest.mark.skipif(
    not (_REAL_DIR and (Path(_REAL_DIR) / "wikitext2" / "test.txt").is_file()),
    reason="EBFT_DATA_DIR does not hold wikitext2/test.txt",
)
def test_real_wikitext2_test_rows() -> None:
    rows = load_documents("wikitext2", "evaluation", data_dir=_REAL_DIR)
    assert len(rows) == 4358
    assert "\n\n".join(rows).startswith("\n\n = Robert Boulter = \n\n\n")
