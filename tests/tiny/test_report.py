"""ebft report: a real run's report.json rendered to Markdown and HTML, with plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ebft.cli import main
from ebft.report import render_report

PRUNE = ["prune", "{model}", "--calib", "text:{text}", "--nsamples", "4", "--seqlen", "32", "--epochs", "2",
         "--batch-size", "2", "--device", "cpu", "--threads", "1", "--eval", "text:{text}", "--eval-seqlen", "32",
         "--max-windows", "2", "--eval-dense", "--quiet", "--out", "{out}"]


def _prune(model: Path, text: Path, out: Path, *extra: str) -> Path:
    values = {"{model}": str(model), "{text}": str(text), "{out}": str(out)}
    args = []
    for arg in PRUNE:
        for key, value in values.items():
            arg = arg.replace(key, value)
        args.append(arg)
    assert main(args + list(extra)) == 0
    return out


@pytest.fixture(scope="module")
def ebft_run(tiny_model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prune(tiny_model_dir, text_file, tmp_path_factory.mktemp("report") / "run")


def test_report_renders_a_real_run(ebft_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["report", str(ebft_run), "--html"]) == 0
    assert capsys.readouterr().out.startswith("wrote ")
    report = json.loads((ebft_run / "report.json").read_text())
    md = (ebft_run / "report.md").read_text(encoding="utf-8")
    source = report["config"]["eval"]["sources"][0]
    assert md.startswith("# ebft run: ")
    # the perplexity row: dense and pruned + EBFT, the run's own numbers
    assert f"| {report['eval_dense'][source]:.2f} | {report['eval'][source]:.2f} |" in md
    assert "| wanda, 50% |" in md and "ebft: 2 epochs, lr 0.0002, batch 2" in md
    for block in report["blocks"]:  # one row per block with its losses
        assert re.search(rf"^\| {block['index']} \| {block['init_loss']:.4g} \| {block['final_loss']:.4g} \|", md, re.M)
    assert f"| prune_finetune | {report['timings']['prune_finetune']:.1f} |" in md
    for name in ("blocks.png", "loss_curves.png"):
        assert (ebft_run / "plots" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{name})" in md
    html = (ebft_run / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and '<img src="plots/blocks.png"' in html
    assert f"<td>{report['eval'][source]:.2f}</td>" in html
    assert not list(ebft_run.glob(".*.tmp"))


def test_report_without_finetuning_has_no_curves(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    run = _prune(tiny_model_dir, text_file, tmp_path / "run", "--finetune", "none")
    written = render_report(run)
    assert {p.name for p in written} == {"report.md", "blocks.png"}
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "| fine-tuning | none |" in md and "Blocks whose reconstruction loss dropped" not in md
