"""Projectors: line integrals of the specimen in the raw frame of each view.

Two projectors honour the full geometry of DESIGN.md section 3 (tilt, rotation,
magnification, shift):

- the analytic projector integrates each primitive exactly along the beam and
  over the area of each detector pixel (erf for Gaussians; Gauss-Legendre
  quadrature, dense near the rims, for spheres and shells), so a primitive's
  image centre is exactly ``Geometry.project`` of its centre;
- the voxel projector integrates a density volume along tilted rays with linear
  interpolation, then maps the aligned-frame projection into the view with the
  in-plane transform (:func:`simtomo.transforms.aligned_to_view`).

Values are line integrals in specimen pixels times density. The loops over
primitives and rays are compiled with numba and release the GIL, so views can
be projected on several threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from simtomo.geometry import Geometry
from simtomo.specimen import Gaussians, Shells, VoxelPhantom
from simtomo.transforms import aligned_to_view

__all__ = [
    "project_gaussians",
    "project_shells",
    "project_voxels",
    "GAUSSIAN_CUTOFF_SIGMA",
]

# Gaussians are evaluated within this many sigma of their centre; the mass
# beyond is below 7e-7 per axis and, being symmetric, moves no centroid.
GAUSSIAN_CUTOFF_SIGMA = 5.0

_GL2 = np.polynomial.legendre.leggauss(2)
_GL8 = np.polynomial.legendre.leggauss(8)
# nodes on [-1/2, 1/2] and weights summing to 1
_NODES_COARSE, _WEIGHTS_COARSE = _GL2[0] / 2.0, _GL2[1] / 2.0
_NODES_FINE, _WEIGHTS_FINE = _GL8[0] / 2.0, _GL8[1] / 2.0


@numba.njit(cache=True, nogil=True)
def _erf_weights(centre: float, sigma: float, lo: int, hi: int, out: np.ndarray) -> None:
    """Fraction of a unit 1-D Gaussian falling in each pixel lo..hi (pixel k spans k +- 1/2)."""
    inv = 1.0 / (math.sqrt(2.0) * sigma)
    prev = math.erf((lo - 0.5 - centre) * inv)
    for k in range(lo, hi + 1):
        nxt = math.erf((k + 0.5 - centre) * inv)
        out[k - lo] = 0.5 * (nxt - prev)
        prev = nxt


@numba.njit(cache=True, nogil=True)
def _splat_gaussians(out, col, row, sigma, weight, cutoff):
    """Add pixel-integrated 2-D Gaussians (centre in array index units) to ``out``."""
    h, w = out.shape
    max_half = 0.0
    for k in range(col.size):
        max_half = max(max_half, cutoff * sigma[k] + 1.0)
    n_buf = int(2 * max_half) + 3
    wx = np.empty(n_buf)
    wy = np.empty(n_buf)
    for k in range(col.size):
        half = cutoff * sigma[k] + 1.0
        c_lo = max(int(math.floor(col[k] - half)), 0)
        c_hi = min(int(math.ceil(col[k] + half)), w - 1)
        r_lo = max(int(math.floor(row[k] - half)), 0)
        r_hi = min(int(math.ceil(row[k] + half)), h - 1)
        if c_lo > c_hi or r_lo > r_hi:
            continue
        _erf_weights(col[k], sigma[k], c_lo, c_hi, wx)
        _erf_weights(row[k], sigma[k], r_lo, r_hi, wy)
        a = weight[k]
        for r in range(r_lo, r_hi + 1):
            ar = a * wy[r - r_lo]
            for c in range(c_lo, c_hi + 1):
                out[r, c] += ar * wx[c - c_lo]


@numba.njit(cache=True, nogil=True, inline="always")
def _chord_difference(dx, dy, r_in2, r_out2):
    """sqrt(r_out^2 - d^2)_+ - sqrt(r_in^2 - d^2)_+ : half the path through a shell."""
    d2 = dx * dx + dy * dy
    v = 0.0
    if d2 < r_out2:
        v = math.sqrt(r_out2 - d2)
        if d2 < r_in2:
            v -= math.sqrt(r_in2 - d2)
    return v


@numba.njit(cache=True, nogil=True)
def _splat_shells(out, col, row, r_in, r_out, weight, nodes_c, weights_c, nodes_f, weights_f):
    """Add pixel-averaged projections ``weight * (chord(r_out) - chord(r_in)) / 2`` of shells.

    Pixels within a pixel diagonal of either rim, where the profile has its
    square-root edge, use the fine quadrature; the smooth rest the coarse one.
    """
    h, w = out.shape
    rim = 0.75
    for k in range(col.size):
        ro, ri = r_out[k], r_in[k]
        ro2, ri2 = ro * ro, ri * ri
        c_lo = max(int(math.floor(col[k] - ro - 1.0)), 0)
        c_hi = min(int(math.ceil(col[k] + ro + 1.0)), w - 1)
        r_lo = max(int(math.floor(row[k] - ro - 1.0)), 0)
        r_hi = min(int(math.ceil(row[k] + ro + 1.0)), h - 1)
        for r in range(r_lo, r_hi + 1):
            dy = r - row[k]
            for c in range(c_lo, c_hi + 1):
                dx = c - col[k]
                d = math.sqrt(dx * dx + dy * dy)
                if d > ro + rim:
                    continue
                if abs(d - ro) < rim or (ri > 0.0 and abs(d - ri) < rim):
                    nodes, wts = nodes_f, weights_f
                else:
                    nodes, wts = nodes_c, weights_c
                acc = 0.0
                for i in range(nodes.size):
                    for j in range(nodes.size):
                        acc += wts[i] * wts[j] * _chord_difference(dx + nodes[j], dy + nodes[i], ri2, ro2)
                out[r, c] += weight[k] * acc


def _view_positions(geometry: Geometry, view: int, centers_px: np.ndarray, shape: tuple[int, int]):
    """Projected centres of primitives in array-index units (col, row)."""
    a = geometry.projection_matrices()[view]
    p = centers_px @ a.T + geometry.shift_px[view]
    h, w = shape
    return p[:, 0] + (w - 1) / 2.0, p[:, 1] + (h - 1) / 2.0


def _visible(col, row, reach, shape) -> np.ndarray:
    h, w = shape
    return (col + reach >= -1) & (col - reach <= w) & (row + reach >= -1) & (row - reach <= h)


def project_gaussians(
    gaussians: Gaussians, geometry: Geometry, view: int, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Pixel-integrated line integrals of isotropic Gaussians in view ``view``.

    A Gaussian of peak ``rho`` and width ``sigma`` projects to a 2-D Gaussian of
    width ``s sigma`` whose integral over the image is ``mass * s^2``
    (``mass = rho (2 pi)^(3/2) sigma^3``); each pixel receives the exact integral
    over its area (products of erf differences) divided by the pixel area.

    Returns (or adds into ``out``) an array of ``geometry.image_shape``.
    """
    shape = geometry.image_shape
    if out is None:
        out = np.zeros(shape)
    if len(gaussians) == 0:
        return out
    s = geometry.mag[view]
    col, row = _view_positions(geometry, view, gaussians.centers_px, shape)
    sigma = s * gaussians.sigma_px
    keep = _visible(col, row, GAUSSIAN_CUTOFF_SIGMA * sigma + 1, shape)
    _splat_gaussians(
        out, col[keep], row[keep], sigma[keep], (gaussians.mass * s * s)[keep], GAUSSIAN_CUTOFF_SIGMA
    )
    return out


