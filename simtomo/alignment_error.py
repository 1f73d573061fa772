"""The gauge-free alignment error (DESIGN.md section 5), the headline accuracy figure.

Sample a grid ``X_k`` over the field of view and the specimen thickness, find the
3-D similarity ``G`` minimising ``sum_i sum_k |p_est_i(G X_k) - p_true_i(X_k)|^2``,
and report per view ``e_i = sqrt(mean_k |p_est_i(G X_k) - p_true_i(X_k)|^2)`` and
the RMS over views. ``G`` absorbs exactly what the images cannot tell apart (a
moved, rotated or scaled specimen), so what is left is the misregistration that
blurs a reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simtomo.errors import ConfigError
from simtomo.geometry import Geometry, rotation_2d
from simtomo.similarity import Similarity, projection_model

__all__ = ["AlignmentErrorResult", "alignment_error", "error_grid", "gauge_jacobian"]


def error_grid(image_shape: tuple[int, int], thickness_px: float, *, n_xy: int = 9, n_z: int = 3) -> np.ndarray:
    """Points (n_xy * n_xy * n_z, 3) at the centres of a regular grid of cells spanning the field of view and the thickness."""
    if not thickness_px > 0:
        raise ConfigError(f"alignment error: thickness_px must be positive, got {thickness_px}")
    h, w = image_shape

    def centres(extent: float, n: int) -> np.ndarray:
        return ((np.arange(n) + 0.5) / n - 0.5) * extent

    x, y, z = np.meshgrid(centres(w, n_xy), centres(h, n_xy), centres(thickness_px, n_z), indexing="ij")
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)


@dataclass(frozen=True, eq=False)
class AlignmentErrorResult:
    """Alignment error of an estimated geometry against the truth, in pixels.

    Attributes
    ----------
    rms_px : float
        RMS over views of the per-view error (the series error).
    per_view_px : (n,) array
        ``e_i``, the RMS misregistration of the grid in view ``i``.
    along_axis_px, across_axis_px : (n,) arrays
        The RMS components of the misregistration along and across the true
        tilt axis of each view; ``along^2 + across^2 = e^2``.
    gauge : Similarity
        The fitted ``G``: the estimated geometry sees true specimen point ``X``
        at ``p_est(G X)``.
    grid : (m, 3) array
        The points the error was sampled on.
    """

    rms_px: float
    per_view_px: np.ndarray
    along_axis_px: np.ndarray
    across_axis_px: np.ndarray
    gauge: Similarity
    grid: np.ndarray

    @property
    def along_rms_px(self) -> float:
        return float(np.sqrt(np.mean(self.along_axis_px**2)))

    @property
    def across_rms_px(self) -> float:
        return float(np.sqrt(np.mean(self.across_axis_px**2)))


def _skew_rows(points: np.ndarray) -> np.ndarray:
    """``-[Y]x`` for each point (m, 3, 3): the derivative of ``w x Y`` with respect to ``w``."""
    x, y, z = points.T
    zero = np.zeros_like(x)
    return -np.stack(
        [np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)], axis=-2
    )


def gauge_jacobian(geometry: Geometry, points: np.ndarray, gauge: Similarity | None = None) -> np.ndarray:
    """Derivatives (n, m, 2, 7) of ``p_i(G X_k)`` with respect to a left perturbation of ``G``.

    The perturbation is ``X -> exp(ds) exp([dw]x) (G X) + dT`` with parameters
    ``(dw (3), dT (3), ds)``; these seven columns span everything a change of
    gauge can do to the projections.
    """
    g = gauge or Similarity.identity()
    y = g.apply(points)  # (m, 3)
    m = geometry.projection_matrices()  # (n, 2, 3)
    d_rot = np.einsum("nab,mbc->nmac", m, _skew_rows(y))
    d_shift = np.broadcast_to(m[:, None], (m.shape[0], y.shape[0], 2, 3))
    d_scale = np.einsum("nab,mb->nma", m, y)[..., None]
    return np.concatenate([d_rot, d_shift, d_scale], axis=-1)


def _least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``min |a x - b|`` for a tall, well-conditioned ``a`` (k <= 12 columns) by normal equations.

    ``einsum`` keeps the products off threaded BLAS, which stalls on a busy
    machine for matrices this thin; columns are scaled first for conditioning.
    """
    scale = np.sqrt(np.einsum("ij,ij->j", a, a))
    scale[scale == 0] = 1.0
    a = a / scale
    normal = np.einsum("ij,ik->jk", a, a)
    return np.linalg.solve(normal, np.einsum("ij,i->j", a, b)) / scale


