"""The true geometry of a simulated acquisition: what the aligners must recover.

Stage shifts, in-plane rotation and magnification drift evolve in the order
the views were acquired (a goniometer drifts in time, not in tilt angle) and
are then stored in the stack's order, sorted by nominal tilt (DESIGN.md
section 3). The stage model is a random walk with backlash: each reversal of
the tilt direction makes the image jump by a fixed amount perpendicular to the
mean tilt axis (the slack is in the tilt mechanism), with one random sign per
series, the sign of each jump following the new direction of travel.

Draw order of :func:`simulate_misalignment` (fixed, so a seed reproduces a
series and changing one magnitude does not reshuffle the others; every draw is
made even when its magnitude is 0):

1. stage shifts, :func:`stage_shifts_px`: backlash sign (1 uniform on
   [0, 1)), initial offset (2 normals), walk steps ((n - 1) x 2 normals);
2. rotation drift, :func:`smooth_drift` (n normals);
3. magnification drift, :func:`smooth_drift` (n normals);
4. tilt jitter (n normals, acquisition order);
5. motion during exposure (n x 2 normals, acquisition order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from simtomo.config import MisalignmentConfig
from simtomo.errors import ConfigError
from simtomo.geometry import Geometry
from simtomo.tiltscheme import TiltScheme

__all__ = [
    "Misalignment",
    "direction_reversals",
    "stage_shifts_px",
    "smooth_drift",
    "simulate_misalignment",
]

logger = logging.getLogger(__name__)


def _tilts_1d(acquired_tilt_deg: np.ndarray) -> np.ndarray:
    tilt = np.asarray(acquired_tilt_deg, dtype=float)
    if tilt.ndim != 1 or tilt.size == 0:
        raise ConfigError(f"acquired_tilt_deg: expected a non-empty 1-D array, got shape {tilt.shape}")
    if not np.all(np.isfinite(tilt)):
        raise ConfigError("acquired_tilt_deg: contains NaN or infinite values")
    return tilt


def _nonnegative(name: str, value: float) -> float:
    if not (np.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}: expected a finite value >= 0, got {value!r}")
    return float(value)


def direction_reversals(acquired_tilt_deg: np.ndarray) -> np.ndarray:
    """Where the tilt direction reverses, in acquisition order.

    Acquisition ``k >= 2`` is a reversal when the move into it,
    ``sign(theta_k - theta_(k-1))``, differs from the move before,
    ``sign(theta_(k-1) - theta_(k-2))``. The first move has no previous
    direction, so it is never a reversal.

    A repeated angle (a move of zero) is not a move: it is never a reversal and
    the direction before it carries over, since a stage that did not turn has
    not taken up its gear slack.

    Parameters
    ----------
    acquired_tilt_deg : (n,) array
        Tilts in acquisition order, degrees.

    Returns
    -------
    (n,) bool array
        True at each acquisition that follows a reversal of tilt direction.
    """
    tilt = _tilts_1d(acquired_tilt_deg)
    moves = np.sign(np.diff(tilt))
    reversed_ = np.zeros(tilt.size, dtype=bool)
    previous = 0.0
    for k, move in enumerate(moves, start=1):
        if move == 0:
            continue
        reversed_[k] = previous != 0 and move != previous
        previous = move
    return reversed_


def stage_shifts_px(
    acquired_tilt_deg: np.ndarray,
    *,
    initial_offset_px: float,
    walk_px: float,
    backlash_px: float,
    tilt_axis_deg: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Image shifts from stage drift and backlash, in acquisition order.

    ``shift_0 ~ N(0, initial_offset_px)`` per axis; for ``k >= 1``,
    ``shift_k = shift_(k-1) + N(0, walk_px)`` per axis, plus at a reversal of
    tilt direction (:func:`direction_reversals`) a jump
    ``backlash_px * u * d_k``, with ``d_k = sign(theta_k - theta_(k-1))`` the
    new direction: the gear slack makes the position lag in the direction of
    travel, so successive jumps alternate in sign.

    The slack is in the tilt mechanism, so the image jumps perpendicular to the
    tilt axis: ``u = s * R(phi) @ (1, 0) = s * (cos phi, sin phi)`` with
    ``phi = tilt_axis_deg`` and ``R(phi) = [[cos, -sin], [sin, cos]]`` as in
    DESIGN.md section 3, where the axis appears along ``R(phi) @ (0, 1)``.
    ``s`` is one random sign per series: ``+1`` when the uniform draw is
    ``< 0.5``, else ``-1``.

    Draws, in this order: the sign ``s`` (1 uniform on [0, 1)), the initial
    offset (2 normals), the walk steps ((n - 1) x 2 normals).

    Parameters
    ----------
    acquired_tilt_deg : (n,) array
        Tilts in acquisition order, degrees.
    initial_offset_px : float
        Standard deviation per axis of the first view's shift, px, >= 0.
    walk_px : float
        Standard deviation per axis of each random-walk step, px, >= 0.
    backlash_px : float
        Length of the jump at each direction reversal, px, >= 0.
    tilt_axis_deg : float
        In-plane angle ``phi`` of the (mean) tilt axis, degrees, counter-clockwise
        from the image y axis; the jumps lie along ``R(phi) @ (1, 0)``.
    rng : numpy.random.Generator
        Source of all random draws.

    Returns
    -------
    (n, 2) array
        Shift ``(tx, ty)`` of each acquisition, px.
    """
    tilt = _tilts_1d(acquired_tilt_deg)
    initial_offset_px = _nonnegative("initial_offset_px", initial_offset_px)
    walk_px = _nonnegative("walk_px", walk_px)
    backlash_px = _nonnegative("backlash_px", backlash_px)
    if not np.isfinite(tilt_axis_deg):
        raise ConfigError(f"tilt_axis_deg: expected a finite angle, got {tilt_axis_deg!r}")
    phi = np.deg2rad(float(tilt_axis_deg))
    n = tilt.size

    sign = 1.0 if rng.random() < 0.5 else -1.0
    u = sign * np.array([np.cos(phi), np.sin(phi)])  # R(phi) @ (1, 0): perpendicular to the axis
    offset = initial_offset_px * rng.standard_normal(2)
    walk = walk_px * rng.standard_normal((n - 1, 2))

    steps = np.zeros((n, 2))
    steps[0] = offset
    steps[1:] = walk
    reversals = direction_reversals(tilt)
    direction = np.concatenate(([0.0], np.sign(np.diff(tilt))))
    steps += (backlash_px * reversals * direction)[:, None] * u
    return np.cumsum(steps, axis=0)


