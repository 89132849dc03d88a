"""Running a sweep: one model in memory at a time, its windows built once, each cell a ``run_prune``."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ebft.config import EvalConfig, RunConfig
from ebft.data import calibration_windows, evaluation_tokens, generate_windows
from ebft.fsio import atomic_dir
from ebft.memory import peak_memory, reset_peak_memory
from ebft.page import fmt_duration
from ebft.results import RunReport
from ebft.runner import evaluate_all, resolve_device, run_prune
from ebft.sweep.cells import CellRecord, Plan, _claimed, _zeroshot_backend, check_sweep, write_record
from ebft.sweep.schema import Cell, Sweep
from ebft.sweep.summary import cell_plots, write_summary

logger = logging.getLogger(__name__)




@dataclass
class _Resident:
    """The one model in memory, with its dense weights and the windows built for it."""

    model_spec: str
    model: Any
    tokenizer: Any
    dense_state: dict[str, torch.Tensor]
    calib: dict[tuple, torch.Tensor] = field(default_factory=dict)
    evals: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def restore(self) -> None:
        self.model.load_state_dict(self.dense_state, strict=True)

    def calibration(self, cfg: RunConfig) -> torch.Tensor:
        """The calibration windows of ``cfg``, built once; ``--calib generated`` ones sampled from the model, which
        holds its dense weights when this is called."""
        options = cfg.calib.options
        sampling = (options.temperature, options.top_p) if cfg.calib.from_model else None
        key = (cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed, cfg.calib.windows, sampling)
        if key not in self.calib and sampling is not None:
            self.calib[key] = generate_windows(self.model, self.tokenizer, *key[1:4], options, resolve_device(cfg.device))
        elif key not in self.calib:
            self.calib[key] = calibration_windows(self.tokenizer, *key[:4], data_dir=cfg.data_dir, windows=key[4])
        return self.calib[key]

    def evaluation(self, ev: EvalConfig, data_dir: Path | None) -> dict[str, torch.Tensor]:
        windows = {}
        for source in ev.sources:
            key = (source, ev.seqlen, ev.max_windows)
            if key not in self.evals:
                self.evals[key] = evaluation_tokens(self.tokenizer, source, ev.seqlen, ev.max_windows, data_dir=data_dir)
            windows[source] = self.evals[key]
        return windows


def _load(spec: str) -> _Resident:
    from ebft.models import load_model

    loaded = load_model(spec)
    state = {k: v.detach().to("cpu", copy=True) for k, v in loaded.model.state_dict().items()}
    return _Resident(spec, loaded.model, loaded.tokenizer, state)


def _kind(settings: dict[str, Any]) -> tuple:
    """What a cell's time mostly depends on: its repair method and preset."""
    return settings.get("finetune"), settings.get("preset")


def _eta(timed: dict[tuple, list[float]], remaining: list[tuple]) -> str:
    """``; about 1 h 40 min left for 2 cell(s)``: each remaining cell (its :func:`_kind`) at the mean time of the
    finished cells of its kind, one of a kind not timed yet at the mean of all of them (and said so); empty when
    nothing remains."""
    if not remaining:
        return ""
    overall = statistics.mean(t for times in timed.values() for t in times)
    untimed = sum(kind not in timed for kind in remaining)
    left = sum(statistics.mean(timed[kind]) if kind in timed else overall for kind in remaining)
    note = f", {untimed} of a method not timed yet" if untimed else ""
    return f"; about {fmt_duration(left)} left for {len(remaining)} cell(s){note}"


@dataclass
class SweepResult:
    out: Path
    cells: int
    computed: list[str]
    skipped: list[str]
    summary: Path
    others: list[str] = field(default_factory=list)  # cells another worker was computing (or finished meanwhile)



