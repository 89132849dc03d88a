"""The command line in-process: one-line errors with the right exit codes, and a full prune + eval round trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from ebft.cli import main

Args = Callable[[Path, Path, Path], list[str]]


def _prune(model: Path, text: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--calib", f"text:{text}", "--nsamples", "4", "--seqlen", "32", "--epochs", "1",
            "--device", "cpu", "--threads", "1", *extra]


# (name, argv given model dir / text file / short text file, exit code, fragment of the message)
BAD: list[tuple[str, Callable[[Path, Path, Path], list[str]], int, str]] = [
    ("sparsity 1.0", lambda m, t, s: _prune(m, t, "--sparsity", "1.0"), 2, "--sparsity must be in [0, 1)"),
    ("sparsity -0.1", lambda m, t, s: _prune(m, t, "--sparsity", "-0.1"), 2, "--sparsity must be in [0, 1)"),
    ("sparsity nan", lambda m, t, s: _prune(m, t, "--sparsity", "nan"), 2, "--sparsity must be in [0, 1)"),
    ("sparsity text", lambda m, t, s: _prune(m, t, "--sparsity", "half"), 2, "--sparsity"),
    ("nm 4:4", lambda m, t, s: _prune(m, t, "--nm", "4:4"), 2, "1 <= N < M"),
    ("nm 3:2", lambda m, t, s: _prune(m, t, "--nm", "3:2"), 2, "1 <= N < M"),
    ("nm 0:4", lambda m, t, s: _prune(m, t, "--nm", "0:4"), 2, "1 <= N < M"),
    ("nm x", lambda m, t, s: _prune(m, t, "--nm", "x"), 2, "--nm expects N:M"),
    ("nm 2:8 width 36", lambda m, t, s: _prune(m, t, "--nm", "2:8"), 1, "has 36 inputs"),
    ("missing text file", lambda m, t, s: _prune(m, t.parent / "absent.txt"), 1, "data file not found"),
    ("text shorter than a window", lambda m, t, s: _prune(m, s), 1, "fewer than one window"),
    ("eval text shorter than a window",
     lambda m, t, s: _prune(m, t, "--eval", f"text:{s}", "--eval-seqlen", "32"), 1, "fewer than one window"),
    ("unknown model path", lambda m, t, s: _prune(m.parent / "nope", t), 1, "model not found"),
    ("unknown pruner", lambda m, t, s: _prune(m, t, "--pruner", "sparsegpt5"), 2, "--pruner 'sparsegpt5' is unknown"),
    ("unknown finetune", lambda m, t, s: _prune(m, t, "--finetune", "lora9"), 2, "--finetune 'lora9' is unknown"),
    ("unknown source", lambda m, t, s: ["prune", str(m), "--calib", "wikitext9"], 2, "unknown data source"),
    ("zero epochs", lambda m, t, s: _prune(m, t, "--epochs", "0"), 2, "--epochs must be a positive"),
    ("negative lr", lambda m, t, s: _prune(m, t, "--lr", "-1"), 2, "--lr must be a positive"),
    ("seqlen 1", lambda m, t, s: _prune(m, t, "--seqlen", "1"), 2, "--seqlen must be at least 2"),
    ("seqlen beyond context", lambda m, t, s: _prune(m, t, "--seqlen", "257"), 2, "--seqlen 257 exceeds"),
    ("eval seqlen beyond context",
     lambda m, t, s: _prune(m, t, "--eval", f"text:{t}", "--eval-seqlen", "300"), 2, "--eval-seqlen 300 exceeds"),
    ("max windows 0", lambda m, t, s: _prune(m, t, "--max-windows", "0"), 2, "--max-windows"),
    ("unknown precision", lambda m, t, s: _prune(m, t, "--precision", "fp8"), 2, "--precision 'fp8' is unknown"),
    ("zero threads", lambda m, t, s: _prune(m, t, "--threads", "0"), 2, "--threads"),
    ("no subcommand", lambda m, t, s: [], 2, "error"),
    ("unknown flag", lambda m, t, s: _prune(m, t, "--frobnicate"), 2, "unrecognized arguments"),
]


@pytest.mark.parametrize("name,argv,code,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name: str, argv: Args, code: int, fragment: str, tiny_model_dir: Path, text_file: Path,
                   short_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    out = tmp_path / "out"
    args = argv(tiny_model_dir, text_file, short_text_file)
    if args and "--out" not in args:
        args += ["--out", str(out)]
    assert main(args) == code
    captured = capsys.readouterr()
    one_line_error(captured.err, fragment)
    assert captured.out == ""
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial run folder either


def test_out_not_empty_needs_overwrite(tiny_model_dir: Path, text_file: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(_prune(tiny_model_dir, text_file, "--out", str(out))) == 2
    one_line_error(capsys.readouterr().err, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_is_a_file(tiny_model_dir: Path, text_file: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    out = tmp_path / "out"
    out.write_text("precious")
    assert main(_prune(tiny_model_dir, text_file, "--out", str(out))) == 2
    one_line_error(capsys.readouterr().err, "is a file")
    assert out.read_text() == "precious"


def test_out_under_a_file(tiny_model_dir: Path, text_file: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    """An --out that can never be created is refused up front, not with a traceback after the run."""
    blocker = tmp_path / "file"
    blocker.write_text("precious")
    assert main(_prune(tiny_model_dir, text_file, "--out", str(blocker / "run"))) == 2
    one_line_error(capsys.readouterr().err, "--out")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    assert blocker.read_text() == "precious"


def test_eval_json_is_a_folder(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               one_line_error) -> None:
    argv = ["eval", str(tiny_model_dir), "--data", "pydoc", "--seqlen", "16", "--max-windows", "1",
            "--json", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, "--json")
    assert list(tmp_path.iterdir()) == []
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.partial-*"))


def test_eval_errors(tiny_model_dir: Path, short_text_file: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    argv = ["eval", str(tiny_model_dir), "--data", f"text:{short_text_file}", "--seqlen", "32", "--device", "cpu"]
    assert main(argv) == 1
    one_line_error(capsys.readouterr().err, "fewer than one window")
    assert main(["eval", str(tiny_model_dir), "--data", "text:/no/such/file.txt"]) == 1
    one_line_error(capsys.readouterr().err, "data file not found")
    assert main(["eval", str(tiny_model_dir), "--data", "pydoc", "--json", str(tmp_path / "no" / "x.json")]) == 2
    one_line_error(capsys.readouterr().err, "does not exist")
    assert main(["eval", str(tmp_path / "nope"), "--data", "pydoc"]) == 1
    one_line_error(capsys.readouterr().err, "model not found")
    assert main(["eval", str(tiny_model_dir), "--data", "pydoc", "--seqlen", "257"]) == 2
    one_line_error(capsys.readouterr().err, "--seqlen 257 exceeds the model's context of 256")


def test_eval_seqlen_error_names_its_flag(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
                                          one_line_error) -> None:
    # `ebft eval` has --seqlen, not --eval-seqlen: the message must name the flag the user typed
    for seqlen in ("0", "1"):
        assert main(["eval", str(tiny_model_dir), "--data", "pydoc", "--seqlen", seqlen]) == 2
        err = capsys.readouterr().err
        one_line_error(err, "--seqlen")
        assert "--eval-seqlen" not in err


def test_debug_shows_the_traceback(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    from ebft.errors import UsageError

    with pytest.raises(UsageError):
        main(_prune(tiny_model_dir, text_file, "--sparsity", "2", "--out", str(tmp_path / "o"), "--debug"))


# ------------------------------------------------------------------------------- success


@pytest.fixture(scope="module")
def pruned_run(tiny_model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = _prune(tiny_model_dir, text_file, "--out", str(out), "--eval", f"text:{text_file}", "--eval-seqlen", "32",
                  "--max-windows", "2", "--quiet")
    assert main(argv) == 0
    return out


def test_prune_writes_a_run(pruned_run: Path, text_file: Path) -> None:
    report = json.loads((pruned_run / "report.json").read_text())
    assert report["config"]["calib"]["source"] == f"text:{text_file}"
    assert report["config"]["finetune"]["epochs"] == 1
    assert report["sparsity"]["overall"] == 0.5
    assert len(report["blocks"]) == 2
    assert (pruned_run / "model" / "config.json").is_file()
    assert (pruned_run / "model" / "tokenizer.json").is_file()
    assert list((pruned_run / "model").glob("*.safetensors"))


def test_eval_reproduces_the_reported_perplexity(pruned_run: Path, text_file: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    source = f"text:{text_file}"
    reported = json.loads((pruned_run / "report.json").read_text())["eval"][source]
    result_file = tmp_path / "ppl.json"
    argv = ["eval", str(pruned_run / "model"), "--data", source, "--seqlen", "32", "--max-windows", "2",
            "--json", str(result_file), "--device", "cpu", "--threads", "1", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    result = json.loads(result_file.read_text())
    assert result["windows"] == 2 and result["tokens"] == 62
    assert result["perplexity"] == pytest.approx(reported, rel=1e-4)
    assert f"perplexity on {source}: {reported:.3f}" in captured.out


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("prune", "eval", "demo"):
        assert command in out


# ------------------------------------------------------------------ reliability flags (issue 7)


def test_reliability_flags_reach_run_prune(tiny_model_dir: Path, text_file: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import ebft.runner

    seen: dict = {}

    def fake_run_prune(cfg, overwrite=False, resume=False, **kwargs):
        seen.update(cfg=cfg, overwrite=overwrite, resume=resume)
        raise KeyboardInterrupt

    monkeypatch.setattr(ebft.runner, "run_prune", fake_run_prune)
    argv = _prune(tiny_model_dir, text_file, "--out", str(tmp_path / "o"), "--resume", "--holdout-fraction", "0.25",
                  "--patience", "3")
    assert main(argv) == 130
    assert seen["resume"] is True and seen["overwrite"] is False
    assert seen["cfg"].finetune.holdout_fraction == 0.25 and seen["cfg"].finetune.patience == 3
    assert main(_prune(tiny_model_dir, text_file, "--out", str(tmp_path / "o"))) == 130
    assert seen["resume"] is False
    assert seen["cfg"].finetune.holdout_fraction == 0.125 and seen["cfg"].finetune.patience is None


def test_os_errors_are_one_line(tiny_model_dir: Path, text_file: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                one_line_error) -> None:
    """A full disk while checkpointing is a runtime failure: one line, exit 1; --debug shows the traceback."""
    import errno

    import ebft.runner

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(ebft.runner, "run_prune", full)
    argv = _prune(tiny_model_dir, text_file, "--out", str(tmp_path / "o"))
    assert main(argv) == 1
    one_line_error(capsys.readouterr().err,
                           f"No space left on device: {tmp_path / 'x'} (rerun with --debug for the traceback)")
    with pytest.raises(OSError):
        main([*argv, "--debug"])


def test_prune_help_lists_reliability_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for flag in ("--resume", "--holdout-fraction", "--patience", "--overwrite"):
        assert flag in out
