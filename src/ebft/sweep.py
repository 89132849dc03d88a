"""``ebft sweep CONFIG.yaml``: run a grid of ``ebft prune`` runs, resumably, and summarise it like the paper.

The config is YAML with up to three keys::

    grid:                      # axes: lists; every combination is one cell
      pruner: [magnitude, wanda, sparsegpt]
      sparsity: [0.5, 0.6, 0.7, 0.8, "2:4", "4:8"]
      finetune: [none, ebft]
    fixed:                     # one value each
      model: smollm2-135m
      calib: c4
      nsamples: 64
      seqlen: 256
      eval: [wikitext2:test]
      max_windows: 16
    out: runs/study           # optional; --out wins; default runs/<config name>

Any run setting (:data:`RUN_KEYS`: the ``ebft prune`` flags, with ``_`` for ``-``, ``calib`` for
``--calib``, ``finetune`` for ``--finetune``, ``sparsity`` taking a fraction or an ``"N:M"`` pattern)
may be a grid axis or fixed. Settings that only ``fixed`` takes (:data:`FIXED_KEYS`) say how cells
are evaluated: perplexity sources, zero-shot tasks, the dense baseline, the data folder. Paths are
relative to the current folder. The whole config is checked before any model is loaded: an
unknown key, a bad value or an empty axis is a one-line error naming the key.

Output, in ``OUT``::

    cells/<cell-id>.json   one per finished cell, written atomically: its settings and the run's report
                           (perplexities, per-block losses and epoch losses, sparsity, timings) plus
                           zero-shot results; the dense baseline is cells/dense.<model>.json
    summary.md             tables like the paper's: perplexity per pruner x sparsity x method, a
                           calibration-size table when nsamples varies, zero-shot accuracy
    plots/                 perplexity vs sparsity per eval source; final/init loss per block over cells;
                           per tuned cell: reconstruction loss before/after per block and the loss curves
    models/<cell-id>/      only with keep_models (--keep-models): each cell's model, 540 MB for SmolLM2

A cell whose JSON exists is skipped on the next run, so an interrupted sweep continues where it
stopped; a cell interrupted half-way is recomputed. Several workers (one per GPU, or per machine on a
shared folder) may run the same sweep at once: a worker claims a cell with ``cells/<cell-id>.json.running``
before computing it and the others pass it by; a claim whose process has died (on the same host) is
taken over. A cell JSON written with other settings (say,
after ``fixed.lr`` changed) is refused with a message rather than silently reused.

What is shared between cells, and what is not:

- each model is loaded once; its dense weights are kept as a CPU copy and put back before every
  cell (``load_state_dict``) instead of reloading;
- calibration windows are built once per (model, source, nsamples, seqlen, seed), and evaluation
  windows once per (model, source, seqlen, max windows);
- the dense model is evaluated once per model (perplexity on every eval source, zero-shot tasks);
- cells with ``finetune: none`` do not depend on the training settings (epochs, lr, batch size, ...):
  grid axes over those collapse into one such cell per pruner, sparsity and calibration set;
- dense block targets are not shared: EBFT's target for block ``i`` is the dense block applied to the
  cell's own pruned (and tuned) activations, which differ in every cell from block 1 on;
- a ``finetune: none`` cell's pruned model is not reused as another cell's starting point: the
  pipeline prunes block ``i`` on activations that passed through the already-tuned blocks before it,
  so a tuned cell never goes through the prune-only model.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import re
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ebft import plots
from ebft.config import CalibConfig, EvalConfig, FinetuneConfig, PruneConfig, RunConfig, parse_nm
from ebft.data import calibration_windows, evaluation_tokens, parse_source
from ebft.errors import EbftError, UsageError
from ebft.fsio import atomic_dir, write_json, write_text
from ebft.report import Page, fmt, run_plots, sparsity_label
from ebft.runner import evaluate_all, resolve_device, run_prune, validate_inputs

logger = logging.getLogger(__name__)

FORMAT = 1
TOP_KEYS = ("grid", "fixed", "out")

#: Run settings, allowed in ``grid`` and ``fixed``: key -> (kind, default).
RUN_KEYS: dict[str, tuple[str, Any]] = {
    "model": ("str", None),
    "pruner": ("str", "wanda"),
    "sparsity": ("sparsity", 0.5),
    "finetune": ("str", "ebft"),
    "calib": ("str", "c4"),
    "nsamples": ("int", 256),
    "seqlen": ("int", 1024),
    "seed": ("int", 0),
    "epochs": ("int", 10),
    "lr": ("float", 2e-4),
    "batch_size": ("int", 8),
    "weight_decay": ("float", 0.0),
    "grad_clip": ("float", 1.0),
    "precision": ("str", "auto"),
    "holdout_fraction": ("float", 0.125),
    "patience": ("optint", None),
    "lora_rank": ("int", 8),
    "lora_alpha": ("float", 16.0),
    "lora_dropout": ("float", 0.0),
    "lora_targets": ("strlist", None),
    "compile": ("bool", False),
    "percdamp": ("optfloat", None),
    "dsnot_cycles": ("optint", None),
    "dsnot_threshold": ("optfloat", None),
    "device": ("str", "auto"),
}
#: Settings that ``finetune: none`` ignores: cells that differ only in these collapse into one.
TRAIN_KEYS = ("epochs", "lr", "batch_size", "weight_decay", "grad_clip", "precision", "holdout_fraction", "patience",
              "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
#: Training settings that a repair method does not read: cells that differ only in these collapse into one.
#: DSnoT reads ``batch_size`` (its forward passes) and ``holdout_fraction`` (its windows and the guard).
IGNORED_BY = {"none": TRAIN_KEYS,
              "dsnot": tuple(k for k in TRAIN_KEYS if k not in ("batch_size", "holdout_fraction"))}
#: Settings that only one pruner or one method reads: key -> (setting, value). In other cells they are
#: dropped, so that a grid can cross e.g. ``pruner`` with ``percdamp`` without asking Wanda for a dampening.
ONLY_FOR = {"compile": ("finetune", "ebft"), "percdamp": ("pruner", "sparsegpt"),
            "dsnot_cycles": ("finetune", "dsnot"), "dsnot_threshold": ("finetune", "dsnot")}
#: Evaluation and bookkeeping settings, allowed in ``fixed`` only: key -> (kind, default).
FIXED_KEYS: dict[str, tuple[str, Any]] = {
    "eval": ("strlist", ["wikitext2"]),
    "eval_seqlen": ("int", 1024),
    "max_windows": ("optint", None),
    "eval_dense": ("bool", True),
    "tasks": ("strlist", None),
    "limit": ("optint", None),
    "zeroshot_backend": ("str", "auto"),
    "zeroshot_batch_size": ("int", 8),
    "data_dir": ("str", None),
    "keep_models": ("bool", False),
}
#: Settings that do not change a cell's numbers: not compared when an existing cell file is reused.
UNCOMPARED = ("device", "data_dir", "keep_models")
#: The order of the parts of a cell id.
ID_ORDER = ("model", "pruner", "sparsity", "finetune", "calib", "nsamples", "seqlen", "seed", "epochs", "lr",
            "batch_size")


# ----------------------------------------------------------------------------- config parsing


def _yaml_loader() -> type:
    """PyYAML's safe loader without YAML 1.1's base-60 numbers, so that ``2:4`` stays the string "2:4"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    resolvers = {}
    for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items():
        resolvers[first] = [(tag, rx) for tag, rx in entries
                            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    Loader.yaml_implicit_resolvers = resolvers
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                                 list("-+0123456789"))
    Loader.add_implicit_resolver(  # YAML 1.2 floats: 1e-3 is a number too
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return Loader


def read_config(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep config not found: {path}; check the path")
    import yaml

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text file; give a YAML sweep config") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping with the keys grid and fixed; got {type(data).__name__}")
    return data


def _coerce(kind: str, value: Any, where: str) -> Any:
    """``value`` as ``kind``; a one-line error that names ``where`` (e.g. ``grid.lr``) otherwise."""
    if kind == "str":
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise UsageError(f"{where} must be a non-empty string; got {value!r}")
    if kind in ("int", "optint"):
        if value is None and kind == "optint":
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be a whole number; got {value!r}")
    if kind in ("float", "optfloat"):
        if value is None and kind == "optfloat":
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UsageError(f"{where} must be a number; got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be true or false; got {value!r}")
    if kind == "strlist":
        if value is None:
            return None
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) and v.strip() for v in items):
            return [v.strip() for v in items]
        raise UsageError(f"{where} must be a list of names (or one comma-separated string); got {value!r}")
    if kind == "sparsity":
        if isinstance(value, str):
            if ":" in value:
                try:
                    nm = parse_nm(value.strip())
                except UsageError as exc:
                    raise UsageError(f"{where}: {exc}") from None
                return f"{nm[0]}:{nm[1]}"  # type: ignore[index]
            try:
                value = float(value)
            except ValueError:
                raise UsageError(f"{where} must be a fraction in [0, 1) or an N:M pattern such as \"2:4\"; "
                                 f"got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                PruneConfig(sparsity=float(value))
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
            return float(value)
        raise UsageError(f"{where} must be a fraction in [0, 1) or an N:M pattern such as \"2:4\"; got {value!r}")
    raise AssertionError(kind)


def _check_value(key: str, value: Any) -> None:
    """Validate one run setting on its own through the config dataclass that owns it."""
    if key == "pruner":
        PruneConfig(pruner=value)
    elif key == "calib":
        parse_source(value)
        CalibConfig(source=value)
    elif key in ("nsamples", "seqlen", "seed"):
        CalibConfig(**{key: value})
    elif key == "finetune":
        FinetuneConfig(method=value)
    elif key in TRAIN_KEYS:
        FinetuneConfig(**{key: value})
    elif key == "percdamp":
        PruneConfig(pruner="sparsegpt", percdamp=value)
    elif key == "compile":
        FinetuneConfig(compile=value)
    elif key in ("dsnot_cycles", "dsnot_threshold"):
        FinetuneConfig(method="dsnot", **{key: value})
    elif key == "device":
        RunConfig(model="-", device=value)


def _where_error(where: str, exc: UsageError) -> UsageError:
    return UsageError(f"{where}: {exc}")


@dataclass
class Cell:
    """One run of the grid: its id, its settings (what makes it this cell) and the RunConfig."""

    id: str
    settings: dict[str, Any]
    config: RunConfig

    @property
    def model(self) -> str:
        return self.settings["model"]


@dataclass
class Sweep:
    """A parsed, validated sweep: its cells in run order, the evaluation settings and the output folder."""

    source: str  # the config file, as given
    out: Path
    axes: dict[str, list[Any]]  # grid axes as written (normalised values)
    fixed: dict[str, Any]  # every run and evaluation setting that is not an axis, defaults included
    cells: list[Cell]
    eval: EvalConfig
    tasks: list[str] | None
    limit: int | None
    zeroshot_backend: str
    zeroshot_batch_size: int
    eval_dense: bool
    data_dir: Path | None
    keep_models: bool
    given: tuple[str, ...] = ()  # the keys the config's fixed section sets (the rest are defaults)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(cell.model for cell in self.cells))

    def cell_path(self, cell_id: str) -> Path:
        return self.out / "cells" / f"{cell_id}.json"

    def dense_id(self, model: str) -> str:
        return f"dense.{_slug_model(model)}"

    def dense_settings(self, model: str) -> dict[str, Any]:
        return {"model": model, **self.eval_settings()}

    def eval_settings(self) -> dict[str, Any]:
        return {"eval": list(self.eval.sources), "eval_seqlen": self.eval.seqlen, "max_windows": self.eval.max_windows,
                "tasks": self.tasks, "limit": self.limit}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-.") or "x"


def _slug_model(model: str) -> str:
    path = Path(model)
    if path.exists() or model.endswith(".gguf") or model.startswith((".", "/", "~")):
        return _slug(path.name)
    return _slug(model.replace("/", "--"))


def _slug_source(source: str) -> str:
    kind, _, rest = source.partition(":")
    if kind in ("text", "jsonl") and rest:
        return _slug(f"{kind}-{Path(rest).name}")
    return _slug(source)


def _id_part(key: str, value: Any) -> str:
    if key == "model":
        return _slug_model(value)
    if key == "sparsity":
        return value.replace(":", "of") if isinstance(value, str) else f"s{value * 100:g}"
    if key == "calib":
        return _slug_source(value)
    if key in ("pruner", "finetune"):
        return _slug(value)
    prefix = {"nsamples": "n", "seqlen": "len", "seed": "seed", "epochs": "e", "lr": "lr", "batch_size": "b"}
    if key in prefix:
        return f"{prefix[key]}{value:g}" if isinstance(value, float) else f"{prefix[key]}{value}"
    if isinstance(value, list):
        value = "+".join(value)
    return f"{key}-{_slug(str(value))}"


def cell_id(settings: dict[str, Any], axes: dict[str, list[Any]]) -> str:
    """A readable, stable id: model.pruner.sparsity.finetune.calib.n.len.seed[.e.lr.b][.other axes]."""
    parts = [_id_part(k, settings[k]) for k in ID_ORDER if k in settings]
    parts += [_id_part(k, settings[k]) for k in axes if k not in ID_ORDER and k in settings]
    return ".".join(parts)


def _run_config(settings: dict[str, Any], ev: EvalConfig, data_dir: Path | None) -> RunConfig:
    s = settings
    sparsity = s["sparsity"]
    nm = parse_nm(sparsity) if isinstance(sparsity, str) else None
    method_keys = [k for k, (owner, _) in ONLY_FOR.items() if owner == "finetune"]
    finetune_args = {k: s[k] for k in (*TRAIN_KEYS, *method_keys) if s.get(k) is not None}
    if "lora_targets" in finetune_args:
        finetune_args["lora_targets"] = tuple(finetune_args["lora_targets"])
    return RunConfig(
        model=s["model"],
        out=None,
        prune=PruneConfig(pruner=s["pruner"], sparsity=0.5 if nm else sparsity, nm=nm, percdamp=s.get("percdamp")),
        calib=CalibConfig(source=s["calib"], nsamples=s["nsamples"], seqlen=s["seqlen"], seed=s["seed"]),
        finetune=FinetuneConfig(method=s["finetune"], **finetune_args),
        eval=copy.deepcopy(ev),
        device=s["device"],
        data_dir=data_dir,
    )


def load_sweep(path: Path, out: Path | None = None, keep_models: bool | None = None) -> Sweep:
    """Parse and validate the sweep config at ``path`` (no model is loaded); ``out`` overrides its ``out``."""
    path = Path(path)
    data = read_config(path)
    name = str(path)
    for key in data:
        if key not in TOP_KEYS:
            raise UsageError(f"{name}: unknown key {key!r}; a sweep config has only: {', '.join(TOP_KEYS)}")
    grid = data.get("grid") or {}
    fixed_in = data.get("fixed") or {}
    for section, value in (("grid", grid), ("fixed", fixed_in)):
        if not isinstance(value, dict):
            raise UsageError(f"{name}: {section} must be a mapping of settings; got {type(value).__name__}")

    axes: dict[str, list[Any]] = {}
    for key, values in grid.items():
        where = f"{name}: grid.{key}"
        if key not in RUN_KEYS:
            hint = " (it can only be under fixed)" if key in FIXED_KEYS else f"; use one of: {', '.join(RUN_KEYS)}"
            raise UsageError(f"{where} is not a setting a grid can vary{hint}")
        if key in fixed_in:
            raise UsageError(f"{name}: {key} is both in grid and in fixed; keep one")
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise UsageError(f"{where} is empty; give at least one value")
        kind = RUN_KEYS[key][0]
        normalised = []
        for value in values:
            value = _coerce(kind, value, where)
            try:
                _check_value(key, value)
            except UsageError as exc:
                raise _where_error(where, exc) from None
            if value in normalised:
                raise UsageError(f"{where} lists {value!r} twice; give each value once")
            normalised.append(value)
        axes[key] = normalised

    fixed: dict[str, Any] = {}
    for key, value in fixed_in.items():
        where = f"{name}: fixed.{key}"
        if key in RUN_KEYS:
            kind = RUN_KEYS[key][0]
        elif key in FIXED_KEYS:
            kind = FIXED_KEYS[key][0]
        else:
            raise UsageError(f"{where} is not a setting; use one of: {', '.join([*RUN_KEYS, *FIXED_KEYS])}")
        if isinstance(value, list) and kind != "strlist":
            raise UsageError(f"{where} holds one value, not a list; to vary it, move it under grid")
        value = _coerce(kind, value, where)
        if key in RUN_KEYS:
            try:
                _check_value(key, value)
            except UsageError as exc:
                raise _where_error(where, exc) from None
        fixed[key] = value
    for key, (_, default) in {**RUN_KEYS, **FIXED_KEYS}.items():
        if key not in axes and key not in fixed:
            fixed[key] = default
    if "model" not in axes and fixed["model"] is None:
        raise UsageError(f"{name}: no model; set fixed.model (or grid.model to compare several)")

    for key in ("eval_seqlen", "max_windows", "limit", "zeroshot_batch_size"):
        if fixed[key] is not None and fixed[key] < 1:
            raise UsageError(f"{name}: fixed.{key} must be a positive whole number; got {fixed[key]}")
    try:
        ev = EvalConfig(sources=list(fixed["eval"] or []), seqlen=fixed["eval_seqlen"],
                        max_windows=fixed["max_windows"])
    except UsageError as exc:
        raise _where_error(f"{name}: fixed", exc) from None
    for source in ev.sources:
        try:
            parse_source(source)
        except UsageError as exc:
            raise _where_error(f"{name}: fixed.eval", exc) from None
    tasks = fixed["tasks"]
    if tasks is not None:
        from ebft.eval.zeroshot import BACKENDS, parse_tasks

        try:
            tasks = parse_tasks(tasks)
        except UsageError as exc:
            raise _where_error(f"{name}: fixed.tasks", exc) from None
        if fixed["zeroshot_backend"] not in BACKENDS:
            raise UsageError(f"{name}: fixed.zeroshot_backend {fixed['zeroshot_backend']!r} is unknown; choose one "
                             f"of: {', '.join(BACKENDS)}")
    if tasks is None and fixed_in.get("limit") is not None:
        raise UsageError(f"{name}: fixed.limit needs fixed.tasks (the zero-shot tasks it limits)")
    if not ev.sources and tasks is None:
        raise UsageError(f"{name}: nothing to measure; set fixed.eval (perplexity sources) and/or fixed.tasks")
    data_dir = Path(fixed["data_dir"]) if fixed["data_dir"] else None

    cells: list[Cell] = []
    seen: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*axes.values()):
        settings = {**{k: v for k, v in fixed.items() if k in RUN_KEYS}, **dict(zip(axes, combo))}
        for key in IGNORED_BY.get(settings["finetune"], ()):  # settings that change nothing: such cells collapse
            settings.pop(key, None)
        for key, (owner, value) in ONLY_FOR.items():
            if settings[owner] != value:
                settings.pop(key, None)
        ident = cell_id(settings, axes)
        if ident in seen:
            if _compared(seen[ident]) != _compared(settings):
                raise UsageError(f"{name}: two cells would share the id {ident}; give the models or sources "
                                 "distinct file names")
            continue
        try:
            config = _run_config(settings, ev, data_dir)
        except UsageError as exc:
            raise UsageError(f"{name}: cell {ident}: {exc}") from None
        seen[ident] = settings
        cells.append(Cell(ident, settings, config))
    order = {m: i for i, m in enumerate(dict.fromkeys(c.model for c in cells))}
    cells.sort(key=lambda c: order[c.model])  # one model at a time; the grid's order otherwise

    out_dir = Path(out) if out is not None else Path(data["out"]) if data.get("out") else Path("runs") / path.stem
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; choose a folder path")
    return Sweep(source=name, out=out_dir, axes=axes, fixed=fixed, cells=cells, eval=ev, tasks=tasks,
                 limit=fixed["limit"], zeroshot_backend=fixed["zeroshot_backend"],
                 zeroshot_batch_size=fixed["zeroshot_batch_size"], eval_dense=fixed["eval_dense"], data_dir=data_dir,
                 keep_models=fixed["keep_models"] if keep_models is None else keep_models, given=tuple(fixed_in))


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in UNCOMPARED}


