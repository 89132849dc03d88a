"""A sweep config: its YAML, its keys (generated from the settings schema), its cells and their ids.

The keys a grid may vary are every ``ebft prune`` setting (:func:`ebft.settings.all_settings`, the
methods' options included) plus ``model``; ``sparsity`` also takes an ``"N:M"`` pattern. The keys
only ``fixed`` takes say how cells are evaluated (:class:`SweepOptions` and the settings marked
``sweep="fixed"``). A cell keeps only the settings it reads: a method's options only in that
method's cells, the training settings only in the cells of methods that read them, the pruner and
its sparsity not in structured cells, so cells that differ in nothing they read are one cell.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebft.config import EvalConfig, RunConfig, parse_nm
from ebft.errors import UsageError
from ebft.finetune import reads
from ebft.presets import preset_values
from ebft.settings import Setting, all_settings, build_run_config, coerce, fields_settings, plain, setting

TOP_KEYS = ("grid", "fixed", "out")
#: Settings that do not change a cell's numbers: not compared when an existing cell file is reused.
UNCOMPARED = ("device", "data_dir", "keep_models", "offload")
#: The order of the parts of a cell id.
ID_ORDER = ("model", "pruner", "sparsity", "finetune", "calib", "nsamples", "seqlen", "seed", "epochs", "lr",
            "batch_size")
#: Settings that a structured cell does not read (it removes whole heads and channels instead).
NOT_STRUCTURED = ("pruner", "sparsity", "nm", "allocation")


@dataclass
class SweepOptions:
    """The settings only a sweep has: how its cells are evaluated and kept (``fixed:`` only)."""

    eval_dense: bool = setting(True, sweep="fixed", help="evaluate the dense model once, as the baseline row")
    tasks: list[str] | None = setting(None, kind="names", sweep="fixed",
                                      help="zero-shot tasks for every cell (and the dense model)")
    limit: int | None = setting(None, kind="int", sweep="fixed", help="zero-shot: the first N examples of each task")
    zeroshot_backend: str = setting("auto", sweep="fixed", help="zero-shot back-end: auto, harness or local")
    zeroshot_batch_size: int = setting(8, sweep="fixed", help="zero-shot: sequences per forward pass")
    keep_models: bool = setting(False, sweep="fixed", help="save each cell's model under OUT/models/")


def run_keys() -> dict[str, Setting]:
    """The keys a grid may vary (and ``fixed`` may set): ``model`` and every ``ebft prune`` setting."""
    return {k: s for k, s in all_settings().items() if s.sweep == "axis"}


def fixed_keys() -> dict[str, Setting]:
    """The keys only ``fixed`` takes: evaluation and bookkeeping."""
    keys = {k: s for k, s in all_settings().items() if s.sweep == "fixed"}
    keys.update({s.key: s for s in _sweep_settings()})
    return keys


def _sweep_settings() -> list[Setting]:
    return list(fields_settings(SweepOptions, ()))


# ----------------------------------------------------------------------------- YAML


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


def _coerce(key: str, s: Setting, value: Any, where: str) -> Any:
    """A YAML value for ``key``; ``sparsity`` also takes an N:M pattern (kept as the string "N:M")."""
    if key == "sparsity" and isinstance(value, str):
        if ":" in value:
            try:
                n, m = parse_nm(value.strip())  # type: ignore[misc]
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
            return f"{n}:{m}"
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"{where} must be a fraction in [0, 1) or an N:M pattern such as \"2:4\"; "
                             f"got {value!r}") from None
    if key == "sparsity" and isinstance(value, bool):
        raise UsageError(f"{where} must be a fraction in [0, 1) or an N:M pattern such as \"2:4\"; got {value!r}")
    return coerce(s, value, where)


def run_values(settings: dict[str, Any]) -> dict[str, Any]:
    """A cell's settings as :func:`ebft.settings.build_run_config` takes them (``sparsity: "2:4"`` -> ``nm``)."""
    values = {k: v for k, v in settings.items() if k != "model"}
    sparsity = values.get("sparsity")
    if isinstance(sparsity, str):
        del values["sparsity"]
        values["nm"] = sparsity
    return values


def _check_value(key: str, s: Setting, value: Any) -> None:
    """Validate one run setting on its own through the config dataclass that owns it."""
    if key == "model":
        return
    values = run_values({key: value})
    if s.owner is not None:
        values[s.owner[0]] = s.owner[1]
    build_run_config(values, model="-")


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
    axes: dict[str, list[Any]]  # grid axes as written (normalised values), over every grid
    fixed: dict[str, Any]  # every run and evaluation setting that is not an axis, defaults included
    cells: list[Cell]
    eval: EvalConfig
    options: SweepOptions
    data_dir: Path | None
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
                "tasks": self.options.tasks, "limit": self.options.limit}


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
        value = "+".join(map(str, value))
    return f"{key}-{_slug(str(value))}"


