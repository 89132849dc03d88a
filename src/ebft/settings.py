"""The settings schema: each run setting is one dataclass field, declared once with its default and help.

The sections of :class:`ebft.config.RunConfig` (``prune``, ``calib``, ``finetune``, ``eval`` and the
top-level fields) declare their fields with :func:`setting`. Each pruner and fine-tuner declares the
options only it reads as a dataclass of its own, registered with it (``@register_pruner("sparsegpt",
options=SparseGPTOptions)``); those fields become settings owned by that method. A calibration source
can own options the same way (``generated``: ``--gen-temperature`` and the like). From this one
schema come:

- the ``ebft prune`` flags (:func:`add_flags`), with ``(default: ...)`` taken from the field;
- the keys of an ``ebft sweep`` config (a setting's key is its flag without ``--``, ``-`` as ``_``);
- the resume check (:func:`config_diff`), which names the flag of the first setting that differs;
- the settings table in ``docs/settings.md`` (:func:`markdown_table`).

A run's settings can be written flat, ``{key: value}``, which is what the command line and a sweep
cell give: :func:`build_run_config` turns that into a validated ``RunConfig`` and refuses a method's
option given to another method, and :func:`flat_values` reads it back from a config or a report.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any

from ebft.errors import UsageError

#: How a setting's values are written: on the command line, in YAML and in report.json.
KINDS = ("str", "int", "float", "bool", "nm", "names", "floats")


def setting(default: Any = MISSING, *, help: str, key: str | None = None, flag: str | None = None,
            kind: str | None = None, default_factory: Any = MISSING, cli: bool = True, sweep: str | None = "axis",
            compared: bool = True, training: bool = False, repeat: bool = False, metavar: str | None = None,
            choices: Callable[[], Iterable[str]] | None = None) -> Any:
    """A dataclass field that is a run setting.

    ``key`` (default: the field name, prefixed by its method for method options) names it in sweeps
    and, as ``--key-with-dashes`` unless ``flag`` says otherwise, on the command line. ``kind`` is
    inferred from the default when that is a plain value. ``sweep``: ``"axis"`` (a grid may vary it),
    ``"fixed"`` (only under ``fixed:``) or ``None`` (not a sweep key). ``compared=False``: the setting
    does not change the pruned model, so ``--resume`` accepts another value. ``training``: one of the
    common training settings that a repair method may or may not read (see ``reads`` on the tuners).
    ``repeat``: the flag may be given several times, each adding a value. ``choices()`` lists the
    accepted values (called when help is shown, so that registries are complete by then).
    """
    if kind is None:
        kind = "str" if default is MISSING else _infer_kind(default)
    if kind not in KINDS:
        raise ValueError(f"setting kind {kind!r} is not one of {KINDS}")
    metadata = {"setting": True, "help": help, "key": key, "flag": flag, "kind": kind, "cli": cli, "sweep": sweep,
                "compared": compared, "training": training, "repeat": repeat, "metavar": metavar,
                "choices": choices}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(factory: Any) -> Any:
    """A dataclass field holding a nested section of settings (``RunConfig.prune`` and so on)."""
    return field(default_factory=factory, metadata={"section": True})


def options_field() -> Any:
    """``PruneConfig.options`` / ``FinetuneConfig.options``: the selected method's options dataclass."""
    return field(default=None, metadata={"options": True})


