"""Ground truth of a simulated series, ``NAME.truth.json`` (DESIGN.md section 4).

A truth file is a geometry file (same ``format`` key and schema, so
:func:`~simtomo.io.geometry_json.read_geometry` on it yields the true geometry)
with these keys added:

``beads_px``
    (m, 3) list of bead centres ``[x, y, z]`` in pixels, volume-centred; m may be 0.
``nominal_tilt_deg``
    (n,) nominal tilt angles, degrees, in view order.
``acquisition_order``
    (n,) view indices in the order the views were acquired (a permutation of
    ``range(n)``); views themselves are stored sorted by nominal tilt.
``dose_e_per_A2``
    (n,) electron dose of each view, e/Å².
``nominal_tilt_axis_deg``
    The tilt-axis direction the microscope reports, degrees (as ``rot_deg``).
``seed``, ``simtomo_version``, ``config``
    The simulation's seed, the simtomo version and its full configuration.

Only scoring reads this file; aligners get an Observation (the truth barrier).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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
from simtomo.io.geometry_json import (
    GEOMETRY_KEYS,
    _build_geometry,
    _check_document,
    _geometry_fields,
    geometry_to_dict,
)

__all__ = ["Truth", "TRUTH_KEYS", "write_truth", "read_truth"]

#: Keys a truth file holds beyond the geometry schema, in the order written.
TRUTH_KEYS = (
    "beads_px",
    "nominal_tilt_deg",
    "acquisition_order",
    "dose_e_per_A2",
    "nominal_tilt_axis_deg",
    "seed",
    "simtomo_version",
    "config",
)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class Truth:
    """What the simulator knows and an aligner must not see.

    Parameters
    ----------
    geometry : Geometry
        The true geometry, in the stack's view order (DESIGN.md section 3).
    beads_px : (m, 3) array
        Bead centres ``(x, y, z)`` in pixels relative to the volume centre; m may be 0.
    nominal_tilt_deg : (n,) array
        Nominal tilt angles in degrees, view order (what the ``.rawtlt`` holds).
    acquisition_order : (n,) int array
        View indices in acquisition order, a permutation of ``range(n)``.
    dose_e_per_A2 : (n,) array
        Dose of each view in e/Å², view order.
    nominal_tilt_axis_deg : float
        Tilt-axis direction reported by the microscope, degrees, same sense as ``rot_deg``.
    seed : int
        Seed of the simulation (non-negative).
    config : dict
        The full simulation configuration, JSON values only (written as-is).
    simtomo_version : str
        Version of simtomo that made the series.

    Raises
    ------
    ConfigError
        If shapes disagree with the geometry's number of views, values are not
        finite, or ``acquisition_order`` is not a permutation.
    """

    geometry: Geometry
    beads_px: np.ndarray
    nominal_tilt_deg: np.ndarray
    acquisition_order: np.ndarray
    dose_e_per_A2: np.ndarray
    nominal_tilt_axis_deg: float
    seed: int
    config: dict
    simtomo_version: str

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, Geometry):
            raise ConfigError(f"Truth.geometry: expected a Geometry, got {type(self.geometry).__name__}")
        n = self.geometry.n_views
        beads = np.array(self.beads_px, dtype=float)
        if beads.size == 0:
            beads = beads.reshape(0, 3)
        if beads.ndim != 2 or beads.shape[1] != 3:
            raise ConfigError(f"Truth.beads_px: expected shape (m, 3), got {beads.shape}")
        if not np.all(np.isfinite(beads)):
            raise ConfigError("Truth.beads_px: contains NaN or infinite values")
        nominal = np.array(self.nominal_tilt_deg, dtype=float)
        dose = np.array(self.dose_e_per_A2, dtype=float)
        for name, arr in (("nominal_tilt_deg", nominal), ("dose_e_per_A2", dose)):
            if arr.shape != (n,):
                raise ConfigError(f"Truth.{name}: expected shape ({n},) for {n} views, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ConfigError(f"Truth.{name}: contains NaN or infinite values")
        if np.any(np.abs(nominal) >= 90):
            raise ConfigError(f"Truth.nominal_tilt_deg: expected |angle| < 90, got max {np.abs(nominal).max()}")
        if np.any(dose < 0):
            raise ConfigError(f"Truth.dose_e_per_A2: expected non-negative doses, got min {dose.min()}")
        order = np.array(self.acquisition_order)
        if order.shape != (n,) or not np.issubdtype(order.dtype, np.integer):
            raise ConfigError(
                f"Truth.acquisition_order: expected {n} integers, got shape {order.shape} dtype {order.dtype}"
            )
        order = order.astype(np.int64)
        if not np.array_equal(np.sort(order), np.arange(n)):
            raise ConfigError(f"Truth.acquisition_order: {_permutation_problem(order.tolist(), n)}")
        axis = float(self.nominal_tilt_axis_deg)
        if not math.isfinite(axis):
            raise ConfigError(f"Truth.nominal_tilt_axis_deg: expected a finite angle, got {axis}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ConfigError(f"Truth.seed: expected a non-negative integer, got {self.seed!r}")
        if not isinstance(self.config, Mapping):
            raise ConfigError(f"Truth.config: expected a dict, got {type(self.config).__name__}")
        if not isinstance(self.simtomo_version, str):
            raise ConfigError(f"Truth.simtomo_version: expected a str, got {type(self.simtomo_version).__name__}")
        object.__setattr__(self, "beads_px", _frozen(beads))
        object.__setattr__(self, "nominal_tilt_deg", _frozen(nominal))
        object.__setattr__(self, "acquisition_order", _frozen(order))
        object.__setattr__(self, "dose_e_per_A2", _frozen(dose))
        object.__setattr__(self, "nominal_tilt_axis_deg", axis)
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def n_views(self) -> int:
        """Number of views."""
        return self.geometry.n_views

    def equals(self, other: Truth) -> bool:
        """True when every field is identical (arrays bit for bit, config by ==)."""
        return (
            self.geometry.equals(other.geometry)
            and all(
                np.array_equal(getattr(self, k), getattr(other, k))
                for k in ("beads_px", "nominal_tilt_deg", "acquisition_order", "dose_e_per_A2")
            )
            and self.nominal_tilt_axis_deg == other.nominal_tilt_axis_deg
            and self.seed == other.seed
            and self.config == other.config
            and self.simtomo_version == other.simtomo_version
        )


def _permutation_problem(order: list[int], n: int) -> str:
    """Why ``order`` is not a permutation of range(n), in a few words."""
    seen: set[int] = set()
    for value in order:
        if not 0 <= value < n:
            return f"found view index {value}, expected a permutation of range({n}) (indices 0..{n - 1})"
        if value in seen:
            return f"view index {value} appears twice, expected a permutation of range({n})"
        seen.add(value)
    missing = sorted(set(range(n)) - seen)
    return f"view indices {missing[:10]} missing, expected a permutation of range({n})"


def write_truth(path: str | os.PathLike, truth: Truth) -> None:
    """Write a truth file, atomically.

    Parameters
    ----------
    path : path-like
        Target file (conventionally ``NAME.truth.json``), replaced if it exists.
    truth : Truth
        The ground truth; floats are written exactly (``repr``).

    Raises
    ------
    ValueError
        If ``truth.config`` holds something JSON cannot store exactly (a numpy
        scalar, NaN, a non-str key); its location is named.
    """
    if not isinstance(truth, Truth):
        raise TypeError(f"truth: expected a simtomo.io.truth.Truth, got {type(truth).__name__}")
    check_json_value(dict(truth.config), "Truth.config")
    document = geometry_to_dict(truth.geometry)
    document.update(
        beads_px=truth.beads_px.tolist(),
        nominal_tilt_deg=truth.nominal_tilt_deg.tolist(),
        acquisition_order=truth.acquisition_order.tolist(),
        dose_e_per_A2=truth.dose_e_per_A2.tolist(),
        nominal_tilt_axis_deg=truth.nominal_tilt_axis_deg,
        seed=truth.seed,
        simtomo_version=truth.simtomo_version,
        config=dict(truth.config),
    )
    write_text_atomic(path, dumps_document(document))


def read_truth(path: str | os.PathLike) -> Truth:
    """Read and validate a truth file.

    Parameters
    ----------
    path : path-like
        A ``NAME.truth.json`` file.

    Returns
    -------
    Truth

    Raises
    ------
    FileFormatError
        For everything :func:`~simtomo.io.geometry_json.read_geometry` rejects,
        and when truth keys are missing (all listed; a plain geometry file is
        called one), ``beads_px`` is not a list of ``[x, y, z]`` triples,
        per-view lists differ in length from ``tilt_deg``, values are not
        finite, a nominal tilt has ``|angle| >= 90``, a dose is negative,
        ``acquisition_order`` is not a permutation of ``range(n)``, ``seed``
        is not a non-negative integer, ``config`` not an object or
        ``simtomo_version`` not a string. Messages start with the file path
        and name the key.
    """
    name = os.fspath(path)
    data = load_json(name)
    _check_document(data, name, (), kind="truth")
    missing = [k for k in GEOMETRY_KEYS + TRUTH_KEYS if k not in data]
    if missing:
        listed = ", ".join(repr(k) for k in missing)
        if list(TRUTH_KEYS) == missing:
            raise FileFormatError(f"{name}: is a geometry file, not a truth file: missing keys {listed}")
        raise FileFormatError(f"{name}: missing keys {listed} of a truth file")

    problems: list[str] = []
    fields = _geometry_fields(data, problems)
    # The number of views, also when other geometry keys are wrong.
    n = len(data["tilt_deg"]) if isinstance(data["tilt_deg"], list) and data["tilt_deg"] else None
    beads = row_list(data, "beads_px", problems, width=3, what="[x, y, z] triples")
    nominal = number_list(data, "nominal_tilt_deg", problems, n=n)
    if nominal is not None and np.any(np.abs(nominal) >= 90):
        i = int(np.flatnonzero(np.abs(nominal) >= 90)[0])
        problems.append(f"key 'nominal_tilt_deg': entry {i} is {nominal[i]!r}, expected |angle| < 90")
    order = data["acquisition_order"]
    if not isinstance(order, list) or not all(is_int(v) for v in order):
        bad = order if not isinstance(order, list) else next(v for v in order if not is_int(v))
        problems.append(f"key 'acquisition_order': found {show(bad)} ({json_type(bad)}), expected a list of view indices")
    elif n is not None and len(order) != n:
        problems.append(f"key 'acquisition_order': {len(order)} entries, but 'tilt_deg' has {n} (expected one per view)")
    elif n is not None and sorted(order) != list(range(n)):
        problems.append(f"key 'acquisition_order': {_permutation_problem(order, n)}")
    dose = number_list(data, "dose_e_per_A2", problems, n=n)
    if dose is not None and np.any(dose < 0):
        i = int(np.flatnonzero(dose < 0)[0])
        problems.append(f"key 'dose_e_per_A2': entry {i} is {dose[i]!r}, expected a non-negative dose")
    why = bad_number(data["nominal_tilt_axis_deg"])
    if why is not None:
        problems.append(f"key 'nominal_tilt_axis_deg': found {why} (degrees)")
    seed = data["seed"]
    if not is_int(seed) or seed < 0:
        problems.append(f"key 'seed': found {show(seed)} ({json_type(seed)}), expected a non-negative integer")
    if not isinstance(data["config"], dict):
        problems.append(f"key 'config': found {json_type(data['config'])}, expected an object")
    version = data["simtomo_version"]
    if not isinstance(version, str):
        problems.append(f"key 'simtomo_version': found {show(version)} ({json_type(version)}), expected a string")
    raise_problems(name, problems)

    geometry = _build_geometry(fields, name)
    try:
        return Truth(
            geometry=geometry,
            beads_px=beads,
            nominal_tilt_deg=nominal,
            acquisition_order=np.array(order, dtype=np.int64),
            dose_e_per_A2=dose,
            nominal_tilt_axis_deg=float(data["nominal_tilt_axis_deg"]),
            seed=seed,
            config=data["config"],
            simtomo_version=version,
        )
    except ConfigError as err:
        # The checks above mirror Truth's; this keeps the file in the message
        # should they ever drift apart.
        raise FileFormatError(f"{name}: {err}") from err
