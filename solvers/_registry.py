"""Method names -> solver classes.

``register(name)`` decorates a solver class (duplicates refused); ``get(method, **options)``
builds one.  Names are case-sensitive and lower-case; an unknown name is a ValueError that
lists :func:`available_methods` with the closest matches, and an unknown option is a
TypeError naming it and the valid options (never a warning).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

__all__ = ["register", "get", "available_methods"]

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator registering a solver under ``name``."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def option_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []


def get(method: Any, **options: Any):
    """A solver instance from a registered name and options, or ``method`` itself if it is
    already a solver instance (then no options may be given)."""
    from .base import Solver

    if isinstance(method, Solver):
        if options:
            raise TypeError(f"options {sorted(options)} given with a solver instance; set them on the instance")
        return method
    if isinstance(method, type) and issubclass(method, Solver):
        cls = method
    elif isinstance(method, str):
        if method not in _REGISTRY:
            close = difflib.get_close_matches(method.lower(), list(_REGISTRY), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "."
            raise ValueError(f"unknown method {method!r}{hint} Valid methods (lower-case): "
                             f"{', '.join(available_methods())}")
        cls = _REGISTRY[method]
    else:
        raise TypeError(f"method must be a method name or a Solver, got {type(method).__name__}")
    valid = option_names(cls)
    for key in options:
        if key not in valid:
            raise TypeError(
                f"unexpected option {key!r} for method {cls.name!r}; valid options: {', '.join(valid) or 'none'}"
            )
    return cls(**options)
