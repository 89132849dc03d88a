"""Everything that needs only the config, the tokenizer and the data is checked before any weight loads."""

from __future__ import annotations

from pathlib import Path

import pytest

import ebft.models.loading
import ebft.runner
from ebft.cli import main


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model's weights fails the test: the checks must refuse the run before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the checks refused the run")

    monkeypatch.setattr(ebft.runner, "load_model", refuse)
    monkeypatch.setattr(ebft.models.loading, "load_model", refuse)


def _prune(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--nsamples", "4", "--seqlen", "32", "--epochs", "1", "--device", "cpu",
            "--threads", "1", "--out", str(out), *extra]


@pytest.mark.parametrize("flags,fragment", [
    (("--calib", "text:{short}"), "calibration source 'text:{short}' has 11 tokens, fewer than one window of --seqlen 32"),
    (("--calib", "text:{text}", "--eval", "text:{short}", "--eval-seqlen", "32"),
     "evaluation source 'text:{short}' has 11 tokens, fewer than one window of 32"),
    (("--calib", "text:{text}", "--nm", "2:8"), "needs every pruned layer's input width divisible by 8"),
])
def test_data_and_shape_errors_come_before_the_weights(flags, fragment: str, no_weights, tiny_model_dir: Path,
                                                       text_file: Path, short_text_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fill = {"short": short_text_file, "text": text_file}
    argv = _prune(tiny_model_dir, tmp_path / "out", *(f.format(**fill) for f in flags))
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and fragment.format(**fill) in lines[0]  # one line: the logs of the checks are held
    assert list(tmp_path.iterdir()) == []


def test_the_held_logs_are_shown_once_the_checks_pass(tiny_model_dir: Path, text_file: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        assert main(_prune(tiny_model_dir, tmp_path / "out", "--calib", f"text:{text_file}", "--finetune", "none")) == 0
    messages = [r.getMessage() for r in caplog.records]
    first = next(i for i, m in enumerate(messages) if m.startswith("calibration text:"))
    assert first < next(i for i, m in enumerate(messages) if m.startswith("loading model"))