# ----------------------------------------------------------------------------- cell files


def read_cell(path: Path) -> dict[str, Any] | None:
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
    return record


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    old, new = _compared(old), _compared(new)
    for key in sorted(old.keys() | new.keys()):
        # ONLY_FOR settings are absent from the cells that do not read them, and from records written
        # before the setting existed: absent means the default there
        unset = RUN_KEYS[key][1] if key in ONLY_FOR else "<unset>"
        if old.get(key, unset) != new.get(key, unset):
            return f"{key} was {old.get(key, unset)!r}, now {new.get(key, unset)!r}"
    return None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record, indent=1)


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
        diff = _settings_diff(record["settings"], settings)
        if diff is not None:
            raise UsageError(f"{sweep.cell_path(cell_id_)} was computed with other settings ({diff}); use another "
                             "--out, or delete that file to recompute it")
        plan.done.append(cell_id_)
    if sweep.eval_dense:
        for model in sweep.models:
            record = read_cell(sweep.cell_path(sweep.dense_id(model)))
            if record is not None:
                diff = _settings_diff(record["settings"], sweep.dense_settings(model))
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
    if sweep.tasks is not None and (plan.todo or plan.dense_todo):
        plan.backend = _zeroshot_backend(sweep)
    return plan


def _zeroshot_backend(sweep: Sweep) -> tuple[str, Any]:
    """The zero-shot back-end, chosen once; the local one's task files are checked now."""
    from ebft.eval.zeroshot import plan_local, select_backend

    backend, why = select_backend(sweep.zeroshot_backend)
    logger.info("zero-shot back-end: %s (%s)", backend, why)
    local = plan_local(sweep.tasks, sweep.data_dir) if backend == "local" else None  # type: ignore[arg-type]
    return backend, local


