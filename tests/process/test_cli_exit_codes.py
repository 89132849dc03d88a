"""python -m ebft in a subprocess: usage errors exit 2, runtime errors exit 1, each one line, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _prune(model: Path, text: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--calib", f"text:{text}", "--nsamples", "4", "--seqlen", "32", "--epochs", "1",
            "--device", "cpu", "--threads", "1", *extra]


def _subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ebft", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_subprocess_exit_codes(tiny_model_dir: Path, text_file: Path, tmp_path: Path, one_line_error) -> None:
    out = tmp_path / "out"
    usage = _subprocess(*_prune(tiny_model_dir, text_file, "--nm", "3:2", "--out", str(out)), cwd=tmp_path)
    assert usage.returncode == 2
    one_line_error(usage.stderr, "1 <= N < M")
    runtime = _subprocess(*_prune(tiny_model_dir, text_file, "--nm", "2:8", "--out", str(out), "--quiet"),
                          cwd=tmp_path)
    assert runtime.returncode == 1
    one_line_error(runtime.stderr, "has 36 inputs")
    assert list(tmp_path.iterdir()) == []
