"""Marker-free alignment by patch tracking (IMOD ``tiltxcorr -patch`` / AreTomo spirit).

1. Coarse alignment by stretched cross-correlation, with the tilt-axis angle
   found from the data (:mod:`aligners.coarse`).
2. A grid of overlapping square patches is laid over the view nearest zero
   tilt. Each patch is a piece of specimen at an unknown depth: exactly like a
   gold bead, except that its "centre" is wherever the correlation locks on.
3. Every patch is tracked view by view, outwards from zero tilt in both
   directions. For the step from view ``i`` (already tracked) to view ``k``:
   the model predicts where the patch goes (from its 3-D position so far);
   both patches are resampled (cubic B-spline) through the local linear map
   between the views (``L = A_k A_i^-1``, ``A`` the x-y columns of the
   projection matrices: the cosine stretch across the tilt axis plus the
   model's rotation and magnification difference), split evenly between the
   two, in a frame whose edges run along and across the tilt axis, the
   reference centred exactly on the tracked point. They are tapered,
   band-passed and cross-correlated, the peak refined to sub-pixel, and the
   target window re-centred on the peak and measured again until it stops
   moving (tapered windows pull the peak toward zero offset by a good
   fraction of the offset). A patch whose window leaves the field, whose peak
   is weak or sits at the edge of the search is dropped from that view on.
4. The tracks (optionally cut into overlapping segments, so that slow drift of
   a long chained track does not bend the fit) go to the shared bundle
   adjustment (:func:`aligners.bundle.solve`) with robust fitting.
5. Optionally the patches are tracked again with the refined model (better
   predictions, the right local stretch, rotation and magnification), and the
   bundle adjustment repeated.
6. Particle tracks (``particle_rounds``, :mod:`aligners.particles`): the
   specimen thickness is measured on a reconstruction made with the
   patch-track geometry, dense particles are detected in a second one, and
   each is found near its projection in every view by a blob filter and
   bundle-adjusted like a gold bead (per-view tilts held near the nominal
   ones). A particle is a point, so its track does not drift the way a patch's
   does (below). The patch-track geometry is kept in
   ``info["patch_track_geometry"]``.

Geometry convention: DESIGN.md section 3; all track coordinates are centred raw
image pixels (unbinned). The tracking works on Fourier-binned line-integral
images; a binned centred coordinate is the unbinned one divided by the binning.

Accuracy (``standard-nobeads``, a 200 nm = 250 px thick specimen, seeds 0-4,
defaults): the patch tracks reach 1.12/2.85/2.25/2.11/1.77 px RMS alignment
error and the particle tracks after them 0.20/0.25/0.18/0.22/0.21 px, in
42-57 s wall and 51-55 s CPU (two seeds at once on 2 cores), 1.4-1.55 GB peak.
The particle tracks need particles that stand apart in projection (see
:mod:`aligners.particles`).

Limits of the patch tracks themselves (same seeds; overlap 0.75): 1.12, 2.80,
2.19, 2.12 and 2.13 px RMS alignment error with 24 px patches and a 4 px
search, against 2.2-2.5 px for the
``xcorr`` start: better on every seed but seed 1 (with 48 px patches and an
8 px search 1.5, 8.7, 3.6, 2.7 and 3.0 px; on the same content in a 40 nm
section, 0.7 px). On seed 1 the rotations are off by -0.35 degree with a ramp
to -1.5 degrees at +60 degrees, and the magnifications by a ramp from -0.8 %
to +1.3 %; with the true rotations, tilts and magnifications put in, it is
still at 1.3 px, so the shifts drift too. A patch is not a point: it holds content at every
depth, and as the tilt changes that content slides through the window at
depth-dependent rates, so the correlation follows a drifting mixture. Tracked
with the *true* geometry as the model (a diagnostic, seed 1, 48 px patches), the tracks miss
fixed 3-D points by about 6 px RMS, and their along-axis components drift
like a rotation growing to 3.5 degrees at +-60 degrees; with proteins only
(no membranes or filaments) the drift falls to 0.4 degree and the misfit to
about 3 px. So most of the bias comes from line-like content (the aperture
problem: a membrane sliding across the axis drags the peak along itself),
the rest from depth mixing. Chained over a track, both grow with tilt, and
the bundle adjustment reads them as per-view rotation and magnification.
Leaving out line-like patches (spectral anisotropy > 0.3) cut the drift to
2.6 degrees only, and forcing each step's along-axis components onto one
affine field did not improve the alignment; both were tried and dropped.
Dropping weakly correlated steps (``min_correlation`` 0.3 or
``min_significance`` 5) made it worse (more tracks average more of the
drift), and a second and third grid tracked from the +-40 degree views gained
nothing (1.09/2.74/2.22/2.18/2.23 px).
On an exactly planar sheet the same code tracks to better than 0.05 px
(tests/test_patch.py).

The aligner never sees the truth. It raises
:class:`~simtomo.errors.AlignmentError` ("correlation too low ...") when the
images do not correlate (e.g. pure noise) or too few patches can be tracked,
rather than return a geometry it cannot support.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numba
import numpy as np
from scipy import ndimage

from aligners import imageops
from aligners.bundle import BundleOptions, BundleSolution, VariableModel, solve
from aligners.coarse import BinnedStack, binned_line_integrals, coarse_align, find_tilt_axis
from aligners.particles import ParticleOptions, refine_observation
from simtomo.alignment import AlignmentResult
from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry, rotation_2d
from simtomo.io.geometry_json import geometry_to_dict
from simtomo.observation import Observation

__all__ = ["PatchAligner", "PatchParams", "PatchTracks", "patch_grid", "track_patches", "split_tracks"]

log = logging.getLogger(__name__)

_MODES = ("fixed", "global", "blocks", "per-view")
# Weight of the prior z = 0 that keeps a track's 3-D position defined while it has been seen in one view only
# (in px^-2 units of the projection equations; tiny against one measured point).
_Z_PRIOR = 1e-6


@dataclass(frozen=True)
class PatchParams:
    """Parameters of the patch-tracking aligner.

    Parameters
    ----------
    patch_size : int
        Side of the square patches, binned px. Small patches hold fewer
        depths of a thick specimen (less drift); on ``standard-nobeads``,
        seeds 0-4 (``max_shift`` 8), 24 px gave 1.35/3.67/2.45/2.31/2.24 px RMS
        alignment error against 1.51/8.68/3.57/2.67/3.04 px with 48 and
        1.36/3.70/2.33/2.90/1.78 with 16.
    overlap : float
        Fraction of a patch shared with its grid neighbour (0 <= overlap < 1).
        On ``standard-nobeads`` seeds 0-4 the patch tracks reach
        1.12/2.85/2.25/2.11/1.77 px with 0.625 and 1.12/2.80/2.19/2.12/2.13 px
        with 0.75, which tracks twice as many patches (36 s against 22 s); the
        particle tracks after them do the rest.
    binning : int or None
        Binning of the tracking images; None brings the larger side near 256 px.
    coarse_binning : int or None
        Binning of the coarse alignment and tilt-axis search (a multiple of the
        tracking binning); None: the tracking binning.
    max_shift : int
        Search radius around the predicted position, binned px. A small radius
        keeps a patch from jumping to other content: on ``standard-nobeads``,
        seeds 0-4, 4 px gave 1.12/2.80/2.19/2.12/2.13 px RMS alignment error
        against 1.35/3.67/2.45/2.31/2.24 px with 8 (3 and 5 px: within 0.15 px of 4).
    lowpass : float
        Pass-band edge of the patch correlations, cycles per binned px.
    highpass : float
        Sigma of the Gaussian high-pass of the patch correlations, cycles per binned px.
    min_correlation : float
        Smallest correlation coefficient of a patch's peak for the step to count.
    min_significance : float
        Smallest peak height over its map's robust spread for the step to count.
    min_track_views : int
        Shortest track (views) passed to the bundle adjustment.
    segment_views : int
        Cut tracks into overlapping segments of this many views (each its own
        3-D point, so chained drift cannot bend the fit); 0 keeps whole tracks.
    min_tracks : int
        Fewest usable tracks for a result (else AlignmentError).
    rotation : str
        Per-view in-plane rotation model: fixed | global | blocks | per-view.
    magnification : str
        Magnification model: fixed | global | blocks | per-view.
    tilt : str
        Tilt-angle model: fixed | global | blocks | per-view.
    block_size : int
        Views per block for models set to "blocks".
    smoothness : float
        Smoothness prior weight of the rotation, magnification and tilt models (see VariableModel).
    tilt_gauge : str
        "level" makes the patch cloud level (IMOD tiltalign style), "reference" keeps the zero-tilt view's nominal tilt.
    robust : bool
        Down-weight and reject mistracked points in the bundle adjustment.
    search_tilt_axis : bool
        Find the tilt-axis angle from the images before tracking (else use the nominal value).
    passes : int
        Tracking + bundle adjustment passes; each after the first re-tracks with the refined model.
    particle_rounds : int
        Rounds of the particle refinement (:mod:`aligners.particles`) after
        the patch tracks, at least (more while a round's last pass still moves
        a view by :attr:`~aligners.particles.ParticleOptions.tolerance_px`):
        dense particles are found in a reconstruction made with the
        patch-track geometry and tracked like gold beads. Point-like
        particles do not drift the way patches do (see the module notes).
        0 returns the patch-track geometry. When too few particles stand out
        of the noise, the refinement is skipped with a warning.
    particle_count : int
        Particles tracked per round (:attr:`aligners.particles.ParticleOptions.count`).
    particle_size_nm : float
        Scale of the particles' blob filter in nm (2.4 nm: proteins of 2-6 nm radius).
    particle_binning : int or None
        Binning of the particle refinement; None: the largest power of two
        that leaves ``particle_size_nm`` at least 1.5 binned px (2 at 8 Å per px).
    """

    patch_size: int = 24
    overlap: float = 0.625
    binning: int | None = None
    coarse_binning: int | None = None
    max_shift: int = 4
    lowpass: float = 0.3
    highpass: float = 0.03
    min_correlation: float = 0.15
    min_significance: float = 0.0
    min_track_views: int = 8
    segment_views: int = 0
    min_tracks: int = 8
    rotation: str = "per-view"
    magnification: str = "per-view"
    tilt: str = "global"
    block_size: int = 5
    smoothness: float = 0.0
    tilt_gauge: str = "level"
    robust: bool = True
    search_tilt_axis: bool = True
    passes: int = 2
    particle_rounds: int = 2
    particle_count: int = 1500
    particle_size_nm: float = 2.4
    particle_binning: int | None = None

    def __post_init__(self) -> None:
        for key in ("rotation", "magnification", "tilt"):
            if getattr(self, key) not in _MODES:
                raise ConfigError(f"patch.{key}: expected one of {', '.join(_MODES)}, got {getattr(self, key)!r}")
        if self.tilt_gauge not in ("level", "reference"):
            raise ConfigError(f"patch.tilt_gauge: expected level or reference, got {self.tilt_gauge!r}")
        _check_int("patch.patch_size", self.patch_size, 16)
        _check_int("patch.max_shift", self.max_shift, 1)
        _check_int("patch.min_track_views", self.min_track_views, 3)
        _check_int("patch.min_tracks", self.min_tracks, 3)
        _check_int("patch.passes", self.passes, 1)
        _check_int("patch.block_size", self.block_size, 1)
        if self.segment_views != 0:
            _check_int("patch.segment_views", self.segment_views, 4)
        _check_int("patch.particle_rounds", self.particle_rounds, 0)
        _check_int("patch.particle_count", self.particle_count, 3)
        if not (isinstance(self.particle_size_nm, (int, float)) and np.isfinite(self.particle_size_nm)
                and self.particle_size_nm > 0):
            raise ConfigError(f"patch.particle_size_nm: expected a positive size in nm, got {self.particle_size_nm!r}")
        for key in ("binning", "coarse_binning", "particle_binning"):
            if getattr(self, key) is not None:
                _check_int(f"patch.{key}", getattr(self, key), 1)
        if not (isinstance(self.overlap, (int, float)) and 0 <= self.overlap < 1):
            raise ConfigError(f"patch.overlap: expected a fraction in [0, 1), got {self.overlap!r}")
        if not (isinstance(self.lowpass, (int, float)) and 0 < self.lowpass <= 0.5):
            raise ConfigError(f"patch.lowpass: expected a cut-off in (0, 0.5] cycles/px, got {self.lowpass!r}")
        if not (isinstance(self.highpass, (int, float)) and 0 < self.highpass < 0.5):
            raise ConfigError(f"patch.highpass: expected a sigma in (0, 0.5) cycles/px, got {self.highpass!r}")
        if not (isinstance(self.min_correlation, (int, float)) and -1 <= self.min_correlation < 1):
            raise ConfigError(f"patch.min_correlation: expected a value in [-1, 1), got {self.min_correlation!r}")
        if not (isinstance(self.min_significance, (int, float)) and np.isfinite(self.min_significance)):
            raise ConfigError(f"patch.min_significance: expected a finite number, got {self.min_significance!r}")
        if not (isinstance(self.smoothness, (int, float)) and np.isfinite(self.smoothness) and self.smoothness >= 0):
            raise ConfigError(f"patch.smoothness: expected a finite value >= 0, got {self.smoothness!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------- #
# Patch grid and sampling
# --------------------------------------------------------------------------- #


def patch_grid(image_shape: tuple[int, int], binning: int, patch_size: int, overlap: float, margin: float = 0.0) -> np.ndarray:
    """Centres of a regular grid of patches covering a view, centred unbinned px.

    Parameters
    ----------
    image_shape : (h, w)
        Unbinned view shape.
    binning : int
        Binning of the tracking images.
    patch_size : int
        Patch side, binned px.
    overlap : float
        Fraction of a patch shared with its neighbour; the grid step is
        ``round(patch_size * (1 - overlap))`` binned px (at least 1).
    margin : float
        Room left between the outermost patches and the view's border, binned px
        (e.g. the search radius, so that every patch can be searched in the next view).

    Returns
    -------
    (m, 2) array of ``(x, y)`` centres; the grid is symmetric about the view centre
    and every patch lies inside the (binned) view.
    """
    hb, wb = image_shape[0] // binning, image_shape[1] // binning
    if patch_size > min(hb, wb):
        raise ConfigError(f"patch_size: {patch_size} binned px does not fit the {hb}x{wb} binned view")
    step = max(1, int(round(patch_size * (1.0 - overlap))))

    def axis(n: int) -> np.ndarray:
        half = (n - patch_size) / 2.0 - margin  # farthest centre offset keeping the patch inside
        k = int(np.floor(max(half, 0.0) / step))
        return np.arange(-k, k + 1) * step

    xs, ys = axis(wb), axis(hb)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(float) * binning


def _integer_patches(centres_b: np.ndarray, shape: tuple[int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left ``(row, col)`` of the whole-pixel patches nearest to ``centres_b`` and their exact centres (x, y)."""
    h, w = shape
    col0 = np.round(centres_b[:, 0] + (w - 1) / 2.0 - (size - 1) / 2.0).astype(int)
    row0 = np.round(centres_b[:, 1] + (h - 1) / 2.0 - (size - 1) / 2.0).astype(int)
    centre = np.stack([col0 + (size - 1) / 2.0 - (w - 1) / 2.0, row0 + (size - 1) / 2.0 - (h - 1) / 2.0], axis=1)
    return np.stack([row0, col0], axis=1), centre


