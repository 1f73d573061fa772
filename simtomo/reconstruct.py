"""Tomographic reconstruction and reprojection under any :class:`~simtomo.geometry.Geometry`.

Everything happens in the *aligned frame* of each view (:mod:`simtomo.transforms`):
the projection ``q = P R_y(theta_i) Y`` of a specimen point ``Y`` before the
in-plane transform, sampled every ``b`` specimen pixels (``b`` = voxel size,
the binning). A raw view is brought into that frame once,
``aligned(q) = raw(A_i q + t_i)``, and a volume voxel at ``X`` (centred as
DESIGN.md section 3 prescribes, ``X = b (index - (n - 1) / 2)``) is seen at

    q_i(X) = N_i X + o_i,    N_i = P R_y(theta_i) s R,   o_i = P R_y(theta_i) T

where ``G = (s, R, T)`` is an optional gauge :class:`~simtomo.similarity.Similarity`
(identity by default): the volume is computed in the frame where view ``i``
sees the volume point ``X`` at ``p_i(G X)``, the semantics of
:func:`simtomo.similarity.projection_model`. A specimen point ``Y`` therefore
appears in the volume at ``G^-1(Y)``.

Values are densities per specimen pixel of path, the units of
:func:`simtomo.voxelize.phantom_volume`, at every voxel size.

Methods
-------
``wbp``
    Weighted back-projection. Each raw view is resampled into its aligned
    frame every ``b`` px: one Keys cubic sample per aligned sample when
    ``b <= 1``; for ``b > 1`` the mean of ``ceil(b)^2`` bilinear samples
    spread evenly over the ``b x b`` cell (a box filter, symmetric, so it
    anti-aliases without shifting). Samples within 8 raw px of the edge of the
    field fade to the view's mean, and samples outside it take the mean. Each
    row is padded along ``u`` (aligned x, across the tilt axis) to at least
    twice its length with raised-cosine ramps down to the mean and back, so the
    FFT sees no wrap-around and no step; filtered by the ramp (Ram-Lak);
    multiplied by the view's angular interval (half the distance to its two
    neighbours among the sorted tilts, the whole gap for the first and last);
    and back-projected with bilinear interpolation.
``sirt``
    SIRT in the aligned frame: the data are resampled once as above (without
    filtering); the projector ``A`` is the voxel-driven bilinear splat, the
    exact adjoint of the back-projector; ``x <- x + C A^T R (p - A x)`` from
    zero, with ``R`` the data weight over the row sum and ``C`` one over the
    column sum.

The hot loops (resampling, back-projection, splat) are numba kernels
(``parallel=True``, cached on disk). Back-projection runs one thread per
volume row with the views innermost, so each voxel is written by one thread
and the loop over views becomes vector gathers.

The ``sirt-like`` weighting replaces the ramp ``|k|`` by the filter that
``N`` SIRT iterations apply to the frequencies of a parallel-beam problem
(G. L. Zeng, "A filtered backprojection algorithm with characteristics of the
iterative Landweber algorithm", Med. Phys. 39(2), 603-607, 2012; the same idea
as IMOD ``tilt``'s FakeSIRTiterations):

    H_N(k) = |k| [1 - (1 - k0 / |k|)^N]   for |k| > k0,     H_N(k) = |k| otherwise,

with ``k`` in cycles per sample. One SIRT iteration with row-sum and
column-sum normalisation multiplies frequency ``k`` by ``k0 / |k|`` with
``k0 = 1 / (Theta T)``: ``T`` is the ray length through the volume in voxels
and ``Theta`` the tilt range in radians (the back-projection of ``n``
unit-weight views spread over ``Theta`` has transfer ``n / (Theta |k|)`` in
the measured wedge; the normalisations divide by ``n`` and by ``T``). ``N``
iterations from zero leave ``1 - (1 - k0/|k|)^N`` of the exact inverse. The
filter is the ramp at low ``k`` and flattens to ``N k0`` at high ``k``.
``T`` is taken per view as ``min(nz / |cos theta|, nx / |sin theta|)``,
``Theta`` as the sum of the views' angular intervals, and ``k0`` averaged
over views. Checked against this module's SIRT on Gaussian blobs (tests).
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from simtomo.errors import ConfigError
from simtomo.geometry import Geometry
from simtomo.imaging import log_intensity
from simtomo.similarity import Similarity, projection_model
from simtomo.transforms import aligned_to_view

__all__ = ["log_intensity", "reconstruct", "reproject"]

log = logging.getLogger(__name__)

_METHODS = ("wbp", "sirt")
_WEIGHTINGS = ("ramp", "sirt-like")

# Raw pixels over which data fade to the view mean at the edge of the field:
# a hard edge would be a step that the ramp filter turns into streaks.
_TAPER_PX = 8.0
# Aligned samples kept beyond the projection of the volume box, so that every
# voxel centre has both bilinear neighbours inside the aligned image.
_MARGIN = 2
# Reprojection keeps more zeros around the volume's footprint for the cubic
# spline of aligned_to_view.
_REPROJECT_MARGIN = 4


# --------------------------------------------------------------------------- inputs


def _check_geometry(geometry: object) -> Geometry:
    if not isinstance(geometry, Geometry):
        raise ConfigError(f"geometry: expected a simtomo Geometry, got {type(geometry).__name__}")
    return geometry


def _check_voxel_size(voxel_size_px: object) -> float:
    if isinstance(voxel_size_px, bool) or not isinstance(voxel_size_px, numbers.Real):
        raise ConfigError(f"voxel_size_px: expected a positive number of specimen pixels, got {voxel_size_px!r}")
    b = float(voxel_size_px)
    if not (math.isfinite(b) and b > 0):
        raise ConfigError(f"voxel_size_px: expected a positive number of specimen pixels, got {voxel_size_px!r}")
    return b


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_shape(shape: object) -> tuple[int, int, int]:
    try:
        items = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        items = ()
    if len(items) != 3 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in items):
        raise ConfigError(f"shape: expected three positive integers (nz, ny, nx), got {shape!r}")
    return tuple(int(v) for v in items)  # type: ignore[return-value]


def _check_gauge(gauge: object) -> Similarity | None:
    if gauge is not None and not isinstance(gauge, Similarity):
        raise ConfigError(f"gauge: expected a simtomo.similarity.Similarity or None, got {type(gauge).__name__}")
    return gauge


def _check_projections(projections: object, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """The stack as a float array numba can read, and the mean of each view."""
    arr = np.asarray(projections)
    n, shape = geometry.n_views, geometry.image_shape
    if arr.ndim != 3:
        raise ConfigError(f"projections: expected an (n, h, w) stack, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ConfigError(f"projections: the stack has {arr.shape[0]} views but the geometry has {n}")
    if arr.shape[1:] != shape:
        raise ConfigError(f"projections: views are {arr.shape[1:]} px but geometry.image_shape is {shape}")
    if arr.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ConfigError(f"projections: expected real values, got dtype {arr.dtype}")
        arr = arr.astype(np.float32)
    arr = np.ascontiguousarray(arr)
    # a non-finite value makes its view's mean non-finite: one pass, no temporary
    means = arr.mean(axis=(1, 2), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(means))
    if bad.size:
        raise ConfigError(f"projections: view {int(bad[0])} contains NaN or infinite values")
    return arr, means


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


@contextmanager
def _numba_threads(workers: object) -> Iterator[int]:
    """Run the enclosed numba kernels on ``workers`` threads (all by default), then restore."""
    limit = numba.config.NUMBA_NUM_THREADS
    if workers is None:
        count = limit
    else:
        count = min(_check_int("workers", workers, 1), limit)
    previous = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        yield count
    finally:
        numba.set_num_threads(previous)


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class _Frame:
    """How volume voxels meet the aligned images of a set of views.

    ``index_map[v] @ (i, j, k, 1)`` gives the (column, row) sample index in the
    aligned image of view ``v`` at which voxel ``vol[k, j, i]`` is seen.
    ``rows_fixed``: every view sees volume row ``j`` on aligned row ``j``
    (no gauge rotation mixes y), which allows 1-D interpolation along ``u``.
    """

    index_map: np.ndarray  # (n, 2, 4) float64
    shape: tuple[int, int]  # (ha, wa)
    rows_fixed: bool


def _aligned_maps(geometry: Geometry, gauge: Similarity | None) -> tuple[np.ndarray, np.ndarray]:
    """``N (n, 2, 3)`` and ``o (n, 2)`` with ``q_i(X) = N_i X + o_i`` in the aligned frame."""
    m, c = projection_model(geometry, gauge)
    a_inv = np.linalg.inv(geometry.inplane_matrices())
    n_mat = a_inv @ m
    offset = np.einsum("nij,nj->ni", a_inv, c - geometry.shift_px)
    return n_mat, offset


def _frame(n_mat: np.ndarray, offset: np.ndarray, shape: tuple[int, int, int], b: float, margin: int) -> _Frame:
    """The aligned sampling grid that holds the projection of the volume box in every view."""
    nz, ny, nx = shape
    half = 0.5 * b * np.array([nx, ny, nz], dtype=float)
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float) * half
    q = np.einsum("nij,mj->nmi", n_mat, corners) + offset[:, None, :]
    rows_fixed = bool(
        np.all(np.abs(n_mat[:, 1, :] - np.array([0.0, 1.0, 0.0])) < 1e-12) and np.all(np.abs(offset[:, 1]) < 1e-9)
    )
    # The aligned grid keeps the volume's parity on each axis, so that an
    # identity mapping lands on whole samples. An odd/even mismatch would put
    # every voxel half-way between rows: no error in position, but bilinear
    # interpolation at f = 1/2 low-passes the volume (zero transfer at Nyquist).
    wa = _grid_size(np.abs(q[..., 0]).max() / b + margin, nx)
    ha = ny if rows_fixed else _grid_size(np.abs(q[..., 1]).max() / b + margin, ny)
    centre_vol = (np.array([nx, ny, nz], dtype=float) - 1.0) / 2.0
    centre_img = (np.array([wa, ha], dtype=float) - 1.0) / 2.0
    # index (i, j, k) -> X = b (index - centre) -> q = N X + o -> sample = q / b + centre_img
    index_map = np.empty((n_mat.shape[0], 2, 4))
    index_map[:, :, :3] = n_mat
    index_map[:, :, 3] = -n_mat @ centre_vol + offset / b + centre_img
    if rows_fixed:  # exactly the identity on rows, not merely to rounding
        index_map[:, 1, :] = np.array([0.0, 1.0, 0.0, 0.0])
    return _Frame(index_map=index_map, shape=(ha, wa), rows_fixed=rows_fixed)


def _grid_size(half_extent: float, n_volume: int) -> int:
    """The smallest size >= n_volume, of the same parity, whose half-width covers ``half_extent`` samples."""
    extra = max(0, int(math.ceil(half_extent - (n_volume - 1) / 2.0)))
    return n_volume + 2 * extra


def _raw_index_maps(geometry: Geometry, frame_shape: tuple[int, int], b: float) -> np.ndarray:
    """``(n, 2, 3)`` maps from aligned sample (column, row) to raw array (column, row) indices."""
    ha, wa = frame_shape
    h, w = geometry.image_shape
    a = geometry.inplane_matrices()
    out = np.empty((geometry.n_views, 2, 3))
    out[:, :, :2] = a * b
    centre_q = -b * (np.array([wa, ha], dtype=float) - 1.0) / 2.0
    out[:, :, 2] = a @ centre_q + geometry.shift_px + (np.array([w, h], dtype=float) - 1.0) / 2.0
    return out


def _angular_intervals(tilt_deg: np.ndarray) -> np.ndarray:
    """Angular interval (radians) each view represents: half the distance to its neighbours.

    Tilts need not be sorted or uniform; the first and last tilt of the sorted
    set take the whole gap to their one neighbour, so that ``n`` evenly spaced
    views at step ``d`` weigh ``n d`` in total.
    """
    t = np.deg2rad(np.asarray(tilt_deg, dtype=float))
    n = t.size
    if n == 1:
        return np.array([math.pi])
    order = np.argsort(t, kind="stable")
    gaps = np.diff(t[order])
    w = np.empty(n)
    w[0], w[-1] = gaps[0], gaps[-1]
    w[1:-1] = 0.5 * (gaps[:-1] + gaps[1:])
    out = np.empty(n)
    out[order] = w
    return out


# --------------------------------------------------------------------------- kernels


@numba.njit(cache=True, nogil=True, inline="always")
def _span(c0: float, d: float, limit: float, n: int) -> tuple[int, int]:
    """The indices ``lo <= i < hi`` of ``range(n)`` with ``0 <= c0 + d * i < limit``.

    The estimate from the line equation is corrected by testing the very
    expression the loops evaluate, so rounding can never let an index out.
    """
    if d == 0.0:
        if 0.0 <= c0 < limit:
            return 0, n
        return 0, 0
    a = -c0 / d
    e = (limit - c0) / d
    lo_f, hi_f = (a, e) if d > 0 else (e, a)
    lo = int(min(max(math.ceil(lo_f), 0.0), float(n)))
    hi = int(min(max(math.ceil(hi_f), 0.0), float(n)))
    while lo > 0 and 0.0 <= c0 + d * (lo - 1) < limit:
        lo -= 1
    while lo < hi and not (0.0 <= c0 + d * lo < limit):
        lo += 1
    while hi < n and hi > lo and 0.0 <= c0 + d * hi < limit:
        hi += 1
    while hi > lo and not (0.0 <= c0 + d * (hi - 1) < limit):
        hi -= 1
    return lo, hi


@numba.njit(cache=True, nogil=True, inline="always")
def _keys_weights(t: float) -> tuple[float, float, float, float]:
    """Keys cubic-convolution weights (a = -1/2) of the samples at offsets -1, 0, 1, 2."""
    w0 = ((-0.5 * t + 1.0) * t - 0.5) * t
    w1 = (1.5 * t - 2.5) * t * t + 1.0
    w2 = ((-1.5 * t + 2.0) * t + 0.5) * t
    w3 = (0.5 * t - 0.5) * t * t
    return w0, w1, w2, w3


@numba.njit(cache=True, nogil=True, inline="always")
def _cubic_sample(img: np.ndarray, x: float, y: float) -> float:
    """Keys cubic interpolation of ``img`` at array coordinates (x = column, y = row), edges replicated."""
    h, w = img.shape
    x0 = int(math.floor(x))
    y0 = int(math.floor(y))
    wx0, wx1, wx2, wx3 = _keys_weights(x - x0)
    wy0, wy1, wy2, wy3 = _keys_weights(y - y0)
    if 1 <= x0 < w - 2 and 1 <= y0 < h - 2:
        c = x0 - 1
        return (
            wy0 * (wx0 * img[y0 - 1, c] + wx1 * img[y0 - 1, c + 1] + wx2 * img[y0 - 1, c + 2] + wx3 * img[y0 - 1, c + 3])
            + wy1 * (wx0 * img[y0, c] + wx1 * img[y0, c + 1] + wx2 * img[y0, c + 2] + wx3 * img[y0, c + 3])
            + wy2 * (wx0 * img[y0 + 1, c] + wx1 * img[y0 + 1, c + 1] + wx2 * img[y0 + 1, c + 2] + wx3 * img[y0 + 1, c + 3])
            + wy3 * (wx0 * img[y0 + 2, c] + wx1 * img[y0 + 2, c + 1] + wx2 * img[y0 + 2, c + 2] + wx3 * img[y0 + 2, c + 3])
        )
    c0 = min(max(x0 - 1, 0), w - 1)
    c1 = min(max(x0, 0), w - 1)
    c2 = min(max(x0 + 1, 0), w - 1)
    c3 = min(max(x0 + 2, 0), w - 1)
    r0 = min(max(y0 - 1, 0), h - 1)
    r1 = min(max(y0, 0), h - 1)
    r2 = min(max(y0 + 1, 0), h - 1)
    r3 = min(max(y0 + 2, 0), h - 1)
    return (
        wy0 * (wx0 * img[r0, c0] + wx1 * img[r0, c1] + wx2 * img[r0, c2] + wx3 * img[r0, c3])
        + wy1 * (wx0 * img[r1, c0] + wx1 * img[r1, c1] + wx2 * img[r1, c2] + wx3 * img[r1, c3])
        + wy2 * (wx0 * img[r2, c0] + wx1 * img[r2, c1] + wx2 * img[r2, c2] + wx3 * img[r2, c3])
        + wy3 * (wx0 * img[r3, c0] + wx1 * img[r3, c1] + wx2 * img[r3, c2] + wx3 * img[r3, c3])
    )


@numba.njit(cache=True, nogil=True, inline="always")
def _linear_sample(img: np.ndarray, x: float, y: float) -> float:
    """Bilinear interpolation of ``img`` at array coordinates (x = column, y = row), edges replicated."""
    h, w = img.shape
    x0 = int(math.floor(x))
    y0 = int(math.floor(y))
    fx = x - x0
    fy = y - y0
    c0 = min(max(x0, 0), w - 1)
    c1 = min(max(x0 + 1, 0), w - 1)
    r0 = min(max(y0, 0), h - 1)
    r1 = min(max(y0 + 1, 0), h - 1)
    top = img[r0, c0] + fx * (img[r0, c1] - img[r0, c0])
    bottom = img[r1, c0] + fx * (img[r1, c1] - img[r1, c0])
    return top + fy * (bottom - top)


@numba.njit(cache=True, nogil=True, parallel=True)
def _resample_views(raw, raw_map, n_sub, fill, taper, out, weight, with_weight):
    """Aligned images ``out[v, r, c] = raw_v(raw_map[v] @ (c, r, 1))``, box-filtered and edge-tapered.

    With ``n_sub == 1`` each aligned sample is one Keys cubic sample of the raw
    view. With ``n_sub > 1`` (voxels larger than a pixel) it is the mean of
    ``n_sub x n_sub`` bilinear samples spread evenly over its cell: a box of
    one aligned sample (``b`` specimen pixels), symmetric about the centre, so
    it anti-aliases without shifting anything. A sub-sample whose source is
    within ``taper`` raw pixels of the field edge is blended toward
    ``fill[v]``; outside the field it is ``fill[v]``. ``weight`` receives the
    mean blend weight (1 = all data), when ``with_weight``.
    """
    n, ha, wa = out.shape
    h = raw.shape[1]
    w = raw.shape[2]
    inv_sub = 1.0 / (n_sub * n_sub)
    for vr in numba.prange(n * ha):
        v = vr // ha
        r = vr % ha
        img = raw[v]
        m00, m01, m02 = raw_map[v, 0, 0], raw_map[v, 0, 1], raw_map[v, 0, 2]
        m10, m11, m12 = raw_map[v, 1, 0], raw_map[v, 1, 1], raw_map[v, 1, 2]
        f = fill[v]
        for c in range(wa):
            acc = 0.0
            wacc = 0.0
            for sr in range(n_sub):
                rr = r + (sr + 0.5) / n_sub - 0.5
                for sc in range(n_sub):
                    cc = c + (sc + 0.5) / n_sub - 0.5
                    x = m00 * cc + m01 * rr + m02
                    y = m10 * cc + m11 * rr + m12
                    d = min(min(x + 0.5, w - 0.5 - x), min(y + 0.5, h - 0.5 - y))
                    if d <= 0.0:
                        acc += f
                        continue
                    if d >= taper:
                        wt = 1.0
                    else:
                        wt = 0.5 - 0.5 * math.cos(math.pi * d / taper)
                    if n_sub == 1:
                        val = _cubic_sample(img, x, y)
                    else:
                        val = _linear_sample(img, x, y)
                    acc += f + wt * (val - f)
                    wacc += wt
            out[v, r, c] = acc * inv_sub
            if with_weight:
                weight[v, r, c] = wacc * inv_sub


@numba.njit(cache=True, nogil=True, inline="always")
def _voxel_rows(rows, c0, d, w, i, limit):
    """One voxel's sum over views of ``w_v * rows_v(c0_v + d_v i)``, skipping views it falls outside."""
    acc = np.float32(0.0)
    for v in range(c0.size):
        u = c0[v] + d[v] * i
        if 0.0 <= u < limit:
            iu = int(u)
            f = np.float32(u - iu)
            a = rows[v, iu]
            acc += w[v] * (a + f * (rows[v, iu + 1] - a))
    return acc


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _backproject_rows(img, imap, wts, vol):
    """``vol += sum_v wts[v] * img_v(u_v(i, j, k), j)``, linear in ``u`` (rows fixed).

    One thread per volume row (y, z); the loop over views is innermost and
    accumulates in a register, which the compiler turns into gathers across
    views. Voxels that some view does not cover take the checked path.
    """
    n, ha, wa = img.shape
    nz, ny, nx = vol.shape
    limit = wa - 1.0
    for jk in numba.prange(ny * nz):
        j = jk // nz
        k = jk % nz
        out = vol[k, j]
        rows = img[:, j, :]
        c0 = np.empty(n)
        d = np.empty(n)
        w = np.empty(n, dtype=np.float32)
        lo_all = 0
        hi_all = nx
        for v in range(n):
            d[v] = imap[v, 0, 0]
            c0[v] = imap[v, 0, 1] * j + imap[v, 0, 2] * k + imap[v, 0, 3]
            w[v] = wts[v]
            lo, hi = _span(c0[v], d[v], limit, nx)
            lo_all = max(lo_all, lo)
            hi_all = min(hi_all, hi)
        if hi_all < lo_all:
            hi_all = lo_all
        for i in range(lo_all, hi_all):
            acc = np.float32(0.0)
            for v in range(n):
                u = c0[v] + d[v] * i
                iu = int(u)
                f = np.float32(u - iu)
                a = rows[v, iu]
                acc += w[v] * (a + f * (rows[v, iu + 1] - a))
            out[i] += acc
        for i in range(lo_all):
            out[i] += _voxel_rows(rows, c0, d, w, i, limit)
        for i in range(hi_all, nx):
            out[i] += _voxel_rows(rows, c0, d, w, i, limit)


