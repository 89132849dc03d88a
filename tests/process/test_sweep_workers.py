"""ebft sweep across processes: claims on cells, workers sharing a sweep, SIGTERM stopping one cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ebft.sweep
import ebft.sweep.runner
from ebft.cli import main
from ebft.sweep import load_sweep, read_cell, run_sweep


def test_sigterm_stops_a_sweep_cleanly(sweep_config, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``kill`` (SIGTERM) mid-cell: exit 143 with one line, the cell's claim released, no cell file."""
    config = sweep_config(tmp_path)

    def killed(cfg, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt the cell")

    monkeypatch.setattr(ebft.sweep.runner, "run_prune", killed)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["sweep", str(config), "--quiet"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "terminated"
    assert signal.getsignal(signal.SIGTERM) is previous
    cells = tmp_path / "out" / "cells"
    assert not list(cells.glob("*.running"))
    assert [p.name for p in cells.glob("*.json")] == ["dense.tiny-llama.json"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_claims(tmp_path: Path) -> None:
    record = tmp_path / "cell.json"
    claim = ebft.sweep.claim_cell(record)
    assert claim == tmp_path / "cell.json.running"
    assert json.loads(claim.read_text())["pid"] == os.getpid()
    assert ebft.sweep.claim_cell(record) is None  # held by a live worker (this one)
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    assert ebft.sweep.claim_cell(record) == claim  # its worker is gone: taken over
    assert json.loads(claim.read_text())["pid"] == os.getpid()
    claim.write_text(json.dumps({"host": "another-machine", "pid": _dead_pid()}))
    assert ebft.sweep.claim_cell(record) is None  # no way to tell from here: respected


def test_workers_share_a_sweep(sweep_config, tmp_path: Path) -> None:
    """A cell another live worker claimed is passed by; a dead worker's claim is taken over."""
    config = sweep_config(tmp_path)
    sweep = load_sweep(config)
    busy, orphan = sweep.cells[1].id, sweep.cells[2].id
    cells = tmp_path / "out" / "cells"
    cells.mkdir(parents=True)
    (cells / f"{busy}.json.running").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    (cells / f"{orphan}.json.running").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    result = run_sweep(sweep)
    assert result.others == [busy] and busy not in result.computed and len(result.computed) == 3
    assert orphan in result.computed and not (cells / f"{orphan}.json.running").exists()
    assert read_cell(cells / f"{busy}.json") is None and (cells / f"{busy}.json.running").exists()
    assert "3 of 4 cells finished" in result.summary.read_text(encoding="utf-8")
    (cells / f"{busy}.json.running").unlink()  # that worker finished (here: went away); the next run completes
    again = run_sweep(load_sweep(config))
    assert again.computed == [busy] and again.others == []