def cell_id(settings: dict[str, Any], axes: dict[str, list[Any]]) -> str:
    """A readable, stable id: model.pruner.sparsity.finetune.calib.n.len.seed[.e.lr.b][.other axes]."""
    parts = [_id_part(k, settings[k]) for k in ID_ORDER if k in settings]
    parts += [_id_part(k, settings[k]) for k in axes if k not in ID_ORDER and k in settings]
    return ".".join(parts)


def read_settings(settings: dict[str, Any], keys: dict[str, Setting]) -> dict[str, Any]:
    """``settings`` less what the cell does not read: other methods' options, training settings its method
    ignores, and the pruner's settings in a structured cell."""
    structured = settings.get("structured") is not None
    ignored = ignored_by(settings["finetune"])
    out = {}
    for key, value in settings.items():
        s = keys.get(key)
        if key in ignored or (s is not None and s.owner is not None and settings.get(s.owner[0]) != s.owner[1]):
            continue
        if structured and (key in NOT_STRUCTURED or (s is not None and s.owner is not None
                                                     and s.owner[0] in ("pruner", "allocation"))):
            continue
        if not structured and key == "structured_score":
            continue
        out[key] = value
    return out


def ignored_by(method: str) -> frozenset[str]:
    """The training settings ``method`` does not read: in its cells they are unset."""
    method_reads = reads(method)
    if method_reads is None:
        return frozenset()
    return frozenset(k for k, s in all_settings().items() if s.training and k not in method_reads)


def _cell_config(settings: dict[str, Any], ev: EvalConfig, data_dir: Path | None) -> RunConfig:
    cfg = build_run_config(run_values(settings), model=settings["model"], data_dir=data_dir)
    cfg.eval = copy.deepcopy(ev)
    return cfg


def _grids(name: str, grid: Any) -> list[dict[str, Any]]:
    """``grid`` as a list of grids: a mapping is one, a list of mappings their union."""
    grids = grid if isinstance(grid, list) else [grid or {}]
    if not grids or not all(isinstance(g, dict) for g in grids):
        raise UsageError(f"{name}: grid must be a mapping of settings, or a list of such mappings; "
                         f"got {type(grid).__name__}")
    return grids