@numba.njit(cache=True, nogil=True, inline="always")
def _voxel_general(img, u0, du, y0, dy, w, i, lim_u, lim_y):
    """One voxel's bilinear sum over views, skipping views it falls outside."""
    acc = np.float32(0.0)
    for v in range(u0.size):
        u = u0[v] + du[v] * i
        y = y0[v] + dy[v] * i
        if 0.0 <= u < lim_u and 0.0 <= y < lim_y:
            iu = int(u)
            iy = int(y)
            fu = np.float32(u - iu)
            fy = np.float32(y - iy)
            a0 = img[v, iy, iu]
            a1 = img[v, iy + 1, iu]
            top = a0 + fu * (img[v, iy, iu + 1] - a0)
            bottom = a1 + fu * (img[v, iy + 1, iu + 1] - a1)
            acc += w[v] * (top + fy * (bottom - top))
    return acc


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _backproject_general(img, imap, wts, vol):
    """``vol += sum_v wts[v] * img_v(u_v(i, j, k), y_v(i, j, k))``, bilinear; views innermost."""
    n, ha, wa = img.shape
    nz, ny, nx = vol.shape
    lim_u = wa - 1.0
    lim_y = ha - 1.0
    for jk in numba.prange(ny * nz):
        j = jk // nz
        k = jk % nz
        out = vol[k, j]
        u0 = np.empty(n)
        du = np.empty(n)
        y0 = np.empty(n)
        dy = np.empty(n)
        w = np.empty(n, dtype=np.float32)
        lo_all = 0
        hi_all = nx
        for v in range(n):
            du[v] = imap[v, 0, 0]
            u0[v] = imap[v, 0, 1] * j + imap[v, 0, 2] * k + imap[v, 0, 3]
            dy[v] = imap[v, 1, 0]
            y0[v] = imap[v, 1, 1] * j + imap[v, 1, 2] * k + imap[v, 1, 3]
            w[v] = wts[v]
            lo_u, hi_u = _span(u0[v], du[v], lim_u, nx)
            lo_y, hi_y = _span(y0[v], dy[v], lim_y, nx)
            lo_all = max(lo_all, max(lo_u, lo_y))
            hi_all = min(hi_all, min(hi_u, hi_y))
        if hi_all < lo_all:
            hi_all = lo_all
        for i in range(lo_all, hi_all):
            acc = np.float32(0.0)
            for v in range(n):
                u = u0[v] + du[v] * i
                y = y0[v] + dy[v] * i
                iu = int(u)
                iy = int(y)
                fu = np.float32(u - iu)
                fy = np.float32(y - iy)
                a0 = img[v, iy, iu]
                a1 = img[v, iy + 1, iu]
                top = a0 + fu * (img[v, iy, iu + 1] - a0)
                bottom = a1 + fu * (img[v, iy + 1, iu + 1] - a1)
                acc += w[v] * (top + fy * (bottom - top))
            out[i] += acc
        for i in range(lo_all):
            out[i] += _voxel_general(img, u0, du, y0, dy, w, i, lim_u, lim_y)
        for i in range(hi_all, nx):
            out[i] += _voxel_general(img, u0, du, y0, dy, w, i, lim_u, lim_y)


