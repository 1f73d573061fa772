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

import json
import os
from collections.abc import Mapping
from typing import Any

from simtomo.errors import ConfigError, FileFormatError
from simtomo.geometry import Geometry
from simtomo.io._json import (
    bad_number,
    check_json_value,
    dumps_document,
    is_int,
    json_type,
    load_json,
    number_list,
    raise_problems,
    row_list,
    show,
    write_text_atomic,
)

__all__ = [
    "GEOMETRY_FORMAT",
    "GEOMETRY_KEYS",
    "geometry_to_dict",
    "geometry_from_dict",
    "write_geometry",
    "read_geometry",
]

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
    raise_problems(source, problems)
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
        check_json_value(value, key)
    document.update(extra)
    write_text_atomic(path, dumps_document(document))


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
    return geometry_from_dict(load_json(name), source=name)


# ----------------------------------------------------------------------------
# the geometry schema, shared with simtomo.io.truth
# ----------------------------------------------------------------------------


def _check_document(data: Any, source: str, required: tuple[str, ...], *, kind: str) -> None:
    """Top level an object, the right ``format``, no missing keys."""
    if not isinstance(data, dict):
        raise FileFormatError(f"{source}: top level is {json_type(data)}, expected a JSON object ({kind} file)")
    if "format" in data and data["format"] != GEOMETRY_FORMAT:
        raise FileFormatError(
            f"{source}: key 'format': found {show(data['format'])}, expected {json.dumps(GEOMETRY_FORMAT)}"
        )
    missing = [k for k in required if k not in data]
    if missing:
        hint = f' (expected "format": {json.dumps(GEOMETRY_FORMAT)})' if "format" in missing else ""
        raise FileFormatError(
            f"{source}: missing keys {', '.join(repr(k) for k in missing)} of a {kind} file{hint}"
        )


def _geometry_fields(data: Mapping[str, Any], problems: list[str]) -> dict[str, Any] | None:
    """Check the geometry keys, recording every problem; the Geometry arguments if none."""
    before = len(problems)
    shape = data["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(v) and v > 0 for v in shape)):
        problems.append(f"key 'image_shape': found {show(shape)}, expected [h, w], two positive integers")
    pixel = data["pixel_size_A"]
    why = bad_number(pixel, positive=True)
    if why is not None:
        problems.append(f"key 'pixel_size_A': found {why} of Å")
    tilt = number_list(data, "tilt_deg", problems)
    n = None
    if tilt is not None:
        n = tilt.shape[0]
        if n == 0:
            problems.append("key 'tilt_deg': empty list, expected one tilt angle per view")
            n = None
    rot = number_list(data, "rot_deg", problems, n=n)
    mag = number_list(data, "mag", problems, n=n, positive=True)
    shift = row_list(data, "shift_px", problems, width=2, what="[tx, ty] pairs", n=n)
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


def _build_geometry(fields: dict[str, Any], source: str) -> Geometry:
    """The Geometry of fields :func:`_geometry_fields` accepted."""
    try:
        return Geometry(**fields)
    except ConfigError as err:
        # Geometry re-checks what _geometry_fields checked; reaching this means
        # the two disagree, but the message must still name the file.
        raise FileFormatError(f"{source}: {err}") from err
