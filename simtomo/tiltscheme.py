"""Tilt schemes: which nominal tilts a series has, in what order they were taken, and their dose.

Views are stored sorted by nominal tilt (DESIGN.md section 3); the order in
which the microscope acquired them is metadata, a permutation of the stored
views. Three acquisition schemes are provided:

- unidirectional: from the lowest tilt to the highest;
- bidirectional: from a start angle to one end, then from next to the start
  to the other end;
- dose-symmetric (Hagen et al. 2017, J Struct Biol 197:191,
  doi:10.1016/j.jsb.2016.06.007): from the tilt nearest 0, alternating groups
  of views on the positive and on the negative side, moving outwards.

All angle sequences are built on one grid ``min, min + step, ... <= max`` so
every scheme over the same range has the same set of tilts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from simtomo.config import TiltConfig
from simtomo.errors import ConfigError

__all__ = [
    "TiltScheme",
    "tilt_grid",
    "unidirectional",
    "bidirectional",
    "dose_symmetric",
    "dose_per_view",
    "make_tilt_scheme",
]

logger = logging.getLogger(__name__)

# A grid longer than this is a typo in step_deg, not a tilt series; refusing it
# avoids allocating gigabytes for e.g. step_deg=1e-9.
_MAX_VIEWS = 100_000


@dataclass(frozen=True, eq=False)
class TiltScheme:
    """Nominal tilts of a series in storage order, with acquisition order and dose.

    Parameters
    ----------
    tilt_deg : (n,) array
        Nominal tilt angles in degrees, sorted ascending: the storage (view) order.
    acquisition_order : (n,) int array
        View indices in the order they were acquired: ``acquisition_order[k]``
        is the stored view taken ``k``-th. A permutation of ``0..n-1``.
    dose_e_per_A2 : (n,) array
        Electron dose of each view in e/Å², in storage order.

    Raises
    ------
    ConfigError
        If the arrays disagree in length, the tilts are not sorted, the order is
        not a permutation, or a dose is negative.
    """

    tilt_deg: np.ndarray
    acquisition_order: np.ndarray
    dose_e_per_A2: np.ndarray

    def __post_init__(self) -> None:
        tilt = np.array(self.tilt_deg, dtype=float, ndmin=1)
        order = np.array(self.acquisition_order, ndmin=1)
        dose = np.array(self.dose_e_per_A2, dtype=float, ndmin=1)
        if tilt.ndim != 1 or tilt.size == 0:
            raise ConfigError(f"TiltScheme.tilt_deg: expected a non-empty 1-D array, got shape {tilt.shape}")
        n = tilt.size
        if not np.all(np.isfinite(tilt)):
            raise ConfigError("TiltScheme.tilt_deg: contains NaN or infinite values")
        if np.any(np.diff(tilt) < 0):
            raise ConfigError("TiltScheme.tilt_deg: expected tilts sorted ascending (storage order)")
        if order.shape != (n,) or not np.issubdtype(order.dtype, np.integer):
            raise ConfigError(
                f"TiltScheme.acquisition_order: expected {n} integer view indices, "
                f"got shape {order.shape} of {order.dtype}"
            )
        if not np.array_equal(np.sort(order), np.arange(n)):
            raise ConfigError(f"TiltScheme.acquisition_order: expected a permutation of 0..{n - 1}")
        if dose.shape != (n,):
            raise ConfigError(f"TiltScheme.dose_e_per_A2: expected shape ({n},), got {dose.shape}")
        if not np.all(np.isfinite(dose)) or np.any(dose < 0):
            raise ConfigError("TiltScheme.dose_e_per_A2: expected finite doses >= 0")
        order = order.astype(np.intp)
        for arr in (tilt, order, dose):
            arr.flags.writeable = False
        object.__setattr__(self, "tilt_deg", tilt)
        object.__setattr__(self, "acquisition_order", order)
        object.__setattr__(self, "dose_e_per_A2", dose)

    @property
    def n_views(self) -> int:
        """Number of views."""
        return int(self.tilt_deg.size)

    @property
    def prior_dose_e_per_A2(self) -> np.ndarray:
        """(n,) dose each view's area had received before the view was taken, storage order.

        The first acquired view has prior dose 0.
        """
        dose_acq = self.dose_e_per_A2[self.acquisition_order]
        prior_acq = np.concatenate(([0.0], np.cumsum(dose_acq)[:-1]))
        prior = np.empty_like(prior_acq)
        prior[self.acquisition_order] = prior_acq
        return prior

    @property
    def acquired_tilt_deg(self) -> np.ndarray:
        """(n,) nominal tilts in acquisition order."""
        return self.tilt_deg[self.acquisition_order]


def _check_range(min_deg: float, max_deg: float, step_deg: float) -> None:
    for name, v in (("min_deg", min_deg), ("max_deg", max_deg), ("step_deg", step_deg)):
        if not np.isfinite(v):
            raise ConfigError(f"{name}: expected a finite number, got {v!r}")
    if step_deg <= 0:
        raise ConfigError(f"step_deg: expected a positive increment, got {step_deg!r}")
    for name, v in (("min_deg", min_deg), ("max_deg", max_deg)):
        if abs(v) >= 90:
            raise ConfigError(f"{name}: expected a tilt strictly between -90 and 90 degrees, got {v!r}")
    if min_deg > max_deg:
        raise ConfigError(f"min_deg: expected a value <= max_deg ({max_deg!r}), got {min_deg!r}")


def tilt_grid(min_deg: float, max_deg: float, step_deg: float) -> np.ndarray:
    """Ascending grid of nominal tilts ``min, min + step, ...`` up to ``max``.

    Parameters
    ----------
    min_deg, max_deg : float
        Lowest and highest allowed tilt, degrees, strictly within ±90.
    step_deg : float
        Tilt increment, degrees, > 0.

    Returns
    -------
    (n,) array
        The grid. ``max_deg`` is included when it lies on the grid to within
        ``1e-6 * step_deg``; values are rounded to 1e-9 degree so that e.g.
        ``-60 + 20 * 3`` is exactly 0.

    Raises
    ------
    ConfigError
        For a non-positive step, ``min_deg > max_deg``, a tilt at or beyond
        ±90 degrees, or an empty or absurdly long grid.
    """
    _check_range(min_deg, max_deg, step_deg)
    n = int(np.floor((max_deg - min_deg) / step_deg + 1e-6)) + 1
    if n < 1:
        raise ConfigError(f"step_deg: the range [{min_deg}, {max_deg}] with step {step_deg} holds no tilt")
    if n > _MAX_VIEWS:
        raise ConfigError(
            f"step_deg: expected an increment giving at most {_MAX_VIEWS} views over "
            f"[{min_deg}, {max_deg}], got {step_deg!r} ({n} views)"
        )
    # Adding 0.0 turns a rounded -0.0 into 0.0, which prints and compares cleanly.
    return np.round(min_deg + step_deg * np.arange(n), 9) + 0.0


def unidirectional(min_deg: float, max_deg: float, step_deg: float) -> np.ndarray:
    """Tilts in acquisition order for a unidirectional series, from ``min_deg`` up to ``max_deg``.

    Parameters
    ----------
    min_deg, max_deg, step_deg : float
        Range and increment in degrees, as for :func:`tilt_grid`.

    Returns
    -------
    (n,) array
        The grid of :func:`tilt_grid`, ascending.
    """
    return tilt_grid(min_deg, max_deg, step_deg)


def bidirectional(
    min_deg: float,
    max_deg: float,
    step_deg: float,
    start_deg: float,
    first_branch: str = "positive",
) -> np.ndarray:
    """Tilts in acquisition order for a bidirectional series.

    The series starts at the grid tilt nearest ``start_deg`` (ties go to the
    lower tilt). With ``first_branch="positive"`` it climbs to the top of the
    grid, then returns to the tilt just below the start and descends to the
    bottom; ``"negative"`` is the mirror image.

    Parameters
    ----------
    min_deg, max_deg, step_deg : float
        Range and increment in degrees, as for :func:`tilt_grid`.
    start_deg : float
        Tilt of the first view, degrees, within ``[min_deg, max_deg]``.
    first_branch : {"positive", "negative"}
        Direction of the first branch.

    Returns
    -------
    (n,) array
        The grid tilts in the order taken.

    Raises
    ------
    ConfigError
        For a bad range, a start outside it, or an unknown ``first_branch``.
    """
    grid = tilt_grid(min_deg, max_deg, step_deg)
    if not (np.isfinite(start_deg) and min_deg <= start_deg <= max_deg):
        raise ConfigError(f"start_deg: expected a start within [{min_deg}, {max_deg}], got {start_deg!r}")
    if first_branch not in ("positive", "negative"):
        raise ConfigError(f"first_branch: expected 'positive' or 'negative', got {first_branch!r}")
    i0 = int(np.argmin(np.abs(grid - start_deg)))
    if first_branch == "positive":
        return np.concatenate((grid[i0:], grid[:i0][::-1]))
    return np.concatenate((grid[: i0 + 1][::-1], grid[i0 + 1 :]))


def dose_symmetric(min_deg: float, max_deg: float, step_deg: float, group_size: int = 2) -> np.ndarray:
    """Tilts in acquisition order for the dose-symmetric scheme of Hagen et al. (2017).

    The series starts at the grid tilt closest to 0 (ties go to the lower
    tilt), which counts as the first view of the first positive group; then
    groups of ``group_size`` views alternate between the negative and the
    positive side, each side moving outwards. For ``group_size=2``, step 3 this
    is Hagen's order ``0, 3, -3, -6, 6, 9, -9, -12, ...`` (Hagen et al. 2017,
    Fig. 1); with ``group_size=1`` the first group is ``0, 3`` so the series
    alternates ``0, 3, -3, 6, -6, ...``. When one side is exhausted (an
    asymmetric range) the rest of the other side follows in one run.

    Hagen, W.J.H., Wan, W. & Briggs, J.A.G. (2017) Implementation of a cryo-electron
    tomography tilt-scheme optimized for high resolution subtomogram averaging.
    J Struct Biol 197:191-198, doi:10.1016/j.jsb.2016.06.007.

    Parameters
    ----------
    min_deg, max_deg, step_deg : float
        Range and increment in degrees, as for :func:`tilt_grid`.
    group_size : int
        Views taken on one side before switching to the other, >= 1.

    Returns
    -------
    (n,) array
        The grid tilts in the order taken.

    Raises
    ------
    ConfigError
        For a bad range or ``group_size < 1``.
    """
    if isinstance(group_size, bool) or not float(group_size).is_integer() or group_size < 1:
        raise ConfigError(f"group_size: expected an integer >= 1, got {group_size!r}")
    g = int(group_size)
    grid = tilt_grid(min_deg, max_deg, step_deg)
    i0 = int(np.argmin(np.abs(grid)))
    positive = grid[i0 + 1 :]
    negative = grid[:i0][::-1]
    # The zero view opens the first positive group, so that group has one
    # view fewer after it (but at least one, or group_size=1 would start negative).
    first = max(g - 1, 1)
    parts = [grid[i0 : i0 + 1], positive[:first]]
    # Once a side is empty its slices are empty too, so the remaining side
    # simply continues group after group.
    n_groups = -(-max(positive.size, negative.size) // g) + 1
    for k in range(n_groups):
        parts.append(negative[k * g : (k + 1) * g])
        parts.append(positive[first + k * g : first + (k + 1) * g])
    return np.concatenate(parts)


def dose_per_view(
    tilt_deg: np.ndarray,
    total_dose_e_per_A2: float,
    weighting: str = "constant",
) -> np.ndarray:
    """Split a total dose over the views of a series.

    Parameters
    ----------
    tilt_deg : (n,) array
        Nominal tilts, degrees, strictly within ±90 (any order; the result
        follows it).
    total_dose_e_per_A2 : float
        Total dose over the series, e/Å², >= 0.
    weighting : {"constant", "cos"}
        ``"constant"``: equal dose per view. ``"cos"``: dose proportional to
        ``1 / cos(tilt)``, which keeps the transmitted signal roughly constant
        as the path through the slab lengthens.

    Returns
    -------
    (n,) array
        Dose of each view, e/Å², summing to the total (to rounding).

    Raises
    ------
    ConfigError
        For an empty tilt list, a tilt at or beyond ±90, a negative or
        non-finite total, or an unknown weighting.
    """
    tilt = np.asarray(tilt_deg, dtype=float)
    if tilt.ndim != 1 or tilt.size == 0:
        raise ConfigError(f"tilt_deg: expected a non-empty 1-D array, got shape {tilt.shape}")
    if not np.all(np.isfinite(tilt)) or np.any(np.abs(tilt) >= 90):
        raise ConfigError("tilt_deg: expected finite tilts strictly between -90 and 90 degrees")
    if not (np.isfinite(total_dose_e_per_A2) and total_dose_e_per_A2 >= 0):
        raise ConfigError(f"total_dose_e_per_A2: expected a finite dose >= 0, got {total_dose_e_per_A2!r}")
    if weighting == "constant":
        weights = np.ones_like(tilt)
    elif weighting == "cos":
        weights = 1.0 / np.cos(np.deg2rad(tilt))
    else:
        raise ConfigError(f"weighting: expected 'constant' or 'cos', got {weighting!r}")
    return float(total_dose_e_per_A2) * weights / weights.sum()


def make_tilt_scheme(cfg: TiltConfig) -> TiltScheme:
    """Build the tilt scheme a :class:`~simtomo.config.TiltConfig` describes.

    Parameters
    ----------
    cfg : TiltConfig
        ``scheme`` selects :func:`unidirectional`, :func:`bidirectional` or
        :func:`dose_symmetric`; the dose is split by :func:`dose_per_view`.

    Returns
    -------
    TiltScheme
        Views sorted by nominal tilt, with the acquisition order as a permutation.

    Raises
    ------
    ConfigError
        For an unknown scheme or any invalid parameter.
    """
    if cfg.scheme == "unidirectional":
        acquired = unidirectional(cfg.min_deg, cfg.max_deg, cfg.step_deg)
    elif cfg.scheme == "bidirectional":
        acquired = bidirectional(cfg.min_deg, cfg.max_deg, cfg.step_deg, cfg.start_deg, cfg.first_branch)
    elif cfg.scheme == "dose-symmetric":
        acquired = dose_symmetric(cfg.min_deg, cfg.max_deg, cfg.step_deg, cfg.group_size)
    else:
        raise ConfigError(
            f"tilt.scheme: expected 'unidirectional', 'bidirectional' or 'dose-symmetric', got {cfg.scheme!r}"
        )
    by_tilt = np.argsort(acquired, kind="stable")
    tilt = acquired[by_tilt]
    # by_tilt maps storage index -> acquisition index; its inverse is the
    # acquisition order expressed as storage indices.
    acquisition_order = np.empty_like(by_tilt)
    acquisition_order[by_tilt] = np.arange(by_tilt.size)
    dose = dose_per_view(tilt, cfg.total_dose_e_per_A2, cfg.dose_weighting)
    logger.debug(
        "tilt scheme %s: %d views from %g to %g deg, first acquired %g deg",
        cfg.scheme, tilt.size, tilt[0], tilt[-1], acquired[0],
    )
    return TiltScheme(tilt_deg=tilt, acquisition_order=acquisition_order, dose_e_per_A2=dose)