def run_sweep(sweep: Sweep, plan: Plan | None = None, on_cell: Callable[[str, CellRecord], None] | None = None
              ) -> SweepResult:
    """Run every unfinished cell, then write ``summary.md`` and the plots; returns what was done.

    ``on_cell(cell_id, record)`` is called after each cell's file is written.
    """
    plan = plan if plan is not None else check_sweep(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    (sweep.out / "cells").mkdir(exist_ok=True)
    todo = set(plan.todo)
    if plan.done:
        logger.info("%d of %d cells finished earlier (in %s): skipped", len(plan.done), len(sweep.cells),
                    sweep.out / "cells")
    backend = plan.backend
    if backend is None and sweep.options.tasks is not None and (plan.todo or plan.dense_todo):
        backend = _zeroshot_backend(sweep)
    resident: _Resident | None = None
    computed: list[str] = []
    others: list[str] = []
    seconds: list[float] = []
    timed: dict[tuple, list[float]] = {}  # the seconds of the cells this process ran, by kind (_kind)
    order = [c for model in sweep.models for c in sweep.cells if c.model == model and c.id in todo]
    position = 0
    total = len(plan.todo)
    for model in sweep.models:
        cells = [c for c in sweep.cells if c.model == model and c.id in todo]
        dense_needed = model in plan.dense_todo
        if not cells and not dense_needed:
            continue
        if resident is None or resident.model_spec != model:
            resident = None  # free the previous model first
            resident = _load(model)
        if dense_needed:
            with _claimed(sweep.cell_path(sweep.dense_id(model))) as mine:
                if mine:
                    _run_dense(sweep, resident, backend)
        for cell in cells:
            position += 1
            start = time.perf_counter()
            with _claimed(sweep.cell_path(cell.id)) as mine:
                if not mine:
                    logger.info("cell %d/%d %s: another worker has it (or finished it); passing it by", position, total,
                                cell.id)
                    others.append(cell.id)
                    continue
                record = _run_cell(sweep, cell, resident, backend)
            seconds.append(time.perf_counter() - start)
            timed.setdefault(_kind(cell.settings), []).append(seconds[-1])
            computed.append(cell.id)
            eta = _eta(timed, [_kind(c.settings) for c in order[position:]])
            ppl = ", ".join(f"{s} {p:.2f}" for s, p in record.report.eval.items())
            zs = record.zeroshot
            zs_text = f", zero-shot mean acc {zs['mean_acc']:.4f}" if zs else ""
            logger.info("cell %d/%d %s: %s%s in %s%s", position, total, cell.id, ppl or "done", zs_text,
                        fmt_duration(seconds[-1]), eta)
            if on_cell is not None:
                on_cell(cell.id, record)
    resident = None
    summary = write_summary(sweep)
    return SweepResult(sweep.out, len(sweep.cells), computed, list(plan.done), summary, others)



def _device(sweep: Sweep) -> torch.device:
    """The device for the dense baseline: ``fixed.device`` (``auto`` when the grid varies it)."""
    return resolve_device(sweep.fixed.get("device") or "auto")


def _zeroshot(sweep: Sweep, resident: _Resident, backend: tuple[str, Any] | None,
              device: torch.device) -> dict[str, Any] | None:
    if sweep.options.tasks is None or backend is None:
        return None
    from ebft.eval.zeroshot import evaluate_harness, evaluate_local

    name, local = backend
    if name == "harness":
        result = evaluate_harness(resident.model, resident.tokenizer, sweep.options.tasks, limit=sweep.options.limit,
                                  batch_size=sweep.options.zeroshot_batch_size, device=device)
    else:
        result = evaluate_local(resident.model, resident.tokenizer, local.run, data_dir=sweep.data_dir,
                                limit=sweep.options.limit, batch_size=sweep.options.zeroshot_batch_size, device=device)
        result.skipped.update(local.skipped)
    resident.model.to("cpu")
    out = result.to_dict()
    out["seconds"] = result.seconds
    return out


def _run_dense(sweep: Sweep, resident: _Resident, backend: tuple[str, Any] | None) -> None:
    start, cpu_start = time.perf_counter(), time.process_time()
    resident.restore()
    device = _device(sweep)
    windows = resident.evaluation(sweep.eval, sweep.data_dir)
    details = evaluate_all(resident.model, windows, device, "dense") if windows else {}
    report = RunReport.from_dict({"eval": {s: r["perplexity"] for s, r in details.items()}, "eval_details": details})
    record = CellRecord(sweep.dense_id(resident.model_spec), "dense", sweep.dense_settings(resident.model_spec), report)
    record.zeroshot = _zeroshot(sweep, resident, backend, device)
    record.seconds = time.perf_counter() - start
    record.cpu_seconds = time.process_time() - cpu_start
    write_record(sweep.cell_path(record.id), record)
    ppl = ", ".join(f"{s} {p:.2f}" for s, p in report.eval.items())
    zs = record.zeroshot
    logger.info("dense %s: %s%s in %s", resident.model_spec, ppl,
                f", zero-shot mean acc {zs['mean_acc']:.4f}" if zs else "", fmt_duration(record.seconds))


def _run_cell(sweep: Sweep, cell: Cell, resident: _Resident, backend: tuple[str, Any] | None) -> CellRecord:
    """Restore the dense weights, run the cell, evaluate it, (keep its model,) write its record."""
    start, cpu_start = time.perf_counter(), time.process_time()
    reset = reset_peak_memory()
    resident.restore()
    cfg = cell.config
    windows = (resident.calibration(cfg), resident.evaluation(cfg.eval, cfg.data_dir))
    logger.info("cell %s: %s %s, finetune %s, calibration %d x %d of %s (seed %d)", cell.id, cfg.prune.pruner,
                cfg.prune.label, cfg.finetune.method, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.source,
                cfg.calib.seed)
    report = run_prune(cfg, model_and_tokenizer=(resident.model, resident.tokenizer), windows=windows)
    record = CellRecord(cell.id, "cell", {**cell.settings, **sweep.eval_settings()}, report)
    record.zeroshot = _zeroshot(sweep, resident, backend, resolve_device(cfg.device))
    if sweep.options.keep_models:
        from ebft.export import save_model

        with atomic_dir(sweep.out / "models" / cell.id, overwrite=True) as tmp:
            save_model(resident.model, resident.tokenizer, tmp)
        record.model_dir = (Path("models") / cell.id).as_posix()
    record.seconds = time.perf_counter() - start
    record.cpu_seconds = time.process_time() - cpu_start
    record.memory = {**peak_memory(), "rss_since_cell_start": reset}
    write_record(sweep.cell_path(cell.id), record)  # the cell counts as finished from here on
    cell_plots(sweep, cell.id, record)
    return record


