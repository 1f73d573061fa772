"""The aligner registry, filled from the entry-point group ``simtomo.aligners``.

An aligner package declares, in its ``pyproject.toml``::

    [project.entry-points."simtomo.aligners"]
    myaligner = "mypackage.module:MyAligner"

``MyAligner`` is a class with a ``name``, a ``Params`` dataclass (every field
with a default and a docstring line in the class docstring) and
``MyAligner(params).align(observation) -> AlignmentResult``. simtomo's own
aligners register the same way, so simtomo never imports a concrete aligner.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from importlib.metadata import entry_points
from typing import Any

from simtomo.errors import ConfigError

__all__ = ["GROUP", "available", "get", "aligner_class", "parse_param", "describe"]

GROUP = "simtomo.aligners"


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available() -> list[str]:
    """Names of the registered aligners, sorted."""
    return sorted(_entry_points())


def aligner_class(name: str) -> type:
    """The class registered under ``name``; a clear error for an unknown name or a broken plug-in."""
    eps = _entry_points()
    if name not in eps:
        close = difflib.get_close_matches(name, eps, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown aligner {name!r}{hint}; registered: {', '.join(sorted(eps)) or 'none'}")
    try:
        cls = eps[name].load()
    except Exception as exc:  # a third-party plug-in may fail in any way on import
        raise ConfigError(f"aligner {name!r}: cannot load {eps[name].value}: {type(exc).__name__}: {exc}") from exc
    if not (hasattr(cls, "Params") and dataclasses.is_dataclass(cls.Params) and hasattr(cls, "align")):
        raise ConfigError(f"aligner {name!r} ({eps[name].value}) lacks a Params dataclass or an align method")
    return cls


def _field_types(params_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(params_cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(params_cls)}


def parse_param(name: str, text: str, kind: Any) -> Any:
    """Convert a ``key=value`` string from the command line to the field's type."""
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if text.lower() in ("none", "null", ""):
            return None
        return parse_param(name, text, args[0])
    if origin in (tuple, list):
        inner = args[0] if args else float
        return tuple(parse_param(name, part, inner) for part in text.split(",") if part.strip())
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"parameter {name}: expected {kind.__name__}, got {text!r}") from None
    return text


def _params(cls: type, values: dict[str, Any]) -> Any:
    types = _field_types(cls.Params)
    unknown = sorted(set(values) - set(types))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, types, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"aligner {cls.name!r}: unknown parameter {', '.join(hints)}; known: {', '.join(types)}")
    parsed = {k: parse_param(k, v, types[k]) if isinstance(v, str) and types[k] is not str else v for k, v in values.items()}
    try:
        return cls.Params(**parsed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"aligner {cls.name!r}: {exc}") from exc


def get(name: str, **params: Any) -> Any:
    """An aligner instance: ``get("fiducial", n_beads=20).align(observation)``.

    Parameter values may be given as strings (from a command line); they are
    converted to the types of the aligner's ``Params`` fields.
    """
    cls = aligner_class(name)
    return cls(_params(cls, params))


def describe(name: str) -> str:
    """One line per parameter: ``name = default`` and its help from the Params docstring."""
    cls = aligner_class(name)
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"{name}: {doc[0] if doc else ''}"]
    helps = _param_help(cls.Params)
    for f in dataclasses.fields(cls.Params):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"    {f.name} = {default!r}" + (f"  {helps[f.name]}" if f.name in helps else ""))
    return "\n".join(lines)


def _param_help(params_cls: type) -> dict[str, str]:
    """Help per field from a numpy-style ``Parameters`` section of the docstring."""
    helps: dict[str, str] = {}
    current = None
    for line in (params_cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        head = stripped.split(":")[0].strip()
        if " : " in stripped and head.isidentifier():
            current = head
            continue
        if current and current not in helps:
            helps[current] = stripped
    return helps