# ----------------------------------------------------------------------------- running


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
        key = (cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed)
        if key not in self.calib:
            self.calib[key] = calibration_windows(self.tokenizer, *key, data_dir=cfg.data_dir)
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


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


@dataclass
class SweepResult:
    out: Path
    cells: int
    computed: list[str]
    skipped: list[str]
    summary: Path
    others: list[str] = field(default_factory=list)  # cells another worker was computing (or finished meanwhile)


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


def run_sweep(sweep: Sweep, plan: Plan | None = None, on_cell: Callable[[str, dict[str, Any]], None] | None = None
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
    if backend is None and sweep.tasks is not None and (plan.todo or plan.dense_todo):
        backend = _zeroshot_backend(sweep)
    resident: _Resident | None = None
    computed: list[str] = []
    others: list[str] = []
    seconds: list[float] = []
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
            computed.append(cell.id)
            left = total - position
            eta = f"; about {_duration(statistics.mean(seconds) * left)} left for {left} cell(s)" if left else ""
            ppl = ", ".join(f"{s} {p:.2f}" for s, p in record["report"].get("eval", {}).items())
            zs = record.get("zeroshot")
            zs_text = f", zero-shot mean acc {zs['mean_acc']:.4f}" if zs else ""
            logger.info("cell %d/%d %s: %s%s in %s%s", position, total, cell.id, ppl or "done", zs_text,
                        _duration(seconds[-1]), eta)
            if on_cell is not None:
                on_cell(cell.id, record)
    resident = None
    summary = write_summary(sweep)
    return SweepResult(sweep.out, len(sweep.cells), computed, list(plan.done), summary, others)


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


def _device(sweep: Sweep) -> torch.device:
    """The device for the dense baseline: ``fixed.device`` (``auto`` when the grid varies it)."""
    return resolve_device(sweep.fixed.get("device") or "auto")


def _zeroshot(sweep: Sweep, resident: _Resident, backend: tuple[str, Any] | None,
              device: torch.device) -> dict[str, Any] | None:
    if sweep.tasks is None or backend is None:
        return None
    from ebft.eval.zeroshot import evaluate_harness, evaluate_local

    name, local = backend
    if name == "harness":
        result = evaluate_harness(resident.model, resident.tokenizer, sweep.tasks, limit=sweep.limit,
                                  batch_size=sweep.zeroshot_batch_size, device=device)
    else:
        result = evaluate_local(resident.model, resident.tokenizer, local.run, data_dir=sweep.data_dir,
                                limit=sweep.limit, batch_size=sweep.zeroshot_batch_size, device=device)
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
    record: dict[str, Any] = {
        "format": FORMAT,
        "id": sweep.dense_id(resident.model_spec),
        "kind": "dense",
        "settings": sweep.dense_settings(resident.model_spec),
        "report": {"eval": {s: r["perplexity"] for s, r in details.items()}, "eval_details": details},
    }
    zs = _zeroshot(sweep, resident, backend, device)
    if zs is not None:
        record["zeroshot"] = zs
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = time.process_time() - cpu_start  # unlike wall time, holds on a shared machine
    _write_record(sweep.cell_path(record["id"]), record)
    ppl = ", ".join(f"{s} {p:.2f}" for s, p in record["report"]["eval"].items())
    logger.info("dense %s: %s%s in %s", resident.model_spec, ppl,
                f", zero-shot mean acc {zs['mean_acc']:.4f}" if zs else "", _duration(record["seconds"]))


def _run_cell(sweep: Sweep, cell: Cell, resident: _Resident, backend: tuple[str, Any] | None) -> dict[str, Any]:
    """Restore the dense weights, run the cell, evaluate it, (keep its model,) write its record."""
    start, cpu_start = time.perf_counter(), time.process_time()
    resident.restore()
    cfg = cell.config
    windows = (resident.calibration(cfg), resident.evaluation(cfg.eval, cfg.data_dir))
    logger.info("cell %s: %s %s, finetune %s, calibration %d x %d of %s (seed %d)", cell.id, cfg.prune.pruner,
                cfg.prune.label, cfg.finetune.method, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.source,
                cfg.calib.seed)
    report = run_prune(cfg, model_and_tokenizer=(resident.model, resident.tokenizer), windows=windows)
    record: dict[str, Any] = {
        "format": FORMAT,
        "id": cell.id,
        "kind": "cell",
        "settings": {**cell.settings, **sweep.eval_settings()},
        "report": report,
    }
    zs = _zeroshot(sweep, resident, backend, resolve_device(cfg.device))
    if zs is not None:
        record["zeroshot"] = zs
    if sweep.keep_models:
        from ebft.export import save_model

        with atomic_dir(sweep.out / "models" / cell.id, overwrite=True) as tmp:
            save_model(resident.model, resident.tokenizer, tmp)
        record["model_dir"] = (Path("models") / cell.id).as_posix()
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = time.process_time() - cpu_start  # unlike wall time, holds on a shared machine
    _write_record(sweep.cell_path(cell.id), record)  # the cell counts as finished from here on
    _cell_plots(sweep, cell.id, record)
    return record


def _cell_plots(sweep: Sweep, cell_id_: str, record: dict[str, Any]) -> dict[str, Path]:
    report = record["report"]
    if report.get("config", {}).get("finetune", {}).get("method", "none") == "none":
        return {}
    return run_plots(report.get("blocks", []), report.get("lora"), sweep.out / "plots" / "cells", f"{cell_id_}.",
                     cell_id_)


# ----------------------------------------------------------------------------- summary


def _records(sweep: Sweep) -> tuple[list[tuple[Cell, dict[str, Any]]], dict[str, dict[str, Any]]]:
    cells = [(c, r) for c in sweep.cells if (r := read_cell(sweep.cell_path(c.id))) is not None]
    dense = {m: r for m in sweep.models if (r := read_cell(sweep.cell_path(sweep.dense_id(m)))) is not None}
    return cells, dense


def _value_label(key: str, value: Any) -> str:
    if key == "sparsity":
        return value if isinstance(value, str) else sparsity_label({"sparsity": value})
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sparsity_sort(value: Any) -> tuple[int, float]:
    if isinstance(value, str):
        n, m = parse_nm(value)  # type: ignore[misc]
        return (1, m + n / m)
    return (0, float(value))


def _mean_text(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return fmt(values[0])
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return fmt(statistics.mean(values))
    return f"{statistics.mean(finite):.2f} ± {statistics.stdev(finite):.2f} (n={len(finite)})"


def _varying(sweep: Sweep, exclude: tuple[str, ...]) -> list[str]:
    return [k for k, v in sweep.axes.items() if len(v) > 1 and k not in exclude]


def _ppl_tables(page: Page, sweep: Sweep, cells: list[tuple[Cell, dict[str, Any]]],
                dense: dict[str, dict[str, Any]]) -> None:
    methods = list(dict.fromkeys(c.settings["finetune"] for c, _ in cells))
    row_keys = [k for k in ("model", "pruner", "sparsity") if k != "model" or len(sweep.models) > 1]
    row_keys += _varying(sweep, ("model", "pruner", "sparsity", "finetune", "seed"))

    def untrained(key: tuple, method: str) -> tuple:  # where a method's cell sits: the settings it ignores are unset
        ignored = IGNORED_BY.get(method, ())
        return tuple(None if k in ignored else v for k, v in zip(row_keys, key))

    for source in sweep.eval.sources:
        page.heading(f"Perplexity on `{source}`", 3)
        notes = [f"{'Dense' if len(sweep.models) < 2 else 'Dense ' + model}: **{fmt(r['report']['eval'][source])}**"
                 for model, r in dense.items() if r["report"]["eval"].get(source) is not None]
        if len(sweep.axes.get("seed", [])) > 1:
            notes.append("mean ± standard deviation over seeds")
        if notes:
            page.para("; ".join(notes) + ".")
        groups: dict[tuple, dict[str, list[float]]] = {}
        for cell, record in cells:
            key = tuple(cell.settings.get(k) for k in row_keys)
            value = record["report"].get("eval", {}).get(source)
            groups.setdefault(key, {}).setdefault(cell.settings["finetune"], []).append(value)
        # a row whose methods all sit in another row (their ignored settings unset) merges into that row
        keys = sorted((k for k, by in groups.items()
                       if not any(t != k and all(untrained(t, m) == k for m in by) for t in groups)),
                      key=lambda k: _row_order(sweep, row_keys, k))
        rows = []
        for key in keys:
            row = [_value_label(k, v) for k, v in zip(row_keys, key)]
            values = [_mean_text(groups.get(untrained(key, m), {}).get(m, [])) for m in methods]
            rows.append(row + values)
        page.table([k.replace("_", " ") for k in row_keys] + methods, rows)


def _row_order(sweep: Sweep, row_keys: list[str], key: tuple) -> tuple:
    """Rows in the grid's order of each axis (sparsity ascending, N:M patterns last)."""
    out = []
    for name, value in zip(row_keys, key):
        if name == "sparsity":
            out.append(_sparsity_sort(value))
        elif name in sweep.axes and value in sweep.axes[name]:
            out.append((0, sweep.axes[name].index(value)))
        else:
            out.append((1, 0) if value is None else (0, -1))
    return tuple(out)


def _calib_table(page: Page, sweep: Sweep, cells: list[tuple[Cell, dict[str, Any]]]) -> None:
    sizes = sweep.axes.get("nsamples", [])
    if len(sizes) < 2:
        return
    page.heading("Calibration samples", 3)
    page.para(f"Perplexity against the number of calibration windows of {sweep.fixed.get('seqlen', '?')} tokens "
              "(`nsamples`).")
    row_keys = [k for k in ("model", "pruner", "sparsity", "finetune") if k != "model" or len(sweep.models) > 1]
    row_keys += _varying(sweep, ("model", "pruner", "sparsity", "finetune", "seed", "nsamples"))
    for source in sweep.eval.sources:
        groups: dict[tuple, dict[int, list[float]]] = {}
        for cell, record in cells:
            key = tuple(cell.settings.get(k) for k in row_keys)
            groups.setdefault(key, {}).setdefault(cell.settings["nsamples"], []).append(
                record["report"].get("eval", {}).get(source))
        rows = [[_value_label(k, v) for k, v in zip(row_keys, key)] +
                [_mean_text(groups[key].get(n, [])) for n in sorted(sizes)] for key in groups]
        page.para(f"`{source}`:")
        page.table([k.replace("_", " ") for k in row_keys] + [str(n) for n in sorted(sizes)], rows)


def _zeroshot_table(page: Page, sweep: Sweep, cells: list[tuple[Cell, dict[str, Any]]],
                    dense: dict[str, dict[str, Any]]) -> None:
    from ebft.eval.zeroshot import mean_acc_stderr

    entries = [(["dense", "", ""] if len(sweep.models) < 2 else [f"dense {m}", "", ""], r["zeroshot"])
               for m, r in dense.items() if r.get("zeroshot")]
    extra = _varying(sweep, ("pruner", "sparsity", "finetune"))
    for cell, record in cells:
        if record.get("zeroshot"):
            label = [cell.settings["pruner"], _value_label("sparsity", cell.settings["sparsity"]),
                     cell.settings["finetune"]]
            if extra:
                label[2] += " (" + ", ".join(f"{k} {_value_label(k, cell.settings.get(k))}" for k in extra) + ")"
            entries.append((label, record["zeroshot"]))
    if not entries:
        return
    tasks = list(dict.fromkeys(t for _, zs in entries for t in zs["tasks"]))
    page.heading("Zero-shot accuracy", 3)
    first = entries[0][1]
    limit = first.get("limit")
    page.para(f"`acc` per task ({first.get('backend')} back-end, "
              f"{'first ' + str(limit) + ' examples per task' if limit else 'all examples'}); mean: unweighted "
              "mean over the tasks; s.e.: its standard error (each task's `sqrt(acc (1 - acc) / (n - 1))`, "
              "combined as independent).")
    rows = []
    for label, zs in entries:
        stderr = mean_acc_stderr(zs["tasks"])  # from acc and n, so that older records get it too
        rows.append(label + [fmt(100 * zs["tasks"][t]["acc"]) if t in zs["tasks"] else "" for t in tasks]
                    + [fmt(100 * zs["mean_acc"]), fmt(100 * stderr) if stderr is not None else ""])
    page.table(["pruner", "sparsity", "finetune", *tasks, "mean", "s.e."], rows)


def _cells_table(page: Page, sweep: Sweep, cells: list[tuple[Cell, dict[str, Any]]]) -> None:
    page.heading("Cells", 2)
    finished = {c.id for c, _ in cells}
    missing = [c.id for c in sweep.cells if c.id not in finished]
    listed = ", ".join(f"`{m}`" for m in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    page.para(f"{len(finished)} of {len(sweep.cells)} cells finished" +
              (f"; not run yet: {listed}." if missing else ".") +
              " Each cell's settings and full report are in `cells/<cell>.json`.")
    rows = []
    for cell, record in cells:
        report = record["report"]
        blocks = report.get("blocks", [])
        tuned = cell.settings["finetune"] != "none"
        improved = f"{sum(b['final_loss'] < b['init_loss'] for b in blocks)}/{len(blocks)}" if tuned else ""
        restored = sum(1 for b in blocks if b.get("restored")) if tuned else ""
        timings = report.get("timings", {})
        links = []
        for kind, suffix in (("blocks", "blocks.png"), ("curves", "loss_curves.png")):
            path = sweep.out / "plots" / "cells" / f"{cell.id}.{suffix}"
            if path.exists():
                links.append(f"[{kind}]({path.relative_to(sweep.out).as_posix()})")
        rows.append([f"`{cell.id}`"] + [fmt(report.get("eval", {}).get(s)) for s in sweep.eval.sources] +
                    [improved, str(restored), fmt(timings.get("prune_finetune"), 0), fmt(record.get("seconds"), 0),
                     fmt(record.get("cpu_seconds"), 0), " ".join(links)])
    page.table(["cell", *sweep.eval.sources, "blocks improved", "restored", "prune+tune s", "cell s", "cell CPU s",
                "plots"], rows)


def _line_points(sweep: Sweep, cells: list[tuple[Cell, dict[str, Any]]], source: str, model: str,
                 along: str) -> Iterator[tuple[str, Cell, float]]:
    """``(line label, cell, perplexity)`` for each cell of ``model`` with a finite ``source`` perplexity,
    for a plot along the axis ``along``: the label is the pruner, `` + METHOD`` unless the method is
    none, and the cell's other varying settings."""
    varying = _varying(sweep, ("model", "pruner", along, "finetune", "seed"))
    for cell, record in cells:
        value = record["report"].get("eval", {}).get(source)
        if cell.model != model or value is None or not math.isfinite(value):
            continue
        method = cell.settings["finetune"]
        label = cell.settings["pruner"] + ("" if method == "none" else f" + {method}")
        extra = [k for k in varying if cell.settings.get(k) is not None]
        if extra:
            label += " (" + ", ".join(f"{k} {_value_label(k, cell.settings.get(k))}" for k in extra) + ")"
        yield label, cell, value


def _summary_plots(sweep: Sweep, cells: list[tuple[Cell, dict[str, Any]]],
                   dense: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    made: list[tuple[str, str]] = []
    folder = sweep.out / "plots"
    multi_model = len(sweep.models) > 1
    for source in sweep.eval.sources:
        for model in sweep.models:
            series: dict[str, list[tuple[float, float, str | None]]] = {}
            for label, cell, value in _line_points(sweep, cells, source, model, "sparsity"):
                sparsity = cell.settings["sparsity"]
                nm = sparsity if isinstance(sparsity, str) else None
                x = cell.config.prune.sparsity
                series.setdefault(label, []).append((x, value, nm))
            if not series or len({x for pts in series.values() for x, _, _ in pts}) < 2:
                continue
            dense_value = dense.get(model, {}).get("report", {}).get("eval", {}).get(source)
            stem = f"ppl_vs_sparsity.{_slug_source(source)}" + (f".{_slug_model(model)}" if multi_model else "")
            path = plots.perplexity_vs_sparsity(series, dense_value, folder / f"{stem}.png",
                                                f"{model}: perplexity on {source}")
            if path is not None:
                made.append((path.relative_to(sweep.out).as_posix(), f"perplexity vs sparsity on {source}"))
    if len(sweep.axes.get("nsamples", [])) > 1:
        made += _nsamples_plots(sweep, cells, dense)
    tuned = {c.id: r["report"].get("blocks", []) for c, r in cells if c.settings["finetune"] != "none"}
    if tuned:
        path = plots.loss_ratio_by_block(tuned, folder / "block_loss_ratio.png",
                                         "reconstruction loss after / before tuning, per block")
        if path is not None:
            made.append((path.relative_to(sweep.out).as_posix(), "final / init reconstruction loss per block"))
    for cell, record in cells:  # per-cell plots that an earlier run could not draw (no matplotlib then)
        if cell.settings["finetune"] != "none" and not (folder / "cells" / f"{cell.id}.blocks.png").exists():
            _cell_plots(sweep, cell.id, record)
    return made


def _nsamples_plots(sweep: Sweep, cells: list[tuple[Cell, dict[str, Any]]],
                    dense: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Perplexity against the number of calibration windows, per eval source and model."""
    made: list[tuple[str, str]] = []
    multi_model = len(sweep.models) > 1
    for source in sweep.eval.sources:
        for model in sweep.models:
            series: dict[str, list[tuple[int, float]]] = {}
            for label, cell, value in _line_points(sweep, cells, source, model, "nsamples"):
                series.setdefault(label, []).append((cell.settings["nsamples"], value))
            if not any(len(points) > 1 for points in series.values()):
                continue
            dense_value = dense.get(model, {}).get("report", {}).get("eval", {}).get(source)
            stem = f"ppl_vs_nsamples.{_slug_source(source)}" + (f".{_slug_model(model)}" if multi_model else "")
            path = plots.perplexity_vs_nsamples(series, dense_value, sweep.fixed.get("seqlen"), sweep.out / "plots" /
                                                f"{stem}.png", f"{model}: perplexity on {source}")
            if path is not None:
                made.append((path.relative_to(sweep.out).as_posix(), f"perplexity vs calibration windows on {source}"))
    return made


def build_summary(sweep: Sweep) -> Page:
    """The summary page from the cell files that exist (plots are drawn as a side effect)."""
    cells, dense = _records(sweep)
    page = Page(f"Sweep: {Path(sweep.source).name}")
    settings = ", ".join(f"{k} {_value_label(k, v)}" for k, v in sweep.fixed.items()
                         if k in RUN_KEYS and k in sweep.given and v is not None and k not in UNCOMPARED)
    axes = "; ".join(f"{k}: {', '.join(_value_label(k, v) for v in vs)}" for k, vs in sweep.axes.items())
    page.bullets([
        f"Config: `{sweep.source}`; {len(sweep.cells)} cells ({len(cells)} finished).",
        f"Grid: {axes or 'no axes'}.",
        f"Fixed: {settings or 'defaults'} (every other setting at the `ebft prune` default).",
        "Evaluation: " + (", ".join(f"`{s}`" for s in sweep.eval.sources) or "none") +
        f", windows of {sweep.eval.seqlen}" + (f", first {sweep.eval.max_windows}" if sweep.eval.max_windows else "")
        + (f"; zero-shot tasks {', '.join(sweep.tasks)}" + (f" (limit {sweep.limit})" if sweep.limit else "")
           if sweep.tasks else "") + ".",
        "`finetune none` cells ignore the training settings; their rows hold pruning alone." +
        (" `dsnot` cells read only `batch_size` and `holdout_fraction` of them."
         if any(c.settings["finetune"] == "dsnot" for c in sweep.cells) else ""),
    ])
    images = _summary_plots(sweep, cells, dense)
    page.heading("Results", 2)
    if sweep.eval.sources:
        _ppl_tables(page, sweep, cells, dense)
        _calib_table(page, sweep, cells)
    _zeroshot_table(page, sweep, cells, dense)
    if images:
        page.heading("Plots", 2)
        for path, alt in images:
            page.image(path, alt)
    _cells_table(page, sweep, cells)
    return page


def write_summary(sweep: Sweep) -> Path:
    """Write ``OUT/summary.md`` (atomically) and the plots; returns the summary's path."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    path = write_text(sweep.out / "summary.md", build_summary(sweep).to_markdown())
    logger.info("wrote %s", path)
    return path


def describe(sweep: Sweep, plan: Plan) -> list[str]:
    """One line per cell: its id and whether it is finished (for ``--dry-run``)."""
    done = set(plan.done)
    lines = [f"{'done' if c.id in done else 'todo'}  {c.id}" for c in sweep.cells]
    lines += [f"todo  {sweep.dense_id(m)}" for m in plan.dense_todo]
    return lines


__all__ = ["Cell", "FIXED_KEYS", "Plan", "RUN_KEYS", "Sweep", "SweepResult", "build_summary", "cell_id",
           "check_sweep", "describe", "load_sweep", "plan_sweep", "read_cell", "read_config", "run_sweep",
           "write_summary"]