def _infer_kind(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "str"
    raise ValueError(f"give the kind of a setting whose default is {default!r}")


@dataclass(frozen=True)
class Setting:
    """One setting of the schema, wherever it is declared."""

    key: str  # sweep key, and the flag's stem
    path: tuple[str, ...]  # attribute path in a RunConfig (or its to_dict()): ("finetune", "lr")
    kind: str
    default: Any
    help: str
    flag: str
    cli: bool
    sweep: str | None
    compared: bool
    training: bool
    repeat: bool
    metavar: str | None
    choices: Callable[[], Iterable[str]] | None = None
    owner: tuple[str, str] | None = None  # (selector key, method): read only when that key has that value

    @property
    def optional(self) -> bool:
        return self.default is None

    def default_text(self) -> str:
        """The default as a user would type it."""
        return show(self, self.default)

    def full_help(self) -> str:
        """The help text with the accepted values, if they are listed."""
        text = self.help if self.choices is None else f"{self.help}; one of: {', '.join(self.choices())}"
        return text if self.owner is None else f"{self.owner[1]}: {text}"

    @property
    def group(self) -> str:
        """The heading this setting's flag is listed under in ``--help``."""
        if self.owner is not None:
            return f"--{self.owner[0]} {self.owner[1]} options"
        return _GROUPS.get(self.path[0], "run")


_GROUPS = {"prune": "pruning", "calib": "calibration", "finetune": "repair (training settings the methods share)",
           "eval": "evaluation"}


def show(s: Setting, value: Any) -> str:
    """``value`` of setting ``s`` as a user would type it on the command line."""
    if value is None:
        return "none"
    if s.kind == "bool":
        return "on" if value else "off"
    if s.kind == "nm":
        return f"{value[0]}:{value[1]}"
    if s.kind in ("names", "floats"):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def fields_settings(cls: type, path: tuple[str, ...], owner: tuple[str, str] | None = None,
                    prefix: str = "") -> Iterator[Setting]:
    """The settings declared by dataclass ``cls`` (sections recursively), at ``path`` inside a config."""
    for f in dataclasses.fields(cls):
        md = f.metadata
        if md.get("section"):
            yield from fields_settings(f.default_factory, (*path, f.name))  # type: ignore[arg-type]
            continue
        if not md.get("setting"):
            continue
        key = md["key"] or prefix + f.name
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None  # a required field (the model)
        yield Setting(key=key, path=(*path, f.name), kind=md["kind"], default=default, help=md["help"],
                      flag=md["flag"] or "--" + key.replace("_", "-"), cli=md["cli"], sweep=md["sweep"],
                      compared=md["compared"], training=md["training"], repeat=md["repeat"], metavar=md["metavar"],
                      choices=md["choices"], owner=owner)


def method_slug(name: str) -> str:
    """``ebft-mask`` -> ``ebft_mask``: a method name as the prefix of its options' keys."""
    return name.replace("-", "_")


def all_settings() -> dict[str, Setting]:
    """Every setting by key: the RunConfig sections, then each registered pruner's and fine-tuner's options.

    Computed afresh on each call, so that a method registered later (a new file imported) appears.
    """
    from ebft.config import RunConfig

    out: dict[str, Setting] = {}

    def add(s: Setting) -> None:
        if s.key in out:
            raise ValueError(f"two settings share the key {s.key!r}: {'.'.join(out[s.key].path)} and "
                             f"{'.'.join(s.path)}; give one of them another key")
        out[s.key] = s

    for s in fields_settings(RunConfig, ()):
        add(s)
    for selector, registry, path in selectors():
        for name, cls in registry.items():
            options = getattr(cls, "Options", None) if cls is not None else None
            if options is None:
                continue
            for s in fields_settings(options, path, owner=(selector, name), prefix=method_slug(name) + "_"):
                add(s)
    return out


def selectors() -> tuple[tuple[str, dict[str, Any], tuple[str, ...]], ...]:
    """``(key, registry, options path)`` of each setting that picks a method (or a calibration source) with options
    of its own."""
    from ebft.allocation import ALLOCATIONS
    from ebft.data import SOURCES
    from ebft.finetune import FINETUNERS
    from ebft.pruners import PRUNERS

    return (("pruner", PRUNERS, ("prune", "options")), ("allocation", ALLOCATIONS, ("prune", "allocation_options")),
            ("calib", SOURCES, ("calib", "options")), ("finetune", FINETUNERS, ("finetune", "options")))


# ----------------------------------------------------------------------------- values


def _get(data: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        data = data.get(name) if isinstance(data, Mapping) else getattr(data, name, None)
        if data is None:
            return None
    return data


def plain(value: Any) -> Any:
    """Tuples as lists and paths as strings: the form a value has in JSON."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def flat_values(config: Any, settings: Mapping[str, Setting] | None = None) -> dict[str, Any]:
    """``{key: value}`` of every setting that applies to ``config`` (a RunConfig or its ``to_dict()``).

    A method's options appear only when that method is the one selected.
    """
    settings = all_settings() if settings is None else settings
    selected = {key: _get(config, settings[key].path) for key, _, _ in selectors()}
    out = {}
    for key, s in settings.items():
        if s.owner is not None and selected.get(s.owner[0]) != s.owner[1]:
            continue
        out[key] = plain(_get(config, s.path))
    return out


def config_diff(old: Any, new: Any) -> str | None:
    """The first compared setting that differs between two configs, as ``--flag was X, now Y``; else None."""
    settings = all_settings()
    before, after = flat_values(old, settings), flat_values(new, settings)
    for key, s in settings.items():
        if not s.compared or (key not in before and key not in after):
            continue
        if before.get(key, "<unset>") != after.get(key, "<unset>"):
            return f"{s.flag} was {_shown(s, before, key)}, now {_shown(s, after, key)}"
    return None


def options_label(config: Any, selector: str = "finetune") -> str:
    """The selected method's options that differ from their defaults, as the flags that give them, e.g.
    ``--kd-lr 0.0001, --kd-epochs 2`` (``config``: a RunConfig or its ``to_dict()``); empty if none do."""
    settings = all_settings()
    method = _get(config, settings[selector].path)
    return ", ".join(f"{s.flag} {show(s, value)}" for s in settings.values()
                     if s.owner == (selector, method)
                     and plain(value := _get(config, s.path)) != plain(s.default))


def _shown(s: Setting, values: dict[str, Any], key: str) -> str:
    if key not in values:
        return "<unset>"
    value = values[key]
    return show(s, value) if s.kind in ("nm", "names", "floats", "bool") or value is None else repr(value)


def build_run_config(values: Mapping[str, Any], **fixed: Any) -> Any:
    """A validated RunConfig from flat ``{key: value}`` settings (those not given take their defaults).

    ``fixed`` are RunConfig fields given directly (``model``, ``out``). A method's option given while
    another method is selected is refused with the message the command line shows.
    """
    from ebft.config import RunConfig, check_combinations

    settings = all_settings()
    unknown = [k for k in values if k not in settings or k == "model"]
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(settings)}")
    check_combinations({k for k, v in values.items() if v is not None}, values.get("pruner"))
    from ebft.presets import apply_preset

    values = apply_preset(values, {key: s.owner for key, s in settings.items()})
    selected = {key: values.get(key, settings[key].default) for key, _, _ in selectors()}
    tree: dict[str, Any] = {}
    for key, value in values.items():
        s = settings[key]
        if s.owner is not None and selected[s.owner[0]] != s.owner[1]:
            raise UsageError(f"{s.flag} applies only to --{s.owner[0]} {s.owner[1]}, not "
                             f"{selected[s.owner[0]]}; drop it")
        node = tree
        for name in s.path[:-1]:
            node = node.setdefault(name, {})
        node[s.path[-1]] = value
    sections = {}
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("section"):
            sections[f.name] = f.default_factory(**tree.pop(f.name, {}))  # type: ignore[misc]
    return RunConfig(**fixed, **sections, **tree)


# ----------------------------------------------------------------------------- the command line


def parse_cli(s: Setting, text: str) -> Any:
    """One command-line value of setting ``s`` (argparse calls this as the flag's ``type``)."""
    if s.kind == "int":
        return int(text)
    if s.kind == "float":
        return float(text)
    if s.kind == "names":
        return tuple(t.strip() for t in text.split(","))
    if s.kind == "floats":
        return tuple(float(t) for t in text.split(","))
    return text  # str, and nm (parsed, with its own messages, by the config)


def add_flags(parser: Any, settings: Iterable[Setting], with_defaults: bool = False) -> None:
    """Add an argparse flag for each setting. Every flag's default is None, so that the given flags are
    known (:func:`given_values`), unless ``with_defaults``: then it is the setting's default."""
    groups: dict[str, Any] = {}
    for s in settings:
        if not s.cli:
            continue
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(s.group) if hasattr(parser, "add_argument_group") else parser
        default = "" if s.kind == "bool" else f" (default: {s.default_text()})"
        kwargs: dict[str, Any] = {"dest": s.key, "default": s.default if with_defaults else None,
                                  "help": s.full_help().replace("%", "%%") + default}
        if s.kind == "bool":  # on/off; a setting that is on by default gets --no-... too
            kwargs["action"] = argparse.BooleanOptionalAction if s.default else "store_true"
        else:
            kwargs["type"] = _argparse_type(s)
            kwargs["metavar"] = s.metavar or s.key.upper()
            if s.repeat:
                kwargs["action"] = "append"
        groups[s.group].add_argument(s.flag, **kwargs)


def _argparse_type(s: Setting) -> Any:
    def convert(text: str) -> Any:
        return parse_cli(s, text)

    convert.__name__ = {"int": "int", "float": "float", "floats": "numbers"}.get(s.kind, "value")
    return convert


def given_values(namespace: Any, settings: Iterable[Setting]) -> dict[str, Any]:
    """The settings a parsed command line gave, as flat ``{key: value}``."""
    out = {}
    for s in settings:
        if s.cli and getattr(namespace, s.key, None) is not None:
            value = getattr(namespace, s.key)
            if s.repeat and s.kind == "names":  # each --eval adds one name
                value = [v for part in value for v in (part if isinstance(part, tuple) else (part,))]
            out[s.key] = value
    return out


# ----------------------------------------------------------------------------- YAML values


def coerce(s: Setting, value: Any, where: str) -> Any:
    """A value of setting ``s`` read from YAML (or JSON), in the form the config takes; a one-line error naming
    ``where`` (e.g. ``grid.lr``) otherwise."""
    if value is None:
        if s.optional:
            return None
        raise UsageError(f"{where} needs a value; it has no 'none'")
    kind = s.kind
    if kind == "str" or kind == "nm":
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise UsageError(f"{where} must be a non-empty string; got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be a whole number; got {value!r}")
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"{where} must be a number; got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where} must be true or false; got {value!r}")
    if kind == "names":
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) and v.strip() for v in items):
            return [v.strip() for v in items]
        raise UsageError(f"{where} must be a list of names (or one comma-separated string); got {value!r}")
    if kind == "floats":
        items = value.split(",") if isinstance(value, str) else value
        try:
            return [float(v) for v in items]
        except (TypeError, ValueError):
            raise UsageError(f"{where} must be a list of numbers; got {value!r}") from None
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- docs


