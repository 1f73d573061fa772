"""3-D Gaussian fits to gold beads in a reconstruction (the Blur metric, DESIGN.md section 5).

Each bead is fitted in a box around its expected position with an
axis-aligned Gaussian plus a constant background,

    m(voxel) = background + amplitude * gx(i) * gy(j) * gz(l),

where ``g`` is the *voxel mean* of ``exp(-(u - c)^2 / (2 sigma^2))`` over the
voxel's extent (a difference of error functions). Because the voxel average is
modelled, the fitted ``sigma`` is that of the underlying continuous blob: a
phantom voxelised as voxel means (:mod:`simtomo.voxelize`) is recovered exactly
at any binning, and the widths of reconstructions at different binnings are
comparable. ``amplitude`` is the peak of that continuous Gaussian; FWHM is
``2 sqrt(2 ln 2) sigma``.

Boxes and the volume edge
-------------------------
All beads share one box, about 3 FWHM (or 3 bead diameters) on each edge.
Near a face of the volume the box is clipped to the volume and the fit uses
the voxels inside (the clipped box is still a rectangular block, so the
weights stay separable). This matters: simulated beads sit on the slab
surfaces and phantom-sized reconstructions end about a voxel beyond them, so
a box that had to lie wholly inside would reject every bead. A bead is not
fitted when its centre is closer to a face than ``edge_margin_px`` (default
half the expected FWHM, i.e. a sixth of the box: the half-maximum point on
that side must lie inside the volume).

Solver
------
The model is separable, and so is every column of its analytic Jacobian and
the (clipped-box) weights. The fit is a bounded Levenberg–Marquardt, run on all
beads at once, whose normal equations come from per-axis sums: ``J^T J``
costs O(box edge) and ``J^T r`` one pass over the box. (A per-bead
:func:`scipy.optimize.least_squares` does an SVD of the (box x 8) Jacobian
per iteration on threaded BLAS, which was measured 40x slower on a loaded
two-core machine; the tests check this solver against it.)

A bead that is too close to the edge, whose fit does not converge, or whose
solution sits on a bound (vanishing amplitude, a width at the lower limit or
the box half-width, a centre at the box or volume edge) gets ``ok = False``;
a bad bead never raises.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from simtomo.errors import ConfigError

__all__ = ["BeadFits", "fit_beads", "FWHM_PER_SIGMA"]

log = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

_SQRT2 = math.sqrt(2.0)
_SQRT_PI_2 = math.sqrt(math.pi / 2.0)

# Box edge in units of the bead's FWHM (or diameter) when the caller gives none.
_BOX_PER_SIZE = 3.0
# Smallest box half-width in voxels: the background needs a rim around the blob.
_MIN_HALF = 3
# Largest box half-width the automatic size estimate may grow to.
_MAX_HALF = 48
# Lower bound of sigma in voxels: below it the voxel-mean model hardly depends on sigma.
_MIN_SIGMA_VOX = 0.1
# A parameter within this distance (voxels) of a centre or width bound counts as on the bound.
_BOUND_TOL_VOX = 1e-4
# Box voxels fitted together (all beads of a batch): bounds the solver's memory to ~100 MB.
_BATCH_VOXELS = 2_000_000


def _half_max_moment_ratio() -> float:
    """<x^2> / sigma^2 of a 3-D Gaussian restricted to where it exceeds half its peak."""
    r = math.sqrt(2.0 * math.log(2.0))
    e = math.exp(-0.5 * r * r)
    i2 = _SQRT_PI_2 * math.erf(r / _SQRT2) - r * e  # int_0^r t^2 exp(-t^2/2) dt
    i4 = 3.0 * i2 - r**3 * e  # int_0^r t^4 exp(-t^2/2) dt
    return i4 / (3.0 * i2)


_HALF_MAX_RATIO = _half_max_moment_ratio()

_PARAM_NAMES = np.array(["cx", "cy", "cz", "sigma_x", "sigma_y", "sigma_z", "amplitude", "background"])


@dataclass(frozen=True, eq=False)
class BeadFits:
    """Per-bead results of :func:`fit_beads`.

    Attributes
    ----------
    center_px : (m, 3)
        Fitted centres (x, y, z) in unbinned specimen pixels, volume-centred.
    fwhm_px : (m, 3)
        Full widths at half maximum along x, y, z, unbinned pixels.
    amplitude : (m,)
        Peak of the fitted Gaussian above the background, in volume units
        (negative for ``polarity=-1``).
    background : (m,)
        Constant background in volume units.
    ok : (m,) bool
        True for a converged fit clear of every bound.
    reason : tuple of str
        Why a bead is not ok (empty string when it is).

    Beads never fitted (too close to the volume edge, no blob above the
    background) hold NaN; beads fitted but rejected keep their fitted values
    for inspection.
    """

    center_px: np.ndarray
    fwhm_px: np.ndarray
    amplitude: np.ndarray
    background: np.ndarray
    ok: np.ndarray
    reason: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        m = np.asarray(self.ok).reshape(-1).size
        for name, tail in (("center_px", (3,)), ("fwhm_px", (3,)), ("amplitude", ()), ("background", ())):
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape((m,) + tail)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        ok = np.asarray(self.ok, dtype=bool).reshape(m)
        ok.setflags(write=False)
        object.__setattr__(self, "ok", ok)
        reason = tuple(self.reason) if self.reason else ("",) * m
        if len(reason) != m:
            raise ConfigError(f"BeadFits.reason: expected {m} entries, got {len(reason)}")
        object.__setattr__(self, "reason", reason)

    def __len__(self) -> int:
        return self.ok.size

    @property
    def median_fwhm_px(self) -> np.ndarray:
        """Median FWHM (x, y, z) over the ok fits, unbinned pixels (NaN when none is ok)."""
        if not self.ok.any():
            return np.full(3, np.nan)
        return np.median(self.fwhm_px[self.ok], axis=0)

    @property
    def n_ok(self) -> int:
        """Number of ok fits."""
        return int(self.ok.sum())


# --------------------------------------------------------------------------- model


def _axis_terms(c: np.ndarray, s: np.ndarray, n: int) -> np.ndarray:
    """Per-axis vectors (m, 4, n) for beads with centres ``c`` (m,) and widths ``s`` (m,), index units.

    Rows: the voxel means ``g`` of the unit-peak Gaussian over voxels 0..n-1
    (voxel ``i`` spans ``i +- 1/2``), ``dg/dc``, ``dg/dsigma`` and ones.
    """
    c = np.asarray(c, dtype=np.float64).reshape(-1, 1)
    s = np.asarray(s, dtype=np.float64).reshape(-1, 1)
    i = np.arange(n, dtype=np.float64)
    inv = 1.0 / (_SQRT2 * s)
    up = (i + 0.5 - c) * inv
    lo = (i - 0.5 - c) * inv
    eup, elo = np.exp(-up * up), np.exp(-lo * lo)
    out = np.empty((c.shape[0], 4, n))
    out[:, 0] = _SQRT_PI_2 * s * (erf(up) - erf(lo))
    out[:, 1] = elo - eup
    out[:, 2] = out[:, 0] / s - _SQRT2 * (up * eup - lo * elo)
    out[:, 3] = 1.0
    return out


def _model(p: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The model ``background + amplitude * gz gy gx`` of parameters ``p`` (8,) on a box (z, y, x)."""
    p = np.asarray(p, dtype=np.float64)
    nz, ny, nx = shape
    gx = _axis_terms(p[0], p[3], nx)[0, 0]
    gy = _axis_terms(p[1], p[4], ny)[0, 0]
    gz = _axis_terms(p[2], p[5], nz)[0, 0]
    return p[7] + p[6] * (gz[:, None, None] * gy[None, :, None] * gx[None, None, :])


