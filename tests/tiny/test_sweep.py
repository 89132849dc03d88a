"""ebft sweep: config validation, a small grid end to end, resuming after an interruption, the summary."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import pytest

import ebft.sweep
import ebft.sweep.runner
from ebft import plots
from ebft.cli import main
from ebft.errors import UsageError
from ebft.models import load_model
from ebft.runner import run_prune
from ebft.sweep import check_sweep, load_sweep, read_cell, read_config, run_sweep

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


@pytest.fixture(scope="module")
def finished(sweep_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-cell sweep (2 sparsities x none/ebft) and its config."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = sweep_config(tmp)
    run_sweep(load_sweep(config))
    return config


# ------------------------------------------------------------------------------ the config


def test_yaml_reads_nm_patterns_as_strings_and_1e3_as_a_number(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("grid: {sparsity: [2:4, 4:8, 0.5]}\nfixed: {lr: 1e-3, seed: 3}\n", encoding="utf-8")
    data = read_config(path)
    assert data["grid"]["sparsity"] == ["2:4", "4:8", 0.5]  # PyYAML alone reads 2:4 as 124 (base 60)
    assert data["fixed"] == {"lr": 0.001, "seed": 3}


def test_cells_and_ids(sweep_config, tmp_path: Path) -> None:
    grid = """  pruner: [magnitude, wanda]
  sparsity: [0.5, "2:4"]
  finetune: [none, ebft]
  epochs: [1, 2]"""
    config = sweep_config(tmp_path, grid)
    config.write_text(config.read_text(encoding="utf-8").replace("  epochs: 1\n", ""), encoding="utf-8")
    sweep = load_sweep(config)
    # finetune none ignores epochs: 2 pruners x 2 patterns x (1 none + 2 ebft)
    assert len(sweep.cells) == 12
    ids = [c.id for c in sweep.cells]
    assert len(set(ids)) == 12
    assert "tiny-llama.wanda.2of4.none.text-pydoc.txt.n4.len32.seed0" in ids
    assert "tiny-llama.magnitude.s50.ebft.text-pydoc.txt.n4.len32.seed0.e2.lr0.001.b2" in ids
    cell = next(c for c in sweep.cells if c.id.startswith("tiny-llama.wanda.2of4.ebft") and ".e2." in c.id)
    assert cell.config.prune.nm == (2, 4) and cell.config.finetune.epochs == 2 and cell.config.finetune.lr == 1e-3
    assert cell.config.calib.nsamples == 4 and cell.config.eval.max_windows == 2 and cell.config.device == "cpu"


def test_pruner_and_method_settings_reach_only_their_cells(sweep_config, tmp_path: Path) -> None:
    grid = """  pruner: [wanda, sparsegpt]
  finetune: [none, dsnot]
  percdamp: [0.01, 0.1]"""
    config = sweep_config(tmp_path, grid, "  dsnot_cycles: 3\n  dsnot_threshold: 0.5")
    sweep = load_sweep(config)
    # Wanda ignores percdamp (2 cells), SparseGPT crosses it (4 cells)
    assert len(sweep.cells) == 6
    by_id = {c.id: c for c in sweep.cells}
    wanda = by_id["tiny-llama.wanda.s50.dsnot.text-pydoc.txt.n4.len32.seed0.b2"]
    assert "percdamp" not in wanda.settings and wanda.config.prune.options is None
    assert wanda.config.finetune.options.cycles == 3 and wanda.config.finetune.options.threshold == 0.5
    gpt = by_id["tiny-llama.sparsegpt.s50.none.text-pydoc.txt.n4.len32.seed0.percdamp-0.1"]
    assert gpt.config.prune.options.percdamp == 0.1 and "dsnot_cycles" not in gpt.settings
    assert gpt.config.finetune.options is None
    assert by_id["tiny-llama.sparsegpt.s50.dsnot.text-pydoc.txt.n4.len32.seed0.b2.percdamp-0.01"] \
        .config.prune.options.percdamp == 0.01
    assert "compile" not in gpt.settings and "compile" not in wanda.settings
    config.write_text(config.read_text(encoding="utf-8").replace("0.01, 0.1", "0.01, -1"), encoding="utf-8")
    with pytest.raises(UsageError, match=r"grid\.percdamp.*>= 0"):
        load_sweep(config)


def test_dsnot_cells_collapse_across_the_training_settings_they_ignore(sweep_config, tmp_path: Path) -> None:
    grid = """  lr: [1.0e-3, 2.0e-3]
  finetune: [none, dsnot, ebft]"""
    config = sweep_config(tmp_path, grid)
    config.write_text(config.read_text(encoding="utf-8").replace("  lr: 1e-3\n", ""), encoding="utf-8")
    sweep = load_sweep(config)
    # DSnoT reads neither lr nor epochs: one DSnoT cell, like the one pruning-only cell; it keeps batch_size
    assert sorted(c.id.split(".", 4)[3] for c in sweep.cells) == ["dsnot", "ebft", "ebft", "none"]
    dsnot = next(c for c in sweep.cells if c.settings["finetune"] == "dsnot")
    assert dsnot.id == "tiny-llama.wanda.s50.dsnot.text-pydoc.txt.n4.len32.seed0.b2"
    assert "lr" not in dsnot.settings and "epochs" not in dsnot.settings and dsnot.config.finetune.batch_size == 2
    run_sweep(sweep)
    source = sweep.eval.sources[0]
    value = {c.settings["finetune"] + str(c.settings.get("lr", "")): read_cell(sweep.cell_path(c.id)).report.eval
             [source] for c in sweep.cells}
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "| pruner | sparsity | lr | none | dsnot | ebft |" in summary
    for lr in ("0.001", "0.002"):  # both lr rows show the shared none and DSnoT cells; no row of their own
        assert (f"| wanda | 50% | {lr} | {value['none']:.2f} | {value['dsnot']:.2f} | "
                f"{value['ebft' + str(float(lr))]:.2f} |") in summary
    assert "| wanda | 50% |  |" not in summary and "read only `batch_size` and `holdout_fraction`" in summary


def test_compile_reaches_ebft_cells_and_older_records_still_count(finished: Path, tmp_path: Path) -> None:
    sweep = load_sweep(finished)
    ebft_cell = next(c for c in sweep.cells if c.settings["finetune"] == "ebft")
    none_cell = next(c for c in sweep.cells if c.settings["finetune"] == "none")
    assert ebft_cell.settings["compile"] is False and "compile" not in none_cell.settings
    # a record written before the compile setting existed is reused while compile keeps its default
    path = sweep.cell_path(ebft_cell.id)
    record = json.loads(path.read_text(encoding="utf-8"))
    del record["settings"]["compile"]
    path.write_text(json.dumps(record), encoding="utf-8")
    assert ebft_cell.id in ebft.sweep.plan_sweep(sweep).done
    on = finished.read_text(encoding="utf-8").replace("  epochs: 1\n", "  epochs: 1\n  compile: true\n")
    (tmp_path / "on.yaml").write_text(on, encoding="utf-8")
    compiled = load_sweep(tmp_path / "on.yaml")
    assert next(c for c in compiled.cells if c.id == ebft_cell.id).config.finetune.options.compile is True
    with pytest.raises(UsageError, match="compile was False, now True"):
        ebft.sweep.plan_sweep(compiled)


def _doc_rows() -> list:
    """The config errors listed in docs/errors.md: ``- `YAML` → `message```."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## `ebft sweep`: bad configs"):]
    rows = []
    for line in section.splitlines():
        match = re.fullmatch(r"- `(.+)` → exit (\d): `(.+)`", line.strip())
        if match:
            rows.append(pytest.param(match[1], int(match[2]), match[3], id=match[3][:60]))
    return rows


