"""Particles found in a working reconstruction and tracked like gold beads.

Why particles. The layered landmarks of :mod:`aligners.landmarks` and the
leave-out matching of :mod:`aligners.projmatch` both compare each view with a
template made from a reconstruction, and that reconstruction was made with the
current geometry: whatever error it carries is partly in the template too, so
the measurement is pulled toward the current answer, most strongly for
patterns that vary smoothly with tilt. A compact dense particle (a protein
complex, a ribosome) is different: in every view it is a blob, and where the
blob is can be read from the view alone. The geometry only says where to look.
Tracked like beads, particles give the bundle adjustment measurements with no
pull toward the current geometry, and the smooth patterns become as visible as
the rest.

One round:

1. The views (line integrals binned by ``binning``) are reconstructed by
   weighted back-projection under the current geometry, all views together:
   the volume only says where particles are, their positions in the views
   come from the views.
2. A difference-of-Gaussians blob filter (``sigma_px`` and three times that)
   is run over the volume; its local maxima inside the specimen slab and the
   field all views see are the candidates, and the ``count`` strongest are kept.
3. ``passes`` times: each particle is projected under the current geometry;
   each view's offset from that prediction is found by correlating the
   filtered view with its predicted particle pattern (:func:`view_offsets`,
   within ``capture_px``); the same blob filter's peak is looked for in the
   filtered view within ``search_px`` of each moved prediction (sub-pixel by a parabola through the peak and its
   neighbours), and the measured points go to the shared bundle adjustment
   (:func:`aligners.bundle.solve`: per-view shift, rotation and magnification,
   per-view tilts held near the nominal ones by ``tilt_anchor_weight``, robust
   rejection of the points that landed on a neighbour). The fit gives the next
   geometry and particle positions.

Each round re-detects the particles in a reconstruction made with the
improved geometry; after ``rounds`` rounds, more follow (up to ``max_rounds``)
while a round's last pass still moves a view by ``tolerance_px`` or more.
Most measured points are good to 1.5-2 px (the peak of a particle among the
overlapping projections of its neighbours), but a view holds hundreds of
them, so its parameters are found to a small fraction of a pixel.

On ``standard-nobeads`` (seeds 0-4, 2000 proteins of 2-6 nm radius per field
of view), two rounds took projection matching's result (1.0-1.7 px RMS
alignment error) to 0.19-0.24 px and the patch tracks' (1.1-2.9 px) to
0.18-0.25 px, in about 25 s. On ``standard`` (seed 0, with gold beads) the
matching left the -60 degree views 10 px off; the view offsets brought them
into the search box and two rounds reached 0.24 px.

Limits: the particles must stand out of the noise and of each other in
projection. On a 256 px field (41 views, 100 nm, 125 or 600 proteins) only
25 of 160-210 candidates were significant and :class:`AlignmentError` was
raised (the aligners then keep their result). With the significance test
relaxed, on the 600-protein field the passes drifted away (0.73 -> 1.2 px):
in a crowded projection a blob's peak is a mixture of neighbours that moves
with tilt.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage
from scipy.spatial import cKDTree

from aligners import imageops
from aligners.bundle import BundleOptions, BundleSolution, VariableModel, solve
from aligners.coarse import binned_line_integrals
from simtomo.alignment_error import alignment_error
from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry
from simtomo.observation import Observation
from simtomo.reconstruct import reconstruct

__all__ = ["ParticleOptions", "ParticlePass", "blob_filter", "detect_particles", "estimate_thickness",
           "measure_particles", "measure_thickness", "particle_binning", "refine_by_particles", "refine_observation",
           "view_offsets"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParticleOptions:
    """Settings of the particle refinement (binned px unless stated).

    The measured alternatives below are from ``standard-nobeads`` seed 0,
    started at 0.72 px (projection matching with layered landmarks), before
    the view offsets were added.

    Parameters
    ----------
    count : int
        Particles kept per round, strongest first: 800 gave 0.27 px, 1500
        0.22 px and 3000 0.43 px (the weaker ones are more often lost among
        their neighbours).
    sigma_px : float
        Scale of the blob filter: the difference of Gaussians of ``sigma_px``
        and ``3 sigma_px``. 1.5 at binning 2 suits proteins of 2-6 nm radius
        at 8 Å per px (1.2 gave 0.37 px against 0.27 with 800 particles).
    search_px : int
        A particle's peak is looked for within this many px (each axis) of
        its projection under the current geometry (moved by the view's
        offset, below); a peak on the border of the search box is no
        measurement.
    capture_px : float
        Before the particles are measured, each view's offset is found by
        correlating the view with its predicted particle pattern, within this
        many px (:func:`view_offsets`), so views far off are searched in the
        right place.
    rounds : int
        Detect-and-track rounds at least, each from a new reconstruction.
    max_rounds : int
        Rounds at most: after ``rounds``, another round follows while the
        last pass of the round still moved a view by ``tolerance_px`` or
        more. (On ``standard``, seed 0, projection matching left the -60
        degree views 10 px off, beyond the search box; each pass brings
        them closer.)
    tolerance_px : float
        Largest per-view update (gauge-free change of the geometry, unbinned
        px) below which no further round is started. On ``standard-nobeads``
        the last pass of the second round moves a view by 0.07-0.09 px.
    passes : int
        Measure-and-solve passes per round.
    min_views : int
        Fewest views a particle must be measured in to enter the bundle adjustment.
    min_significance : float
        A particle is significant when the median height of its measured peaks
        is at least this many robust noise sd of the filtered views. In pure
        noise the median peak in a search box is 1.6-2.1 sd (the best of the
        box); on ``standard-nobeads`` the particles' medians spread from 1.4 to
        7.5 sd around 2.8.
    min_particles : int
        Fewest significant particles for a result; else :class:`AlignmentError`.
    tilt_anchor_weight : float
        :attr:`aligners.bundle.BundleOptions.tilt_anchor_weight`: how strongly
        each view's tilt, beyond a common offset, is held at the nominal tilt.
        With one tilt offset for all views instead (no per-view tilts), 0.42 px
        against 0.27 px (800 particles).
    z_margin : float
        Depth of the reconstruction as a multiple of the specimen thickness;
        particles are kept within 1.1 times the thickness.
    """

    count: int = 1500
    sigma_px: float = 1.5
    search_px: int = 3
    capture_px: float = 16.0
    rounds: int = 2
    max_rounds: int = 6
    tolerance_px: float = 0.15
    passes: int = 3
    min_views: int = 10
    min_significance: float = 2.5
    min_particles: int = 50
    tilt_anchor_weight: float = 2.0
    z_margin: float = 1.3

    def __post_init__(self) -> None:
        for name, lo in (("count", 3), ("search_px", 2), ("rounds", 1), ("max_rounds", 1), ("passes", 1),
                         ("min_views", 3), ("min_particles", 3)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"particles.{name}: expected an integer >= {lo}, got {v!r}")
        if self.max_rounds < self.rounds:
            raise ConfigError(f"particles.max_rounds: expected at least rounds ({self.rounds}), "
                              f"got {self.max_rounds!r}")
        for name in ("sigma_px", "min_significance", "tolerance_px", "capture_px"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"particles.{name}: expected a positive number, got {v!r}")
        if not (isinstance(self.tilt_anchor_weight, (int, float)) and math.isfinite(self.tilt_anchor_weight)
                and self.tilt_anchor_weight >= 0):
            raise ConfigError(f"particles.tilt_anchor_weight: expected a finite number >= 0, "
                              f"got {self.tilt_anchor_weight!r}")
        if not (isinstance(self.z_margin, (int, float)) and self.z_margin >= 1.1):
            raise ConfigError(f"particles.z_margin: expected a number >= 1.1, got {self.z_margin!r}")


@dataclass(frozen=True)
class ParticlePass:
    """What one measure-and-solve pass did.

    ``max_update_px`` and ``rms_update_px`` are the largest and RMS per-view
    gauge-free change of the geometry it made
    (:func:`simtomo.alignment_error.alignment_error` of the new geometry
    against the old, over the specimen's thickness), unbinned px.
    """

    round: int
    iteration: int
    particles: int
    points: int
    rejected: int
    residual_rms_px: float
    max_update_px: float
    rms_update_px: float
    seconds: float
    geometry: Geometry
    solution: BundleSolution


def blob_filter(data: np.ndarray, sigma_px: float, *, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Difference of Gaussians ``G(sigma) - G(3 sigma)`` over ``axes`` of ``data`` (default all), float32.

    Bright blobs about ``sigma_px`` across become positive peaks; the smooth
    background and structure much larger than the blob cancel. The filter is
    applied in Fourier space (periodic boundaries: within about ``9 sigma_px``
    of an edge the other edge leaks in), three to four times faster than two
    real-space Gaussians on a reconstruction.
    """
    arr = np.asarray(data, dtype=np.float32)
    axes = tuple(range(arr.ndim)) if axes is None else tuple(a % arr.ndim for a in axes)
    k2 = np.zeros((1,) * arr.ndim, dtype=np.float32)
    for a in axes:
        f = fft.rfftfreq(arr.shape[a]) if a == axes[-1] else fft.fftfreq(arr.shape[a])
        k2 = k2 + (f.astype(np.float32) ** 2).reshape([-1 if i == a else 1 for i in range(arr.ndim)])
    g = np.float32(-2.0 * np.pi**2 * sigma_px**2)
    transfer = np.exp(g * k2) - np.exp(np.float32(9.0) * g * k2)
    spectrum = fft.rfftn(arr, axes=axes, workers=-1)
    spectrum *= transfer
    return fft.irfftn(spectrum, s=[arr.shape[a] for a in axes], axes=axes, workers=-1).astype(np.float32, copy=False)


def detect_particles(volume: np.ndarray, *, sigma_px: float, count: int, half_depth: float,
                     half_width: tuple[float, float]) -> np.ndarray:
    """The ``count`` strongest blobs of a volume, as points ``(x, y, z)`` (m, 3) in voxels from its centre.

    Parameters
    ----------
    volume : (nz, ny, nx) array
        A reconstruction; dense particles are bright.
    sigma_px : float
        Blob scale, voxels (:func:`blob_filter`).
    count : int
        Most blobs returned, strongest first.
    half_depth : float
        Blobs with ``|z|`` beyond this are dropped (outside the specimen slab).
    half_width : (float, float)
        Blobs with ``|x|`` or ``|y|`` beyond these are dropped (outside the field every view sees).
    """
    filtered = blob_filter(volume, sigma_px)
    peaks = filtered == ndimage.maximum_filter(filtered, size=2 * int(2 * sigma_px) + 1)
    z, y, x = np.nonzero(peaks & (filtered > 0))
    strength = filtered[z, y, x]
    nz, ny, nx = volume.shape
    pts = np.column_stack([x - (nx - 1) / 2.0, y - (ny - 1) / 2.0, z - (nz - 1) / 2.0])
    inside = ((np.abs(pts[:, 2]) <= half_depth) & (np.abs(pts[:, 0]) <= half_width[0])
              & (np.abs(pts[:, 1]) <= half_width[1]))
    pts = pts[inside][np.argsort(-strength[inside], kind="stable")]
    # A blob centred between voxels is a plateau of equal maxima: keep the first of each.
    reach = int(2 * sigma_px)
    pairs = cKDTree(pts).query_pairs(reach, p=np.inf, output_type="ndarray")
    duplicate = np.zeros(len(pts), dtype=bool)
    duplicate[pairs.max(axis=1)] = True
    return pts[~duplicate][:count]


def estimate_thickness(volume: np.ndarray, voxel_size_px: float, *, fraction: float = 0.25) -> float:
    """Specimen thickness (px) from the z profile of in-plane structure in a reconstruction.

    The profile is the standard deviation of each z slice after removing its
    smooth background (a coarse in-plane mean); the thickness is the extent
    where it exceeds ``fraction`` of its peak above the floor (the median of
    the outermost slices).

    Parameters
    ----------
    volume : (nz, ny, nx) array
        A reconstruction deeper than the specimen.
    voxel_size_px : float
        Voxel edge in px.
    fraction : float
        Threshold between floor and peak.
    """
    vol = np.asarray(volume, dtype=np.float32)
    nz = vol.shape[0]
    if vol.ndim != 3 or nz < 5:
        raise ConfigError(f"volume: expected a (nz, ny, nx) reconstruction with nz >= 5, got shape {vol.shape}")
    # Inner part of each slice: the edges of a reconstruction carry truncation artefacts.
    _, ny, nx = vol.shape
    core = vol[:, ny // 8 : ny - ny // 8, nx // 4 : nx - nx // 4]
    hp = imageops.bandpass(core, highpass=0.05)
    prof = hp.reshape(nz, -1).std(axis=1)
    edge = max(1, nz // 10)
    floor = float(np.median(np.concatenate([prof[:edge], prof[-edge:]])))
    peak = float(prof.max())
    above = np.flatnonzero(prof > floor + fraction * (peak - floor))
    if above.size == 0 or peak <= floor:
        return float(nz * voxel_size_px)
    return float((above[-1] - above[0] + 1) * voxel_size_px)


def _parabola(m1: np.ndarray, m0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Vertex offset of the parabola through three samples at -1, 0, 1 (0 where they do not form a maximum)."""
    curvature = m1 - 2.0 * m0 + p1
    peak = curvature < 0
    return np.where(peak, 0.5 * (m1 - p1) / np.where(peak, curvature, -1.0), 0.0)


def measure_particles(filtered: np.ndarray, predicted: np.ndarray, search_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob-filter peaks near the predicted particle positions.

    Parameters
    ----------
    filtered : (n, h, w) array
        The views after :func:`blob_filter`.
    predicted : (n, m, 2) array
        Predicted positions, centred image coordinates ``(x, y)`` in the views' px.
    search_px : int
        Half side of the search box.

    Returns
    -------
    positions : (n, m, 2) array
        Measured positions, same coordinates; NaN where the box leaves the
        view or its maximum lies on the box's border (no peak inside).
    heights : (n, m) array
        The filtered view at each peak; NaN where there is no measurement.
    """
    n, h, w = filtered.shape
    r = int(search_px)
    col = np.round(predicted[..., 0] + (w - 1) / 2.0).astype(np.int64)
    row = np.round(predicted[..., 1] + (h - 1) / 2.0).astype(np.int64)
    inside = (row >= r + 1) & (col >= r + 1) & (row < h - r - 1) & (col < w - r - 1)
    out = np.full(predicted.shape, np.nan)
    heights = np.full(predicted.shape[:2], np.nan)
    offsets = np.arange(-r, r + 1)
    side = 2 * r + 1
    for i in range(n):
        k = np.flatnonzero(inside[i])
        if k.size == 0:
            continue
        img = filtered[i]
        boxes = img[row[i, k][:, None, None] + offsets[None, :, None],
                    col[i, k][:, None, None] + offsets[None, None, :]]
        best = np.argmax(boxes.reshape(len(k), -1), axis=1)
        br, bc = best // side, best % side
        interior = (br > 0) & (br < side - 1) & (bc > 0) & (bc < side - 1)
        k, br, bc = k[interior], br[interior], bc[interior]
        pr = row[i, k] + br - r
        pc = col[i, k] + bc - r
        dr = _parabola(img[pr - 1, pc], img[pr, pc], img[pr + 1, pc])
        dc = _parabola(img[pr, pc - 1], img[pr, pc], img[pr, pc + 1])
        out[i, k, 0] = pc + dc - (w - 1) / 2.0
        out[i, k, 1] = pr + dr - (h - 1) / 2.0
        heights[i, k] = img[pr, pc]
    return out, heights


def view_offsets(filtered: np.ndarray, predicted: np.ndarray, sigma_px: float, max_offset_px: float,
                 *, min_significance: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-view shift of the whole particle pattern: where each filtered view best fits the predicted positions.

    The predicted positions are drawn as points, smoothed by a Gaussian of
    ``sigma_px`` and cross-correlated with the filtered view; the highest
    value within ``max_offset_px`` (each axis) is the view's offset. A view
    far off (more than the per-particle search box) is then searched in the
    right place at once, instead of being pulled in by the bundle adjustment a
    fraction of a pixel per pass.

    Parameters
    ----------
    filtered : (n, h, w) array
        The views after :func:`blob_filter`.
    predicted : (n, m, 2) array
        Predicted particle positions, centred image coordinates ``(x, y)``.
    sigma_px : float
        Smoothing of the drawn points.
    max_offset_px : float
        Largest offset searched, px.
    min_significance : float
        The peak must stand this many robust sd of the searched map above its
        median; otherwise the view's offset is 0.

    Returns
    -------
    offsets : (n, 2) array
        ``(dx, dy)`` to add to the view's predicted positions, whole px.
    significance : (n,) array
        Height of each view's peak in robust sd of its searched map.
    """
    n, h, w = filtered.shape
    r = int(max_offset_px)
    k2 = fft.rfftfreq(w)[None, :] ** 2 + fft.fftfreq(h)[:, None] ** 2
    smooth = np.exp(-2.0 * np.pi**2 * sigma_px**2 * k2)
    offsets = np.zeros((n, 2))
    significance = np.zeros(n)
    lags = np.r_[0 : r + 1, -r:0]
    for i in range(n):
        col = np.round(predicted[i, :, 0] + (w - 1) / 2.0)
        row = np.round(predicted[i, :, 1] + (h - 1) / 2.0)
        ok = np.isfinite(col) & np.isfinite(row) & (col >= 0) & (row >= 0) & (col < w) & (row < h)
        if ok.sum() < 3:
            continue
        points = np.zeros((h, w), dtype=np.float32)
        np.add.at(points, (row[ok].astype(np.int64), col[ok].astype(np.int64)), 1.0)
        # corr[dy, dx] sums the filtered view at every predicted position moved by (dx, dy)
        corr = fft.irfft2(fft.rfft2(filtered[i]) * np.conj(fft.rfft2(points)) * smooth, s=(h, w))
        window = corr[np.ix_(lags % h, lags % w)]
        centre = np.median(window)
        spread = 1.4826 * np.median(np.abs(window - centre)) + 1e-30
        iy, ix = np.unravel_index(np.argmax(window), window.shape)
        significance[i] = (window[iy, ix] - centre) / spread
        if significance[i] >= min_significance:
            offsets[i] = lags[ix], lags[iy]
    return offsets, significance


def refine_by_particles(
    images: np.ndarray,
    binning: int,
    geometry: Geometry,
    thickness_px: float,
    *,
    options: ParticleOptions = ParticleOptions(),
    acquisition_order: np.ndarray | None = None,
    nominal_tilt_deg: np.ndarray | None = None,
    workers: int | None = None,
) -> list[ParticlePass]:
    """Refine a geometry by bundle adjustment of particle tracks (see the module notes).

    Parameters
    ----------
    images : (n, hb, wb) array
        Line-integral views binned by ``binning`` (dense matter positive).
    binning : int
    geometry : Geometry
        Starting geometry, unbinned px; it must place particles within about
        ``search_px`` binned px of their true projections (projection
        matching's result does; a coarse alignment does not).
    thickness_px : float
        Specimen thickness, unbinned px.
    options : ParticleOptions
    acquisition_order : (n,) int array, optional
        Passed to the bundle adjustment.
    nominal_tilt_deg : (n,) array, optional
        The stage's tilt readings, the anchor of ``options.tilt_anchor_weight``
        (default: the starting geometry's tilts).
    workers : int, optional
        Threads of the reconstruction.

    Returns
    -------
    list of ParticlePass
        Every pass in order; the last one's geometry is the result.

    Raises
    ------
    AlignmentError
        When fewer than ``options.min_particles`` particles are measured in
        ``options.min_views`` or more views with a median peak of
        ``options.min_significance`` noise sd: the views hold no particles
        consistent with the geometry.
    """
    opt = options
    if np.ndim(images) != 3 or len(images) != geometry.n_views:
        raise ConfigError(f"particles: expected {geometry.n_views} views (n, h, w) for the geometry, "
                          f"got shape {np.shape(images)}")
    if not thickness_px > 0:
        raise ConfigError(f"particles: thickness_px must be positive, got {thickness_px!r}")
    n, hb, wb = images.shape
    b = float(binning)
    nz = 2 * int(math.ceil(opt.z_margin * thickness_px / b / 2.0))
    half_depth = 0.55 * thickness_px / b
    # The volume is the field of view's own square; its outer 8 % is left out
    # because there high-tilt views see the particles only partly.
    half_width = (0.42 * wb, 0.42 * hb)
    filtered_views = blob_filter(images, opt.sigma_px, axes=(1, 2))
    # robust noise level of each filtered view: most of a view is not a particle peak
    centred = filtered_views - np.median(filtered_views, axis=(1, 2), keepdims=True)
    noise_sd = np.maximum(1.4826 * np.median(np.abs(centred), axis=(1, 2)), 1e-30)
    del centred
    bundle_options = BundleOptions(rotation=VariableModel("per-view"), magnification=VariableModel("per-view"),
                                   tilt=VariableModel("per-view"), tilt_anchor_weight=opt.tilt_anchor_weight,
                                   robust=True)
    anchor = geometry.tilt_deg if nominal_tilt_deg is None else np.asarray(nominal_tilt_deg, dtype=float)
    reference = int(np.argmin(np.abs(geometry.tilt_deg)))
    passes: list[ParticlePass] = []
    for rnd in range(opt.max_rounds):
        if rnd >= opt.rounds and passes[-1].max_update_px < opt.tolerance_px:
            break
        t0 = time.perf_counter()
        g_b = geometry.replace(shift_px=geometry.shift_px / b, image_shape=(hb, wb))
        volume = reconstruct(images, g_b, (nz, hb, wb), method="wbp", weighting="ramp", workers=workers)
        points = detect_particles(volume, sigma_px=opt.sigma_px, count=opt.count, half_depth=half_depth,
                                  half_width=half_width) * b
        del volume
        log.info("particles round %d: %d candidates detected (%.1f s)", rnd + 1, len(points), time.perf_counter() - t0)
        for it in range(opt.passes):
            predicted = geometry.project(points) / b
            offsets, _ = view_offsets(filtered_views, predicted, opt.sigma_px, opt.capture_px)
            xy, heights = measure_particles(filtered_views, predicted + offsets[:, None, :], opt.search_px)
            xy *= b
            tracked = np.isfinite(xy[..., 0]).sum(axis=0) >= opt.min_views
            significance = np.nanmedian(heights[:, tracked] / noise_sd[:, None], axis=0)
            # Significance decides whether there are particles at all; the weaker
            # tracks still go in (the robust fit drops their bad points), because
            # leaving them out costs accuracy (seeds 0 and 3: 0.23 -> 0.29 px).
            strong = int(np.sum(significance >= opt.min_significance))
            if strong < opt.min_particles:
                raise AlignmentError(
                    f"correlation too low: only {strong} of {len(points)} particles of the working reconstruction "
                    f"were found in {opt.min_views} or more views with a median peak of {opt.min_significance} noise "
                    f"sd (need {opt.min_particles}); the views hold no dense particles consistent with the geometry"
                )
            solution = solve(xy[:, tracked], geometry, options=bundle_options, reference_view=reference,
                             acquisition_order=acquisition_order, initial_points=points[tracked],
                             tilt_anchor_deg=anchor)
            # the bundle adjustment fixes its own gauge: measure the change without it
            change = alignment_error(solution.geometry, geometry, thickness_px=thickness_px).per_view_px
            geometry = solution.geometry
            points = solution.points_xyz[np.all(np.isfinite(solution.points_xyz), axis=1)]
            record = ParticlePass(
                round=rnd + 1,
                iteration=it + 1,
                particles=int(tracked.sum()),
                points=int(solution.report.n_points),
                rejected=int(solution.rejected.sum()),
                residual_rms_px=float(solution.report.rms_px),
                max_update_px=float(change.max()),
                rms_update_px=float(np.sqrt(np.mean(change**2))),
                seconds=time.perf_counter() - t0,
                geometry=geometry,
                solution=solution,
            )
            passes.append(record)
            log.info("particles round %d pass %d: %d particles, %d points (%d rejected), residual %.3f px RMS, "
                     "largest update %.3f px (%.1f s)", record.round, record.iteration, record.particles, record.points,
                     record.rejected, record.residual_rms_px, record.max_update_px, record.seconds)
            t0 = time.perf_counter()
    return passes


def measure_thickness(images: np.ndarray, binning: int, geometry: Geometry, *,
                      shape: tuple[int, int, int] | None = None, workers: int | None = None) -> float:
    """Specimen thickness (unbinned px) from a reconstruction much deeper than the specimen (:func:`estimate_thickness`).

    Parameters
    ----------
    images : (n, hb, wb) array
        Line-integral views binned by ``binning``.
    binning : int
    geometry : Geometry
        An alignment good to a few px (unbinned).
    shape : (nz, ny, nx), optional
        The probe volume in binned voxels; default 0.6 times the field deep, over the field.
    workers : int, optional
        Threads of the reconstruction.
    """
    n, hb, wb = images.shape
    b = float(binning)
    if shape is None:
        shape = (2 * int(math.ceil(0.3 * max(hb, wb))), hb, wb)
    g_b = geometry.replace(shift_px=geometry.shift_px / b, image_shape=(hb, wb))
    volume = reconstruct(images, g_b, shape, method="wbp", weighting="sirt-like", workers=workers)
    thickness = estimate_thickness(volume, b)
    log.info("specimen thickness estimated %.0f px (probe depth %d px)", thickness, shape[0] * b)
    return thickness


def particle_binning(size_px: float, min_sigma_px: float = 1.5) -> int:
    """The largest power of two that leaves a blob scale of ``size_px`` at least ``min_sigma_px`` binned px (>= 1)."""
    b = 1
    while size_px / (2 * b) >= min_sigma_px:
        b *= 2
    return b


def refine_observation(
    observation: Observation,
    geometry: Geometry,
    thickness_px: float | None = None,
    *,
    size_nm: float = 2.4,
    binning: int | None = None,
    clip_percentile: float | None = 99.5,
    options: ParticleOptions = ParticleOptions(),
    workers: int | None = None,
) -> tuple[int, float, list[ParticlePass]]:
    """:func:`refine_by_particles` on an observation, in an aligner's terms: the particle size in nm, the raw stack.

    Parameters
    ----------
    observation : Observation
        The stack (electron counts) and microscope metadata.
    geometry : Geometry
        Starting geometry, unbinned px, good to a few px.
    thickness_px : float, optional
        Specimen thickness, unbinned px; None measures it (:func:`measure_thickness`).
    size_nm : float
        Blob scale in nm; sets ``options.sigma_px`` at the binning.
    binning : int, optional
        None: :func:`particle_binning` of ``size_nm`` (2 at 8 Å per px).
    clip_percentile : float or None
        The line integrals are clipped to their ``[100 - q, q]`` percentiles
        over the series (gold beads would otherwise be the strongest blobs and
        dominate the reconstruction's streaks).
    options : ParticleOptions
        Everything else (``sigma_px`` is replaced).
    workers : int, optional
        Threads of the reconstructions.

    Returns
    -------
    (binning, thickness_px, passes)
    """
    size_px = size_nm * 10.0 / observation.pixel_size_A
    b = binning or particle_binning(size_px)
    images = binned_line_integrals(observation.stack, b).images
    if clip_percentile is not None:
        lo, hi = np.percentile(images, [100.0 - clip_percentile, clip_percentile])
        images = np.clip(images, lo, hi)
    if thickness_px is None:
        # the probe is 0.6 times the field deep: at binning 4 it takes a couple of seconds, and the
        # z profile needs no finer sampling
        coarse = max(1, 4 // b)
        thickness_px = measure_thickness(imageops.fourier_bin(images, coarse) if coarse > 1 else images, b * coarse,
                                         geometry, workers=workers)
    options = dataclasses.replace(options, sigma_px=size_px / b)
    passes = refine_by_particles(images, b, geometry, thickness_px, options=options,
                                 acquisition_order=observation.acquisition_order,
                                 nominal_tilt_deg=observation.tilt_deg, workers=workers)
    return b, float(thickness_px), passes