# Each Jacobian column is a separable product: a coefficient (the amplitude or 1)
# times per-axis vectors of type 0 = g, 1 = dg/dc, 2 = dg/dsigma, 3 = ones.
# Columns: cx, cy, cz, sx, sy, sz, amplitude, background.
_ZT = np.array([0, 0, 1, 0, 0, 2, 0, 3])
_YT = np.array([0, 1, 0, 0, 2, 0, 0, 3])
_XT = np.array([1, 0, 0, 2, 0, 0, 0, 3])
_AMP_COEF = np.array([True] * 6 + [False, False])
_ZZ, _YY, _XX = (np.ix_(t, t) for t in (_ZT, _YT, _XT))


@dataclass(frozen=True)
class _Boxes:
    """The data of m beads on a common box (m, nz, ny, nx) and the separable 0/1 weights of the clipped boxes."""

    data: np.ndarray  # zero outside the volume
    wz: np.ndarray  # (m, nz)
    wy: np.ndarray  # (m, ny)
    wx: np.ndarray  # (m, nx)
    weight: np.ndarray  # (m, nz, ny, nx) outer product of the three

    def take(self, sel: np.ndarray) -> _Boxes:
        return _Boxes(self.data[sel], self.wz[sel], self.wy[sel], self.wx[sel], self.weight[sel])


