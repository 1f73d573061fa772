"""Geometry files, ``*.geometry.json`` (DESIGN.md section 3).

Column-oriented, one list entry per view in the stack's view order::

    {"format": "simtomo.geometry/1", "image_shape": [h, w], "pixel_size_A": 8.0,
     "tilt_deg": [...], "rot_deg": [...], "mag": [...], "shift_px": [[tx, ty], ...]}

Angles in degrees, shifts in pixels, conventions as :class:`simtomo.geometry.Geometry`.
Floats are written with ``repr`` (Python's ``json``), so a write followed by a
read gives back bit-identical arrays. Other top-level keys are allowed and
ignored by :func:`read_geometry` (truth files are geometry files with more keys).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from simtomo.errors import ConfigError, FileFormatError
from simtomo.geometry import Geometry

__all__ = [
    "GEOMETRY_FORMAT",
    "GEOMETRY_KEYS",
    "geometry_to_dict",
    "geometry_from_dict",
    "write_geometry",
    "read_geometry",
]

logger = logging.getLogger(__name__)

#: Value of the ``format`` key of geometry (and truth) files.
GEOMETRY_FORMAT = "simtomo.geometry/1"
#: Keys every geometry file holds, in the order they are written.
GEOMETRY_KEYS = ("format", "image_shape", "pixel_size_A", "tilt_deg", "rot_deg", "mag", "shift_px")


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------


def geometry_to_dict(geometry: Geometry) -> dict[str, Any]:
    """The JSON document of a geometry (plain Python lists, ints and floats).

    Parameters
    ----------
    geometry : Geometry
        Per-view parameters in the stack's view order (DESIGN.md section 3).

    Returns
    -------
    dict
        The schema keys in :data:`GEOMETRY_KEYS` order.
    """
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry: expected a simtomo.geometry.Geometry, got {type(geometry).__name__}")
    h, w = geometry.image_shape
    return {
        "format": GEOMETRY_FORMAT,
        "image_shape": [int(h), int(w)],
        "pixel_size_A": float(geometry.pixel_size_A),
        # tolist() yields Python floats, which json writes with repr: exact.
        "tilt_deg": geometry.tilt_deg.tolist(),
        "rot_deg": geometry.rot_deg.tolist(),
        "mag": geometry.mag.tolist(),
        "shift_px": geometry.shift_px.tolist(),
    }


def geometry_from_dict(data: Any, *, source: str) -> Geometry:
    """Validate a parsed geometry document and build the :class:`Geometry`.

    Parameters
    ----------
    data : object
        The parsed JSON document.
    source : str
        Where it came from (a file path), used as the prefix of every message.

    Returns
    -------
    Geometry

    Raises
    ------
    FileFormatError
        If the top level is not an object, ``format`` is missing or not
        ``"simtomo.geometry/1"``, keys are missing (all are listed), or any
        value is malformed: lists of unequal length (each named with its
        length and tilt_deg's), shift_px entries that are not pairs,
        non-numeric, NaN or infinite entries, image_shape not two positive
        integers, pixel_size_A or mag not positive.
    """
    _check_document(data, source, GEOMETRY_KEYS, kind="geometry")
    problems: list[str] = []
    fields = _geometry_fields(data, problems)
    _raise_problems(source, problems)
    return _build_geometry(fields, source)


def write_geometry(path: str | os.PathLike, geometry: Geometry, **extra: Any) -> None:
    """Write a geometry file, atomically.

    Parameters
    ----------
    path : path-like
        Target file (conventionally ``NAME.geometry.json``), replaced if it exists.
    geometry : Geometry
        The geometry, in the stack's view order.
    **extra
        Further top-level keys written after the schema keys (e.g. the aligner's
        name and settings). Values must be JSON values: str, int, float
        (finite), bool, None, lists and dicts with str keys.

    Raises
    ------
    ValueError
        If an extra key collides with a schema key or a value is not a finite
        JSON value (its location is named).
    """
    document = geometry_to_dict(geometry)
    clash = sorted(set(extra) & set(document))
    if clash:
        raise ValueError(f"write_geometry: extra keys {clash} collide with the geometry schema keys")
    for key, value in extra.items():
        _check_json_value(value, key)
    document.update(extra)
    _write_text_atomic(path, _dumps_document(document))


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Read a geometry file (a truth file also works: it yields the true geometry).

    Parameters
    ----------
    path : path-like
        A ``*.geometry.json`` or ``*.truth.json`` file.

    Returns
    -------
    Geometry

    Raises
    ------
    FileFormatError
        If the file is missing or not valid JSON (line and column given), or
        for any problem listed in :func:`geometry_from_dict`; every message
        starts with the file path and names the key.
    """
    name = os.fspath(path)
    return geometry_from_dict(_load_json(name), source=name)


# ----------------------------------------------------------------------------
# helpers shared with simtomo.io.truth
# ----------------------------------------------------------------------------


class _DuplicateKey(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; a hand-edited file with a
    # key twice is ambiguous, so it is refused.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _load_json(name: str) -> Any:
    """Parse a JSON file, turning every failure into a FileFormatError naming the file."""
    if not os.path.exists(name):
        raise FileFormatError(f"{name}: no such file, expected a JSON file")
    if os.path.isdir(name):
        raise FileFormatError(f"{name}: is a directory, expected a JSON file")
    try:
        raw = Path(name).read_bytes()
    except OSError as err:
        raise FileFormatError(f"{name}: cannot read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{name}: not UTF-8 text (byte {err.start}), expected a JSON file") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{name}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except _DuplicateKey as err:
        raise FileFormatError(f"{name}: key {err.args[0]!r} appears twice in one JSON object, expected once") from None
    except RecursionError:
        raise FileFormatError(f"{name}: invalid JSON: nested too deeply") from None


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _show(value: Any) -> str:
    """A value as it appears in the file, cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_document(data: Any, source: str, required: tuple[str, ...], *, kind: str) -> None:
    """Top level an object, the right ``format``, no missing keys."""
    if not isinstance(data, dict):
        raise FileFormatError(f"{source}: top level is {_json_type(data)}, expected a JSON object ({kind} file)")
    if "format" in data and data["format"] != GEOMETRY_FORMAT:
        raise FileFormatError(
            f"{source}: key 'format': found {_show(data['format'])}, expected {json.dumps(GEOMETRY_FORMAT)}"
        )
    missing = [k for k in required if k not in data]
    if missing:
        hint = f' (expected "format": {json.dumps(GEOMETRY_FORMAT)})' if "format" in missing else ""
        raise FileFormatError(
            f"{source}: missing keys {', '.join(repr(k) for k in missing)} of a {kind} file{hint}"
        )


def _raise_problems(source: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise FileFormatError(f"{source}: {problems[0]}")
    if problems:
        raise FileFormatError(f"{source}: {len(problems)} problems: " + "; ".join(problems))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad_number(value: Any) -> str | None:
    """Why a JSON value is not a finite number, or None if it is one."""
    if not _is_number(value):
        return f"{_show(value)} ({_json_type(value)}), expected a number"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{_show(value)}, expected a finite number"
    return None


def _number_list(
    data: Mapping[str, Any], key: str, problems: list[str], *, n: int | None = None, positive: bool = False
) -> np.ndarray | None:
    """A list of finite numbers as float64, or None after recording what is wrong."""
    value = data[key]
    if not isinstance(value, list):
        problems.append(f"key {key!r}: found {_json_type(value)} {_show(value)}, expected a list of numbers")
        return None
    ok = _check_length(key, value, n, problems)
    for i, item in enumerate(value):
        why = _bad_number(item)
        if why is None and positive and not item > 0:
            why = f"{_show(item)}, expected a positive number"
        if why is not None:
            problems.append(f"key {key!r}: entry {i} is {why}")
            return None
    return np.array(value, dtype=float).reshape(len(value)) if ok else None


def _check_length(key: str, value: list, n: int | None, problems: list[str]) -> bool:
    if n is not None and len(value) != n:
        problems.append(f"key {key!r}: {len(value)} entries, but 'tilt_deg' has {n} (expected one per view)")
        return False
    return True


def _row_list(
    data: Mapping[str, Any], key: str, problems: list[str], *, width: int, what: str, n: int | None = None
) -> np.ndarray | None:
    """A list of length-``width`` lists of finite numbers as an (m, width) float64 array."""
    value = data[key]
    if not isinstance(value, list):
        problems.append(f"key {key!r}: found {_json_type(value)} {_show(value)}, expected a list of {what}")
        return None
    ok = _check_length(key, value, n, problems)
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != width:
            found = f"a list of {len(row)}" if isinstance(row, list) else _json_type(row)
            problems.append(f"key {key!r}: entry {i} is {found} {_show(row)}, expected {what[:-1]}")
            return None
        for j, item in enumerate(row):
            why = _bad_number(item)
            if why is not None:
                problems.append(f"key {key!r}: entry {i}[{j}] is {why}")
                return None
    return np.array(value, dtype=float).reshape(len(value), width) if ok else None


def _geometry_fields(data: Mapping[str, Any], problems: list[str]) -> dict[str, Any] | None:
    """Check the geometry keys, recording every problem; the Geometry arguments if none."""
    before = len(problems)
    shape = data["image_shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    ):
        problems.append(f"key 'image_shape': found {_show(shape)}, expected [h, w], two positive integers")
    pixel = data["pixel_size_A"]
    why = _bad_number(pixel)
    if why is None and not pixel > 0:
        why = f"{_show(pixel)}, expected a positive number"
    if why is not None:
        problems.append(f"key 'pixel_size_A': found {why} of Å")
    tilt = _number_list(data, "tilt_deg", problems)
    n = None
    if tilt is not None:
        n = tilt.shape[0]
        if n == 0:
            problems.append("key 'tilt_deg': empty list, expected one tilt angle per view")
            n = None
    rot = _number_list(data, "rot_deg", problems, n=n)
    mag = _number_list(data, "mag", problems, n=n, positive=True)
    shift = _row_list(data, "shift_px", problems, width=2, what="[tx, ty] pairs", n=n)
    if len(problems) > before:
        return None
    return dict(
        tilt_deg=tilt,
        rot_deg=rot,
        mag=mag,
        shift_px=shift,
        image_shape=tuple(shape),
        pixel_size_A=float(pixel),
    )


def _build_geometry(fields: dict[str, Any] | None, source: str) -> Geometry:
    if fields is None:  # pragma: no cover - callers raise their problems first
        raise FileFormatError(f"{source}: invalid geometry")
    try:
        return Geometry(**fields)
    except ConfigError as err:
        # Geometry re-checks what _geometry_fields checked; reaching this means
        # the two disagree, but the message must still name the file.
        raise FileFormatError(f"{source}: {err}") from err


def _check_json_value(value: Any, where: str) -> None:
    """Refuse what json would write lossily or not at all, naming its location."""
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number; JSON cannot hold it")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is {type(key).__name__}, expected str (JSON keys are strings)")
            _check_json_value(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where}: {type(value).__name__} {_show(value)} is not a JSON value "
        "(expected str, int, float, bool, None, list or dict; convert numpy values with .tolist())"
    )


def _dumps_document(document: Mapping[str, Any]) -> str:
    """One top-level key per line; lists kept on their line, objects indented."""
    lines = []
    for key, value in document.items():
        if isinstance(value, dict) and value:
            text = json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n  ")
        else:
            text = json.dumps(value, allow_nan=False)
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            # On disk before the rename, so a crash leaves either the old file
            # or the complete new one.
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    logger.debug("wrote %s", target)