CONFIG_ROWS = _doc_rows()


def test_config_error_list_is_there() -> None:
    assert len(CONFIG_ROWS) >= 12


@pytest.mark.parametrize("yaml_text,code,message", CONFIG_ROWS)
def test_config_errors(yaml_text: str, code: int, message: str, tiny_model_dir: Path, text_file: Path,
                       tmp_path: Path, capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    """Every bad config of docs/errors.md is refused with that one line, before anything is written."""
    path = tmp_path / "bad.yaml"
    values = {"model": str(tiny_model_dir), "text": str(text_file), "tmp": str(tmp_path), "cfg": str(path)}

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        return text

    path.write_text(fill(yaml_text) + "\n", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_line_error(captured.err)
    pattern = ".*".join(re.escape(fill(part)) for part in message.split("…"))
    assert re.fullmatch("error: " + pattern, line), f"\n{line}\n{message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------------------ running


def test_sweep_writes_cells_summary_and_plots(finished: Path) -> None:
    sweep = load_sweep(finished)
    out = sweep.out
    records = {c.id: read_cell(out / "cells" / f"{c.id}.json").to_dict() for c in sweep.cells}
    dense = read_cell(out / "cells" / "dense.tiny-llama.json").to_dict()
    assert dense["kind"] == "dense"
    source = sweep.eval.sources[0]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    for cell in sweep.cells:
        record = records[cell.id]
        assert record["settings"]["sparsity"] == cell.settings["sparsity"]
        report = record["report"]
        assert report["config"]["prune"]["sparsity"] == cell.settings["sparsity"]
        assert len(report["blocks"]) == 2 and report["timings"]["prune_finetune"] > 0
        # the cell's peak memory: at least the interpreter and torch (far above a tiny model's weights), in the table
        assert 0.1 < record["memory"]["peak_rss_gb"] < 64
        assert f"| {record['memory']['peak_rss_gb']:.2f} |" in summary
        if cell.settings["finetune"] == "ebft":
            assert all(len(b["epoch_losses"]) == 1 for b in report["blocks"])
            assert (out / "plots" / "cells" / f"{cell.id}.blocks.png").stat().st_size > 1000
            assert (out / "plots" / "cells" / f"{cell.id}.loss_curves.png").stat().st_size > 1000
        assert f"{report['eval'][source]:.2f}" in summary
    assert f"Dense: **{dense['report']['eval'][source]:.2f}**" in summary
    # the paper-like table: one row per sparsity, a column per method, the cells' own numbers
    row = next(line for line in summary.splitlines() if line.startswith("| wanda | 70% |"))
    none = records[next(c.id for c in sweep.cells if c.settings["sparsity"] == 0.7 and c.settings["finetune"] == "none")]
    ebft_ = records[next(c.id for c in sweep.cells if c.settings["sparsity"] == 0.7 and c.settings["finetune"] == "ebft")]
    assert row == f"| wanda | 70% | {none['report']['eval'][source]:.2f} | {ebft_['report']['eval'][source]:.2f} |"
    for name in ("ppl_vs_sparsity.text-pydoc.txt.png", "block_loss_ratio.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in summary
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporary files


def test_cells_equal_standalone_runs(finished: Path, tiny_model_dir: Path) -> None:
    """Restoring the dense weights and reusing the windows changes nothing: every cell equals its own run."""
    sweep = load_sweep(finished)
    for cell in sweep.cells[-2:]:  # the last cells ran on a model that earlier cells had pruned
        loaded = load_model(str(tiny_model_dir))
        report = run_prune(cell.config, model_and_tokenizer=(loaded.model, loaded.tokenizer)).to_dict()
        record = read_cell(sweep.cell_path(cell.id)).to_dict()
        assert record["report"]["eval"] == report["eval"]
        assert [b["final_loss"] for b in record["report"]["blocks"]] == [b["final_loss"] for b in report["blocks"]]


def test_interrupted_sweep_resumes_without_recomputing(sweep_config, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = sweep_config(tmp_path)
    calls: list[str] = []
    real = ebft.sweep.runner.run_prune

    def crashing(cfg, **kwargs):
        calls.append(f"{cfg.prune.sparsity}/{cfg.finetune.method}")
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C inside the second cell
        return real(cfg, **kwargs)

    monkeypatch.setattr(ebft.sweep.runner, "run_prune", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(config))
    cells = tmp_path / "out" / "cells"
    finished_cells = sorted(p.name for p in cells.glob("*.json") if not p.name.startswith("dense."))
    assert len(finished_cells) == 1 and not (tmp_path / "out" / "summary.md").exists()
    # a look at the sweep so far: the summary of the finished cell, nothing run
    assert main(["sweep", str(config), "--summary-only", "--quiet"]) == 0
    assert "1 of 4 cells finished" in (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert len(calls) == 2
    first = cells / finished_cells[0]
    stamp = first.stat().st_mtime_ns
    dense_stamp = (cells / "dense.tiny-llama.json").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(ebft.sweep.runner, "run_prune", lambda cfg, **kw: (calls.append(
        f"{cfg.prune.sparsity}/{cfg.finetune.method}"), real(cfg, **kw))[1])
    result = run_sweep(load_sweep(config))
    assert len(calls) == 3 and "0.5/none" not in calls  # the finished first cell was not run again
    assert result.skipped == [finished_cells[0][:-len(".json")]] and len(result.computed) == 3
    assert first.stat().st_mtime_ns == stamp and (cells / "dense.tiny-llama.json").stat().st_mtime_ns == dense_stamp
    assert len(list(cells.glob("*.json"))) == 5

    calls.clear()
    assert main(["sweep", str(config), "--quiet"]) == 0  # a finished sweep only rewrites its summary
    assert calls == []

    assert not list(cells.glob("*.running"))  # the interrupted cell's claim was released


def test_changed_settings_are_refused(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    changed = finished.with_name("changed.yaml")
    changed.write_text(finished.read_text(encoding="utf-8").replace("max_windows: 2", "max_windows: 1"),
                       encoding="utf-8")  # a setting outside the cell ids: the old files must not be taken as done
    assert main(["sweep", str(changed), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: \S+/cells/\S+\.json was computed with other settings \(max_windows was 2, now 1\); "
                        r"use another --out, or delete that file to recompute it\n", err), err
    # a setting inside the ids (lr) makes new cells next to the old ones
    changed.write_text(finished.read_text(encoding="utf-8").replace("lr: 1e-3", "lr: 2e-3"), encoding="utf-8")
    assert main(["sweep", str(changed), "--dry-run"]) == 0
    assert "4 cells, 2 finished, 2 to run" in capsys.readouterr().out


def test_dry_run_lists_cells(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(finished), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"sweep \S+: 4 cells, 4 finished, 0 to run -> \S+/out$", out[0])
    assert len([line for line in out if line.strip().startswith("done ")]) == 4


def test_without_matplotlib_the_summary_is_still_written(sweep_config, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    config = sweep_config(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setattr(plots, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="ebft.plots"):
        run_sweep(load_sweep(config))
    warnings = [r.getMessage() for r in caplog.records if r.name == "ebft.plots"]
    assert len(warnings) == 1 and "pip install 'ebft[plot]'" in warnings[0]
    assert (tmp_path / "out" / "summary.md").exists() and not list((tmp_path / "out").rglob("*.png"))


def test_zeroshot_and_calibration_tables(sweep_config, tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (data / "zeroshot" / "rte" / "val.jsonl").exists():
        pytest.skip("no zero-shot files in ../shared/data")
    grid = """  nsamples: [2, 4]
  finetune: [none, ebft]"""
    extra = f"""  tasks: rte,boolq
  limit: 3
  zeroshot_backend: local
  data_dir: {data}"""
    config = sweep_config(tmp_path, grid, extra)
    config.write_text(config.read_text(encoding="utf-8").replace("  nsamples: 4\n", ""), encoding="utf-8")
    sweep = load_sweep(config)
    check_sweep(sweep)
    run_sweep(sweep)
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    assert "### Calibration samples" in summary and "### Zero-shot accuracy" in summary
    header = next(line for line in summary.splitlines() if line.startswith("| pruner | sparsity | finetune | rte"))
    assert header == "| pruner | sparsity | finetune | rte | boolq | mean | s.e. |"
    for cell in sweep.cells:
        zs = read_cell(sweep.cell_path(cell.id)).zeroshot
        assert zs["limit"] == 3 and set(zs["tasks"]) == {"rte", "boolq"}
        assert f"{100 * zs['mean_acc']:.2f} |" in summary
    dense = json.loads((tmp_path / "out" / "cells" / "dense.tiny-llama.json").read_text())
    assert summary.count("| dense |") == 1 and dense["zeroshot"]["tasks"]["rte"]["n"] == 3
    if importlib.util.find_spec("matplotlib") is not None:  # the calibration-size plot
        plot = tmp_path / "out" / "plots" / "ppl_vs_nsamples.text-pydoc.txt.png"
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({plot.relative_to(tmp_path / 'out')})" in summary
        assert not (tmp_path / "out" / "plots" / "ppl_vs_sparsity.text-pydoc.txt.png").exists()  # one sparsity


def test_unknown_key_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("fixed: {model: m, lrr: 1}\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"fixed\.lrr is not a setting"):
        load_sweep(path)


def test_the_time_left_counts_each_cell_at_the_mean_of_its_kind() -> None:
    """Cells of different methods take very different times (pruning alone minutes, a preset an hour): each cell
    left is counted at its own kind's mean, an untimed kind at the mean of all, and the estimate says so."""
    from ebft.sweep.runner import _eta, _kind

    none, lora, best = _kind({"finetune": "none"}), _kind({"finetune": "lora"}), _kind({"finetune": "kd",
                                                                                        "preset": "best"})
    timed = {none: [60.0, 120.0], lora: [600.0]}
    assert _eta(timed, [lora, none]) == "; about 11 min 30 s left for 2 cell(s)"  # 600 + 90
    # an untimed kind at the mean of the three finished cells, (60 + 120 + 600) / 3 = 260 s
    assert _eta(timed, [best, none]) == "; about 5 min 50 s left for 2 cell(s), 1 of a method not timed yet"
    assert _eta(timed, []) == ""