def _residual(p: np.ndarray, boxes: _Boxes):
    """Axis vectors, weighted residuals ``w (model - data)`` and costs of parameters ``p`` (m, 8)."""
    _, nz, ny, nx = boxes.data.shape
    vz = _axis_terms(p[:, 2], p[:, 5], nz)
    vy = _axis_terms(p[:, 1], p[:, 4], ny)
    vx = _axis_terms(p[:, 0], p[:, 3], nx)
    r = vz[:, 0, :, None, None] * vy[:, 0, None, :, None]
    r = r * (p[:, 6, None] * vx[:, 0])[:, None, None, :]
    r += p[:, 7, None, None, None]
    r *= boxes.weight
    r -= boxes.data
    flat = r.reshape(r.shape[0], -1)
    cost = np.einsum("bi,bi->b", flat, flat)
    return (vz, vy, vx), r, cost


def _normal_equations(p: np.ndarray, axes, r: np.ndarray, boxes: _Boxes):
    """``J^T W r`` (m, 8) and ``J^T W J`` (m, 8, 8) from per-axis sums: never the (box x 8) Jacobian."""
    vz, vy, vx = axes
    coef = np.where(_AMP_COEF[None, :], p[:, 6, None], 1.0)
    gz = np.einsum("ban,bcn,bn->bac", vz, vz, boxes.wz)
    gy = np.einsum("ban,bcn,bn->bac", vy, vy, boxes.wy)
    gx = np.einsum("ban,bcn,bn->bac", vx, vx, boxes.wx)
    hess = coef[:, :, None] * coef[:, None, :] * gz[:, _ZZ[0], _ZZ[1]] * gy[:, _YY[0], _YY[1]] * gx[:, _XX[0], _XX[1]]
    t = np.einsum("bzyx,baz->bayx", r, vz)  # r is zero outside the volume, so W r = r
    t = np.einsum("bayx,bcy->bacx", t, vy)
    t = np.einsum("bacx,bdx->bacd", t, vx)
    grad = coef * t[:, _ZT, _YT, _XT]
    return grad, hess


