"""Marker-free alignment by projection matching (in the spirit of AreTomo and TomoPy's joint alignment).

Each view is compared with a reprojection of a working reconstruction made
*without* it, and its geometry is moved so that the two agree.

Algorithm
---------
0. The views become binned line integrals, clipped to their 0.5 and 99.5
   percentiles over the series (``clip_percentile``): gold beads and dense
   membranes otherwise dominate every correlation below (on ``standard``,
   seed 2, the result went from 3.1 to 1.8 px).
1. Start: a given geometry (``initial_geometry``), or the coarse alignment of
   :mod:`aligners.coarse` (tilt axis from the depth parallax, then stretched
   cross-correlation of neighbouring views) at ``coarse_binning``.
2. Thickness: unless given, the specimen's extent in z is measured once on a
   thick binned reconstruction (the z profile of the in-plane structure).
3. Coarse to fine over ``binnings`` (by default one stage, binning 4 for 1024 px views), iterate:

   - The views are split into ``folds`` interleaved subsets (by tilt rank).
     Gauss-Seidel over the folds: the volume is reconstructed (WBP with the
     ramp filter by default; SIRT-like weighting or SIRT optional) from
     every view *outside* fold ``k``, the views
     of fold ``k`` are reprojected under the current geometry, measured and
     updated before the next fold is processed. A view thus never meets its own
     contribution (no pull toward its current position), and the cost per
     iteration is ``folds - 1`` reconstructions (one for ``folds = 2``).
     Updating the folds one after the other (not simultaneously) matters: a
     simultaneous update of two folds against each other swaps their relative
     error instead of removing it.
   - Measurement: a grid of patches (inside the part of the view where the
     reprojection has the full path through the volume), each band-passed,
     tapered and cross-correlated with the reprojection (sub-pixel peak). The
     patch displacements, taken into the view's aligned frame ``q`` (tilt axis
     along y), are fitted robustly by the small-motion model
     ``dq_x = e_x + sigma q_x - omega q_y - tan(theta) q_x dtheta``,
     ``dq_y = e_y + sigma q_y + omega q_x``: shift ``e``, magnification change
     ``sigma``, in-plane rotation ``omega`` and tilt change ``dtheta`` (which
     stretches the view across the axis; it is weakly determined near zero
     tilt and regularised there).
   - Gauge: the data do not fix the specimen's position, scale and tilt
     offset, so those components are removed from every update (mean tilt
     change, mean log-magnification change, and the shift pattern of a 3-D
     specimen translation ``R(phi) (T_x cos theta + T_z sin theta, T_y)``).
   - Along-axis profile (``axis_profile``): the specimen's projection onto
     the tilt axis is the same in every view, so each view's profile along
     the axis, integrated across a fixed band of the specimen, measures its
     along-axis shift against the others' mean without a chain through
     neighbours (:mod:`aligners.axisprofile`). The smooth part of those
     shifts in tilt is applied after every iteration: it is the pattern the
     leave-out matching is blind to (see below), and on ``standard-nobeads``
     seed 2 it was 1.85 px of a 2.4 px error.
   - Stop rule of a stage: the largest per-view update (RMS displacement it
     causes over the field of view, mid-plane points, unbinned px) is below
     ``tolerance_px`` scaled by the stage's binning over the finest binning,
     or ``max_iterations`` is reached.

What is refined is chosen by ``refine`` (``shift``, ``rotation``,
``magnification``, ``tilt``): per view, from the patch fit; a view with fewer
than ``min_patches_affine`` significant patches (high tilt, coarse binning)
gets its shift only. The tilt axis is the data's own estimate
(:func:`aligners.coarse.find_tilt_axis`) plus whatever the per-view rotations
absorb; ``axis_flatten`` optionally removes the rotation pattern the matching
cannot see (below).

Measurement bias (``debias``): a leave-out reprojection interpolates the
missing view from its neighbours, exact only to first order in their angular
distance; the fixed-point iteration would follow that small pull every
iteration and drift. It is measured once per stage on synthetic data that fit
the current geometry exactly and subtracted. The exact ramp filter
(``weighting="ramp"``) drifts about half as much as the SIRT-like one.

Particles (``particle_rounds``, after the matching stages): what the
leave-out matching cannot see (patterns shared by neighbouring views, smooth
in tilt: the tilt axis, rotation and magnification ramps, per-view tilts) is
taken up by tracking dense particles like gold beads
(:mod:`aligners.particles`). They are detected in a reconstruction at binning
2 (``particle_binning``, ``particle_size_nm``); each is looked for near its
projection in every view by a blob filter, with no template from the
reconstruction, so the measurement does not lean toward the current
geometry; the tracks go to the shared bundle adjustment (per-view shift,
rotation, magnification, and per-view tilts held near the nominal ones by
``tilt_anchor_weight``). At least two rounds of three passes, the particles
detected again for each; more while a round's last pass still moves a view
by 0.15 px or more (on ``standard``, where the matching left the -60 degree
views 10 px off, beyond the particles' search box). The passes are recorded in ``info["iterations"]`` with
``stage = "particles"``; their update is the gauge-free change of the
geometry (:func:`simtomo.alignment_error.alignment_error` between successive
passes). When too few particles stand out of the noise the refinement is
skipped with a warning.

Layered landmarks (``landmark_passes``, off by default): the earlier answer
to the same problem, kept for specimens without particles. Thin layers of the
working reconstruction, reprojected on their own, are matched to the views
and the measured positions of grid points in each layer are fitted like bead
tracks (:mod:`aligners.landmarks`); plain passes, then fine passes with the
other layers' reprojection subtracted from each view and anchored per-view
tilts, and the mean of each kind of passes goes on. The templates come from
the working reconstruction, so the measurement leans toward the current
geometry in exactly the patterns that matter: on ``standard-nobeads`` seeds
0-4 they reached 0.72/0.78/0.74/0.70/1.08 px (against 0.23/0.24/0.19/0.24/0.21
with the particles) in about 45 s.

Known limits (measured on ``standard-nobeads``, seeds 0-4, default
parameters): from the coarse start (2.2-3.1 px RMS alignment error) the
matching stage reaches 1.02/1.56/1.43/1.57/1.69 px and the particle rounds
0.227/0.242/0.189/0.237/0.206 px, in 38-56 s wall and 46-53 s CPU (two
seeds at once on 2 cores), 1.5-1.6 GB peak. The particle rounds need particles
that stand out of the noise in projection: on a 256 px field (41 views,
100 nm, 125 or 600 proteins) only 25 of 160-210 candidates did, and the
refinement was skipped, leaving the matching result (2.7 and 3.8 px). The
matching stage alone cannot reach 0.3 px: per-view rotations ``phi_i + m / cos(theta_i)`` are
an exact null direction of the matching for the specimen's mid-plane
(equivalent to a shear of that plane); only content away from it sees ``m``;
``axis_flatten`` removes the ``1 / cos`` component of the rotations, which is
biased when the true rotation drift correlates with ``|tilt|``
(dose-symmetric acquisition), so it is off by default.

Failure: when fewer than ``min_reliable_fraction`` of the views have enough
patches that correlate (peak >= ``min_peak``) with their reprojection, or the
coarse alignment finds no correlation, :class:`~simtomo.errors.AlignmentError`
("correlation too low") is raised rather than a geometry returned.

Convergence is recorded in ``AlignmentResult.info["iterations"]``: per
iteration its stage (``matching``, ``landmarks`` or ``particles``), the
binning, the largest and RMS per-view update (px), the mean patch correlation
(matching) or the landmarks or particles used and their residual, and the geometry
(:func:`geometry_from_dict` rebuilds it); ``info["converged"]`` says whether
the matching stage's stop rule fired; ``info["start_geometry"]`` holds the
start, ``info["cpu_seconds"]`` and ``info["wall_seconds"]`` the cost. The
residual report is the last particle (or landmark) pass's bundle residual
(the matching stage's per-view patch-fit RMS when neither ran).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from aligners import imageops
from aligners.axisprofile import along_axis_shifts, apply_along_axis_shifts
from aligners.coarse import BinnedStack, binned_line_integrals, coarse_align, find_tilt_axis
from aligners.landmarks import LandmarkOptions, refine_by_landmarks
from aligners.particles import ParticleOptions, estimate_thickness, measure_thickness, refine_observation
from simtomo.alignment import AlignmentResult, ResidualReport
from simtomo.alignment_error import alignment_error
from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry
from simtomo.observation import Observation
from simtomo.reconstruct import reconstruct, reproject

__all__ = ["ProjmatchAligner", "ProjmatchParams", "ViewFit", "estimate_thickness", "fit_view_motion", "geometry_from_dict"]

log = logging.getLogger(__name__)

_REFINABLE = ("shift", "rotation", "magnification", "tilt")


@dataclass(frozen=True)
class ProjmatchParams:
    """Parameters of the projection-matching aligner.

    Parameters
    ----------
    binnings : tuple of int, optional
        Binning of each stage, coarse to fine (each a multiple of the next).
        None: one stage at the power of two that brings the larger side to
        <= 256 px (``(4,)`` for 1024 px views, ``(1,)`` for 256 px). An extra
        coarser stage (binning 8 on ``standard``) lost too many high-tilt views
        (too few patches inside the reprojection's full-depth region) and did
        not improve the result; a finer one (binning 2) costs ~8x more per
        iteration and did not reduce the error either (it is dominated by
        weakly determined smooth modes, see the module notes).
    max_iterations : int
        Iterations per stage at most.
    tolerance_px : float
        Stop rule: a stage ends when the largest per-view update, as RMS
        displacement over the field of view in unbinned px, is below
        ``tolerance_px * binning / finest binning``.
    folds : int
        Interleaved view subsets (>= 2) for leave-out reconstruction.
    method : {"wbp", "sirt"}
        Reconstruction method of the working volume.
    weighting : {"ramp", "sirt-like"}
        WBP filter (``sirt-like`` damps high-frequency noise).
    sirt_like_iterations, sirt_iterations : int
        Iterations mimicked by the SIRT-like filter / run by SIRT.
    refine : tuple of str
        Per-view parameters refined: any of ``shift``, ``rotation``,
        ``magnification``, ``tilt``.
    thickness_px : float, optional
        Specimen thickness in unbinned px; None measures it from the data.
    z_margin : float
        Reconstruction depth as a multiple of the thickness.
    width_factor : float
        Volume width across the tilt axis as a multiple of the field of view
        (> 1 lets high-tilt views be compared over more of their area).
    patch_size, patch_step : int
        Patch side and grid step in binned px.
    max_shift : float
        Largest patch displacement searched, binned px.
    lowpass, highpass : float
        Band-pass of the patch correlations, cycles per binned px.
    min_peak : float
        A patch counts when its correlation coefficient at the peak reaches
        this (unrelated band-passed patches stay near 0.1).
    min_patches : int
        Fewest significant patches for a view's update.
    min_patches_affine : int
        Fewest significant patches to refine more than the shift of a view.
    min_reliable_fraction : float
        Fewest reliable views (fraction) for a result; else AlignmentError.
    tilt_regularisation : float
        Ridge weight on the tilt change (relative to the data at 45 degrees):
        keeps the tilt of near-zero-tilt views, whose stretch says little.
    initial_geometry : Geometry, optional
        Start from this geometry (unbinned) instead of the coarse alignment.
    tilt_axis_deg : float, optional
        Start value of the tilt axis for the search; None takes the log's.
    search_tilt_axis : bool
        Estimate the tilt axis from the data before the coarse alignment.
    coarse_binning : int, optional
        Binning of the tilt-axis search and coarse alignment; None: the power
        of two that brings the larger side to <= 256 px.
    axis_flatten : bool
        After a stage has converged, remove the rotation pattern
        ``m / cos(theta_i)`` that the matching cannot determine (it holds any
        error of the starting tilt axis) and iterate again; see
        :meth:`ProjmatchAligner._axis_scan`.
    debias : bool
        Measure the leave-out reprojection's own bias once per stage on
        synthetic data consistent with the current geometry and subtract it
        (see :meth:`ProjmatchAligner._bias`); costs about one iteration per stage.
    axis_scan_binnings : tuple of int, optional
        Stages after which ``axis_flatten`` acts; None: the first stage only.
    landmark_passes : int
        Passes of the layered-landmark bundle adjustment
        (:mod:`aligners.landmarks`) at the first binning, after the matching
        stages; it takes up the smooth patterns the leave-out matching cannot
        see. 0 (the default) skips it: the particle rounds do that job better
        when the specimen holds dense particles (from the matching result on
        ``standard-nobeads`` seeds 0-4, 12 plain and 6 fine landmark passes
        reached 0.72/0.78/0.74/0.70/1.08 px in about 45 s, two particle
        rounds 0.23/0.24/0.19/0.24/0.21 px in about 25 s). A pass that finds
        too few landmarks (far from the answer, or no structure) ends the
        landmark passes with a warning.
        The passes scatter rather than converge, so their mean goes on
        (to the fine passes, or as the result when there are none): on
        ``standard-nobeads`` seeds 0-4, the mean of 4/8/12 passes had a mean
        error of 1.12/0.97/0.89 px, at about 3.5 s a pass.
    landmark_fine_passes : int
        Passes after those, started from their mean, with each layer's
        window decluttered (the other layers' reprojection subtracted from
        the view, :attr:`aligners.landmarks.LandmarkOptions.declutter`) and
        per-view tilts anchored to the nominal ones (``tilt_anchor_weight``).
        The result is then the mean of these passes. On ``standard-nobeads``
        seeds 0-4, 6 fine passes after the 12 plain ones took the error from
        0.84/0.94/0.76/0.76/1.13 to 0.72/0.78/0.74/0.70/1.08 px and the
        per-view tilt error from the 0.2 degree jitter to 0.12-0.15 degree
        RMS. (After 8 plain passes, 10 fine ones gained at most 0.03 px over
        6.) 0 skips them.
    tilt_anchor_weight : float
        :attr:`aligners.bundle.BundleOptions.tilt_anchor_weight` of the
        particle passes and the fine landmark passes: how strongly each view's
        tilt, beyond a common offset, is held at the nominal tilt from the
        microscope log.
    landmark_layer_px : float
        Thickness of the landmark layers, unbinned px.
    particle_rounds : int
        Rounds of the particle refinement (:mod:`aligners.particles`) after
        the matching stages (and landmark passes), at least: dense particles
        are detected in a reconstruction and tracked like gold beads, with no
        template from the reconstruction, so no pull toward the current
        geometry. More rounds follow while a round's last pass still moves a
        view by :attr:`~aligners.particles.ParticleOptions.tolerance_px` or
        more (up to ``max_rounds`` there). 0 skips it. When the views hold too few particles that can
        be tracked, the refinement is skipped with a warning and the result
        so far stands.
    particle_count : int
        Particles tracked per round (:attr:`aligners.particles.ParticleOptions.count`).
    particle_size_nm : float
        Scale of the particles' blob filter
        (:attr:`aligners.particles.ParticleOptions.sigma_px`) in nm: 2.4 nm
        (3 px at 8 Å, binned by 2: 1.5 px) suits protein complexes of
        2-6 nm radius.
    particle_binning : int, optional
        Binning of the particle refinement; None: the largest power of two
        that leaves ``particle_size_nm`` at least 1.5 binned px (2 at 8 Å per px).
    axis_profile : bool
        After every matching iteration, correct each view's along-axis shift
        by its smooth pattern in tilt measured from the tilt-axis profiles
        (:mod:`aligners.axisprofile`): the specimen's projection onto the tilt
        axis is the same in every view, so it measures what the leave-out
        matching cannot see. Costs well under 0.1 s per iteration.
    clip_percentile : float or None
        Before anything else the binned line integrals are clipped to their
        ``[100 - q, q]`` percentiles over the series. Gold beads and dense
        membranes, a few pixels in a thousand, otherwise dominate the patch
        correlations and the streaks of the working reconstruction. None
        keeps the values.
    workers : int, optional
        Threads of the reconstruction kernels (default all cores).
    """

    binnings: tuple[int, ...] | None = None
    max_iterations: int = 12
    tolerance_px: float = 0.2
    folds: int = 2
    method: str = "wbp"
    weighting: str = "ramp"
    sirt_like_iterations: int = 10
    sirt_iterations: int = 10
    refine: tuple[str, ...] = _REFINABLE
    thickness_px: float | None = None
    z_margin: float = 1.3
    width_factor: float = 2.0
    patch_size: int = 64
    patch_step: int = 48
    max_shift: float = 8.0
    lowpass: float = 0.3
    highpass: float = 0.02
    min_peak: float = 0.25
    min_patches: int = 1
    min_patches_affine: int = 8
    min_reliable_fraction: float = 0.5
    tilt_regularisation: float = 0.05
    initial_geometry: Geometry | None = field(default=None, compare=False)
    tilt_axis_deg: float | None = None
    search_tilt_axis: bool = True
    coarse_binning: int | None = None
    axis_flatten: bool = False
    debias: bool = True
    axis_scan_binnings: tuple[int, ...] | None = None
    landmark_passes: int = 0
    landmark_fine_passes: int = 6
    tilt_anchor_weight: float = 2.0
    landmark_layer_px: float = 48.0
    particle_rounds: int = 2
    particle_count: int = 1500
    particle_size_nm: float = 2.4
    particle_binning: int | None = None
    axis_profile: bool = True
    clip_percentile: float | None = 99.5
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.binnings is not None:
            b = tuple(self.binnings)
            if not b or any(isinstance(v, bool) or not float(v).is_integer() or v < 1 for v in b):
                raise ConfigError(f"projmatch.binnings: expected positive integers, got {self.binnings!r}")
            b = tuple(int(v) for v in b)
            if any(b[i] % b[i + 1] for i in range(len(b) - 1)):
                raise ConfigError(f"projmatch.binnings: each binning must be a multiple of the next, got {b}")
            object.__setattr__(self, "binnings", b)
        for name, lo in (("max_iterations", 1), ("folds", 2), ("sirt_like_iterations", 1), ("sirt_iterations", 1),
                         ("patch_size", 8), ("patch_step", 1), ("min_patches", 1), ("min_patches_affine", 1),
                         ("landmark_passes", 0), ("landmark_fine_passes", 0), ("particle_rounds", 0),
                         ("particle_count", 3)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"projmatch.{name}: expected an integer >= {lo}, got {v!r}")
        for name in ("tolerance_px", "z_margin", "width_factor", "max_shift", "min_peak", "landmark_layer_px",
                     "particle_size_nm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"projmatch.{name}: expected a positive number, got {v!r}")
        if not (isinstance(self.tilt_anchor_weight, (int, float)) and math.isfinite(self.tilt_anchor_weight)
                and self.tilt_anchor_weight >= 0):
            raise ConfigError(f"projmatch.tilt_anchor_weight: expected a finite number >= 0, got {self.tilt_anchor_weight!r}")
        if self.z_margin < 1 or self.width_factor < 1:
            raise ConfigError("projmatch.z_margin / width_factor: expected >= 1")
        if self.clip_percentile is not None and not 50 < self.clip_percentile <= 100:
            raise ConfigError(f"projmatch.clip_percentile: expected a percentile in (50, 100] or None, got {self.clip_percentile!r}")
        if self.method not in ("wbp", "sirt"):
            raise ConfigError(f"projmatch.method: expected 'wbp' or 'sirt', got {self.method!r}")
        if self.weighting not in ("ramp", "sirt-like"):
            raise ConfigError(f"projmatch.weighting: expected 'ramp' or 'sirt-like', got {self.weighting!r}")
        refine = tuple(self.refine)
        bad = [r for r in refine if r not in _REFINABLE]
        if bad:
            raise ConfigError(f"projmatch.refine: unknown {bad}; expected any of {', '.join(_REFINABLE)}")
        object.__setattr__(self, "refine", refine)
        if not 0 < self.lowpass <= 0.5 or not 0 < self.highpass < self.lowpass:
            raise ConfigError(f"projmatch.lowpass / highpass: expected 0 < highpass < lowpass <= 0.5, got {self.lowpass}, {self.highpass}")
        if not 0 <= self.min_reliable_fraction <= 1:
            raise ConfigError(f"projmatch.min_reliable_fraction: expected a fraction in [0, 1], got {self.min_reliable_fraction!r}")
        if not self.tilt_regularisation >= 0:
            raise ConfigError(f"projmatch.tilt_regularisation: expected >= 0, got {self.tilt_regularisation!r}")
        if self.particle_binning is not None and (isinstance(self.particle_binning, bool)
                                                  or not isinstance(self.particle_binning, (int, np.integer))
                                                  or self.particle_binning < 1):
            raise ConfigError(f"projmatch.particle_binning: expected an integer >= 1 or None, got {self.particle_binning!r}")
        if self.thickness_px is not None and not self.thickness_px > 0:
            raise ConfigError(f"projmatch.thickness_px: expected a positive thickness in px or None, got {self.thickness_px!r}")
        if self.initial_geometry is not None and not isinstance(self.initial_geometry, Geometry):
            raise ConfigError(f"projmatch.initial_geometry: expected a Geometry or None, got {type(self.initial_geometry).__name__}")


# --------------------------------------------------------------------------- geometry helpers


def _power_of_two_binning(side: int, target_px: int) -> int:
    """The smallest power of two that brings ``side`` to at most ``target_px``."""
    b = 1
    while side / b > target_px:
        b *= 2
    return b


def _auto_binnings(shape: tuple[int, int]) -> tuple[int, ...]:
    first = _power_of_two_binning(max(shape), 256)
    last = _power_of_two_binning(max(shape), 256)
    out = [first]
    while out[-1] > last:
        out.append(out[-1] // 2)
    return tuple(out)


def _binned(geometry: Geometry, b: int, shape_b: tuple[int, int]) -> Geometry:
    """The geometry in the pixels of images binned by ``b`` (fourier_bin keeps centred coordinates: x_b = x / b)."""
    return geometry.replace(shift_px=geometry.shift_px / b, image_shape=shape_b)


def _field_points(shape: tuple[int, int], n: int = 5) -> np.ndarray:
    h, w = shape
    xs = np.linspace(-0.4 * w, 0.4 * w, n)
    ys = np.linspace(-0.4 * h, 0.4 * h, n)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)], axis=1)


def _update_size(old: Geometry, new: Geometry) -> np.ndarray:
    """Per-view RMS displacement (px) of specimen points over the field of view between two geometries."""
    pts = _field_points(old.image_shape)
    d = new.project(pts) - old.project(pts)
    return np.sqrt(np.mean(np.sum(d * d, axis=-1), axis=1))


def _geometry_dict(g: Geometry) -> dict:
    return {
        "tilt_deg": g.tilt_deg.tolist(),
        "rot_deg": g.rot_deg.tolist(),
        "mag": g.mag.tolist(),
        "shift_px": g.shift_px.tolist(),
    }


def geometry_from_dict(data: dict, like: Geometry) -> Geometry:
    """Rebuild a Geometry recorded in ``info["iterations"][k]["geometry"]`` (image shape and pixel size from ``like``)."""
    return like.replace(
        tilt_deg=np.asarray(data["tilt_deg"], dtype=float),
        rot_deg=np.asarray(data["rot_deg"], dtype=float),
        mag=np.asarray(data["mag"], dtype=float),
        shift_px=np.asarray(data["shift_px"], dtype=float),
    )


# --------------------------------------------------------------------------- per-view motion fit


@dataclass(frozen=True)
class ViewFit:
    """The small motion that brings a view's model onto its measurements.

    Parameters
    ----------
    shift : (2,) array
        ``e``: shift in the aligned frame (same units as the patch positions).
    log_mag : float
        ``sigma``: relative magnification change.
    rotation_rad : float
        ``omega``: in-plane rotation change, radians.
    tilt_rad : float
        ``dtheta``: tilt change, radians.
    n_used : int
        Patches that entered the fit (after rejection).
    rms : float
        RMS residual of the used patches.
    """

    shift: np.ndarray
    log_mag: float
    rotation_rad: float
    tilt_rad: float
    n_used: int
    rms: float


def fit_view_motion(
    q: np.ndarray,
    dq: np.ndarray,
    tilt_deg: float,
    *,
    refine: tuple[str, ...] = _REFINABLE,
    weights: np.ndarray | None = None,
    tilt_regularisation: float = 0.05,
    reject_sigma: float = 3.5,
) -> ViewFit:
    """Fit ``dq = e + [[sigma - tan(theta) dtheta, -omega], [omega, sigma]] q`` robustly.

    Parameters
    ----------
    q : (m, 2) array
        Patch positions in the view's aligned frame (tilt axis along y).
    dq : (m, 2) array
        Measured displacements (where the content is, minus where the model puts it), aligned frame.
    tilt_deg : float
        The view's tilt.
    refine : tuple of str
        Which of shift, rotation, magnification, tilt are free (others stay 0).
    weights : (m,) array, optional
        Patch weights.
    tilt_regularisation : float
        Ridge weight on ``dtheta`` relative to the data's stretch sensitivity at 45 degrees.
    reject_sigma : float
        Patches beyond this many robust sigmas of the residual are dropped (iterated).
    """
    q = np.asarray(q, dtype=float)
    dq = np.asarray(dq, dtype=float)
    m = q.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=float)
    tan_t = math.tan(math.radians(tilt_deg))
    # columns: e_x, e_y, sigma, omega, dtheta
    a = np.zeros((2 * m, 5))
    a[0::2, 0] = 1.0
    a[1::2, 1] = 1.0
    a[0::2, 2] = q[:, 0]
    a[1::2, 2] = q[:, 1]
    a[0::2, 3] = -q[:, 1]
    a[1::2, 3] = q[:, 0]
    a[0::2, 4] = -tan_t * q[:, 0]
    y = dq.reshape(-1)
    free = np.array(["shift" in refine, "shift" in refine, "magnification" in refine, "rotation" in refine, "tilt" in refine])
    if m < 4:
        free[2:] = False
    keep = np.ones(m, dtype=bool)
    x = np.zeros(5)
    rms = float("nan")
    scale_q2 = float(np.mean(np.sum(q * q, axis=1))) if m else 1.0
    for _ in range(5):
        wk = np.repeat(np.where(keep, w, 0.0), 2)
        aw = a[:, free] * np.sqrt(wk)[:, None]
        yw = y * np.sqrt(wk)
        ata = aw.T @ aw
        atb = aw.T @ yw
        idx = np.flatnonzero(free)
        if free[4]:
            k = int(np.flatnonzero(idx == 4)[0])
            # the stretch column at 45 degrees has energy ~ sum w q_x^2; ridge relative to that
            ata[k, k] += tilt_regularisation * float(np.sum(wk[0::2])) * 0.5 * scale_q2
        if not idx.size:
            break
        try:
            sol = np.linalg.solve(ata, atb)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(ata, atb, rcond=None)[0]
        x = np.zeros(5)
        x[idx] = sol
        r = (y - a @ x).reshape(m, 2)
        rl = np.sqrt(np.sum(r * r, axis=1))
        med = float(np.median(rl[keep])) if keep.any() else 0.0
        mad = 1.4826 * float(np.median(np.abs(rl[keep] - med))) if keep.any() else 0.0
        limit = med + reject_sigma * max(mad, 1e-3)
        new_keep = rl <= limit
        rms = float(np.sqrt(np.mean(rl[new_keep] ** 2))) if new_keep.any() else float("nan")
        if np.array_equal(new_keep, keep) or new_keep.sum() < max(3, m // 2):
            break
        keep = new_keep
    return ViewFit(shift=x[:2].copy(), log_mag=float(x[2]), rotation_rad=float(x[3]), tilt_rad=float(x[4]),
                   n_used=int(keep.sum()), rms=rms)


# --------------------------------------------------------------------------- the aligner


@dataclass(frozen=True)
class _Stage:
    images: np.ndarray  # (n, hb, wb) binned line integrals
    binning: int
    vol_shape: tuple[int, int, int]


class ProjmatchAligner:
    """Projection matching: each view against the reprojection of a reconstruction made without it."""

    name = "projmatch"
    Params = ProjmatchParams

    def __init__(self, params: ProjmatchParams | None = None) -> None:
        self.params = params or ProjmatchParams()

    # ----------------------------------------------------------------- driver

    def align(self, observation: Observation) -> AlignmentResult:
        p = self.params
        t_start = time.perf_counter()
        cpu_start = time.process_time()
        stack = observation.stack
        n, h, w = stack.shape
        if n < 2 * p.folds:
            raise ConfigError(f"projmatch: {n} views are too few for {p.folds} folds (need >= {2 * p.folds})")
        binnings = p.binnings or _auto_binnings((h, w))
        if min(h, w) // binnings[0] < 32:
            raise ConfigError(f"projmatch.binnings: images of {h}x{w} px binned by {binnings[0]} are smaller than 32 px")
        finest = binnings[-1]
        base = binned_line_integrals(stack, finest)
        if p.clip_percentile is not None:
            lo, hi = np.percentile(base.images, [100.0 - p.clip_percentile, p.clip_percentile])
            base = dataclasses.replace(base, images=np.clip(base.images, lo, hi))
        stacks = {finest: base}
        for b in binnings[:-1]:
            stacks[b] = base.rebin(b // finest)
        info: dict = {"aligner": self.name, "binnings": list(binnings)}

        geometry = self._start(observation, lambda: self._coarse_stack(stack, stacks), info)
        info["start_geometry"] = _geometry_dict(geometry)
        thickness = p.thickness_px
        if thickness is None:
            thickness = self._thickness(stacks[binnings[0]], geometry)
            info["thickness_estimated_px"] = thickness
        info["thickness_px"] = float(thickness)

        history: list[dict] = []
        stats: dict | None = None
        scan_bins = p.axis_scan_binnings if p.axis_scan_binnings is not None else (binnings[0],)
        for b in binnings:
            images = stacks[b].images
            stage = _Stage(images=images, binning=b, vol_shape=self._volume_shape(geometry, images.shape[1:], b, thickness))
            tol = p.tolerance_px * b / finest
            geometry, stats = self._run_stage(stage, geometry, tol, history)
            if p.axis_flatten and b in scan_bins:
                geometry, scan = self._axis_scan(stage, geometry)
                info.setdefault("axis_scans", []).append(scan)
                geometry, stats = self._run_stage(stage, geometry, tol, history)
        landmark_report = None
        if p.landmark_passes:
            geometry, landmark_report = self._landmarks(stacks[binnings[0]], geometry, thickness, observation, history)
        if p.particle_rounds:
            geometry, particle_report = self._particles(geometry, thickness, observation, history)
            landmark_report = particle_report or landmark_report
        info["iterations"] = history
        # the stop rule is the matching stage's; the later passes run a fixed number of times
        matching = [r for r in history if r["stage"] == "matching"]
        info["converged"] = bool(matching and matching[-1].get("converged", False))
        info["wall_seconds"] = time.perf_counter() - t_start
        info["cpu_seconds"] = time.process_time() - cpu_start
        info["tilt_axis_deg"] = float(np.mean(geometry.rot_deg))
        residuals = landmark_report
        if residuals is None and stats is not None:
            rms = np.asarray(stats["fit_rms"], dtype=float) * finest
            finite = np.isfinite(rms)
            residuals = ResidualReport(
                per_view_rms_px=rms,
                per_view_mean_px=rms,
                per_track_rms_px=np.zeros(0),
                rms_px=float(np.sqrt(np.mean(rms[finite] ** 2))) if finite.any() else float("nan"),
                mean_px=float(np.mean(rms[finite])) if finite.any() else float("nan"),
                n_points=int(np.sum(stats["n_used"])),
            )
        log.info("projmatch: %d iterations in %.1f s (%.1f s CPU)", len(history), info["wall_seconds"], info["cpu_seconds"])
        return AlignmentResult(geometry=geometry, residuals=residuals, info=info)

    def _landmarks(self, stage: BinnedStack, geometry: Geometry, thickness: float, observation: Observation,
                   history: list) -> tuple[Geometry, ResidualReport | None]:
        """Layered-landmark bundle adjustment (:func:`aligners.landmarks.refine_by_landmarks`), one pass at a time.

        First ``landmark_passes`` plain passes, then ``landmark_fine_passes``
        decluttered ones with anchored per-view tilts from the plain passes'
        mean. Returns the mean geometry of the last kind of passes that ran and
        the residual report of the last pass (None when no pass ran).
        """
        p = self.params
        b = stage.binning
        images = stage.images
        vol_shape = self._volume_shape(geometry, images.shape[1:], b, thickness)
        plain = LandmarkOptions(layer_px=p.landmark_layer_px, iterations=1)
        fine = LandmarkOptions(layer_px=p.landmark_layer_px, iterations=1, declutter=True, tilt="per-view",
                               tilt_anchor_weight=p.tilt_anchor_weight)
        report = None
        for kind, options, count in (("plain", plain, p.landmark_passes), ("fine", fine, p.landmark_fine_passes)):
            passes_done: list[Geometry] = []
            for it in range(count):
                t0 = time.perf_counter()
                try:
                    new, passes, solution = refine_by_landmarks(
                        images, b, geometry, vol_shape, thickness, options=options,
                        acquisition_order=observation.acquisition_order,
                        reconstruct_kwargs={"weighting": p.weighting, "workers": p.workers},
                        nominal_tilt_deg=observation.tilt_deg,
                    )
                except AlignmentError as exc:
                    # The layers did not match (too coarse a sampling for the windows, or too
                    # far from the answer); the result so far stands.
                    log.warning("projmatch: %s landmark passes stopped at pass %d (%s)", kind, it + 1, exc)
                    break
                # the bundle adjustment fixes its own gauge: measure the change without it
                change = alignment_error(new, geometry, thickness_px=thickness).per_view_px
                geometry = new
                passes_done.append(new)
                report = solution.report
                history.append({
                    "stage": "landmarks",
                    "kind": kind,
                    "binning": b,
                    "iteration": it + 1,
                    "max_update_px": float(change.max()),
                    "rms_update_px": float(np.sqrt(np.mean(change**2))),
                    "landmarks": passes[0].landmarks,
                    "residual_rms_px": passes[0].residual_rms_px,
                    "seconds": time.perf_counter() - t0,
                    "geometry": _geometry_dict(geometry),
                })
            if len(passes_done) > 1:
                # The passes scatter about the answer (each re-measures every
                # landmark against a reconstruction from the previous pass) rather
                # than converge, so their mean is the estimate (see
                # ``landmark_passes`` for what it gained). Every pass fixes the
                # same gauge, so their parameters can be averaged.
                geometry = _mean_geometry(passes_done)
            if len(passes_done) < count:
                break
        return geometry, report

    def _particles(self, geometry: Geometry, thickness: float,
                   observation: Observation, history: list) -> tuple[Geometry, ResidualReport | None]:
        """Particle refinement (:func:`aligners.particles.refine_by_particles`); the geometry unchanged when it fails."""
        p = self.params
        try:
            b, _, passes = refine_observation(
                observation, geometry, thickness, size_nm=p.particle_size_nm, binning=p.particle_binning,
                clip_percentile=p.clip_percentile, workers=p.workers,
                options=ParticleOptions(count=p.particle_count, rounds=p.particle_rounds,
                                        tilt_anchor_weight=p.tilt_anchor_weight),
            )
        except AlignmentError as exc:
            log.warning("projmatch: particle refinement skipped (%s); the result so far stands", exc)
            return geometry, None
        for rec in passes:
            geometry = rec.geometry
            history.append({
                "stage": "particles",
                "binning": b,
                "round": rec.round,
                "iteration": rec.iteration,
                "max_update_px": rec.max_update_px,
                "rms_update_px": rec.rms_update_px,
                "particles": rec.particles,
                "residual_rms_px": rec.residual_rms_px,
                "seconds": rec.seconds,
                "geometry": _geometry_dict(geometry),
            })
        return geometry, passes[-1].solution.report

    def _run_stage(self, stage: _Stage, geometry: Geometry, tol: float, history: list) -> tuple[Geometry, dict | None]:
        """Iterate at one binning until the largest update is below ``tol`` (or ``max_iterations``); appends to ``history``."""
        b = stage.binning
        stats = None
        bias = self._bias(stage, geometry) if self.params.debias else None
        for it in range(self.params.max_iterations):
            t0 = time.perf_counter()
            new_geometry, stats = self._iterate(stage, geometry, bias)
            profile_rms = float("nan")
            if self.params.axis_profile:
                profile = along_axis_shifts(stage.images, b, new_geometry)
                new_geometry = apply_along_axis_shifts(new_geometry, profile.shift_px)
                profile_rms = float(np.sqrt(np.mean(profile.shift_px**2)))
            sizes = _update_size(geometry, new_geometry)
            geometry = new_geometry
            rec = {
                "stage": "matching",
                "binning": b,
                "iteration": it + 1,
                "max_update_px": float(sizes.max()),
                "rms_update_px": float(np.sqrt(np.mean(sizes**2))),
                "mean_peak": float(np.nanmean(stats["peak"])),
                "reliable_views": int(stats["reliable"].sum()),
                "axis_profile_rms_px": profile_rms,
                "seconds": time.perf_counter() - t0,
                "geometry": _geometry_dict(geometry),
            }
            history.append(rec)
            log.info(
                "projmatch bin %d iteration %d: max update %.3f px, rms %.3f px (along-axis profile %.3f), "
                "mean peak %.3f (%.1f s)",
                b, it + 1, rec["max_update_px"], rec["rms_update_px"], profile_rms, rec["mean_peak"], rec["seconds"],
            )
            if rec["max_update_px"] < tol:
                rec["converged"] = True
                break
        return geometry, stats

    def _axis_scan(self, stage: _Stage, geometry: Geometry) -> tuple[Geometry, dict]:
        """Remove the rotation pattern ``m / cos(theta_i)`` that projection matching cannot see.

        Per-view rotations ``phi_i + m / cos(theta_i)`` keep the projections of
        the specimen's mid-plane consistent for any ``m`` (the change is
        equivalent to a shear of that plane), so the per-view updates leave
        ``m`` wherever the start put it (an error of the starting tilt axis
        ends up there). Only content away from the mid-plane sees it, weakly.
        Here ``m`` is taken as the coefficient of ``1 / cos(theta)`` in a
        robust regression of the rotations on ``(1, 1 / cos(theta))``, i.e.
        the rotations are assumed to carry no systematic trend with
        ``1 / cos(theta)``; a rotation drift that happens to correlate with it
        (drift in a dose-symmetric acquisition grows with |tilt|) biases ``m``.
        """
        sec = 1.0 / np.cos(np.deg2rad(geometry.tilt_deg))
        design = np.stack([np.ones_like(sec), sec], axis=1)
        rot = geometry.rot_deg
        keep = np.ones(rot.size, dtype=bool)
        coef = np.zeros(2)
        for _ in range(3):
            coef = np.linalg.lstsq(design[keep], rot[keep], rcond=None)[0]
            r = rot - design @ coef
            mad = 1.4826 * float(np.median(np.abs(r[keep] - np.median(r[keep])))) + 1e-6
            keep = np.abs(r) <= 3.5 * mad
        m = float(coef[1])
        log.info("projmatch: rotation pattern m / cos(theta) with m = %.3f deg removed (axis %.3f deg)", m, coef[0])
        scan = {"binning": stage.binning, "m_deg": m, "axis_deg": float(coef[0])}
        return geometry.replace(rot_deg=rot - m * sec), scan

    def _folds(self, geometry: Geometry) -> np.ndarray:
        """Fold of each view: interleaved by tilt rank, so every fold spans the tilt range."""
        n = geometry.n_views
        order = np.argsort(geometry.tilt_deg, kind="stable")
        fold_of = np.empty(n, dtype=int)
        fold_of[order] = np.arange(n) % self.params.folds
        return fold_of

    # ----------------------------------------------------------------- start

    def _coarse_stack(self, stack: np.ndarray, stacks: dict[int, BinnedStack]) -> BinnedStack:
        """The stack at the coarse alignment's binning (reusing a stage's stack when it divides)."""
        h, w = stack.shape[1:]
        b = self.params.coarse_binning or _power_of_two_binning(max(h, w), 256)
        for have, bs in sorted(stacks.items()):
            if b % have == 0:
                return bs.rebin(b // have)
        return binned_line_integrals(stack, b)

    def _start(self, observation: Observation, coarse_stack, info: dict) -> Geometry:
        p = self.params
        n, h, w = observation.stack.shape
        if p.initial_geometry is not None:
            g = p.initial_geometry
            if g.n_views != n or g.image_shape != (h, w):
                raise ConfigError(
                    f"projmatch.initial_geometry: has {g.n_views} views of {g.image_shape}, the stack {n} of {(h, w)}"
                )
            info["start"] = "initial_geometry"
            return g
        axis = p.tilt_axis_deg if p.tilt_axis_deg is not None else observation.tilt_axis_deg
        coarse_stack = coarse_stack()
        if p.search_tilt_axis:
            found = find_tilt_axis(coarse_stack, observation.tilt_deg, start_deg=axis)
            axis = found.angle_deg
            info["tilt_axis_search_deg"] = float(axis)
        if axis is None:
            axis = 0.0
        coarse = coarse_align(coarse_stack, observation.tilt_deg, float(axis), pixel_size_A=observation.pixel_size_A)
        info["start"] = "coarse"
        return coarse.geometry

    # ----------------------------------------------------------------- volume

    def _volume_shape(self, g: Geometry, shape_b: tuple[int, int], b: int, thickness: float) -> tuple[int, int, int]:
        """A volume that holds the specimen seen by every view, in binned voxels."""
        hb, wb = shape_b
        corners = np.array([[-(wb - 1) / 2, -(hb - 1) / 2], [(wb - 1) / 2, -(hb - 1) / 2],
                            [-(wb - 1) / 2, (hb - 1) / 2], [(wb - 1) / 2, (hb - 1) / 2]])
        a_inv = np.linalg.inv(g.inplane_matrices())
        t = g.shift_px / b
        q = np.einsum("nij,nmj->nmi", a_inv, corners[None] - t[:, None, :])
        low = np.abs(g.tilt_deg) <= 20
        qx = np.abs(q[low if low.any() else slice(None), :, 0]).max()
        qy = np.abs(q[..., 1]).max()
        nx = 2 * int(math.ceil(self.params.width_factor * qx / 2.0))
        ny = 2 * int(math.ceil(qy + 1))
        nz = 2 * int(math.ceil(self.params.z_margin * thickness / b / 2.0))
        return (max(nz, 4), ny, nx)

    def _thickness(self, stage: BinnedStack, g: Geometry) -> float:
        b = stage.binning
        hb, wb = stage.images.shape[1:]
        probe = 0.6 * max(hb, wb) * b
        shape = self._volume_shape(g, (hb, wb), b, probe / self.params.z_margin)
        return measure_thickness(stage.images, b, g, shape=shape, workers=self.params.workers)

    # ----------------------------------------------------------------- one iteration

    def _reconstruct(self, images: np.ndarray, g: Geometry, views: np.ndarray, shape) -> np.ndarray:
        p = self.params
        sub = g.select(views)
        if p.method == "sirt":
            return reconstruct(images[views], sub, shape, method="sirt", iterations=p.sirt_iterations, workers=p.workers)
        return reconstruct(images[views], sub, shape, method="wbp", weighting=p.weighting,
                           sirt_like_iterations=p.sirt_like_iterations, workers=p.workers)

    def _bias(self, stage: _Stage, geometry: Geometry) -> np.ndarray:
        """The measurement's own bias at this geometry, from data that are consistent with it by construction.

        A leave-out reprojection interpolates the missing view from its
        neighbours, which is exact only to first order in their angular
        distance: content is pulled toward the neighbours' positions by a
        small, systematic amount (larger with a smoothing filter and a deep
        volume). The fixed-point iteration would follow that pull every
        iteration and drift. Here the full reconstruction is reprojected into
        every view (synthetic data that fit the geometry exactly) and
        measured like the real data; the fitted motions are the bias, later
        subtracted from the real measurements.

        Returns
        -------
        (n, 5) array
            ``(e_x, e_y, sigma, omega, dtheta)`` per view (binned px, radians); NaN where unmeasured.
        """
        p = self.params
        b = stage.binning
        n, hb, wb = stage.images.shape
        g_b = _binned(geometry, b, (hb, wb))
        vol = self._reconstruct(stage.images, g_b, np.arange(n), stage.vol_shape)
        synthetic = reproject(vol, g_b, workers=p.workers)
        del vol
        out = np.full((n, 5), np.nan)
        fold_of = self._folds(geometry)
        for k in range(p.folds):
            views = np.flatnonzero(fold_of == k)
            vol = self._reconstruct(synthetic, g_b, np.flatnonzero(fold_of != k), stage.vol_shape)
            ref = reproject(vol, g_b, views=views, workers=p.workers)
            del vol
            for v, fit in zip(views, self._measure(synthetic[views], ref, g_b.select(views), stage.vol_shape)):
                if fit is not None:
                    f = fit[0]
                    out[v] = (f.shift[0], f.shift[1], f.log_mag, f.rotation_rad, f.tilt_rad)
        log.info("projmatch: measurement bias at bin %d: rms shift %.3f binned px", b,
                 float(np.sqrt(np.nanmean(np.sum(out[:, :2] ** 2, axis=1)))))
        return out

    def _iterate(self, stage: _Stage, geometry: Geometry, bias: np.ndarray | None = None) -> tuple[Geometry, dict]:
        p = self.params
        b = stage.binning
        images = stage.images
        n, hb, wb = images.shape
        fold_of = self._folds(geometry)
        tilt = geometry.tilt_deg.copy()
        rot = geometry.rot_deg.copy()
        mag = geometry.mag.copy()
        shift_b = geometry.shift_px / b
        peak = np.full(n, np.nan)
        n_used = np.zeros(n, dtype=int)
        fit_rms = np.full(n, np.nan)
        reliable = np.zeros(n, dtype=bool)
        d_shift = np.zeros((n, 2))
        d_tilt = np.zeros(n)
        d_logmag = np.zeros(n)
        for k in range(p.folds):
            views = np.flatnonzero(fold_of == k)
            others = np.flatnonzero(fold_of != k)
            g_b = Geometry(tilt_deg=tilt, rot_deg=rot, mag=mag, shift_px=shift_b, image_shape=(hb, wb),
                           pixel_size_A=geometry.pixel_size_A)
            vol = self._reconstruct(images, g_b, others, stage.vol_shape)
            ref = reproject(vol, g_b, views=views, workers=p.workers)
            del vol
            fits = self._measure(images[views], ref, g_b.select(views), stage.vol_shape)
            for v, fit in zip(views, fits):
                if fit is None:
                    continue
                peak[v], n_used[v], fit_rms[v] = fit[1], fit[0].n_used, fit[0].rms
                reliable[v] = True
                f = fit[0]
                if bias is not None and np.all(np.isfinite(bias[v])):
                    f = ViewFit(shift=f.shift - bias[v, :2], log_mag=f.log_mag - bias[v, 2],
                                rotation_rad=f.rotation_rad - bias[v, 3], tilt_rad=f.tilt_rad - bias[v, 4],
                                n_used=f.n_used, rms=f.rms)
                a = g_b.inplane_matrices()[v]
                d_shift[v] = a @ f.shift
                d_logmag[v] = f.log_mag
                d_tilt[v] = math.degrees(f.tilt_rad)
                rot[v] += math.degrees(f.rotation_rad)
                mag[v] *= math.exp(f.log_mag)
                tilt[v] += math.degrees(f.tilt_rad)
                shift_b[v] = shift_b[v] + d_shift[v]
        if reliable.sum() < max(1, math.ceil(p.min_reliable_fraction * n)):
            raise AlignmentError(
                f"correlation too low: only {int(reliable.sum())} of {n} views match their reprojection at binning {b} "
                f"(need {p.min_patches} patches with correlation >= {p.min_peak:g}); "
                "the images hold no structure consistent with a tomogram"
            )
        # Gauge: the specimen's tilt offset, scale and 3-D position are not determined by the data.
        if np.any(reliable):
            tilt[reliable] -= d_tilt[reliable].mean()
            mag[reliable] /= math.exp(d_logmag[reliable].mean())
            u = np.einsum("nji,nj->ni", _rotations(rot), d_shift)  # aligned-frame shift updates
            th = np.deg2rad(geometry.tilt_deg)
            design = np.stack([np.cos(th), np.sin(th)], axis=1)[reliable]
            tx_tz = np.linalg.lstsq(design, u[reliable, 0], rcond=None)[0]
            ty = u[reliable, 1].mean()
            gauge_u = np.stack([np.stack([np.cos(th), np.sin(th)], axis=1) @ tx_tz, np.full(n, ty)], axis=1)
            gauge_t = np.einsum("nij,nj->ni", _rotations(rot), gauge_u)
            shift_b = shift_b - gauge_t
        new = geometry.replace(tilt_deg=tilt, rot_deg=rot, mag=mag, shift_px=shift_b * b)
        return new, {"peak": peak, "n_used": n_used, "fit_rms": fit_rms, "reliable": reliable}

    def _patches(self, views: np.ndarray, refs: np.ndarray, g: Geometry, vol_shape):
        """Tapered, mean-free patch pairs (reprojection, view) where the reprojection is complete.

        Returns ``(a, b, owner, q)``: patch stacks, the view index of each patch
        and its centre in the view's aligned frame; None when there are none.
        """
        p = self.params
        m, hb, wb = views.shape
        # small (very binned) images: fewer, relatively larger patches
        ps = min(p.patch_size, min(hb, wb) // 2)
        step = max(1, min(p.patch_step, (3 * ps) // 4))
        nz, ny, nx = vol_shape
        rows = np.arange(0, hb - ps + 1, step)
        cols = np.arange(0, wb - ps + 1, step)
        rows = rows + (hb - ps - rows[-1]) // 2
        cols = cols + (wb - ps - cols[-1]) // 2
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        corners = np.stack([rr.ravel(), cc.ravel()], axis=1)
        centres = np.stack([cc.ravel() + (ps - 1) / 2 - (wb - 1) / 2, rr.ravel() + (ps - 1) / 2 - (hb - 1) / 2], axis=1)
        half = ps / 2.0 + p.max_shift / 2.0
        offs = np.array([[-half, -half], [half, -half], [-half, half], [half, half]])
        window = imageops.taper_window((ps, ps), ps / 4.0)
        a_inv = np.linalg.inv(g.inplane_matrices())
        tilt = np.deg2rad(g.tilt_deg)
        all_a, all_b, owner, qpos = [], [], [], []
        for i in range(m):
            # the reprojection is complete where rays cross the whole depth of the volume
            lim_x = 0.5 * nx * abs(math.cos(tilt[i])) - 0.5 * nz / self.params.z_margin * abs(math.sin(tilt[i])) - 2
            lim_y = 0.5 * ny - 2
            pts = centres[:, None, :] + offs[None]
            q = np.einsum("ij,kmj->kmi", a_inv[i], pts - g.shift_px[i])
            ok = np.all((np.abs(q[..., 0]) <= lim_x) & (np.abs(q[..., 1]) <= lim_y), axis=1)
            sel = np.flatnonzero(ok)
            if sel.size == 0:
                continue
            pa = imageops.extract_patches(refs[i], corners[sel], ps)
            pb = imageops.extract_patches(views[i], corners[sel], ps)
            pa = (pa - pa.mean(axis=(1, 2), keepdims=True)) * window
            pb = (pb - pb.mean(axis=(1, 2), keepdims=True)) * window
            all_a.append(pa)
            all_b.append(pb)
            owner.append(np.full(sel.size, i))
            qpos.append(np.einsum("ij,kj->ki", a_inv[i], centres[sel] - g.shift_px[i]))
        if not all_a:
            return None
        return np.concatenate(all_a), np.concatenate(all_b), np.concatenate(owner), np.concatenate(qpos)

    def _measure(self, views: np.ndarray, refs: np.ndarray, g: Geometry, vol_shape, refine: tuple[str, ...] | None = None) -> list:
        """Patch displacements of each view against its reprojection, fitted per view (binned px)."""
        p = self.params
        m = views.shape[0]
        a_inv = np.linalg.inv(g.inplane_matrices())
        out: list = [None] * m
        pairs = self._patches(views, refs, g, vol_shape)
        if pairs is None:
            return out
        pa, pb, owner_a, q_all = pairs
        res = imageops.correlate_stack(pa, pb, max_shift=p.max_shift, lowpass=p.lowpass, highpass=p.highpass, subpixel="dft")
        good = res.valid & (res.peak >= p.min_peak)
        for i in range(m):
            sel = np.flatnonzero((owner_a == i) & good)
            if sel.size < p.min_patches:
                continue
            dq = np.einsum("ij,kj->ki", a_inv[i], res.shift[sel])
            wts = np.clip(res.peak[sel], 0.05, None) ** 2
            # few patches (high tilt): their spread says nothing about rotation or scale
            free = p.refine if refine is None else refine
            if sel.size < p.min_patches_affine:
                free = tuple(r for r in free if r == "shift")
            fit = fit_view_motion(q_all[sel], dq, float(g.tilt_deg[i]), refine=free, weights=wts,
                                  tilt_regularisation=p.tilt_regularisation)
            out[i] = (fit, float(np.mean(res.peak[sel])))
        return out


def _mean_geometry(geometries: list[Geometry]) -> Geometry:
    """Per-view mean of tilt, rotation, log-magnification and shift over geometries in one gauge."""
    return geometries[0].replace(
        tilt_deg=np.mean([g.tilt_deg for g in geometries], axis=0),
        rot_deg=np.mean([g.rot_deg for g in geometries], axis=0),
        mag=np.exp(np.mean([np.log(g.mag) for g in geometries], axis=0)),
        shift_px=np.mean([g.shift_px for g in geometries], axis=0),
    )


def _rotations(rot_deg: np.ndarray) -> np.ndarray:
    """``R(phi)`` per view, (n, 2, 2)."""
    r = np.deg2rad(np.asarray(rot_deg, dtype=float))
    c, s = np.cos(r), np.sin(r)
    return np.stack([np.stack([c, -s], axis=-1), np.stack([s, c], axis=-1)], axis=-2)
