"""Registries by name (pruners, fine-tuners), each entry with the dataclass of the options only it reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ebft.errors import UsageError


def registrar(registry: dict[str, Any], what: str, bases: tuple[type, ...]) -> Callable[..., Callable[[type], type]]:
    """The ``@register_<what>(name, options=None)`` decorator of ``registry``, for subclasses of ``bases``."""

    def register(name: str, options: type | None = None) -> Callable[[type], type]:
        def decorate(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, bases)):
                kinds = " or ".join(b.__name__ for b in bases)
                raise TypeError(f"@register_{what}({name!r}) must decorate a {kinds} subclass")
            if registry.get(name, cls) is not cls:
                raise ValueError(f"a {what} named {name!r} is already registered ({registry[name].__qualname__})")
            if options is not None and not dataclasses.is_dataclass(options):
                raise TypeError(f"@register_{what}({name!r}): options must be a dataclass")
            cls.name = name
            cls.Options = options
            registry[name] = cls
            return cls

        return decorate

    return register


def resolve_options(registry: dict[str, Any], flag: str, name: str, options: Any) -> Any:
    """The options of ``registry[name]`` as its dataclass (from None, a dict or an instance).

    A one-line error if ``name`` is unknown, or the options belong to another method or name a field
    that its dataclass lacks.
    """
    if name not in registry:
        raise UsageError(f"{flag} {name!r} is unknown; choose one of: {', '.join(sorted(registry))}")
    cls = getattr(registry[name], "Options", None)
    if cls is None:
        if options not in (None, {}):
            raise UsageError(f"{flag} {name} takes no options; got {options!r}")
        return None
    if options is None:
        return cls()
    if isinstance(options, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"{flag} {name} has no option {unknown[0]!r}; its options: {', '.join(sorted(known))}")
        return cls(**options)
    if not isinstance(options, cls):
        raise UsageError(f"{flag} {name} takes {cls.__name__} options, not {type(options).__name__}")
    return options
