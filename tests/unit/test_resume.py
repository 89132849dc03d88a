"""A run killed at any block and resumed gives the same model, byte for byte, as one that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import ebft.checkpoint
from ebft.checkpoint import work_dir
from ebft.cli import main

NBLOCKS = 4
KILLER = Path(__file__).resolve().parents[1] / "kill_after_block.py"


@pytest.fixture(scope="module")
def model_dir(tiny_factory, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with 4 blocks, so that a run can stop after the first, middle and last ones."""
    folder = tmp_path_factory.mktemp("resume") / "tiny4"
    tiny_factory("llama", num_hidden_layers=NBLOCKS, hidden_size=32, intermediate_size=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _argv(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--out", str(out), "--calib", f"text:{text}", "--nsamples", "6", "--seqlen", "32",
            "--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--threads", "1", "--quiet",
            *extra]


def _weights(out: Path) -> bytes:
    return (out / "model" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_argv(model_dir, text_file, out)) == 0
    return out


def _killed(argv: list[str], kill_after: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(KILLER), str(kill_after), *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _assert_unfinished(out: Path, done: int) -> None:
    assert not out.exists()  # the run folder appears only complete
    state = json.loads((work_dir(out) / "run.json").read_text())
    assert state["done"] == done and len(state["blocks"]) == done
    assert sorted(p.name for p in (work_dir(out) / "blocks").iterdir()) == [f"{i:05d}.safetensors" for i in range(done)]


@pytest.mark.parametrize("kills", [(0, 2), (NBLOCKS - 1,)], ids=["first-then-middle", "last"])
def test_sigkill_then_resume_is_bitwise_identical(kills: tuple[int, ...], model_dir: Path, text_file: Path,
                                                  reference: Path, tmp_path: Path) -> None:
    """SIGKILL right after block k's checkpoint (several k, and twice in one run), resume, compare bytes."""
    out = tmp_path / "run"
    for number, k in enumerate(kills):
        _killed(_argv(model_dir, text_file, out, *(["--resume"] if number else [])), k, tmp_path)
        _assert_unfinished(out, k + 1)
    assert main(_argv(model_dir, text_file, out, "--resume")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the work folder is gone
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json"]
    assert _weights(out) == _weights(reference)
    report = json.loads((out / "report.json").read_text())
    expected = json.loads((reference / "report.json").read_text())
    assert report["resumed"] == [k + 1 for k in kills]
    assert [b["index"] for b in report["blocks"]] == list(range(NBLOCKS))
    for got, want in zip(report["blocks"], expected["blocks"]):
        for key in ("init_loss", "final_loss", "holdout_init_loss", "holdout_final_loss", "epoch_losses", "restored"):
            assert got[key] == want[key], key
    assert report["sparsity"] == expected["sparsity"]


@pytest.mark.parametrize("stop_after", [0, 2])
def test_interrupt_then_resume_in_process(stop_after: int, model_dir: Path, text_file: Path, reference: Path,
                                          tmp_path: Path, interrupt_after) -> None:
    """An exception (here Ctrl-C) after block k keeps the finished blocks; --resume continues from k + 1."""
    out = tmp_path / "run"

    with interrupt_after(stop_after):
        assert main(_argv(model_dir, text_file, out)) == 130
    _assert_unfinished(out, stop_after + 1)
    assert main(_argv(model_dir, text_file, out, "--resume")) == 0
    assert _weights(out) == _weights(reference)


def test_killed_while_publishing(model_dir: Path, text_file: Path, reference: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the final model was staged but before the rename: --resume only publishes it."""
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(ebft.checkpoint, "publish", lambda out: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(_argv(model_dir, text_file, out)) == 130
    assert (work_dir(out) / "final" / "report.json").is_file() and not out.exists()
    with monkeypatch.context() as patch:
        patch.setattr("ebft.runner.load_model", lambda spec: pytest.fail("publishing needs no model"))
        assert main(_argv(model_dir, text_file, out, "--resume")) == 0
    assert _weights(out) == _weights(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_before_the_first_block_leaves_nothing(model_dir: Path, text_file: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ebft.checkpoint.Checkpoint, "save_block", fail)
    assert main(_argv(model_dir, text_file, tmp_path / "run")) == 130
    assert list(tmp_path.iterdir()) == []


def test_resume_without_a_run_starts_one(model_dir: Path, text_file: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_argv(model_dir, text_file, out, "--resume")) == 0
    assert _weights(out) == _weights(reference)
    stamp = (out / "report.json").stat().st_mtime_ns
    # resuming a finished run with the same flags does nothing and succeeds
    assert main(_argv(model_dir, text_file, out, "--resume")) == 0
    assert (out / "report.json").stat().st_mtime_ns == stamp


def test_overwrite_discards_an_unfinished_run(model_dir: Path, text_file: Path, reference: Path, tmp_path: Path,
                                              interrupt_after) -> None:
    out = tmp_path / "run"
    with interrupt_after(0):
        assert main(_argv(model_dir, text_file, out, "--lr", "5e-3")) == 130
    assert main(_argv(model_dir, text_file, out, "--overwrite")) == 0
    assert _weights(out) == _weights(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_refuses_other_data(model_dir: Path, text_file: Path, tmp_path: Path,
                                   interrupt_after, capsys: pytest.CaptureFixture[str]) -> None:
    """Same flags, but the calibration text changed in between: the windows' fingerprint differs."""
    text = tmp_path / "text.txt"
    text.write_text(text_file.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    with interrupt_after(0):
        assert main(_argv(model_dir, text, out)) == 130
    text.write_text(text_file.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    capsys.readouterr()
    assert main(_argv(model_dir, text, out, "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: the calibration windows differ") and "--overwrite" in err
    assert (work_dir(out) / "run.json").is_file()  # still there to resume once the data is back


@pytest.mark.parametrize("method", ["none", "ebft-mask"])
def test_resume_other_methods(method: str, model_dir: Path, text_file: Path, tmp_path: Path,
                              interrupt_after) -> None:
    """Without tuning, and with a tuner that changes the masks: the saved masks and activations carry over."""
    extra = ("--finetune", method)
    assert main(_argv(model_dir, text_file, tmp_path / "whole", *extra)) == 0
    out = tmp_path / "run"
    with interrupt_after(1):
        assert main(_argv(model_dir, text_file, out, *extra)) == 130
    assert main(_argv(model_dir, text_file, out, *extra, "--resume")) == 0
    assert _weights(out) == _weights(tmp_path / "whole")
    whole, resumed = (json.loads((p / "report.json").read_text()) for p in (tmp_path / "whole", out))
    assert resumed["sparsity"] == whole["sparsity"]