def smooth_drift(n: int, rms: float, rng: np.random.Generator) -> np.ndarray:
    """A random walk of ``n`` steps with its mean removed, scaled to a given RMS.

    Always draws ``n`` standard normals, even when the result is all zeros, so
    that later draws from ``rng`` do not depend on ``rms``.

    Parameters
    ----------
    n : int
        Number of samples, >= 1.
    rms : float
        Root mean square of the result about zero, >= 0.
    rng : numpy.random.Generator
        Source of the random steps.

    Returns
    -------
    (n,) array
        Zero-mean drift with RMS exactly ``rms``; all zeros when ``rms == 0`` or
        ``n == 1`` (a single sample has no drift once its mean is removed).
    """
    if isinstance(n, bool) or not float(n).is_integer() or n < 1:
        raise ConfigError(f"n: expected an integer >= 1, got {n!r}")
    rms = _nonnegative("rms", rms)
    walk = np.cumsum(rng.standard_normal(int(n)))
    walk -= walk.mean()
    size = np.sqrt(np.mean(walk**2))
    if rms == 0 or size == 0:
        return np.zeros(int(n))
    return walk * (rms / size)


@dataclass(frozen=True, eq=False)
class Misalignment:
    """The true geometry of a simulated series and the specimen motion during each view.

    Parameters
    ----------
    geometry : Geometry
        True projection geometry, in storage order (sorted by nominal tilt).
    motion_px : (n, 2) array
        Linear specimen drift during each exposure, from its start to its end,
        in image px, storage order.
    """

    geometry: Geometry
    motion_px: np.ndarray

    def __post_init__(self) -> None:
        motion = np.array(self.motion_px, dtype=float)
        n = self.geometry.n_views
        if motion.shape != (n, 2):
            raise ConfigError(f"Misalignment.motion_px: expected shape ({n}, 2), got {motion.shape}")
        if not np.all(np.isfinite(motion)):
            raise ConfigError("Misalignment.motion_px: contains NaN or infinite values")
        motion.flags.writeable = False
        object.__setattr__(self, "motion_px", motion)