def _solve(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched ``a x = b``; rows whose system is singular or non-finite get ``ok = False``."""
    good = np.isfinite(a).all(axis=(1, 2)) & np.isfinite(b).all(axis=1)
    x = np.zeros_like(b)
    if good.all():
        try:
            return np.linalg.solve(a, b[..., None])[..., 0], good
        except np.linalg.LinAlgError:
            pass
    for k in np.flatnonzero(good):
        try:
            x[k] = np.linalg.solve(a[k], b[k])
        except np.linalg.LinAlgError:
            good[k] = False
    return x, good


def _levenberg_marquardt(
    boxes: _Boxes, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, *, max_iter: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """Bounded Levenberg–Marquardt of the separable model, all beads at once.

    Parameters
    ----------
    boxes : _Boxes
        Data with the bead positive, and weights.
    x0 : (m, 8)
        Strictly feasible starts.
    lower, upper : (m, 8)
        Bounds; steps are projected onto them.

    Returns
    -------
    p : (m, 8)
    converged : (m,) bool

    Marquardt scaling with Nielsen's damping update. A bead has converged when
    an accepted step lowers the cost by less than 1e-12 of it or moves the
    parameters by less than 1e-10 in the metric of ``diag(J^T J)``, when its
    cost reaches the rounding level of the data, or when no step can lower the
    cost any more at rounding level (a minimum, possibly on a bound).
    """
    m = boxes.data.shape[0]
    p = np.array(x0, dtype=np.float64)
    axes, r, cost = _residual(p, boxes)
    grad, hess = _normal_equations(p, axes, r, boxes)
    flat = boxes.data.reshape(m, -1)
    floor = 1e-30 * np.einsum("bi,bi->b", flat, flat) + 1e-300
    lam = 1e-3 * np.diagonal(hess, axis1=1, axis2=2).max(axis=1)
    nu = np.full(m, 2.0)
    done = np.zeros(m, dtype=bool)
    converged = np.zeros(m, dtype=bool)

    def finish(ids: np.ndarray, ok: bool) -> None:
        done[ids] = True
        converged[ids] = ok

    def damp_harder(ids: np.ndarray) -> None:
        lam[ids] *= nu[ids]
        nu[ids] *= 2.0

    for _ in range(max_iter):
        finish(np.flatnonzero(~done & (cost <= floor)), True)
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        h, g, pa = hess[act], grad[act], p[act]
        d = np.diagonal(h, axis1=1, axis2=2).copy()
        dmax = d.max(axis=1)
        dead = ~(np.isfinite(dmax) & (dmax > 0))
        d = np.maximum(d, 1e-12 * np.where(dead, 1.0, dmax)[:, None])
        step, solved = _solve(h + lam[act, None, None] * (d[:, :, None] * np.eye(8)), -g)
        fail = dead | ~solved
        finish(act[fail], False)
        p_new = np.clip(pa + step, lower[act], upper[act])
        step = p_new - pa
        pred = -(2.0 * np.einsum("bi,bi->b", g, step) + np.einsum("bi,bij,bj->b", step, h, step))
        scaled_step = np.sqrt(np.einsum("bi,bi->b", step**2, d))
        scaled_p = np.sqrt(np.einsum("bi,bi->b", pa**2, d))
        tiny_step = scaled_step <= 1e-12 * (scaled_p + 1e-300)
        usable = ~fail & np.isfinite(pred) & (pred > 0)
        # no descent predicted: a minimum if the step is already negligible, else damp harder
        stuck = ~fail & ~usable
        finish(act[stuck & tiny_step], True)
        damp_harder(act[stuck & ~tiny_step])
        trial = np.flatnonzero(usable)
        if trial.size == 0:
            continue
        ids = act[trial]
        sub = boxes.take(ids)
        t_axes, t_r, t_cost = _residual(p_new[trial], sub)
        actual = cost[ids] - t_cost
        acc = actual > 0
        if acc.any():
            sel = ids[acc]
            rho = actual[acc] / pred[trial][acc]
            old = cost[sel]
            p[sel] = p_new[trial][acc]
            cost[sel] = t_cost[acc]
            grad[sel], hess[sel] = _normal_equations(p[sel], tuple(v[acc] for v in t_axes), t_r[acc], sub.take(acc))
            lam[sel] *= np.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            nu[sel] = 2.0
            small = (actual[acc] <= 1e-12 * old) | (scaled_step[trial][acc] <= 1e-10 * (scaled_p[trial][acc] + 1e-300))
            finish(sel[small], True)
        rej = ~acc
        if rej.any():
            sel = ids[rej]
            # rounding level: the cost cannot decrease any further
            at_rounding = tiny_step[trial][rej] | (pred[trial][rej] <= 1e-15 * cost[sel])
            finish(sel[at_rounding], True)
            damp_harder(sel[~at_rounding])
    return p, converged


# --------------------------------------------------------------------------- boxes and starts


@dataclass(frozen=True)
class _Box:
    """One bead's box: data (zero outside the volume), its origin and the valid index ranges."""

    data: np.ndarray  # (nz, ny, nx), float64
    origin: np.ndarray  # (3,) x, y, z volume index of box voxel 0
    valid_lo: np.ndarray  # (3,) x, y, z first box index inside the volume
    valid_hi: np.ndarray  # (3,) last box index inside the volume

    def valid(self) -> np.ndarray:
        (x0, y0, z0), (x1, y1, z1) = self.valid_lo, self.valid_hi
        return self.data[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1]

    def weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """0/1 weights (x, y, z) along each axis of the box."""
        n = np.array(self.data.shape[::-1])
        return tuple(
            ((np.arange(n[a]) >= self.valid_lo[a]) & (np.arange(n[a]) <= self.valid_hi[a])).astype(np.float64)
            for a in range(3)
        )


def _edge_distance(idx: np.ndarray, dims_xyz: np.ndarray) -> np.ndarray:
    """Distance (voxels) from centres (m, 3) in index units to the nearest face along each axis."""
    return np.minimum(idx + 0.5, dims_xyz - 0.5 - idx)


def _extract(vol: np.ndarray, centre_idx: np.ndarray, half: np.ndarray) -> _Box:
    """The box of half-widths ``half`` (x, y, z) around the voxel nearest ``centre_idx``, clipped to the volume."""
    dims = np.array(vol.shape[::-1])
    origin = np.rint(centre_idx).astype(np.int64) - half
    size = 2 * half + 1
    lo = np.maximum(origin, 0)
    hi = np.minimum(origin + size - 1, dims - 1)
    data = np.zeros(tuple(size[::-1]))
    v_lo, v_hi = lo - origin, hi - origin
    data[v_lo[2] : v_hi[2] + 1, v_lo[1] : v_hi[1] + 1, v_lo[0] : v_hi[0] + 1] = vol[
        lo[2] : hi[2] + 1, lo[1] : hi[1] + 1, lo[0] : hi[0] + 1
    ]
    return _Box(data, origin, v_lo, v_hi)


def _blob_moments(data: np.ndarray, half: np.ndarray):
    """Centre (x, y, z) in box index units and per-axis sigma of the half-maximum blob near the box centre.

    ``data`` is background-subtracted with the bead positive (zero outside the
    volume). The peak is sought in the central half of the box so that a
    brighter neighbour near the rim cannot take over. The second moments of
    the voxels above half that peak are scaled to the sigma of a Gaussian.
    """
    nz, ny, nx = data.shape
    qx, qy, qz = np.maximum(half // 2, 1)
    core = data[
        half[2] - qz : half[2] + qz + 1,
        half[1] - qy : half[1] + qy + 1,
        half[0] - qx : half[0] + qx + 1,
    ]
    peak = float(core.max())
    if not peak > 0:
        return None, None
    w = np.where(data >= 0.5 * peak, data, 0.0)
    total = w.sum()
    profiles = (w.sum(axis=(0, 1)), w.sum(axis=(0, 2)), w.sum(axis=(1, 2)))  # x, y, z
    centre = np.empty(3)
    var = np.empty(3)
    for a, (prof, n) in enumerate(zip(profiles, (nx, ny, nz))):
        u = np.arange(n, dtype=np.float64)
        centre[a] = (prof * u).sum() / total
        var[a] = (prof * (u - centre[a]) ** 2).sum() / total
    sigma = np.sqrt(np.maximum(var / _HALF_MAX_RATIO - 1.0 / 12.0, 0.25**2))
    return centre, sigma


def _auto_half(vol: np.ndarray, idx: np.ndarray, polarity: int) -> np.ndarray:
    """Box half-widths (x, y, z) of about 3 FWHM, from the median half-maximum moments of the beads."""
    dims = np.array(vol.shape[::-1], dtype=np.float64)
    half = np.full(3, 4, dtype=np.int64)
    for _ in range(5):
        sig = []
        inside = np.all(_edge_distance(idx, dims) >= np.maximum(half / 3.0, 1.0), axis=1)
        for c in idx[inside]:
            box = _extract(vol, c, half)
            data = polarity * box.data
            data -= float(np.median(polarity * box.valid()))
            data *= _outer(box.weights())
            _, s = _blob_moments(data, half)
            if s is not None:
                sig.append(s)
        if not sig:
            return half
        need = np.ceil(0.5 * _BOX_PER_SIZE * FWHM_PER_SIGMA * np.median(sig, axis=0)).astype(np.int64)
        need = np.clip(need, _MIN_HALF, _MAX_HALF)
        if np.all(need <= half):
            return need
        half = np.maximum(half, need)
    return half


def _outer(w_xyz: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    wx, wy, wz = w_xyz
    return wz[:, None, None] * wy[None, :, None] * wx[None, None, :]


def _validate(volume, positions_px, voxel_size_px, box_px, diameter_px, polarity, edge_margin_px):
    vol = np.asarray(volume)
    if vol.ndim != 3 or vol.size == 0 or not (
        np.issubdtype(vol.dtype, np.floating) or np.issubdtype(vol.dtype, np.integer)
    ):
        raise ConfigError(
            f"volume: expected a non-empty real 3-D array vol[z, y, x], got shape {vol.shape} and dtype {vol.dtype}"
        )
    try:
        pos = np.asarray(positions_px, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(
            f"positions_px: expected (m, 3) positions (x, y, z) in pixels, got {positions_px!r}"
        ) from None
    if pos.ndim == 1 and pos.size == 3:
        pos = pos[None, :]
    if pos.ndim != 2 or pos.shape[1] != 3 or not np.all(np.isfinite(pos)):
        raise ConfigError(f"positions_px: expected finite (m, 3) positions (x, y, z), got shape {pos.shape}")
    b = _positive(voxel_size_px, "voxel_size_px", "a voxel edge in pixels")
    if isinstance(polarity, bool) or polarity not in (1, -1):
        raise ConfigError(f"polarity: expected +1 (bright beads) or -1 (dark beads), got {polarity!r}")
    box = None
    if box_px is not None:
        try:
            arr = np.asarray(box_px, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.array([np.nan])
        if arr.size not in (1, 3) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ConfigError(f"box_px: expected a positive edge (or three edges x, y, z) in pixels, got {box_px!r}")
        box = np.broadcast_to(arr.reshape(-1), (3,)).copy()
    diam = None if diameter_px is None else _positive(diameter_px, "diameter_px", "a bead diameter in pixels")
    margin = None
    if edge_margin_px is not None:
        try:
            margin = float(edge_margin_px)
        except (TypeError, ValueError):
            margin = math.nan
        if not (math.isfinite(margin) and margin >= 0):
            raise ConfigError(f"edge_margin_px: expected a distance >= 0 in pixels, got {edge_margin_px!r}")
    return vol, pos, b, box, diam, margin


def _positive(value, name: str, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name}: expected {what} > 0, got {value!r}")
    return v


# --------------------------------------------------------------------------- public


def fit_beads(
    volume,
    positions_px,
    *,
    voxel_size_px: float = 1,
    box_px=None,
    diameter_px: float | None = None,
    edge_margin_px: float | None = None,
    polarity: int = +1,
) -> BeadFits:
    """Fit every bead with an axis-aligned 3-D Gaussian plus constant background.

    Parameters
    ----------
    volume : (nz, ny, nx) array
        Reconstruction (or phantom) ``vol[z, y, x]``.
    positions_px : (m, 3)
        Expected bead centres (x, y, z) in unbinned specimen pixels, volume-centred
        (DESIGN.md section 3: voxel ``index`` is at ``voxel_size_px * (index - (n - 1) / 2)``).
        The fit starts there (or at the half-maximum centroid when that is more
        than a sigma away) and may move anywhere inside the box.
    voxel_size_px : float
        Voxel edge in unbinned pixels (the binning of the reconstruction).
    box_px : float or (3,), optional
        Edge of the fit box (x, y, z) in unbinned pixels, the same for every
        bead (rounded to an odd number of voxels).
    diameter_px : float, optional
        Bead diameter in unbinned pixels; the box edge is then 3 diameters.
        With neither, the box edge is 3 times the median FWHM estimated from the
        half-maximum moments of the beads themselves.
    edge_margin_px : float, optional
        Smallest distance from a bead centre to a face of the volume, unbinned
        pixels; closer beads get ``ok = False``. Default: a sixth of the box
        edge on each axis (about half an FWHM), at least one voxel.
    polarity : +1 or -1
        +1 when beads are brighter than their surroundings (gold in a
        ``-log(I / I0)`` reconstruction), -1 when darker.

    Returns
    -------
    BeadFits

    Raises
    ------
    ConfigError
        For a volume that is not 3-D, positions that are not (m, 3), a voxel
        size, box or diameter that is not positive, or a polarity other than +-1.
    """
    vol, pos, b, box_edge, diam, margin = _validate(
        volume, positions_px, voxel_size_px, box_px, diameter_px, polarity, edge_margin_px
    )
    m = pos.shape[0]
    dims = np.array(vol.shape[::-1], dtype=np.float64)  # x, y, z
    idx = pos / b + (dims - 1.0) / 2.0  # (m, 3) x, y, z in index units

    if box_edge is not None:
        half = np.maximum(np.rint((box_edge / b - 1.0) / 2.0).astype(np.int64), 1)
    elif diam is not None:
        half = np.full(3, max(math.ceil(0.5 * _BOX_PER_SIZE * diam / b), _MIN_HALF), dtype=np.int64)
    else:
        half = _auto_half(vol, idx, polarity)
    margin_vox = np.maximum(half / 3.0, 1.0) if margin is None else np.full(3, margin / b)
    box_shape = tuple(int(2 * h + 1) for h in half[::-1])  # (z, y, x)
    log.debug("fit_beads: %d beads, box %s voxels, edge margin %s voxels", m, box_shape, margin_vox)

    center = np.full((m, 3), np.nan)
    fwhm = np.full((m, 3), np.nan)
    amp = np.full(m, np.nan)
    bg = np.full(m, np.nan)
    ok = np.zeros(m, dtype=bool)
    reason = [""] * m

    near_edge = np.any(_edge_distance(idx, dims) < margin_vox, axis=1)
    s_hi = np.maximum(half.astype(np.float64), 1.0)
    boxes, origins, starts, lowers, uppers, scales, fitted = [], [], [], [], [], [], []
    for k in range(m):
        if near_edge[k]:
            reason[k] = "too close to the volume edge"
            continue
        box = _extract(vol, idx[k], half)
        w = _outer(box.weights())
        data = polarity * box.data
        bg0 = float(np.median(polarity * box.valid()))
        c0, s0 = _blob_moments((data - bg0) * w, half)
        if c0 is None:
            reason[k] = "no blob above the background"
            continue
        # Bounds in box index units: the centre inside the box and the volume, sigma
        # between a tenth of a voxel and the half-width, the amplitude of the bead's sign.
        lower = np.concatenate([box.valid_lo.astype(np.float64), np.full(3, _MIN_SIGMA_VOX), [0.0, -np.inf]])
        upper = np.concatenate([box.valid_hi.astype(np.float64), s_hi, [np.inf, np.inf]])
        # the expected position is the better start unless the blob centroid is clearly elsewhere
        local = idx[k] - box.origin
        start_c = np.where(np.abs(c0 - local) < np.maximum(s0, 1.0), local, c0)
        a0 = float(data[half[2], half[1], half[0]] - bg0) if w[half[2], half[1], half[0]] else 0.0
        a0 = max(a0, 0.5 * float(((data - bg0) * w).max()))
        x0 = np.concatenate([start_c, np.clip(s0, 1.5 * _MIN_SIGMA_VOX, 0.9 * s_hi), [a0, bg0]])
        slack = 1e-6 * np.where(np.isfinite(upper - lower), upper - lower, 1.0)
        starts.append(np.clip(x0, lower + slack, upper - slack))  # strictly feasible
        boxes.append((data * w, box.weights()))
        origins.append(box.origin)
        lowers.append(lower)
        uppers.append(upper)
        scales.append(float(np.abs((data - bg0) * w).max()))
        fitted.append(k)

    if fitted:
        lower, upper = np.stack(lowers), np.stack(uppers)
        p = np.empty((len(fitted), 8))
        converged = np.zeros(len(fitted), dtype=bool)
        # beads per batch: the solver holds a few arrays of (beads x box voxels) float64
        per_batch = max(1, _BATCH_VOXELS // math.prod(box_shape))
        for j0 in range(0, len(fitted), per_batch):
            part = slice(j0, min(j0 + per_batch, len(fitted)))
            wx, wy, wz = (np.stack([bw[1][a] for bw in boxes[part]]) for a in range(3))
            batch = _Boxes(
                data=np.stack([bw[0] for bw in boxes[part]]),
                wz=wz,
                wy=wy,
                wx=wx,
                weight=wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :],
            )
            p[part], converged[part] = _levenberg_marquardt(batch, np.stack(starts[part]), lower[part], upper[part])
        sel = np.array(fitted)
        centre_idx = p[:, :3] + np.stack(origins)
        center[sel] = b * (centre_idx - (dims - 1.0) / 2.0)
        fwhm[sel] = FWHM_PER_SIGMA * b * p[:, 3:6]
        amp[sel] = polarity * p[:, 6]
        bg[sel] = polarity * p[:, 7]
        at_bound = np.zeros(p.shape, dtype=bool)
        at_bound[:, :6] = (p[:, :6] - lower[:, :6] <= _BOUND_TOL_VOX) | (upper[:, :6] - p[:, :6] <= _BOUND_TOL_VOX)
        at_bound[:, 6] = p[:, 6] <= 1e-9 * np.array(scales)
        drifted = np.any(_edge_distance(centre_idx, dims) < margin_vox, axis=1)
        for j, k in enumerate(fitted):
            if not np.all(np.isfinite(p[j])):
                reason[k] = "fit returned non-finite parameters"
            elif not converged[j]:
                reason[k] = "fit did not converge"
            elif at_bound[j].any():
                reason[k] = "fit at a bound: " + ", ".join(_PARAM_NAMES[at_bound[j]])
            elif drifted[j]:
                reason[k] = "fitted centre too close to the volume edge"
            else:
                ok[k] = True
    n_bad = m - int(ok.sum())
    if n_bad:
        log.info("fit_beads: %d of %d beads not ok: %s", n_bad, m, sorted({r for r in reason if r}))
    return BeadFits(center, fwhm, amp, bg, ok, tuple(reason))