def _fit_gauge(estimated: Geometry, target: np.ndarray, grid: np.ndarray) -> Similarity:
    """Least-squares ``G`` with ``p_est(G X_k) ~ target``: an affine start, then Gauss-Newton on the similarity."""
    m, c = projection_model(estimated)
    n, k = m.shape[0], grid.shape[0]
    # affine start: p = M_i (L X + T) + c_i is linear in (L, T)
    design = np.concatenate(
        [np.einsum("nab,kc->nkabc", m, grid).reshape(n, k, 2, 9), np.broadcast_to(m[:, None], (n, k, 2, 3))], axis=-1
    ).reshape(-1, 12)
    rhs = (target - c[:, None, :]).reshape(-1)
    sol = _least_squares(design, rhs)
    u, s, vt = np.linalg.svd(sol[:9].reshape(3, 3))
    rot = u @ vt
    if np.linalg.det(rot) < 0:  # the nearest proper rotation; a mirrored estimate stays visibly wrong
        u[:, -1] *= -1
        rot = u @ vt
    gauge = Similarity(scale=float(np.mean(s)), rotation=rot, translation=sol[9:])
    for _ in range(50):
        resid = (estimated.project(gauge.apply(grid)) - target).reshape(-1)
        jac = gauge_jacobian(estimated, grid, gauge).reshape(-1, 7)
        step = _least_squares(jac, -resid)
        rot_step = Similarity.from_params(np.concatenate([step[:3], np.zeros(3), [step[6]]]))
        gauge = Similarity(
            scale=gauge.scale * rot_step.scale,
            rotation=rot_step.rotation @ gauge.rotation,
            translation=rot_step.matrix @ gauge.translation + step[3:6],
        )
        if np.max(np.abs(step)) < 1e-14 * max(1.0, float(np.max(np.abs(grid)))):
            break
    return gauge


def alignment_error(
    estimated: Geometry,
    true: Geometry,
    *,
    thickness_px: float,
    grid: np.ndarray | None = None,
) -> AlignmentErrorResult:
    """The gauge-free alignment error of ``estimated`` against ``true`` (DESIGN.md section 5).

    Parameters
    ----------
    estimated, true : Geometry
        Geometries of the same stack (same views, same image shape).
    thickness_px : float
        Specimen thickness in pixels; the grid spans it in z.
    grid : (m, 3) array, optional
        Sample points; default :func:`error_grid` (9 x 9 x 3 over the field of view).

    Returns
    -------
    AlignmentErrorResult

    Examples
    --------
    >>> from simtomo import Geometry
    >>> g = Geometry.nominal([-30, 0, 30], (64, 64), 8.0)
    >>> alignment_error(g, g, thickness_px=20).rms_px
    0.0
    """
    if estimated.n_views != true.n_views:
        raise ConfigError(
            f"alignment error: the estimated geometry has {estimated.n_views} views, the truth {true.n_views}"
        )
    if estimated.image_shape != true.image_shape:
        raise ConfigError(
            f"alignment error: the estimated geometry is for images of {estimated.image_shape}, "
            f"the truth for {true.image_shape}"
        )
    points = error_grid(true.image_shape, thickness_px) if grid is None else np.asarray(grid, dtype=float)
    target = true.project(points)
    gauge = _fit_gauge(estimated, target, points)
    diff = estimated.project(gauge.apply(points)) - target  # (n, m, 2)
    axis = rotation_2d(true.rot_deg) @ np.array([0.0, 1.0])  # (n, 2) tilt axis in each view
    along = np.einsum("nmi,ni->nm", diff, axis)
    across = np.einsum("nmi,ni->nm", diff, np.stack([axis[:, 1], -axis[:, 0]], axis=1))
    per_view = np.sqrt(np.mean(np.sum(diff**2, axis=-1), axis=1))
    return AlignmentErrorResult(
        rms_px=float(np.sqrt(np.mean(per_view**2))),
        per_view_px=per_view,
        along_axis_px=np.sqrt(np.mean(along**2, axis=1)),
        across_axis_px=np.sqrt(np.mean(across**2, axis=1)),
        gauge=gauge,
        grid=points,
    )