def load_sweep(path: Path, out: Path | None = None, keep_models: bool | None = None) -> Sweep:
    """Parse and validate the sweep config at ``path`` (no model is loaded); ``out`` overrides its ``out``.

    ``grid`` is a mapping of axes, or a list of them: then the cells are the union of each grid's.
    """
    path = Path(path)
    data = read_config(path)
    name = str(path)
    for key in data:
        if key not in TOP_KEYS:
            raise UsageError(f"{name}: unknown key {key!r}; a sweep config has only: {', '.join(TOP_KEYS)}")
    grids = _grids(name, data.get("grid"))
    fixed_in = data.get("fixed") or {}
    if not isinstance(fixed_in, dict):
        raise UsageError(f"{name}: fixed must be a mapping of settings; got {type(fixed_in).__name__}")
    keys, only_fixed = run_keys(), fixed_keys()

    every_grid: list[dict[str, list[Any]]] = []
    for number, grid in enumerate(grids):
        axes: dict[str, list[Any]] = {}
        for key, values in grid.items():
            where = f"{name}: grid.{key}" if len(grids) == 1 else f"{name}: grid[{number}].{key}"
            if key not in keys:
                hint = " (it can only be under fixed)" if key in only_fixed else f"; use one of: {', '.join(keys)}"
                raise UsageError(f"{where} is not a setting a grid can vary{hint}")
            if key in fixed_in:
                raise UsageError(f"{name}: {key} is both in grid and in fixed; keep one")
            if not isinstance(values, list):
                values = [values]
            if not values:
                raise UsageError(f"{where} is empty; give at least one value")
            normalised = []
            for value in values:
                value = _coerce(key, keys[key], value, where)
                try:
                    _check_value(key, keys[key], value)
                except UsageError as exc:
                    raise UsageError(f"{where}: {exc}") from None
                if value in normalised:
                    raise UsageError(f"{where} lists {value!r} twice; give each value once")
                normalised.append(value)
            axes[key] = normalised
        every_grid.append(axes)
    union: dict[str, list[Any]] = {}
    for axes in every_grid:
        for key, values in axes.items():
            union.setdefault(key, [])
            union[key] += [v for v in values if v not in union[key]]

    fixed: dict[str, Any] = {}
    for key, value in fixed_in.items():
        where = f"{name}: fixed.{key}"
        if key not in keys and key not in only_fixed:
            raise UsageError(f"{where} is not a setting; use one of: {', '.join([*keys, *only_fixed])}")
        s = keys.get(key) or only_fixed[key]
        if isinstance(value, list) and s.kind not in ("names", "floats"):
            raise UsageError(f"{where} holds one value, not a list; to vary it, move it under grid")
        value = _coerce(key, s, value, where)
        if key in keys:
            try:
                _check_value(key, s, value)
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
        fixed[key] = value
    for key, s in {**keys, **only_fixed}.items():
        if key not in union and key not in fixed:
            fixed[key] = plain(s.default)
    if "model" not in union and fixed["model"] is None:
        raise UsageError(f"{name}: no model; set fixed.model (or grid.model to compare several)")

    for key in ("eval_seqlen", "max_windows", "limit", "zeroshot_batch_size"):
        if fixed[key] is not None and fixed[key] < 1:
            raise UsageError(f"{name}: fixed.{key} must be a positive whole number; got {fixed[key]}")
    try:
        ev = EvalConfig(sources=list(fixed["eval"] or []), seqlen=fixed["eval_seqlen"],
                        max_windows=fixed["max_windows"])
    except UsageError as exc:
        raise UsageError(f"{name}: fixed.eval: {exc}") from None
    options = SweepOptions(**{f.name: fixed[f.name] for f in dataclasses.fields(SweepOptions)})
    if options.tasks is not None:
        from ebft.eval.zeroshot import BACKENDS, parse_tasks

        try:
            options.tasks = parse_tasks(options.tasks)
        except UsageError as exc:
            raise UsageError(f"{name}: fixed.tasks: {exc}") from None
        if options.zeroshot_backend not in BACKENDS:
            raise UsageError(f"{name}: fixed.zeroshot_backend {options.zeroshot_backend!r} is unknown; choose one "
                             f"of: {', '.join(BACKENDS)}")
    if options.tasks is None and fixed_in.get("limit") is not None:
        raise UsageError(f"{name}: fixed.limit needs fixed.tasks (the zero-shot tasks it limits)")
    if not ev.sources and options.tasks is None:
        raise UsageError(f"{name}: nothing to measure; set fixed.eval (perplexity sources) and/or fixed.tasks")
    if keep_models is not None:
        options.keep_models = keep_models
    data_dir = Path(fixed["data_dir"]) if fixed["data_dir"] else None

    cells: list[Cell] = []
    seen: dict[str, dict[str, Any]] = {}
    for axes in every_grid:
        for combo in itertools.product(*axes.values()):
            settings = {**{k: v for k, v in fixed.items() if k in keys}, **dict(zip(axes, combo))}
            for key in union:  # an axis of another grid only: this grid's cells take the fixed value or default
                settings.setdefault(key, plain(keys[key].default))
            if settings.get("preset") is not None:  # the preset's values, where neither fixed nor this grid sets them
                given = {*fixed_in, *axes}
                settings.update({k: plain(v) for k, v in preset_values(settings["preset"], given,
                                                                       settings.get("finetune") if "finetune" in given
                                                                       else None).items()})
            settings = read_settings(settings, keys)  # what the cell does not read changes nothing: cells collapse
            ident = cell_id(settings, union)
            if ident in seen:
                if _compared(seen[ident]) != _compared(settings):
                    raise UsageError(f"{name}: two cells would share the id {ident}; give the models or sources "
                                     "distinct file names")
                continue
            try:
                config = _cell_config(settings, ev, data_dir)
            except UsageError as exc:
                raise UsageError(f"{name}: cell {ident}: {exc}") from None
            seen[ident] = settings
            cells.append(Cell(ident, settings, config))
    order = {m: i for i, m in enumerate(dict.fromkeys(c.model for c in cells))}
    cells.sort(key=lambda c: order[c.model])  # one model at a time; the grid's order otherwise

    out_dir = Path(out) if out is not None else Path(data["out"]) if data.get("out") else Path("runs") / path.stem
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; choose a folder path")
    return Sweep(source=name, out=out_dir, axes=union, fixed=fixed, cells=cells, eval=ev, options=options,
                 data_dir=data_dir, given=tuple(fixed_in))


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in UNCOMPARED}


def default_of(key: str) -> Any:
    """The default of a run key (what an absent key in an older cell record means)."""
    s = run_keys().get(key) or fixed_keys().get(key)
    return None if s is None else plain(s.default)


__all__ = ["Cell", "Sweep", "SweepOptions", "cell_id", "fixed_keys", "load_sweep", "read_config", "run_keys"]
