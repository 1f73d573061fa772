"""Nominal tilt angles as an IMOD ``.rawtlt`` file: one angle in degrees per line.

Line ``k`` belongs to view ``k`` of the stack (views sorted by nominal tilt,
DESIGN.md section 3); a positive tilt turns the specimen as ``R_y(theta)`` does.
"""

from __future__ import annotations

import math
import os

import numpy as np

from simtomo.errors import FileFormatError
from simtomo.io._json import read_text, write_text_atomic

__all__ = ["read_rawtlt", "write_rawtlt"]


def read_rawtlt(path: str | os.PathLike, n_views: int | None = None) -> np.ndarray:
    """Read nominal tilt angles.

    Parameters
    ----------
    path : path-like
        The ``.rawtlt`` file. Blank lines are ignored.
    n_views : int, optional
        Number of views in the matching stack; the file must hold exactly that
        many angles.

    Returns
    -------
    (n,) float64 array
        Tilt angles in degrees, in file (view) order.

    Raises
    ------
    FileFormatError
        If the file is missing or not text, a line is not a single number (its
        1-based line number and text are given), an angle is NaN or has
        ``|angle| >= 90``, the file holds no angles, or the count differs from
        ``n_views`` (both counts are given).
    """
    name = os.fspath(path)
    text = read_text(name, "a .rawtlt file of tilt angles", expected_text="one tilt angle per line")
    angles = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        shown = stripped if len(stripped) <= 40 else stripped[:37] + "..."
        try:
            value = float(stripped)
        except ValueError:
            raise FileFormatError(
                f"{name}: line {number}: found {shown!r}, expected one tilt angle in degrees"
            ) from None
        if math.isnan(value):
            raise FileFormatError(f"{name}: line {number}: found {shown!r}, expected a finite tilt angle")
        if not abs(value) < 90:
            raise FileFormatError(
                f"{name}: line {number}: found tilt angle {shown}, expected |angle| < 90 degrees"
            )
        angles.append(value)
    if not angles:
        raise FileFormatError(f"{name}: no tilt angles found, expected one per line")
    if n_views is not None and len(angles) != n_views:
        raise FileFormatError(f"{name}: {len(angles)} tilt angles, but the stack has {n_views} views")
    return np.array(angles, dtype=float)


def write_rawtlt(path: str | os.PathLike, tilt_deg: np.ndarray) -> None:
    """Write nominal tilt angles, one per line, atomically.

    Parameters
    ----------
    path : path-like
        Target file, replaced if it exists.
    tilt_deg : (n,) array
        Tilt angles in degrees, in view order; written so that
        :func:`read_rawtlt` returns exactly these float64 values.

    Raises
    ------
    ValueError
        If ``tilt_deg`` is not a non-empty 1-D array of finite angles with
        ``|angle| < 90`` (what :func:`read_rawtlt` accepts).
    """
    tilt = np.asarray(tilt_deg, dtype=float)
    if tilt.ndim != 1 or tilt.size == 0:
        raise ValueError(f"tilt_deg: expected a non-empty 1-D array, got shape {tilt.shape}")
    bad = np.flatnonzero(~(np.abs(tilt) < 90))
    if bad.size:
        raise ValueError(f"tilt_deg: entry {int(bad[0])} is {tilt[bad[0]]!r}, expected a finite angle with |angle| < 90")
    # The shortest decimal text that reads back as exactly each angle
    # (unique=True), positional so any tilt-file parser reads it:
    # -60.0 -> "-60", 1.5 -> "1.5", 0.333 -> "0.333".
    write_text_atomic(path, "".join(np.format_float_positional(v, unique=True, trim="-") + "\n" for v in tilt))