def markdown_table(settings: Mapping[str, Setting] | None = None) -> str:
    """The settings as Markdown: one table for the run, one per method with options."""
    settings = all_settings() if settings is None else settings

    def row(s: Setting) -> str:
        sweep = {"axis": "grid or fixed", "fixed": "fixed", None: "-"}[s.sweep]
        resume = "yes" if s.compared else "no"
        flag = f"`{s.flag}`" if s.cli else "-"
        text = s.full_help().replace("|", "\\|")
        return f"| {flag} | `{s.key}` | {s.default_text()} | {text} | {sweep} | {resume} |"

    header = ["| flag | sweep key | default | meaning | in a sweep | --resume compares |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines = ["## Run settings", "", *header]
    lines += [row(s) for s in settings.values() if s.owner is None]
    owners = list(dict.fromkeys(s.owner for s in settings.values() if s.owner is not None))
    for owner in owners:
        lines += ["", f"## `--{owner[0]} {owner[1]}` options", "", *header]
        lines += [row(s) for s in settings.values() if s.owner == owner]
    return "\n".join(lines) + "\n"


def check_finite(value: Any, flag: str, what: str, *, low: float | None = None, low_open: bool = False,
                 high: float | None = None, high_open: bool = True) -> None:
    """Refuse ``value`` unless it is a real number within the bounds; ``what`` ends the message."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise UsageError(f"{flag} must be {what}; got {value!r}")


def settings_doc() -> str:
    """The text of ``docs/settings.md``: the run's settings, each method's options, a sweep's own settings."""
    from ebft.sweep.schema import SweepOptions

    rows = ["| sweep key | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{s.key}` | {s.default_text()} | {s.help} |" for s in fields_settings(SweepOptions, ())]
    sweep = "\n## A sweep's own settings (`fixed:` only)\n\n" + "\n".join(rows) + "\n"
    return _DOC_HEAD + markdown_table() + sweep


def main() -> None:
    """``python -m ebft.settings``: print ``docs/settings.md``."""
    print(settings_doc(), end="")


_DOC_HEAD = """# Settings

Every setting of `ebft prune`, generated from the dataclasses that declare them
(`python -m ebft.settings > docs/settings.md`; a test checks that this file is current).

- **flag**: the `ebft prune` flag; **sweep key**: its name in an `ebft sweep` config;
- **in a sweep**: whether a `grid:` may vary it, or only `fixed:` may set it;
- **--resume compares**: whether `--resume` refuses a run whose value differs (the others do not change the
  pruned model).

A method's options (the tables after the first) apply only when that method is chosen: given with another
method, they are refused.

"""


if __name__ == "__main__":
    main()