@numba.njit(cache=True, nogil=True, inline="always")
def _splat_rows(buf, c0, d, s, i, limit, checked):
    """Add voxel value ``s`` at column ``i`` to every view's row buffer, linear in ``u``."""
    for v in range(c0.size):
        u = c0[v] + d[v] * i
        if checked and not (0.0 <= u < limit):
            continue
        iu = int(u)
        f = np.float32(u - iu)
        fs = f * s
        buf[v, iu] += s - fs
        buf[v, iu + 1] += fs


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _project_rows(vol, imap, wts, img):
    """Adjoint of :func:`_backproject_rows`: ``img_v += wts[v] * splat of vol`` along ``u``.

    One thread per volume y, which writes only aligned row y of each view,
    into a private contiguous buffer added to the images at the end. The loop
    over views is innermost: consecutive splats go to different rows, so no
    update waits on the store of the one before.
    """
    n, ha, wa = img.shape
    nz, ny, nx = vol.shape
    limit = wa - 1.0
    for j in numba.prange(ny):
        buf = np.zeros((n, wa), dtype=np.float32)
        c0 = np.empty(n)
        d = np.empty(n)
        for v in range(n):
            d[v] = imap[v, 0, 0]
        for k in range(nz):
            src = vol[k, j]
            lo_all = 0
            hi_all = nx
            for v in range(n):
                c0[v] = imap[v, 0, 1] * j + imap[v, 0, 2] * k + imap[v, 0, 3]
                lo, hi = _span(c0[v], d[v], limit, nx)
                lo_all = max(lo_all, lo)
                hi_all = min(hi_all, hi)
            if hi_all < lo_all:
                hi_all = lo_all
            for i in range(lo_all, hi_all):
                s = src[i]
                if s != 0.0:
                    _splat_rows(buf, c0, d, s, i, limit, False)
            for i in range(lo_all):
                if src[i] != 0.0:
                    _splat_rows(buf, c0, d, src[i], i, limit, True)
            for i in range(hi_all, nx):
                if src[i] != 0.0:
                    _splat_rows(buf, c0, d, src[i], i, limit, True)
        for v in range(n):
            wv = np.float32(wts[v])
            row = img[v, j]
            for m in range(wa):
                row[m] += wv * buf[v, m]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _project_general(vol, imap, wts, img):
    """Adjoint of :func:`_backproject_general`: bilinear splat, one thread per view (no write races)."""
    n, ha, wa = img.shape
    nz, ny, nx = vol.shape
    lim_u = wa - 1.0
    lim_y = ha - 1.0
    for v in numba.prange(n):
        im = img[v]
        wv = np.float32(wts[v])
        du = imap[v, 0, 0]
        dy = imap[v, 1, 0]
        for k in range(nz):
            for j in range(ny):
                u0 = imap[v, 0, 1] * j + imap[v, 0, 2] * k + imap[v, 0, 3]
                y0 = imap[v, 1, 1] * j + imap[v, 1, 2] * k + imap[v, 1, 3]
                lo_u, hi_u = _span(u0, du, lim_u, nx)
                lo_y, hi_y = _span(y0, dy, lim_y, nx)
                lo = max(lo_u, lo_y)
                hi = min(hi_u, hi_y)
                src = vol[k, j]
                for i in range(lo, hi):
                    u = u0 + du * i
                    y = y0 + dy * i
                    iu = int(u)
                    iy = int(y)
                    fu = np.float32(u - iu)
                    fy = np.float32(y - iy)
                    val = wv * src[i]
                    bottom = fy * val
                    top = val - bottom
                    im[iy, iu] += top - fu * top
                    im[iy, iu + 1] += fu * top
                    im[iy + 1, iu] += bottom - fu * bottom
                    im[iy + 1, iu + 1] += fu * bottom


