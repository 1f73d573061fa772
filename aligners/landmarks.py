"""Depth-resolved landmarks: thin layers of a working reconstruction matched to the views.

Why layers. A patch of a view of a thick specimen holds content from every
depth of the section; content at different depths moves differently as the
tilt changes, so neither a patch tracked from view to view nor a reprojection
of the whole volume behaves like a point. Worse, a whole-volume reprojection
at one tilt is, at the frequencies that carry sub-pixel precision, made from
the few neighbouring views only (the Crowther overlap of a slab of thickness
``T`` spans about ``1 / (k T)`` radians at frequency ``k``), so shift patterns
shared by neighbouring views are nearly invisible to it.

Here the working reconstruction is cut into thin layers (soft z-windows of a
few tens of px). A *landmark* is a point ``X = (x, y, z_layer)`` on a grid in
each layer. Its template in view ``i`` is the reprojection of its layer alone
under the current geometry, cut around the projection of ``X``; the view's
window there is correlated with it. The layer is thin, so its reprojection at
one tilt draws on views over a range of tilts several times wider than the
whole volume's, and the content of the window is at one depth, so the
measured position of ``X`` is that of a point. The clutter of the other layers
is uncorrelated with the template and only adds noise. The measured positions
go to the shared bundle adjustment (:func:`aligners.bundle.solve`) as tracks
of 3-D points, which fits per-view shift, rotation and magnification (and a
tilt offset) to all landmarks at once.

Views are split into interleaved folds by tilt rank; each view is measured
against a reconstruction made without its fold, so it never meets its own
contribution.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from aligners import imageops
from aligners.bundle import BundleOptions, BundleSolution, VariableModel, solve
from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry
from simtomo.reconstruct import reconstruct, reproject
from simtomo.similarity import Similarity

__all__ = ["LandmarkOptions", "LandmarkPass", "landmark_grid", "layer_centres", "layer_weights", "refine_by_landmarks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LandmarkOptions:
    """Settings of the layered-landmark refinement (binned px unless stated).

    Parameters
    ----------
    layer_px : float
        Layer thickness in unbinned px (the full-weight part of each z-window).
    edge_px : float
        Width of each layer's linear fall-off, binned px.
    window : int
        Side of the correlated windows.
    spacing : float
        Grid step of the landmarks in x and y.
    max_shift : float
        Largest displacement searched.
    lowpass, highpass : float
        Band-pass of the correlations, cycles per binned px.
    min_significance : float
        A measurement counts when its correlation peak stands this many robust
        standard deviations above its map.
    min_views : int
        Fewest measured views for a landmark to enter the bundle adjustment.
    iterations : int
        Measure-and-solve passes.
    tilt : str
        Bundle model of the tilt angles (``"global"``: one offset;
        ``"per-view"`` needs ``tilt_anchor_weight``, or the tilts take up the
        measurement noise as smooth tilt patterns).
    tilt_anchor_weight : float
        :attr:`aligners.bundle.BundleOptions.tilt_anchor_weight`; the anchor is
        ``nominal_tilt_deg`` of :func:`refine_by_landmarks`.
    declutter : bool
        Subtract the other layers' reprojection (scaled to the view by least
        squares) from the view before a layer is correlated with it, so that
        only the layer's own content and noise remain in the window. The
        subtraction is made at the current geometry, so it also pulls the
        measurement toward it: use it near the answer (from the matching
        stage's result on seed 1 of ``standard-nobeads``, 8 decluttered
        passes reach 1.35 px, 8 plain ones 1.00 px). Started from the true
        geometry (seed 0), one pass goes to 0.19 px with it and to 0.47 px
        without it.
    folds : int
        Interleaved view subsets for the leave-out reconstructions.
    """

    layer_px: float = 48.0
    edge_px: float = 3.0
    window: int = 32
    spacing: float = 32.0
    max_shift: float = 6.0
    lowpass: float = 0.3
    highpass: float = 0.03
    min_significance: float = 5.0
    min_views: int = 8
    iterations: int = 4
    tilt: str = "global"
    tilt_anchor_weight: float = 0.0
    declutter: bool = False
    folds: int = 2

    def __post_init__(self) -> None:
        for key in ("layer_px", "edge_px", "spacing", "max_shift"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"landmarks.{key}: expected a positive number, got {getattr(self, key)!r}")
        if self.window < 16:
            raise ConfigError(f"landmarks.window: expected at least 16 px, got {self.window!r}")
        if self.max_shift >= self.window / 2:
            raise ConfigError(f"landmarks.max_shift: expected less than half the window ({self.window / 2}), got {self.max_shift!r}")
        if not (np.isfinite(self.tilt_anchor_weight) and self.tilt_anchor_weight >= 0):
            raise ConfigError(f"landmarks.tilt_anchor_weight: expected a finite number >= 0, got {self.tilt_anchor_weight!r}")
        if self.min_views < 3 or self.iterations < 1 or self.folds < 2:
            raise ConfigError("landmarks: min_views >= 3, iterations >= 1 and folds >= 2 are required")


@dataclass(frozen=True)
class LandmarkPass:
    """What one measure-and-solve pass did."""

    iteration: int
    landmarks: int
    points: int
    rejected: int
    residual_rms_px: float
    seconds: float


def layer_centres(thickness: float, layer: float) -> np.ndarray:
    """Depths (same units as the inputs) of ``round(thickness / layer)`` layers tiling the specimen, centred on 0."""
    n = max(1, int(round(thickness / layer)))
    return (np.arange(n) - (n - 1) / 2.0) * (thickness / n)


def layer_weights(nz: int, centre: float, half: float, edge: float) -> np.ndarray:
    """Soft z-window of a layer over the ``nz`` centred voxel depths: 1 within ``half``, linear fall-off over ``edge``."""
    z = np.arange(nz) - (nz - 1) / 2.0
    return np.clip(1.0 - (np.abs(z - centre) - half) / edge, 0.0, 1.0)


def landmark_grid(vol_shape: tuple[int, int, int], window: int, spacing: float, depths: np.ndarray) -> np.ndarray:
    """Landmarks ``(x, y, z)`` (m, 3): a centred x-y grid inside the volume (binned px), one copy per layer depth."""
    _, ny, nx = vol_shape

    def axis(n: int, margin: float) -> np.ndarray:
        k = int(np.floor(max(n / 2.0 - margin, 0.0) / spacing))
        return np.arange(-k, k + 1) * spacing

    # A full window's margin across the axis: near the volume's x edges the
    # rays of high-tilt views leave the volume and a layer's reprojection is cut short.
    gx, gy = np.meshgrid(axis(nx, window), axis(ny, window / 2.0))
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    return np.concatenate([np.column_stack([xy, np.full(len(xy), z)]) for z in depths])


def _measure(
    images: np.ndarray,
    g_b: Geometry,
    vol: np.ndarray,
    views: np.ndarray,
    landmarks: np.ndarray,
    depths: np.ndarray,
    half: float,
    opt: LandmarkOptions,
    out: np.ndarray,
) -> None:
    """Write into ``out[views]`` the measured positions (binned px) of ``landmarks`` against ``vol``'s layers."""
    nz = vol.shape[0]
    _, hb, wb = images.shape
    s = opt.window
    proj = g_b.project(landmarks)  # (n, m, 2)
    taper = imageops.taper_window((s, s), s / 4.0)
    pa_all, pb_all, owner = [], [], []
    if opt.declutter:
        full = reproject(vol, g_b, views=views)
        centred = full - full.mean(axis=(1, 2), keepdims=True)
        gain = np.einsum("vij,vij->v", centred, images[views]) / np.maximum(np.einsum("vij,vij->v", centred, centred), 1e-30)
    for z0 in depths:
        wz = layer_weights(nz, z0, half, opt.edge_px)
        idx = np.flatnonzero(wz > 0)
        i0, i1 = int(idx[0]), int(idx[-1]) + 1
        layer = vol[i0:i1] * wz[i0:i1, None, None].astype(np.float32)
        # the cropped layer is centred on its own middle: move it back to its depth
        depth = (i0 + i1 - 1) / 2.0 - (nz - 1) / 2.0
        refs = reproject(layer, g_b, views=views, gauge=Similarity(translation=np.array([0.0, 0.0, depth])))
        in_layer = np.flatnonzero(landmarks[:, 2] == z0)
        for r_i, v in enumerate(views):
            p = proj[v, in_layer]
            col = np.round(p[:, 0] + (wb - 1) / 2.0 - (s - 1) / 2.0).astype(int)
            row = np.round(p[:, 1] + (hb - 1) / 2.0 - (s - 1) / 2.0).astype(int)
            ok = (col >= 0) & (row >= 0) & (col + s <= wb) & (row + s <= hb)
            if not ok.any():
                continue
            corners = np.column_stack([row[ok], col[ok]])
            pa_all.append(imageops.extract_patches(refs[r_i], corners, s))
            target = images[v] - gain[r_i] * (full[r_i] - refs[r_i]) if opt.declutter else images[v]
            pb_all.append(imageops.extract_patches(target, corners, s))
            owner.append(np.column_stack([np.full(int(ok.sum()), v), in_layer[ok]]))
    if not pa_all:
        return
    pa = np.concatenate(pa_all)
    pb = np.concatenate(pb_all)
    own = np.concatenate(owner)
    for arr in (pa, pb):
        arr -= arr.mean(axis=(1, 2), keepdims=True)
        arr *= taper
    # Both windows are cut at the same pixels, so the template's sub-pixel
    # position is the projection of X and the peak is the view's displacement.
    res = imageops.correlate_stack(pa, pb, max_shift=opt.max_shift, lowpass=opt.lowpass, highpass=opt.highpass,
                                   subpixel="dft")
    shift = np.nan_to_num(res.shift, nan=np.inf)
    good = res.valid & (res.significance >= opt.min_significance) & np.all(np.abs(shift) < opt.max_shift - 1.0, axis=1)
    v, j = own[good, 0], own[good, 1]
    out[v, j] = proj[v, j] + res.shift[good]


