"""--ebft-lr-search through the walk on a tiny Llama: every block reports its chosen lr; resume is bitwise."""

from __future__ import annotations

import json
from pathlib import Path

from ebft.cli import main

SEARCH = ("--nsamples", "16", "--ebft-lr-search", "10,1,0.1", "--ebft-lr-trial-steps", "2")  # 2 held out


def test_each_block_reports_the_lr_it_chose(resume_setup, tmp_path: Path) -> None:
    out = tmp_path / "search"
    assert main(resume_setup.argv(out, *SEARCH)) == 0
    blocks = json.loads((out / "report.json").read_text())["blocks"]
    for block in blocks:
        assert set(block["lr_trials"]) == {"0.01", "0.001", "0.0001"}
        finite = {k: v for k, v in block["lr_trials"].items() if v is not None}
        assert block["lr"] == float(min(finite, key=finite.get))
        assert block["steps"] == 2 * 7  # the training itself: 2 epochs of 14 windows, batch 2 (trials apart)


def test_lr_search_resumes_bitwise(resume_setup, tmp_path: Path, assert_resumes_bitwise) -> None:
    assert_resumes_bitwise(resume_setup, tmp_path, SEARCH, stop_after=1)