def simulate_misalignment(
    cfg: MisalignmentConfig,
    scheme: TiltScheme,
    *,
    image_shape: tuple[int, int],
    pixel_size_A: float,
    rng: np.random.Generator,
) -> Misalignment:
    """Draw the true geometry of an acquisition.

    Lengths in nm become image px as ``nm * 10 / pixel_size_A``. Drifting
    quantities evolve in acquisition order and are then stored by nominal tilt:

    - shift: :func:`stage_shifts_px` with ``initial_offset_nm``,
      ``shift_walk_nm``, ``backlash_nm`` and ``tilt_axis_deg`` (backlash
      jumps perpendicular to the mean tilt axis);
    - ``rot_deg = tilt_axis_deg + smooth_drift(rms=rot_drift_deg)``;
    - ``mag = 1 + smooth_drift(rms=mag_drift)``;
    - ``tilt_deg = nominal + tilt_offset_deg + N(0, tilt_jitter_deg)``;
    - motion: each component ``N(0, motion_blur / sqrt(2))``, so its RMS
      length is ``motion_blur_nm`` in px.

    The draw order is fixed (see the module docstring).

    Parameters
    ----------
    cfg : MisalignmentConfig
        Magnitudes of the errors.
    scheme : TiltScheme
        Nominal tilts (storage order) and acquisition order.
    image_shape : (h, w)
        View size in px.
    pixel_size_A : float
        Pixel size at the specimen, Å, > 0.
    rng : numpy.random.Generator
        Source of all random draws.

    Returns
    -------
    Misalignment
        True geometry and per-view motion, in storage order.

    Raises
    ------
    ConfigError
        For a non-positive pixel size, or true tilts reaching ±90 degrees.
    """
    if not (np.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise ConfigError(f"pixel_size_A: expected a positive size, got {pixel_size_A!r}")
    px_per_nm = 10.0 / float(pixel_size_A)
    order = scheme.acquisition_order
    nominal_acq = scheme.acquired_tilt_deg
    n = nominal_acq.size

    shift_acq = stage_shifts_px(
        nominal_acq,
        initial_offset_px=cfg.initial_offset_nm * px_per_nm,
        walk_px=cfg.shift_walk_nm * px_per_nm,
        backlash_px=cfg.backlash_nm * px_per_nm,
        tilt_axis_deg=cfg.tilt_axis_deg,
        rng=rng,
    )
    rot_acq = cfg.tilt_axis_deg + smooth_drift(n, cfg.rot_drift_deg, rng)
    mag_acq = 1.0 + smooth_drift(n, cfg.mag_drift, rng)
    tilt_acq = nominal_acq + cfg.tilt_offset_deg + cfg.tilt_jitter_deg * rng.standard_normal(n)
    motion_acq = (cfg.motion_blur_nm * px_per_nm / np.sqrt(2.0)) * rng.standard_normal((n, 2))

    if np.any(np.abs(tilt_acq) >= 90):
        raise ConfigError(
            f"misalignment.tilt_offset_deg: true tilts reach {np.abs(tilt_acq).max():.3g} degrees; "
            "expected every true tilt strictly within ±90 degrees"
        )

    def stored(values_acq: np.ndarray) -> np.ndarray:
        out = np.empty_like(values_acq)
        out[order] = values_acq
        return out

    geometry = Geometry(
        tilt_deg=stored(tilt_acq),
        rot_deg=stored(rot_acq),
        mag=stored(mag_acq),
        shift_px=stored(shift_acq),
        image_shape=image_shape,
        pixel_size_A=pixel_size_A,
    )
    logger.debug(
        "misalignment: %d views, max |shift| %.1f px, rot %.2f..%.2f deg, mag %.4f..%.4f",
        n, float(np.max(np.linalg.norm(shift_acq, axis=1))), rot_acq.min(), rot_acq.max(),
        mag_acq.min(), mag_acq.max(),
    )
    return Misalignment(geometry=geometry, motion_px=stored(motion_acq))