@numba.njit(cache=True, nogil=True, parallel=True)
def _weighted_sq_norm(r, w):
    """``sum w * r^2`` over two equally shaped float32 arrays, accumulated in float64."""
    rf = r.ravel()
    wf = w.ravel()
    acc = 0.0
    for i in numba.prange(rf.size):
        x = np.float64(rf[i])
        acc += np.float64(wf[i]) * x * x
    return acc


def _backproject(img: np.ndarray, frame: _Frame, wts: np.ndarray, vol: np.ndarray) -> None:
    """Add the weighted back-projection of aligned images ``img`` into ``vol`` (float32, C order)."""
    kernel = _backproject_rows if frame.rows_fixed else _backproject_general
    kernel(img, frame.index_map, np.ascontiguousarray(wts, dtype=np.float64), vol)


def _project(vol: np.ndarray, frame: _Frame, wts: np.ndarray, img: np.ndarray) -> None:
    """Add the weighted forward projection of ``vol`` into aligned images ``img``: the adjoint of :func:`_backproject`."""
    kernel = _project_rows if frame.rows_fixed else _project_general
    kernel(vol, frame.index_map, np.ascontiguousarray(wts, dtype=np.float64), img)


# --------------------------------------------------------------------------- filters


def _sirt_like_k0(tilt_deg: np.ndarray, shape: tuple[int, int, int]) -> float:
    """``k0 = mean_i 1 / (Theta T_i)``: ``Theta`` the tilt range covered (sum of the angular
    intervals, radians), ``T_i`` the ray length through the volume at tilt ``theta_i`` (voxels)."""
    nz, _, nx = shape
    t = np.deg2rad(np.asarray(tilt_deg, dtype=float))
    c, s = np.abs(np.cos(t)), np.abs(np.sin(t))
    with np.errstate(divide="ignore"):
        length = np.minimum(np.where(c > 0, nz / c, np.inf), np.where(s > 0, nx / s, np.inf))
    theta = float(_angular_intervals(tilt_deg).sum())
    return float(np.mean(1.0 / (theta * length)))