def refine_by_landmarks(
    images: np.ndarray,
    binning: int,
    geometry: Geometry,
    vol_shape: tuple[int, int, int],
    thickness_px: float,
    *,
    options: LandmarkOptions = LandmarkOptions(),
    acquisition_order: np.ndarray | None = None,
    reconstruct_kwargs: dict | None = None,
    nominal_tilt_deg: np.ndarray | None = None,
) -> tuple[Geometry, list[LandmarkPass], BundleSolution]:
    """Refine a geometry by bundle adjustment of depth-resolved landmarks.

    Parameters
    ----------
    images : (n, hb, wb) array
        Line-integral views binned by ``binning``.
    binning : int
    geometry : Geometry
        Starting geometry, unbinned px (e.g. a coarse alignment).
    vol_shape : (nz, ny, nx)
        Working reconstruction in binned voxels; it must hold the specimen.
    thickness_px : float
        Specimen thickness, unbinned px (the layers tile it).
    options : LandmarkOptions
    acquisition_order : (n,) int array, optional
        Passed to the bundle adjustment.
    reconstruct_kwargs : dict, optional
        Extra arguments of :func:`simtomo.reconstruct.reconstruct` (method, weighting, workers).
    nominal_tilt_deg : (n,) array, optional
        The stage's tilt readings, the anchor of ``options.tilt_anchor_weight``
        (default: the starting geometry's tilts).

    Returns
    -------
    (Geometry, list of LandmarkPass, BundleSolution of the last pass)

    Raises
    ------
    AlignmentError
        When too few landmarks are measured in enough views (the views hold no
        structure consistent with a tomogram), from the bundle adjustment.
    """
    opt = options
    n, hb, wb = images.shape
    b = float(binning)
    depths = layer_centres(thickness_px / b, opt.layer_px / b)
    half = 0.5 * thickness_px / b / len(depths)
    landmarks = landmark_grid(vol_shape, opt.window, opt.spacing, depths)
    order = np.argsort(geometry.tilt_deg, kind="stable")
    fold_of = np.empty(n, dtype=int)
    fold_of[order] = np.arange(n) % opt.folds
    kwargs = {"method": "wbp", "weighting": "ramp", **(reconstruct_kwargs or {})}
    model = VariableModel(mode="per-view")
    bundle_options = BundleOptions(rotation=model, magnification=model, tilt=VariableModel(mode=opt.tilt),
                                   tilt_gauge="level", robust=True, tilt_anchor_weight=opt.tilt_anchor_weight)
    anchor = geometry.tilt_deg if nominal_tilt_deg is None else nominal_tilt_deg
    reference = int(np.argmin(np.abs(geometry.tilt_deg)))
    log.info("landmarks: %d layers of %.1f binned px, %d landmarks, binning %d", len(depths), 2 * half, len(landmarks),
             binning)
    passes: list[LandmarkPass] = []
    solution = None
    for it in range(opt.iterations):
        t0 = time.perf_counter()
        g_b = geometry.replace(shift_px=geometry.shift_px / b, image_shape=(hb, wb))
        xy = np.full((n, len(landmarks), 2), np.nan)
        for k in range(opt.folds):
            views = np.flatnonzero(fold_of == k)
            others = np.flatnonzero(fold_of != k)
            vol = reconstruct(images[others], g_b.select(others), vol_shape, **kwargs)
            _measure(images, g_b, vol, views, landmarks, depths, half, opt, xy)
            del vol
        seen = np.isfinite(xy[..., 0]).sum(axis=0) >= opt.min_views
        if seen.sum() < 3:
            raise AlignmentError(
                f"correlation too low: only {int(seen.sum())} of {len(landmarks)} landmarks matched their layer's "
                f"reprojection in {opt.min_views} or more views; the views hold no structure consistent with a tomogram"
            )
        solution = solve(xy[:, seen] * b, geometry, options=bundle_options, reference_view=reference,
                         acquisition_order=acquisition_order, initial_points=landmarks[seen] * b, tilt_anchor_deg=anchor)
        geometry = solution.geometry
        record = LandmarkPass(
            iteration=it + 1,
            landmarks=int(seen.sum()),
            points=int(solution.report.n_points),
            rejected=int(solution.rejected.sum()),
            residual_rms_px=float(solution.report.rms_px),
            seconds=time.perf_counter() - t0,
        )
        passes.append(record)
        log.info("landmarks pass %d: %d landmarks, %d points (%d rejected), residual %.3f px RMS (%.1f s)",
                 record.iteration, record.landmarks, record.points, record.rejected, record.residual_rms_px,
                 record.seconds)
    assert solution is not None
    return geometry, passes, solution