def _warp_shape(lin: np.ndarray, shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of the frame ``u = lin^-1 p`` that holds a whole view of ``shape`` (same parity as the view)."""
    h, w = shape
    corners = np.array([[-(w - 1) / 2.0, -(h - 1) / 2.0], [(w - 1) / 2.0, -(h - 1) / 2.0]])
    ext = np.abs(corners @ np.linalg.inv(lin).T).max(axis=0)
    wo = 2 * int(np.ceil(ext[0] + 1.0)) + (w % 2)
    ho = 2 * int(np.ceil(ext[1] + 1.0)) + (h % 2)
    return ho, wo


def _inside(centres_b: np.ndarray, lin: np.ndarray, half: float, shape: tuple[int, int], margin: float) -> np.ndarray:
    """Whether the windows ``centre + lin @ q`` (``|q| <= half`` per axis) lie within the image, ``margin`` px inside."""
    h, w = shape
    corners = np.array([[-half, -half], [half, -half], [-half, half], [half, half]])
    pts = centres_b[:, None, :] + np.einsum("mij,cj->mci", np.broadcast_to(lin, (len(centres_b), 2, 2)), corners)
    lim = np.array([(w - 1) / 2.0 - margin, (h - 1) / 2.0 - margin])
    return np.all(np.abs(pts) <= lim, axis=(1, 2))


# --------------------------------------------------------------------------- #
# Tracking
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class PatchTracks:
    """Patch tracks through a tilt series.

    Parameters
    ----------
    xy : (n, m, 2) array
        Position of patch ``j`` in view ``i``, centred unbinned px; NaN where not tracked.
    peak : (n, m) array
        Correlation coefficient of the step that found each point (NaN where
        missing; 1 in the start view).
    start_view : int
        The view the patch grid was laid on.
    """

    xy: np.ndarray
    peak: np.ndarray
    start_view: int

    @property
    def n_points(self) -> int:
        return int(np.isfinite(self.xy[..., 0]).sum())


def _view_steps(tilt: np.ndarray, start: int) -> list[tuple[int, int, int]]:
    """(previous, next, direction) view steps outward from ``start`` in tilt order, first upward then downward."""
    order = np.argsort(tilt, kind="stable")
    r = int(np.flatnonzero(order == start)[0])
    up = [(int(order[k - 1]), int(order[k]), 1) for k in range(r + 1, len(order))]
    down = [(int(order[k + 1]), int(order[k]), -1) for k in range(r - 1, -1, -1)]
    return up + down


@dataclass(frozen=True, eq=False)
class _Correlator:
    """Measures where patch content of one view sits in another (binned images, unbinned coordinates)."""

    stack: np.ndarray
    binning: float
    patch_size: int
    max_shift: int
    lowpass: float
    highpass: float
    min_correlation: float
    min_significance: float
    axis_deg: np.ndarray
    refinements: int = 4
    _splines: dict = field(default_factory=dict)

    def _coefficients(self, view: int) -> np.ndarray:
        if view not in self._splines:
            self._splines[view] = ndimage.spline_filter(self.stack[view].astype(np.float64), order=3)
        return self._splines[view]

    def _patches(self, view: int, centres_b: np.ndarray, lin: np.ndarray) -> np.ndarray:
        """Tapered, mean-free patches ``out(q) = view(centre + lin q)`` (cubic spline), (m, s, s)."""
        h, w = self.stack.shape[1:]
        o = np.arange(self.patch_size) - (self.patch_size - 1) / 2.0
        grid = np.stack(np.meshgrid(o, o), axis=-1) @ lin.T  # (s, s, 2) as (x, y)
        rows0 = centres_b[:, 1] + (h - 1) / 2.0
        cols0 = centres_b[:, 0] + (w - 1) / 2.0
        out = np.empty((len(centres_b), self.patch_size, self.patch_size), dtype=np.float32)
        _sample_bspline3(self._coefficients(view), rows0, cols0, np.ascontiguousarray(grid[..., 1]),
                         np.ascontiguousarray(grid[..., 0]), out)
        out -= out.mean(axis=(1, 2), keepdims=True)
        out *= imageops.taper_window((self.patch_size, self.patch_size), self.patch_size / 4.0)
        return out

    def measure(self, va: int, vk: int, lin: np.ndarray, xa: np.ndarray, xk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions in view ``vk`` of the content at ``xa`` (m, 2) in view ``va``, searched around ``xk``.

        ``lin`` maps displacements in view ``va`` to view ``vk`` (local linear map
        for content at constant depth); ``axis_deg`` holds each view's tilt-axis direction.
        Returns ``(found (m, 2), peak (m,))``; NaN where a window leaves its view
        or the peak is too weak.
        """
        _, hb, wb = self.stack.shape
        b = self.binning
        m = len(xa)
        found = np.full((m, 2), np.nan)
        peak = np.full(m, np.nan)
        half = (self.patch_size - 1) / 2.0
        # Patches are sampled in the frame of view ``va`` rotated so that its tilt axis is vertical
        # (window edges along and across the axis), the reference centred exactly on the point.
        # The stretch between the views is split evenly (``lin = h h``): the reference is sampled
        # through ``h^-1``, the target through ``h``, so both are resampled alike and differences of
        # interpolation blur do not bias the peak in one direction.
        h = _sqrt2x2(lin)
        q = np.linalg.solve(h, rotation_2d(self.axis_deg[va]))
        ql = lin @ q
        c_a = xa / b
        c_k = xk / b
        ok = np.all(np.isfinite(c_a), axis=1) & np.all(np.isfinite(c_k), axis=1)
        ok[ok] = _inside(c_a[ok], q[None], half + 0.5, (hb, wb), 1.0)
        ok[ok] = _inside(c_k[ok], ql[None], half + self.max_shift + 2.0, (hb, wb), 1.0)
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            return found, peak
        ref = self._patches(va, c_a[idx], q)
        pos = c_k[idx]
        total = np.zeros((idx.size, 2))
        good = np.ones(idx.size, dtype=bool)
        for it in range(1 + self.refinements):
            # The peak of two tapered windows is pulled toward zero offset by a good fraction of the
            # true offset (the windows' own overlap correlates); re-centring the target window on the
            # found content and measuring again shrinks that bias geometrically.
            tgt = self._patches(vk, pos, ql)
            res = imageops.correlate_stack(
                ref, tgt, max_shift=self.max_shift, lowpass=self.lowpass, highpass=self.highpass,
                subpixel="dft", chunk=64,
            )
            shift = np.nan_to_num(res.shift, nan=np.inf)
            good &= res.valid & np.all(np.abs(shift) < self.max_shift - 1.0, axis=1)
            step = np.where(good[:, None], shift, 0.0)
            pos = pos + step @ ql.T
            total += step
            good &= _inside(pos, ql[None], half + 1.0, (hb, wb), 1.0)
            if it == 0:
                good &= (res.peak >= self.min_correlation) & (res.significance >= self.min_significance)
            if not np.any(good & np.any(np.abs(step) > 0.005, axis=1)):
                break
        good &= np.all(np.abs(total) < self.max_shift - 1.0, axis=1)
        found[idx[good]] = pos[good] * b
        peak[idx[good]] = res.peak[good]
        return found, peak


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _sample_bspline3(coef, rows0, cols0, drow, dcol, out):  # pragma: no cover - compiled
    """``out[m, a, b]`` = cubic B-spline interpolation of ``coef`` (prefiltered) at
    ``(rows0[m] + drow[a, b], cols0[m] + dcol[a, b])``; indices clamped at the borders."""
    h, w = coef.shape
    n, s1, s2 = out.shape
    for k in numba.prange(n * s1):
        m = k // s1
        a = k % s1
        for b in range(s2):
            r = rows0[m] + drow[a, b]
            c = cols0[m] + dcol[a, b]
            r0 = int(np.floor(r))
            c0 = int(np.floor(c))
            tr = r - r0
            tc = c - c0
            wr0 = (1.0 - tr) ** 3 / 6.0
            wr1 = (3.0 * tr**3 - 6.0 * tr**2 + 4.0) / 6.0
            wr2 = (-3.0 * tr**3 + 3.0 * tr**2 + 3.0 * tr + 1.0) / 6.0
            wr3 = tr**3 / 6.0
            wc0 = (1.0 - tc) ** 3 / 6.0
            wc1 = (3.0 * tc**3 - 6.0 * tc**2 + 4.0) / 6.0
            wc2 = (-3.0 * tc**3 + 3.0 * tc**2 + 3.0 * tc + 1.0) / 6.0
            wc3 = tc**3 / 6.0
            acc = 0.0
            for i in range(4):
                ri = min(max(r0 - 1 + i, 0), h - 1)
                wr = wr0 if i == 0 else (wr1 if i == 1 else (wr2 if i == 2 else wr3))
                row = (
                    wc0 * coef[ri, min(max(c0 - 1, 0), w - 1)]
                    + wc1 * coef[ri, min(max(c0, 0), w - 1)]
                    + wc2 * coef[ri, min(max(c0 + 1, 0), w - 1)]
                    + wc3 * coef[ri, min(max(c0 + 2, 0), w - 1)]
                )
                acc += wr * row
            out[m, a, b] = acc


def _sqrt2x2(a: np.ndarray) -> np.ndarray:
    """Principal square root of a 2x2 matrix with positive real eigenvalues (a near-identity local map)."""
    det = float(np.linalg.det(a))
    if not det > 0:
        raise AlignmentError(f"patch: a local map between views is singular or mirrored (det {det:.3g})")
    s = np.sqrt(det)
    t = np.sqrt(float(np.trace(a)) + 2.0 * s)
    return (a + s * np.eye(2)) / t


def _axis_angles(geometry: Geometry) -> np.ndarray:
    """In-plane direction ``phi`` (degrees) of each view's tilt axis: the image of the specimen y axis."""
    m = geometry.projection_matrices()
    return np.rad2deg(np.arctan2(-m[:, 0, 1], m[:, 1, 1]))


def _local_map(mats: np.ndarray, va: int, vk: int) -> np.ndarray:
    """Linear map of displacements from view ``va`` to view ``vk`` for content in a plane of constant depth:
    the cosine stretch across the tilt axis plus the model's rotation and magnification difference."""
    return mats[vk][:, :2] @ np.linalg.inv(mats[va][:, :2])


def track_patches(
    images: BinnedStack,
    tilt_deg: np.ndarray,
    geometry: Geometry,
    centres_xy: np.ndarray,
    start_view: int,
    *,
    patch_size: int = 64,
    max_shift: int = 8,
    lowpass: float = 0.3,
    highpass: float = 0.03,
    min_correlation: float = 0.15,
    min_significance: float = 0.0,
    points_xyz: np.ndarray | None = None,
) -> PatchTracks:
    """Track patches view by view outward from ``start_view`` by cross-correlation.

    Parameters
    ----------
    images : BinnedStack
        Line-integral views (binned).
    tilt_deg : (n,) array
        Nominal tilts (they order the views).
    geometry : Geometry
        The current model (unbinned px): it predicts where a patch goes in the
        next view and the local linear map between the two views.
    centres_xy : (m, 2) array
        Patch centres in ``start_view``, centred unbinned px.
    start_view : int
        View where tracking starts.
    patch_size, max_shift : int
        Patch side and search radius, binned px.
    lowpass, highpass : float
        Band-pass of the correlations, cycles per binned px.
    min_correlation, min_significance : float
        A step whose peak falls below either ends the track in that direction.
    points_xyz : (m, 3) array, optional
        Known 3-D positions of the patches (e.g. from a bundle adjustment);
        NaN rows and None start at depth 0 in ``start_view``. Positions are
        re-triangulated from the tracked points as tracking proceeds.

    Returns
    -------
    PatchTracks
    """
    stack = images.images
    n = stack.shape[0]
    corr = _Correlator(stack, float(images.binning), int(patch_size), int(max_shift), float(lowpass), float(highpass),
                       float(min_correlation), float(min_significance), _axis_angles(geometry))
    centres = np.asarray(centres_xy, dtype=float).reshape(-1, 2)
    m = len(centres)
    tilt = np.asarray(tilt_deg, dtype=float)
    mats = geometry.projection_matrices()  # (n, 2, 3)
    shifts = np.asarray(geometry.shift_px, dtype=float)
    xy = np.full((n, m, 2), np.nan)
    peak = np.full((n, m), np.nan)
    xy[start_view] = centres
    peak[start_view] = 1.0

    # Normal equations of each track's 3-D position: data rows plus a weak z = 0 prior.
    prior = np.zeros((3, 3))
    prior[2, 2] = _Z_PRIOR
    a_s = mats[start_view]
    ata0 = np.broadcast_to(a_s.T @ a_s + prior, (m, 3, 3)).copy()
    atb0 = (centres - shifts[start_view]) @ a_s
    if points_xyz is not None:
        known = np.asarray(points_xyz, dtype=float)
        ok = np.all(np.isfinite(known), axis=1)
        # A known position enters as a prior as strong as one more view.
        ata0 = ata0 + np.where(ok, 1.0, 0.0)[:, None, None] * np.eye(3)[None]
        atb0 = atb0 + np.where(ok[:, None], np.nan_to_num(known), 0.0)
    # Each direction starts from the start view's normal equations.
    state = {+1: (ata0.copy(), atb0.copy()), -1: (ata0.copy(), atb0.copy())}
    for prev, nxt, direction in _view_steps(tilt, start_view):
        ata, atb = state[direction]
        active = np.flatnonzero(np.isfinite(xy[prev, :, 0]))
        if active.size == 0:
            continue
        X = np.linalg.solve(ata[active], atb[active][..., None])[..., 0]
        pred = xy[prev, active] + X @ (mats[nxt] - mats[prev]).T + (shifts[nxt] - shifts[prev])
        found, pk = corr.measure(prev, nxt, _local_map(mats, prev, nxt), xy[prev, active], pred)
        good = np.isfinite(found[:, 0])
        idx = active[good]
        xy[nxt, idx] = found[good]
        peak[nxt, idx] = pk[good]
        a_n = mats[nxt]
        ata[idx] += a_n.T @ a_n
        atb[idx] += (found[good] - shifts[nxt]) @ a_n
    return PatchTracks(xy=xy, peak=peak, start_view=int(start_view))


def split_tracks(xy: np.ndarray, tilt_deg: np.ndarray, segment_views: int, min_views: int) -> np.ndarray:
    """Cut tracks into segments of ``segment_views`` consecutive views (in tilt order) overlapping by half.

    Each segment becomes its own track (its own 3-D point in the bundle
    adjustment), so slow drift accumulated by chained correlation along a
    long track is absorbed instead of bending the fit. Segments with fewer
    than ``min_views`` points are dropped; ``segment_views = 0`` only drops
    short tracks.

    Returns
    -------
    (n, k, 2) array
    """
    n, m, _ = xy.shape
    seen = np.isfinite(xy[..., 0])
    if segment_views <= 0:
        return xy[:, seen.sum(axis=0) >= min_views]
    order = np.argsort(tilt_deg, kind="stable")
    step = max(1, segment_views // 2)
    out = []
    for j in range(m):
        views = order[seen[order, j]]
        if views.size < min_views:
            continue
        if views.size <= segment_views:
            starts = [0]
        else:
            starts = list(range(0, views.size - segment_views + 1, step))
            if starts[-1] + segment_views < views.size:
                starts.append(views.size - segment_views)
        for s in starts:
            seg = views[s : s + segment_views]
            col = np.full((n, 2), np.nan)
            col[seg] = xy[seg, j]
            out.append(col)
    if not out:
        return np.zeros((n, 0, 2))
    return np.stack(out, axis=1)


# --------------------------------------------------------------------------- #
# The aligner
# --------------------------------------------------------------------------- #


class PatchAligner:
    """Marker-free alignment: coarse correlation, patch tracking and bundle adjustment."""

    name = "patch"
    Params = PatchParams

    def __init__(self, params: PatchParams | None = None) -> None:
        self.params = params or PatchParams()

    def _options(self) -> BundleOptions:
        p = self.params
        model = lambda mode: VariableModel(mode=mode, block_size=p.block_size, smoothness=p.smoothness)  # noqa: E731
        return BundleOptions(
            rotation=model(p.rotation),
            magnification=model(p.magnification),
            tilt=model(p.tilt),
            tilt_gauge=p.tilt_gauge,
            robust=p.robust,
        )

    def align(self, observation: Observation) -> AlignmentResult:
        start = time.perf_counter()
        p = self.params
        tilt = observation.tilt_deg
        shape = observation.image_shape
        b = p.binning if p.binning is not None else imageops.auto_binning(shape, 256)
        cb = p.coarse_binning if p.coarse_binning is not None else b
        if cb % b:
            raise ConfigError(f"patch.coarse_binning: {cb} is not a multiple of the tracking binning {b}")
        images = binned_line_integrals(observation.stack, b)
        small = images.rebin(cb // b)
        axis = observation.tilt_axis_deg
        if p.search_tilt_axis:
            axis = find_tilt_axis(small, tilt, start_deg=axis, binning=cb).angle_deg
        elif axis is None:
            raise AlignmentError("patch: the observation has no nominal tilt axis; set search_tilt_axis=true")
        coarse = coarse_align(small, tilt, axis, pixel_size_A=observation.pixel_size_A, binning=cb)
        ref = coarse.reference_view
        centres = patch_grid(shape, b, p.patch_size, p.overlap, margin=p.max_shift + 2)
        options = self._options()
        geometry = coarse.geometry
        points = None
        solution: BundleSolution | None = None
        history = []
        for k in range(p.passes):
            tracks = track_patches(
                images, tilt, geometry, centres, ref,
                patch_size=p.patch_size, max_shift=p.max_shift, lowpass=p.lowpass, highpass=p.highpass,
                min_correlation=p.min_correlation, min_significance=p.min_significance, points_xyz=points,
            )
            xy = split_tracks(tracks.xy, tilt, p.segment_views, p.min_track_views)
            n_tracks = xy.shape[1]
            log.info("patch: pass %d, %d patches, %d of them tracked through >= %d views (%d points)",
                     k + 1, len(centres), n_tracks, p.min_track_views, int(np.isfinite(xy[..., 0]).sum()))
            if n_tracks < p.min_tracks:
                raise AlignmentError(
                    f"correlation too low: only {n_tracks} of {len(centres)} patches could be tracked through "
                    f"{p.min_track_views} or more views (need {p.min_tracks}); the views hold too little common structure"
                )
            solution = solve(xy, geometry, options=options, reference_view=ref,
                             acquisition_order=observation.acquisition_order)
            history.append({"pass": k + 1, "tracks": int(n_tracks), "points": int(np.isfinite(xy[..., 0]).sum()),
                            "residual_rms_px": float(solution.report.rms_px)})
            geometry = solution.geometry
            points = None
            if p.segment_views == 0:  # whole tracks: the next pass starts each patch at its fitted position
                long_enough = np.isfinite(tracks.xy[..., 0]).sum(axis=0) >= p.min_track_views
                points = np.full((len(centres), 3), np.nan)
                points[long_enough] = solution.points_xyz
        assert solution is not None
        log.info("patch: residual %.3f px RMS over %d points, %d rejected, in %.1f s",
                 solution.report.rms_px, solution.report.n_points, len(solution.report.rejected),
                 time.perf_counter() - start)
        info = {
            "aligner": self.name,
            "tilt_axis_start_deg": None if axis is None else float(axis),
            "binning": int(b),
            "coarse_binning": int(cb),
            "patches": int(len(centres)),
            "passes": history,
            "robust_sigma_px": float(solution.sigma_px),
            "converged": bool(solution.converged),
        }
        tracked = solution
        if p.particle_rounds:
            solution = self._particles(observation, solution, info)
        if solution is tracked and tracked.report.rms_px > 2.0:
            log.warning(
                "patch: residual %.2f px RMS: the patch tracks are not consistent with fixed 3-D points "
                "(thick specimen?); the geometry may be off by more than the shift-only coarse alignment",
                tracked.report.rms_px,
            )
        info["seconds"] = time.perf_counter() - start
        return AlignmentResult(geometry=solution.geometry, residuals=solution.report, markers_px=solution.points_xyz,
                               info=info)

    def _particles(self, observation: Observation, solution: BundleSolution, info: dict) -> BundleSolution:
        """Refine the patch-track solution by particle tracks; it stands as it is when no particles are found."""
        p = self.params
        try:
            binning, thickness, passes = refine_observation(
                observation, solution.geometry, size_nm=p.particle_size_nm, binning=p.particle_binning,
                options=ParticleOptions(count=p.particle_count, rounds=p.particle_rounds),
            )
        except AlignmentError as exc:
            log.warning("patch: particle refinement skipped (%s); the patch-track geometry stands", exc)
            return solution
        info["patch_track_geometry"] = geometry_to_dict(solution.geometry)
        info["particles"] = {
            "binning": binning,
            "thickness_px": thickness,
            "passes": [{"round": r.round, "pass": r.iteration, "particles": r.particles, "points": r.points,
                        "rejected": r.rejected, "residual_rms_px": r.residual_rms_px,
                        "max_update_px": r.max_update_px, "seconds": r.seconds}
                       for r in passes],
        }
        info["robust_sigma_px"] = float(passes[-1].solution.sigma_px)
        info["converged"] = bool(passes[-1].solution.converged)
        return passes[-1].solution