def _sirt_like_factor(k: np.ndarray, iterations: int, k0: float) -> np.ndarray:
    """``1 - (1 - k0/|k|)^N`` for ``|k| > k0``, else 1: the share of the exact inverse after ``N`` SIRT steps."""
    ak = np.abs(np.asarray(k, dtype=float))
    out = np.ones_like(ak)
    hi = ak > k0
    out[hi] = 1.0 - (1.0 - k0 / ak[hi]) ** iterations
    return out


def _ramp_filter(npad: int, spacing: float, weighting: str = "ramp", *, iterations: int = 10, k0: float = 0.0) -> np.ndarray:
    """Frequency response (``npad // 2 + 1`` real values) of the R-weighting filter for rows of ``npad`` samples.

    The ramp is the transform of the band-limited spatial kernel
    ``h[0] = 1/4, h[odd m] = -1/(pi m)^2, h[even m] = 0`` (Ram-Lak), which
    keeps the small non-zero DC of a finite row instead of zeroing it; the
    result is divided by the sample spacing so that the back-projection sums
    to a density. ``weighting="sirt-like"`` multiplies it by
    :func:`_sirt_like_factor`.
    """
    m = np.arange(npad)
    d = np.minimum(m, npad - m)
    h = np.zeros(npad)
    h[0] = 0.25
    odd = d % 2 == 1
    h[odd] = -1.0 / (math.pi * d[odd]) ** 2
    response = np.fft.rfft(h).real / spacing
    if weighting == "sirt-like":
        response *= _sirt_like_factor(np.fft.rfftfreq(npad), iterations, k0)
    return response


