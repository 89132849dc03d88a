"""ebft.data on files and a byte tokenizer: loaders and token windows (offline, no model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ebft.data import (
    calibration_stream,
    calibration_windows,
    evaluation_stream,
    evaluation_tokens,
    load_documents,
    wikitext_rows,
)
from ebft.errors import EbftError, UsageError


def _bytes(text: str) -> list[int]:
    """Token ids the byte tokenizer gives for ``text`` without special tokens."""
    return list(text.encode("utf-8"))


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


# ---------------------------------------------------------------------------- tokens


def test_byte_tokenizer_helper(tokenizer: PreTrainedTokenizerFast) -> None:
    # one token per byte: the vocabulary is the ByteLevel alphabet, plus the two special tokens
    assert set(tokenizer.get_vocab()) == set(pre_tokenizers.ByteLevel.alphabet()) | {"<eos>", "<bos>"}
    assert tokenizer("hé \n", add_special_tokens=False)["input_ids"] == _bytes("hé \n")
    assert tokenizer.eos_token_id == 256


def test_calibration_stream_puts_eos_between_documents(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", ["ab", "c", "dé"])
    stream = calibration_stream(tokenizer, f"jsonl:{path}").tolist()
    assert stream == _bytes("ab") + [256] + _bytes("c") + [256] + _bytes("dé")


def test_calibration_uses_no_special_tokens(tmp_path: Path, bos_tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hello world", encoding="utf-8")
    assert calibration_stream(bos_tokenizer, f"text:{path}").tolist() == _bytes("hello world")
    # evaluation follows the standard protocol: default special tokens, so one BOS at the start
    assert evaluation_stream(bos_tokenizer, f"text:{path}", 4).tolist() == [257] + _bytes("hello world")


def test_calibration_windows(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [f"document number {i} " * (i % 4 + 1) for i in range(40)]
    path = _write_jsonl(tmp_path / "d.jsonl", texts)
    spec = f"jsonl:{path}"
    stream = calibration_stream(tokenizer, spec)
    windows = calibration_windows(tokenizer, spec, nsamples=12, seqlen=16, seed=3)
    assert windows.shape == (12, 16) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_windows(tokenizer, spec, nsamples=12, seqlen=16, seed=3))
    assert not torch.equal(windows, calibration_windows(tokenizer, spec, nsamples=12, seqlen=16, seed=4))
    unfolded = stream.unfold(0, 16, 1)
    for row in windows:
        assert (unfolded == row).all(dim=1).any()
    assert (stream == 256).sum() == len(texts) - 1


def test_calibration_window_offsets_cover_the_end(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "t.txt"
    path.write_text("abcdef", encoding="utf-8")
    windows = calibration_windows(tokenizer, f"text:{path}", nsamples=200, seqlen=6, seed=0)
    assert (windows == torch.tensor(_bytes("abcdef"))).all()
    starts = {row[0].item() for row in calibration_windows(tokenizer, f"text:{path}", nsamples=200, seqlen=5, seed=0)}
    assert starts == set(_bytes("ab"))


def test_evaluation_windows(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "t.txt"
    text = "".join(chr(ord("a") + i % 26) for i in range(103))
    path.write_text(text, encoding="utf-8")
    windows = evaluation_tokens(tokenizer, f"text:{path}", seqlen=10)
    assert windows.shape == (10, 10)
    assert windows.flatten().tolist() == _bytes(text[:100])
    assert torch.equal(evaluation_tokens(tokenizer, f"text:{path}", seqlen=10, max_windows=3), windows[:3])
    assert evaluation_tokens(tokenizer, f"text:{path}", seqlen=10, max_windows=99).shape == (10, 10)


def test_evaluation_joins_documents(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    root = _data_dir(tmp_path)
    wiki = evaluation_stream(tokenizer, "wikitext2", 4, data_dir=root).tolist()
    assert wiki == _bytes("\n\n = Title = \n\n\n\n\n Body one . \n")
    path = _write_jsonl(tmp_path / "d.jsonl", ["one", "two"])
    assert evaluation_stream(tokenizer, f"jsonl:{path}", 4).tolist() == _bytes("one\n\ntwo")


def test_c4_evaluation_protocol(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    root = _data_dir(tmp_path)
    _write_jsonl(root / "c4" / "validation.jsonl", [f"d{i}" for i in range(1200)])
    joined = " ".join(f"d{i}" for i in range(1100))
    assert evaluation_stream(tokenizer, "c4", 10**6, data_dir=root).tolist() == _bytes(joined)
    capped = evaluation_tokens(tokenizer, "c4", seqlen=4, data_dir=root)
    assert capped.shape == (256, 4)
    assert capped.flatten().tolist() == _bytes(joined)[: 256 * 4]


def test_too_short_errors(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x" * 123, encoding="utf-8")
    spec = f"text:{path}"
    with pytest.raises(EbftError, match=r"has 123 tokens, fewer than one window of --seqlen 1024; .*smaller --seqlen"):
        calibration_windows(tokenizer, spec, nsamples=4, seqlen=1024, seed=0)
    with pytest.raises(EbftError, match=r"has 123 tokens, fewer than one window of 124") as info:
        evaluation_tokens(tokenizer, spec, seqlen=124)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError):
        calibration_windows(tokenizer, spec, nsamples=0, seqlen=8, seed=0)
    with pytest.raises(UsageError):
        evaluation_tokens(tokenizer, spec, seqlen=8, max_windows=0)


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


def test_document_windows_lie_inside_one_long_enough_document(tmp_path: Path,
                                                              tokenizer: PreTrainedTokenizerFast) -> None:
    # documents of 5, 12, 3 and 20 byte-tokens, each of one letter: a window's letter names its document
    texts = ["a" * 5, "b" * 12, "c" * 3, "d" * 20]
    spec = f"jsonl:{_write_jsonl(tmp_path / 'd.jsonl', texts)}"
    windows = calibration_windows(tokenizer, spec, nsamples=300, seqlen=8, seed=1, windows="document")
    assert windows.shape == (300, 8)
    letters = {chr(int(row[0])) for row in windows}
    assert letters == {"b", "d"}  # the 5- and 3-token documents are shorter than a window
    assert all(len(set(row.tolist())) == 1 for row in windows)  # no EOS, no second document inside
    again = calibration_windows(tokenizer, spec, nsamples=300, seqlen=8, seed=1, windows="document")
    assert torch.equal(windows, again)
    assert not torch.equal(windows, calibration_windows(tokenizer, spec, nsamples=300, seqlen=8, seed=2,
                                                        windows="document"))
    # the stream draws windows across documents: some hold an EOS (id 256) between two of them
    assert (calibration_windows(tokenizer, spec, nsamples=300, seqlen=8, seed=1) == 256).any()


def test_document_window_starts_are_uniform_over_the_document(tmp_path: Path,
                                                              tokenizer: PreTrainedTokenizerFast) -> None:
    spec = f"jsonl:{_write_jsonl(tmp_path / 'd.jsonl', ['abcdefgh', 'xy'])}"
    windows = calibration_windows(tokenizer, spec, nsamples=400, seqlen=5, seed=0, windows="document")
    starts = torch.tensor([int(row[0]) for row in windows])
    assert set(starts.tolist()) == set(_bytes("abcd"))  # every start of the one 8-token document, none past it
    counts = torch.bincount(starts - ord("a"))
    assert counts.min() > 60  # 400 draws over 4 starts: about 100 each


def test_document_windows_refuse_when_no_document_is_long_enough(tmp_path: Path,
                                                                 tokenizer: PreTrainedTokenizerFast) -> None:
    spec = f"jsonl:{_write_jsonl(tmp_path / 'd.jsonl', ['abc', 'abcdefg'])}"
    with pytest.raises(EbftError, match=r"no document of --seqlen 8 tokens \(the longest has 7\); .*"
                                        r"--calib-windows stream") as info:
        calibration_windows(tokenizer, spec, nsamples=2, seqlen=8, seed=0, windows="document")
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="--calib-windows 'doc' is unknown"):
        calibration_windows(tokenizer, spec, nsamples=2, seqlen=4, seed=0, windows="doc")
