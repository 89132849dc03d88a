"""Sweep cells on disk: their records, which are finished, the checks before running, and the claims
with which several workers share one sweep."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebft.errors import EbftError, UsageError
from ebft.fsio import write_json
from ebft.results import RunReport
from ebft.runner import validate_inputs
from ebft.sweep.schema import Sweep, _compared, default_of

logger = logging.getLogger(__name__)

#: The format of a cell record (cells/<id>.json).
FORMAT = 1


@dataclass
class CellRecord:
    """A finished cell (``kind`` "cell") or dense baseline ("dense"): ``cells/<id>.json``."""

    id: str
    kind: str
    settings: dict[str, Any]  # what makes it this cell, evaluation settings included
    report: RunReport  # a dense baseline's holds only its evaluation
    zeroshot: dict[str, Any] | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None  # unlike wall time, holds on a shared machine
    #: the sweep process's peak memory during the cell (``peak_rss_gb``, ``peak_cuda_gb``; it includes the dense
    #: weights the sweep keeps for its next cells), and ``rss_since_cell_start``: False where the resident set's
    #: high-water mark could not be reset, so that its peak counts from the process's start
    memory: dict[str, Any] | None = None
    model_dir: str | None = None  # with keep_models: the cell's saved model, relative to the sweep folder

    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, **dataclasses.asdict(self), "report": self.report.to_dict()}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["report"] = RunReport.from_dict(data.get("report") or {})
        return cls(**values)


def read_cell(path: Path) -> CellRecord | None:
    """A finished cell's record, or ``None`` if there is none (or it cannot be read: it is then redone)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        logger.warning("%s cannot be read; its cell will be recomputed", path)
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("settings"), dict):
        logger.warning("%s is not a sweep cell record; its cell will be recomputed", path)
        return None
    try:
        return CellRecord.from_dict(record)
    except (TypeError, ValueError):
        logger.warning("%s is not a sweep cell record; its cell will be recomputed", path)
        return None


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    old, new = _compared(old), _compared(new)
    for key in sorted(old.keys() | new.keys()):
        # settings are absent from the cells that do not read them, and from records written before
        # the setting existed: absent means the default there
        unset = default_of(key)
        if old.get(key, unset) != new.get(key, unset):
            return f"{key} was {old.get(key, unset)!r}, now {new.get(key, unset)!r}"
    return None


def write_record(path: Path, record: CellRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record.to_dict(), indent=1)


@dataclass
class Plan:
    """Which cells (and dense baselines) are finished and which remain."""

    done: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)
    dense_todo: list[str] = field(default_factory=list)  # models whose dense baseline is missing
    backend: tuple[str, Any] | None = None  # the zero-shot back-end, once check_sweep has chosen it


def plan_sweep(sweep: Sweep) -> Plan:
    """Compare ``OUT/cells`` with the config; refuse cell files written with other settings."""
    plan = Plan()
    jobs = [(c.id, {**c.settings, **sweep.eval_settings()}) for c in sweep.cells]
    for cell_id_, settings in jobs:
        record = read_cell(sweep.cell_path(cell_id_))
        if record is None:
            plan.todo.append(cell_id_)
            continue
        diff = _settings_diff(record.settings, settings)
        if diff is not None:
            raise UsageError(f"{sweep.cell_path(cell_id_)} was computed with other settings ({diff}); use another "
                             "--out, or delete that file to recompute it")
        plan.done.append(cell_id_)
    if sweep.options.eval_dense:
        for model in sweep.models:
            record = read_cell(sweep.cell_path(sweep.dense_id(model)))
            if record is not None:
                diff = _settings_diff(record.settings, sweep.dense_settings(model))
                if diff is not None:
                    raise UsageError(f"{sweep.cell_path(sweep.dense_id(model))} was computed with other settings "
                                     f"({diff}); use another --out, or delete that file to recompute it")
            else:
                plan.dense_todo.append(model)
    return plan


def check_sweep(sweep: Sweep) -> Plan:
    """Everything that needs no weights, for every distinct kind of cell: models, data, N:M widths, zero-shot files."""
    plan = plan_sweep(sweep)
    checked: set[str] = set()
    todo = set(plan.todo)
    for cell in sweep.cells:
        if cell.id not in todo:
            continue
        cfg = cell.config
        patience = cfg.finetune.patience is not None  # checked against nsamples and the held-out fraction
        key = json.dumps([cfg.model, cfg.calib.source, cfg.calib.seqlen, cfg.prune.nm, cfg.finetune.method == "lora",
                          cfg.finetune.method if patience else None, cfg.calib.nsamples if patience else None,
                          cfg.finetune.holdout_fraction if patience else None, cfg.device])
        if key in checked:
            continue
        checked.add(key)
        try:
            validate_inputs(cfg)
        except EbftError as exc:
            raise type(exc)(f"{sweep.source}: cell {cell.id}: {exc}") from None
    if sweep.options.tasks is not None and (plan.todo or plan.dense_todo):
        plan.backend = _zeroshot_backend(sweep)
    return plan


def _zeroshot_backend(sweep: Sweep) -> tuple[str, Any]:
    """The zero-shot back-end, chosen once; the local one's task files are checked now."""
    from ebft.eval.zeroshot import plan_local, select_backend

    backend, why = select_backend(sweep.options.zeroshot_backend)
    logger.info("zero-shot back-end: %s (%s)", backend, why)
    local = plan_local(sweep.options.tasks, sweep.data_dir) if backend == "local" else None  # type: ignore[arg-type]
    return backend, local



CLAIM_SUFFIX = ".running"


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the worker that wrote a claim still runs; one on another host is assumed to."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, KeyError, TypeError, ValueError):
        return True
    return True


def claim_cell(path: Path) -> Path | None:
    """Claim the cell whose record is ``path`` for this process: the claim file, or ``None`` if a live
    worker holds it. A claim left by a dead process on this host is taken over."""
    claim = path.with_name(path.name + CLAIM_SUFFIX)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(claim.read_text(encoding="utf-8"))
                if not isinstance(holder, dict):
                    raise ValueError
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError):
                # being written right now, or garbage: give a fresh claim the benefit of the doubt
                try:
                    if time.time() - claim.stat().st_mtime < 60:
                        return None
                except FileNotFoundError:
                    continue
                holder = {}
            if holder and _alive(holder):
                return None
            logger.warning("%s: its worker (pid %s on %s) is gone; taking the cell over", claim,
                           holder.get("pid", "?"), holder.get("host", "?"))
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return claim
    return None



@contextlib.contextmanager
def _claimed(path: Path) -> Iterator[bool]:
    """Yields whether this worker should compute the record at ``path``: not when it exists by now
    (another worker finished it after the plan was made) or a live worker has claimed it."""
    if read_cell(path) is not None:
        yield False
        return
    claim = claim_cell(path)
    if claim is None:
        yield False
        return
    try:
        yield read_cell(path) is None  # finished between the check and the claim: nothing to do
    finally:
        claim.unlink(missing_ok=True)


