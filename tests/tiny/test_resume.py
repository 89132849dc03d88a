"""A run stopped in-process after any block and resumed gives the same model, byte for byte, as an unbroken one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ebft.checkpoint
from ebft.checkpoint import work_dir
from ebft.cli import main


def _weights(out: Path) -> bytes:
    return (out / "model" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("stop_after", [0, 2])
def test_interrupt_then_resume_in_process(stop_after: int, resume_setup, resume_reference: Path,
                                          tmp_path: Path, interrupt_after, assert_unfinished) -> None:
    """An exception (here Ctrl-C) after block k keeps the finished blocks; --resume continues from k + 1."""
    out = tmp_path / "run"

    with interrupt_after(stop_after):
        assert main(resume_setup.argv(out)) == 130
    assert_unfinished(out, stop_after + 1)
    assert main(resume_setup.argv(out, "--resume")) == 0
    assert _weights(out) == _weights(resume_reference)


def test_killed_while_publishing(resume_setup, resume_reference: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the final model was staged but before the rename: --resume only publishes it."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(ebft.checkpoint, "publish", lambda out: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(resume_setup.argv(out)) == 130
    assert (work_dir(out) / "final" / "report.json").is_file() and not out.exists()
    with monkeypatch.context() as patch:
        patch.setattr("ebft.runner.load_model", lambda spec: pytest.fail("publishing needs no model"))
        assert main(resume_setup.argv(out, "--resume")) == 0
    assert _weights(out) == _weights(resume_reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_before_the_first_block_leaves_nothing(resume_setup, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ebft.checkpoint.Checkpoint, "save_block", fail)
    assert main(resume_setup.argv(tmp_path / "run")) == 130
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_run_starts_one(resume_setup, resume_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(resume_setup.argv(out, "--resume")) == 0
    assert _weights(out) == _weights(resume_reference)
    stamp = (out / "report.json").stat().st_mtime_ns
    # resuming a finished run with the same flags does nothing and succeeds
    assert main(resume_setup.argv(out, "--resume")) == 0
    assert (out / "report.json").stat().st_mtime_ns == stamp


def test_overwrite_discards_an_unfinished_run(resume_setup, resume_reference: Path, tmp_path: Path,
                                              interrupt_after) -> None:
    out = tmp_path / "run"
    with interrupt_after(0):
        assert main(resume_setup.argv(out, "--lr", "5e-3")) == 130
    assert main(resume_setup.argv(out, "--overwrite")) == 0
    assert _weights(out) == _weights(resume_reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_refuses_other_data(resume_setup, tmp_path: Path,
                                   interrupt_after, capsys: pytest.CaptureFixture[str]) -> None:
    """Same flags, but the calibration text changed in between: the windows' fingerprint differs."""
    text = tmp_path / "text.txt"
    text.write_text(resume_setup.text_file.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    with interrupt_after(0):
        assert main(resume_setup.argv(out, text=text)) == 130
    text.write_text(resume_setup.text_file.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    capsys.readouterr()
    assert main(resume_setup.argv(out, "--resume", text=text)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: the calibration windows differ") and "--overwrite" in err
    assert (work_dir(out) / "run.json").is_file()  # still there to resume once the data is back


@pytest.mark.parametrize("method", ["none", "ebft-mask"])
def test_resume_other_methods(method: str, resume_setup, tmp_path: Path,
                              interrupt_after) -> None:
    """Without tuning, and with a tuner that changes the masks: the saved masks and activations carry over."""
    extra = ("--finetune", method)
    assert main(resume_setup.argv(tmp_path / "whole", *extra)) == 0
    out = tmp_path / "run"
    with interrupt_after(1):
        assert main(resume_setup.argv(out, *extra)) == 130
    assert main(resume_setup.argv(out, *extra, "--resume")) == 0
    assert _weights(out) == _weights(tmp_path / "whole")
    whole, resumed = (json.loads((p / "report.json").read_text()) for p in (tmp_path / "whole", out))
    assert resumed["sparsity"] == whole["sparsity"]
