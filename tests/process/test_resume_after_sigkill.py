"""A run SIGKILLed right after any block's checkpoint and resumed gives the same model, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ebft.cli import main

NBLOCKS = 4
KILLER = Path(__file__).resolve().parent / "kill_after_block.py"


def _weights(out: Path) -> bytes:
    return (out / "model" / "model.safetensors").read_bytes()


def _killed(argv: list[str], kill_after: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(KILLER), str(kill_after), *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("kills", [(0, 2), (NBLOCKS - 1,)], ids=["first-then-middle", "last"])
def test_sigkill_then_resume_is_bitwise_identical(kills: tuple[int, ...], resume_setup,
                                                  resume_reference: Path, tmp_path: Path, assert_unfinished) -> None:
    """SIGKILL right after block k's checkpoint (several k, and twice in one run), resume, compare bytes."""
    out = tmp_path / "run"
    for number, k in enumerate(kills):
        _killed(resume_setup.argv(out, *(["--resume"] if number else [])), k, tmp_path)
        assert_unfinished(out, k + 1)
    assert main(resume_setup.argv(out, "--resume")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the work folder is gone
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json"]
    assert _weights(out) == _weights(resume_reference)
    report = json.loads((out / "report.json").read_text())
    expected = json.loads((resume_reference / "report.json").read_text())
    assert report["resumed"] == [k + 1 for k in kills]
    assert [b["index"] for b in report["blocks"]] == list(range(NBLOCKS))
    for got, want in zip(report["blocks"], expected["blocks"]):
        for key in ("init_loss", "final_loss", "holdout_init_loss", "holdout_final_loss", "epoch_losses", "restored"):
            assert got[key] == want[key], key
    assert report["sparsity"] == expected["sparsity"]