def project_shells(shells: Shells, geometry: Geometry, view: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Pixel-averaged line integrals of uniform spherical shells (and solid spheres) in view ``view``.

    The path through a shell at specimen distance ``rho`` from its centre is
    ``2 (sqrt(R^2 - rho^2)_+ - sqrt(r^2 - rho^2)_+)``; in the view ``rho = d / s``
    with ``d`` the image distance, which gives ``(2/s)(sqrt((sR)^2 - d^2)_+ - ...)``.
    """
    shape = geometry.image_shape
    if out is None:
        out = np.zeros(shape)
    if len(shells) == 0:
        return out
    s = geometry.mag[view]
    col, row = _view_positions(geometry, view, shells.centers_px, shape)
    r_out = s * shells.r_outer_px
    keep = _visible(col, row, r_out + 1, shape)
    _splat_shells(
        out,
        col[keep],
        row[keep],
        (s * shells.r_inner_px)[keep],
        r_out[keep],
        (2.0 / s * shells.density)[keep],
        _NODES_COARSE,
        _WEIGHTS_COARSE,
        _NODES_FINE,
        _WEIGHTS_FINE,
    )
    return out


@numba.njit(cache=True, nogil=True)
def _tilt_project(vol, theta, n_u):
    """Line integrals of ``vol[z, y, x]`` along the beam of tilt ``theta`` (radians).

    Returns ``p[y, u]`` with ``u = x cos(theta) + z sin(theta)`` sampled every
    voxel, centred, as density times voxel lengths. Each voxel's content is
    split between the two nearest u samples with linear weights, which keeps
    the mass and the first moment of every voxel exactly: a bead's projected
    centroid is its voxel centroid, at any tilt.
    """
    nz, ny, nx = vol.shape
    out = np.zeros((ny, n_u))
    c, s = math.cos(theta), math.sin(theta)
    cu, cx, cz = (n_u - 1) / 2.0, (nx - 1) / 2.0, (nz - 1) / 2.0
    for j in range(ny):
        for k in range(nz):
            zs = (k - cz) * s + cu
            for i in range(nx):
                v = vol[k, j, i]
                if v == 0.0:
                    continue
                u = (i - cx) * c + zs
                i0 = int(math.floor(u))
                f = u - i0
                if 0 <= i0 < n_u:
                    out[j, i0] += (1.0 - f) * v
                if 0 <= i0 + 1 < n_u:
                    out[j, i0 + 1] += f * v
    return out


def project_voxels(phantom: VoxelPhantom, geometry: Geometry, view: int, *, out: np.ndarray | None = None) -> np.ndarray:
    """Line integrals of a voxel volume in view ``view``, in specimen pixels times density.

    The volume is first projected along the tilted beam on its own grid (the
    aligned frame, sampled every voxel), then mapped into the view with the
    in-plane transform by cubic-spline interpolation.
    """
    vol = phantom.volume  # float32, contiguous: converted once, not per view
    nz, ny, nx = vol.shape
    theta = math.radians(float(geometry.tilt_deg[view]))
    n_u = int(math.ceil(abs(math.cos(theta)) * nx + abs(math.sin(theta)) * nz)) + 3
    aligned = _tilt_project(vol, theta, n_u) * phantom.voxel_size_px
    image = aligned_to_view(aligned, geometry, view, spacing_px=phantom.voxel_size_px)
    if out is None:
        return image
    out += image
    return out