def _filter_views(aligned: np.ndarray, fill: np.ndarray, scale: np.ndarray, response: np.ndarray, npad: int, workers: int) -> None:
    """Pad, filter along ``u`` and scale each aligned image in place.

    The pad continues each row smoothly from its right edge down to the view's
    fill value and back up to its left edge (raised-cosine halves), so the
    circular FFT sees neither a wrap-around nor a step.
    """
    n, ha, wa = aligned.shape
    length = npad - wa
    t = np.arange(1, length + 1) / (length + 1.0)
    first = t < 0.5
    rise_1 = (0.5 - 0.5 * np.cos(np.pi * 2.0 * t[first])).astype(np.float32)[None, :]
    rise_2 = (0.5 - 0.5 * np.cos(np.pi * (2.0 * t[~first] - 1.0))).astype(np.float32)[None, :]
    n1 = int(first.sum())
    resp = response.astype(np.float32)
    buf = np.empty((ha, npad), dtype=np.float32)
    for v in range(n):
        img = aligned[v]
        f = np.float32(fill[v])
        right = img[:, -1:]
        left = img[:, :1]
        buf[:, :wa] = img
        buf[:, wa : wa + n1] = right + (f - right) * rise_1
        buf[:, wa + n1 :] = f + (left - f) * rise_2
        spec = sfft.rfft(buf, axis=1, workers=workers)
        spec *= resp
        filtered = sfft.irfft(spec, n=npad, axis=1, workers=workers)
        np.multiply(filtered[:, :wa], np.float32(scale[v]), out=img)


# --------------------------------------------------------------------------- public API


def _to_aligned(
    data: np.ndarray, means: np.ndarray, geometry: Geometry, frame: _Frame, b: float, *, with_weight: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Every raw view resampled into the aligned grid of ``frame`` (and the data weight of each sample)."""
    ha, wa = frame.shape
    n = geometry.n_views
    aligned = np.empty((n, ha, wa), dtype=np.float32)
    weight = np.empty((n, ha, wa) if with_weight else (1, 1, 1), dtype=np.float32)
    n_sub = max(1, int(math.ceil(b - 1e-9)))
    raw_map = _raw_index_maps(geometry, frame.shape, b)
    _resample_views(data, raw_map, n_sub, means.astype(np.float64), _TAPER_PX, aligned, weight, with_weight)
    return aligned, weight


@dataclass(frozen=True)
class _Setup:
    """Checked inputs of a reconstruction and the aligned grid that serves them."""

    data: np.ndarray
    means: np.ndarray
    geometry: Geometry
    shape: tuple[int, int, int]
    b: float
    gauge: Similarity | None
    frame: _Frame


def _setup(projections, geometry, shape, voxel_size_px, gauge) -> _Setup:
    """Check every input (ConfigError naming the argument) and build the aligned frame."""
    geometry = _check_geometry(geometry)
    shape = _check_shape(shape)
    b = _check_voxel_size(voxel_size_px)
    gauge = _check_gauge(gauge)
    data, means = _check_projections(projections, geometry)
    n_mat, offset = _aligned_maps(geometry, gauge)
    frame = _frame(n_mat, offset, shape, b, _MARGIN)
    return _Setup(data, means, geometry, shape, b, gauge, frame)


def _wbp_filtered(setup: _Setup, weighting: str, sirt_like_iterations: int, workers: int) -> np.ndarray:
    """Aligned, padded, R-weighted images times the angular interval of each view."""
    t0 = time.perf_counter()
    aligned, _ = _to_aligned(setup.data, setup.means, setup.geometry, setup.frame, setup.b, with_weight=False)
    t1 = time.perf_counter()
    wa = setup.frame.shape[1]
    npad = sfft.next_fast_len(2 * wa, real=True)
    k0 = _sirt_like_k0(setup.geometry.tilt_deg, setup.shape)
    response = _ramp_filter(npad, setup.b, weighting, iterations=sirt_like_iterations, k0=k0)
    _filter_views(aligned, setup.means, _angular_intervals(setup.geometry.tilt_deg), response, npad, workers)
    log.debug("WBP: resampled %d views to %s in %.2f s, filtered in %.2f s", aligned.shape[0], setup.frame.shape, t1 - t0, time.perf_counter() - t1)
    return aligned


def reconstruct(
    projections: np.ndarray,
    geometry: Geometry,
    shape: Sequence[int],
    *,
    voxel_size_px: float = 1,
    method: str = "wbp",
    weighting: str = "ramp",
    sirt_like_iterations: int = 10,
    iterations: int = 15,
    gauge: Similarity | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Reconstruct a volume ``vol[z, y, x]`` from line-integral images.

    Parameters
    ----------
    projections : (n, h, w) array
        Line integrals (e.g. :func:`log_intensity` of the counts), in the
        views' raw frames and in the order of ``geometry``.
    geometry : Geometry
        Any geometry: tilt, per-view in-plane rotation, magnification, shift.
    shape : (nz, ny, nx)
        Output grid; voxel centres at ``X = b (index - (n - 1) / 2)``.
    voxel_size_px : float
        Voxel edge ``b`` in specimen pixels (the binning), > 0.
    method : {"wbp", "sirt"}
        Weighted back-projection, or SIRT in the aligned frame.
    weighting : {"ramp", "sirt-like"}
        WBP filter: the ramp, or the ramp modified to mimic
        ``sirt_like_iterations`` SIRT iterations (module docstring).
    sirt_like_iterations : int
        Iterations the ``sirt-like`` filter mimics (>= 1).
    iterations : int
        SIRT iterations (>= 1), starting from zero.
    gauge : Similarity, optional
        Reconstruct in the frame where view ``i`` sees volume point ``X`` at
        ``p_i(G X)``: a specimen point ``Y`` lands at ``G^-1(Y)``.
    workers : int, optional
        Threads for the compiled kernels and FFTs for this call (default: all
        cores; capped at numba's thread pool). The previous numba thread
        count is restored afterwards.

    Returns
    -------
    (nz, ny, nx) float32 array
        Density per specimen pixel of path, the units of
        :func:`simtomo.voxelize.phantom_volume` at binning ``b``.
    """
    method = _check_choice("method", method, _METHODS)
    weighting = _check_choice("weighting", weighting, _WEIGHTINGS)
    sirt_like_iterations = _check_int("sirt_like_iterations", sirt_like_iterations, 1)
    iterations = _check_int("iterations", iterations, 1)
    setup = _setup(projections, geometry, shape, voxel_size_px, gauge)
    with _numba_threads(workers) as threads:
        t0 = time.perf_counter()
        if method == "wbp":
            filtered = _wbp_filtered(setup, weighting, sirt_like_iterations, threads)
            vol = np.zeros(setup.shape, dtype=np.float32)
            t1 = time.perf_counter()
            _backproject(filtered, setup.frame, np.ones(setup.geometry.n_views), vol)
            log.debug("WBP: back-projected %d views into %s in %.2f s", setup.geometry.n_views, setup.shape, time.perf_counter() - t1)
        else:
            vol, _ = _sirt(setup, iterations)
        log.info("reconstruct (%s): %s voxels of %g px from %d views in %.2f s", method, setup.shape, setup.b, setup.geometry.n_views, time.perf_counter() - t0)
    return vol


def _projector_weight(b: float, gauge: Similarity | None) -> float:
    """Line integral per unit density and splat weight: a voxel holds ``(s b)^3`` specimen px^3 over ``b^2`` of aligned area."""
    s = 1.0 if gauge is None else gauge.scale
    return b * s**3


@dataclass(frozen=True)
class _SirtSystem:
    """The aligned-frame system of SIRT: data ``p``, ``R`` (per sample) and ``C`` (per voxel)."""

    data: np.ndarray  # (n, ha, wa) aligned line integrals
    row_weight: np.ndarray  # R = data weight / row sum, 0 where no voxel or no data
    inv_col: np.ndarray  # C = 1 / column sum of the data weights, 0 where no view sees the voxel
    wts: np.ndarray  # projector weight of each view
    frame: _Frame


def _sirt_system(setup: _Setup) -> _SirtSystem:
    """Resample the data once and form ``R`` and ``C`` by projecting ones and back-projecting the weights.

    ``R`` is the data weight of each aligned sample (1 inside the field,
    tapering to 0 at and beyond its edge) over the row sum ``A 1``; ``C`` is
    one over the column sum of those weights, ``A^T (weight)``. With these
    the SIRT update is a contraction (Schur test with the row and column
    weights) and the weighted residual never grows.
    """
    data, weight = _to_aligned(setup.data, setup.means, setup.geometry, setup.frame, setup.b, with_weight=True)
    frame, shape = setup.frame, setup.shape
    wts = np.full(setup.geometry.n_views, _projector_weight(setup.b, setup.gauge))
    row_sum = np.zeros_like(data)
    ones = np.ones(shape, dtype=np.float32)
    _project(ones, frame, wts, row_sum)
    del ones
    covered = row_sum > 1e-6 * wts[0]
    np.multiply(weight, covered, out=weight)
    col = np.zeros(shape, dtype=np.float32)
    _backproject(weight, frame, wts, col)
    np.divide(weight, row_sum, out=weight, where=covered)  # weight becomes R
    del row_sum, covered
    seen = col > 1e-6 * wts[0]
    np.divide(1.0, col, out=col, where=seen)  # col becomes C
    col[~seen] = 0.0
    return _SirtSystem(data=data, row_weight=weight, inv_col=col, wts=wts, frame=frame)


def _sirt_step(system: _SirtSystem, x: np.ndarray, residual: np.ndarray, update: np.ndarray, *, first: bool) -> float:
    """One update ``x += C A^T R (p - A x)`` in place; returns ``sum R (p - A x)^2`` before it.

    ``residual`` (aligned shape) and ``update`` (volume shape) are work buffers.
    With ``first`` (``x`` still zero) the forward projection is skipped.
    """
    if first:
        np.copyto(residual, system.data)
    else:
        residual.fill(0.0)
        _project(x, system.frame, system.wts, residual)
        np.subtract(system.data, residual, out=residual)
    norm = float(_weighted_sq_norm(residual, system.row_weight))
    residual *= system.row_weight
    update.fill(0.0)
    _backproject(residual, system.frame, system.wts, update)
    update *= system.inv_col
    x += update
    return norm


def _sirt(setup: _Setup, iterations: int) -> tuple[np.ndarray, list[float]]:
    """SIRT from zero; returns the volume and ``sum R (p - A x_k)^2`` for ``k = 0 .. iterations - 1``."""
    t0 = time.perf_counter()
    system = _sirt_system(setup)
    log.debug("SIRT: data resampled, row and column sums formed in %.2f s", time.perf_counter() - t0)
    x = np.zeros(setup.shape, dtype=np.float32)
    residual = np.empty_like(system.data)
    update = np.empty(setup.shape, dtype=np.float32)
    history: list[float] = []
    for it in range(iterations):
        history.append(_sirt_step(system, x, residual, update, first=it == 0))
        log.info(
            "SIRT iteration %d/%d: weighted residual %.6g (%.1f s)",
            it + 1, iterations, math.sqrt(history[-1]), time.perf_counter() - t0,
        )
    return x, history


def reproject(
    volume: np.ndarray,
    geometry: Geometry,
    *,
    voxel_size_px: float = 1,
    gauge: Similarity | None = None,
    views: Sequence[int] | np.ndarray | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Line integrals of a volume in the raw frame of each view.

    The volume is projected into the aligned frame of each view with the
    bilinear splat that is the adjoint of the back-projector (sampled every
    ``b`` px), then mapped into the raw view with
    :func:`simtomo.transforms.aligned_to_view`. Values are density times
    specimen pixels of path, like the simulator's noise-free line integrals.

    Parameters
    ----------
    volume : (nz, ny, nx) array
        Density per specimen pixel, voxels of ``voxel_size_px`` px, centred.
    geometry : Geometry
    voxel_size_px : float
        Voxel edge ``b`` in specimen pixels.
    gauge : Similarity, optional
        View ``i`` sees volume point ``X`` at ``p_i(G X)`` (as in :func:`reconstruct`).
    views : sequence of int, optional
        Indices of the views to compute (default all), in the order given.
    workers : int, optional
        Threads for the compiled kernels (default: all cores).

    Returns
    -------
    (n_sel, h, w) float32 array
    """
    geometry = _check_geometry(geometry)
    b = _check_voxel_size(voxel_size_px)
    gauge = _check_gauge(gauge)
    vol = np.asarray(volume)
    if vol.ndim != 3 or vol.size == 0:
        raise ConfigError(f"volume: expected a non-empty (nz, ny, nx) array, got shape {vol.shape}")
    if not (np.issubdtype(vol.dtype, np.integer) or np.issubdtype(vol.dtype, np.floating)):
        raise ConfigError(f"volume: expected real values, got dtype {vol.dtype}")
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    if not math.isfinite(float(vol.sum(dtype=np.float64))):
        raise ConfigError("volume: contains NaN or infinite values")
    if views is None:
        sel = np.arange(geometry.n_views)
    else:
        sel = np.asarray(views)
        if sel.ndim != 1 or not np.issubdtype(sel.dtype, np.integer) or np.any(sel < 0) or np.any(sel >= geometry.n_views):
            raise ConfigError(f"views: expected a list of view indices in [0, {geometry.n_views}), got {views!r}")
    n_mat, offset = _aligned_maps(geometry, gauge)
    frame = _frame(n_mat[sel], offset[sel], vol.shape, b, _REPROJECT_MARGIN)
    aligned = np.zeros((sel.size,) + frame.shape, dtype=np.float32)
    with _numba_threads(workers):
        _project(vol, frame, np.full(sel.size, _projector_weight(b, gauge)), aligned)
    out = np.empty((sel.size,) + geometry.image_shape, dtype=np.float32)
    for idx, view in enumerate(sel):
        out[idx] = aligned_to_view(aligned[idx], geometry, int(view), spacing_px=b)
    return out


# --------------------------------------------------------------------------- reference


def _reference_backproject(img: np.ndarray, frame: _Frame, wts: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Plain NumPy/SciPy back-projection, for tests and benchmarks of the compiled kernels.

    For every view and z slice, the aligned sample coordinates of all voxels
    are computed with array arithmetic and interpolated with
    ``scipy.ndimage.map_coordinates(order=1)``; no code is shared with the kernels.
    """
    nz, ny, nx = shape
    out = np.zeros(shape, dtype=np.float64)
    jj, ii = np.meshgrid(np.arange(ny, dtype=float), np.arange(nx, dtype=float), indexing="ij")
    for v in range(img.shape[0]):
        m = frame.index_map[v]
        for k in range(nz):
            col = m[0, 0] * ii + m[0, 1] * jj + (m[0, 2] * k + m[0, 3])
            row = m[1, 0] * ii + m[1, 1] * jj + (m[1, 2] * k + m[1, 3])
            out[k] += wts[v] * ndimage.map_coordinates(img[v], [row, col], order=1, mode="constant", cval=0.0, prefilter=False)
    return out.astype(np.float32)


def _reference_wbp(
    projections: np.ndarray,
    geometry: Geometry,
    shape: Sequence[int],
    *,
    voxel_size_px: float = 1,
    gauge: Similarity | None = None,
) -> np.ndarray:
    """WBP with the same filtered images as :func:`reconstruct` and the reference back-projector."""
    setup = _setup(projections, geometry, shape, voxel_size_px, gauge)
    with _numba_threads(None) as threads:
        filtered = _wbp_filtered(setup, "ramp", 10, threads)
    return _reference_backproject(filtered, setup.frame, np.ones(setup.geometry.n_views), setup.shape)
