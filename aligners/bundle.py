"""Bundle adjustment of fiducial tracks: the solver shared by every track-based aligner.

Model (DESIGN.md section 3). The measured point ``xy[i, j]`` of track ``j`` in
view ``i`` (centred raw-image coordinates, px; NaN where missing) is explained by

    p_ij = s_i R(phi_i) P R_y(theta_i) X_j + t_i

with per-view shift ``t_i`` (always free), in-plane tilt-axis angle ``phi_i``,
magnification ``s_i`` and tilt ``theta_i``, and a 3-D position ``X_j`` per
track. Which of ``phi``, ``s``, ``theta`` are solved for, and how finely, is set
per variable by a :class:`VariableModel`; like IMOD's tiltalign the solver
estimates a *correction* to the initial value of each variable:

- ``"fixed"``: the initial values are kept;
- ``"global"``: one correction shared by all views (a uniform start, e.g. the
  nominal geometry, therefore ends with one value for all views);
- ``"blocks"``: one correction per block of ``block_size`` consecutive views
  (consecutive in tilt order, or in acquisition order when one is given), so
  the corrections are *piecewise constant* over the blocks; the last block
  holds the remainder;
- ``"per-view"``: one correction per view.

Internally the rotation and tilt are in radians and the magnification enters
as ``log s`` (so it stays positive); results are reported in degrees and as
plain magnifications.

Gauge (what the data cannot determine, fixed explicitly):

- translation (3): the shifts absorb a moved specimen exactly. During the fit
  three rows ``sum_i M0_i^T (t_i - t0_i) = 0`` (``M0_i`` the initial projection
  matrices) pin it; afterwards the track cloud is moved to mean zero and the
  shifts compensate, so the returned ``points_xyz`` have mean 0;
- scale (1), when the magnification is free: the reference view's
  magnification correction is fixed (its whole block for ``"blocks"``; for
  ``"global"`` this leaves nothing free: one common magnification *is* a scale);
- rotation about y (1), when the tilt is free: the reference view's tilt
  correction is fixed during the fit (its block / the global offset likewise).
  With ``tilt_gauge="level"`` the solution is then rotated about y (all tilts
  change by one offset) so that the least-squares plane ``z = a x + b y + c``
  through the tracks has ``a = 0`` (IMOD's "add X to tilt angles to make the
  specimen level"); when the tracks clearly lie on two surfaces (beads on both
  sides of a section) the two planes share ``a, b`` and have their own ``c``.
  With ``"reference"`` the reference tilt keeps its initial value. Levelling
  needs free tilts and is skipped when the tilt is ``"fixed"``.

The reference view is the one with the smallest ``|initial tilt|`` unless given.
With every variable fixed there is no scale or rotation gauge.

Solver: Levenberg-Marquardt on the analytic Jacobian, with the track positions
eliminated by a Schur complement (their normal-equation blocks are 3x3), so a
step costs one dense solve of the size of the view parameters. The start is
made robust to shift errors of tens of pixels by first solving the linear
problem in shifts and positions with the angles held at their initial values.
Robust fitting (IRLS): the scale is ``sigma = 1.4826 * median(|r_x|, |r_y|)``
over all points, corrected for the degrees of freedom of the fit, and a
point's normalised residual is ``u = |r| / sigma`` (its length in sigmas per
axis). Two rounds of Huber weights, then Tukey's biweight with
``c = robust_threshold`` until the weights settle, then least squares on the
points with ``u <= c`` (weight 1) while those beyond are rejected, repeated
until the rejected set is stable. The last stage keeps the estimator fully
efficient on clean data: with ``c = 4``, a good point is rejected with
probability ``exp(-8) = 3e-4``.

Points and tracks: a track enters the fit with 3 or more measured points; at
least 3 such tracks are needed, and every view needs enough points for its own
free variables (``ceil((2 + k) / 2)`` points with ``k`` per-view variables
besides the shift: one, two, or three with rotation, magnification and tilt
all per view), and each block or global variable one point beyond the shifts.
Otherwise :class:`~simtomo.errors.AlignmentError` names what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.sparse as sp

from simtomo.alignment import ResidualReport
from simtomo.alignment_error import error_grid, gauge_jacobian
from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry, rotation_y

__all__ = ["VariableModel", "BundleOptions", "BundleSolution", "solve", "crlb_alignment_error"]

logger = logging.getLogger(__name__)

_MODES = ("fixed", "global", "blocks", "per-view")
_VARIABLES = ("rotation", "magnification", "tilt")
_LABELS = {"rotation": "rot_deg", "magnification": "log_mag", "tilt": "tilt_deg"}
# No localisation is better than this. The floor keeps the robust weights meaningful on
# (nearly) noise-free data, whose residuals are at the level the intermediate stages converge to.
_SIGMA_FLOOR_PX = 1e-3
# MAD -> standard deviation for a Gaussian.
_MAD_TO_SIGMA = 1.482602218505602
# Huber corner, in robust sigmas of the residual length, for the convex first robust stage.
_HUBER_K = 2.0
_MIN_TRACKS = 3
_MIN_TRACK_POINTS = 3


@dataclass(frozen=True)
class VariableModel:
    """How one per-view variable (rotation, magnification or tilt) is solved for.

    Parameters
    ----------
    mode : {"fixed", "global", "blocks", "per-view"}
        See the module docstring: the variable's correction to its initial
        value is none, one shared value, piecewise constant over blocks, or one
        per view.
    block_size : int
        Views per block for ``"blocks"`` (consecutive in tilt order, or in
        acquisition order when :func:`solve` is given one), >= 1.
    smoothness : float
        Weight ``w`` of a prior residual ``w * R * (v_i - v_k)`` for each pair of
        neighbouring views ``i, k`` in tilt order, with ``R`` half the larger
        image dimension (px; 512 for 1024x1024 views) and ``v`` the rotation ``phi`` (radians),
        ``log s`` for the magnification, or the tilt correction
        ``theta - theta_initial`` (radians). ``R * (v_i - v_k)`` is about how
        far the change moves a point at the edge of the field, so the residual
        is in px-equivalent units and competes with measurement residuals in px
        (unit weight each): ``w = 1`` weighs a jump that moves the field edge by
        1 px like one point measured 1 px off (a view with 25 beads at ~300 px
        from the centre carries the weight of ~9 edge points, so values of a
        few units and up smooth noticeably). 0 (default) disables it.
    """

    mode: str = "per-view"
    block_size: int = 5
    smoothness: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"VariableModel.mode: expected one of {_MODES}, got {self.mode!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, (int, np.integer)) or self.block_size < 1:
            raise ConfigError(f"VariableModel.block_size: expected an integer >= 1, got {self.block_size!r}")
        if not (np.isfinite(self.smoothness) and self.smoothness >= 0):
            raise ConfigError(f"VariableModel.smoothness: expected a finite value >= 0, got {self.smoothness!r}")


@dataclass(frozen=True)
class BundleOptions:
    """Options of :func:`solve`.

    Parameters
    ----------
    rotation, magnification, tilt : VariableModel
        How each per-view variable is solved for (default: per view).
    tilt_gauge : {"level", "reference"}
        ``"level"``: after the fit, rotate the solution about y so the tracks'
        best-fit plane is level (tilts change by a common offset);
        ``"reference"``: the reference view keeps its initial tilt.
    robust : bool
        Down-weight and reject outliers (IRLS, see the module docstring).
    robust_threshold : float
        Rejection threshold in robust sigmas (per axis) of the residual length.
    tilt_anchor_weight : float
        Weight ``w`` of a prior that keeps each view's tilt near its anchor
        (``tilt_anchor_deg`` of :func:`solve`, by default the initial tilts)
        beyond one offset common to all views: residuals
        ``w * R * ((theta_i - a_i) - mean_k(theta_k - a_k))`` in the
        px-equivalent units of :attr:`VariableModel.smoothness`. Free per-view
        tilts are otherwise nearly degenerate with the depth scale of the
        tracks (a correction growing with the tilt); with noisy tracks
        (landmarks of :mod:`aligners.landmarks`) they drift along that
        direction pass after pass. The anchor is the stage's reading (the
        nominal tilts), which is off by a fraction of a degree per view. 0
        (default) disables it.
    max_iterations : int
        Total Levenberg-Marquardt iterations over all stages.
    tolerance : float
        Convergence: a stage stops when a step moves the reprojections by less
        than this RMS, px.
    """

    rotation: VariableModel = VariableModel("per-view")
    magnification: VariableModel = VariableModel("per-view")
    tilt: VariableModel = VariableModel("per-view")
    tilt_gauge: str = "level"
    robust: bool = True
    robust_threshold: float = 4.0
    tilt_anchor_weight: float = 0.0
    max_iterations: int = 200
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        for name in _VARIABLES:
            if not isinstance(getattr(self, name), VariableModel):
                raise ConfigError(f"BundleOptions.{name}: expected a VariableModel, got {type(getattr(self, name)).__name__}")
        if self.tilt_gauge not in ("level", "reference"):
            raise ConfigError(f"BundleOptions.tilt_gauge: expected 'level' or 'reference', got {self.tilt_gauge!r}")
        if not (np.isfinite(self.robust_threshold) and self.robust_threshold > 0):
            raise ConfigError(f"BundleOptions.robust_threshold: expected a positive number, got {self.robust_threshold!r}")
        if not (np.isfinite(self.tilt_anchor_weight) and self.tilt_anchor_weight >= 0):
            raise ConfigError(f"BundleOptions.tilt_anchor_weight: expected a finite value >= 0, got {self.tilt_anchor_weight!r}")
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, (int, np.integer)) or self.max_iterations < 1:
            raise ConfigError(f"BundleOptions.max_iterations: expected an integer >= 1, got {self.max_iterations!r}")
        if not (np.isfinite(self.tolerance) and self.tolerance > 0):
            raise ConfigError(f"BundleOptions.tolerance: expected a positive number, got {self.tolerance!r}")


@dataclass(frozen=True, eq=False)
class BundleSolution:
    """Result of :func:`solve`.

    Attributes
    ----------
    geometry : Geometry
        The fitted geometry (in the tilt gauge of the options).
    points_xyz : (m, 3) array
        Track positions, px, mean 0 over the fitted tracks; tracks not fitted
        (fewer than 3 points) are triangulated with the fitted geometry when
        they have 2 points, NaN otherwise.
    residual_xy : (n, m, 2) array
        Reprojection minus measurement, px; NaN where missing.
    kept : (n, m) bool array
        Points that entered the final fit.
    rejected : (n, m) bool array
        Points the robust fit rejected.
    report : ResidualReport
        Per-view and per-track RMS of the kept residuals.
    covariance : (k, k) array
        Covariance of the free view parameters, track positions marginalised,
        in the fit's gauge (reference magnification and tilt fixed, before
        levelling, translation pinned as in the module docstring), scaled by
        the measured residual variance ``sum_kept |r|^2 / (2 n_kept - p)``.
        Units as in ``parameter_names``: shifts px, angles degrees, ``log_mag``
        relative.
    parameter_names : list of str
        Names of the rows of ``covariance``.
    sigma_px : float
        Robust (MAD) residual sigma per axis, px, of the kept points,
        corrected for the degrees of freedom the fit uses; never below
        0.001 px (the floor of the robust scale).
    iterations : int
        Levenberg-Marquardt iterations, all stages.
    converged : bool
        Whether the final stage met the tolerance.
    info : dict
        ``reference_view``, ``tracks_used`` (indices of the fitted tracks) and
        ``residual_variance_px2`` (the covariance scale).
    """

    geometry: Geometry
    points_xyz: np.ndarray
    residual_xy: np.ndarray
    kept: np.ndarray
    rejected: np.ndarray
    report: ResidualReport
    covariance: np.ndarray
    parameter_names: list[str]
    sigma_px: float
    iterations: int
    converged: bool
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# Parameter layout
# --------------------------------------------------------------------------- #


class _Layout:
    """Where each view's variables live in the vector of view parameters.

    The vector is ``[tx_0, ty_0, tx_1, ty_1, ..., rotation..., magnification..., tilt...]``;
    ``cols[var][i]`` is the index (within the variable's segment) of the
    correction view ``i`` uses, or -1 when the variable is not free there.
    """

    def __init__(self, n: int, cols: dict[str, np.ndarray], groups: dict[str, list[str]]):
        self.n = n
        self.cols = cols
        self.sizes = {v: int(cols[v].max() + 1) if cols[v].size and cols[v].max() >= 0 else 0 for v in _VARIABLES}
        self.offsets = {}
        off = 2 * n
        for v in _VARIABLES:
            self.offsets[v] = off
            off += self.sizes[v]
        self.n_cam = off
        names = []
        for i in range(n):
            names += [f"shift_x[{i}]", f"shift_y[{i}]"]
        for v in _VARIABLES:
            names += [f"{_LABELS[v]}[{g}]" for g in groups[v]]
        self.names = names

    def unit_scale(self) -> np.ndarray:
        """Factors from internal units (rad, log) to reported units (deg, log)."""
        scale = np.ones(self.n_cam)
        for v in ("rotation", "tilt"):
            scale[self.offsets[v] : self.offsets[v] + self.sizes[v]] = np.rad2deg(1.0)
        return scale


def _variable_columns(
    model: VariableModel, n: int, order: np.ndarray, fixed_view: int | None
) -> tuple[np.ndarray, list[str]]:
    """Column of each view for one variable (-1 = not free) and the names of the columns."""
    if model.mode == "fixed":
        return np.full(n, -1), []
    if model.mode == "global":
        group = np.zeros(n, dtype=int)
        label = {0: "all"}
    elif model.mode == "per-view":
        group = np.arange(n)
        label = {i: str(i) for i in range(n)}
    else:
        group = np.empty(n, dtype=int)
        group[order] = np.arange(n) // model.block_size
        label = {}
        for b in range(int(group.max()) + 1):
            label[b] = f"block {b}: views " + ",".join(str(int(v)) for v in np.sort(np.flatnonzero(group == b)))
    free = np.ones(int(group.max()) + 1, dtype=bool)
    if fixed_view is not None:
        free[group[fixed_view]] = False
    new_index = np.cumsum(free) - 1
    cols = np.where(free[group], new_index[group], -1)
    names = [label[g] for g in range(free.size) if free[g]]
    return cols, names


def _make_layout(options: BundleOptions, tilt0_deg: np.ndarray, reference: int, acquisition_order) -> _Layout:
    n = tilt0_deg.size
    tilt_order = np.argsort(tilt0_deg, kind="stable")
    block_order = tilt_order if acquisition_order is None else np.asarray(acquisition_order)
    cols, groups = {}, {}
    for v in _VARIABLES:
        model = getattr(options, v)
        fixed_view = reference if v in ("magnification", "tilt") else None
        cols[v], groups[v] = _variable_columns(model, n, block_order, fixed_view)
    return _Layout(n, cols, groups)


def _frozen_layout(n: int) -> _Layout:
    """Shifts only (and track positions): the linear start-up problem."""
    return _Layout(n, {v: np.full(n, -1) for v in _VARIABLES}, {v: [] for v in _VARIABLES})


# --------------------------------------------------------------------------- #
# Model and Jacobians
# --------------------------------------------------------------------------- #


@dataclass
class _State:
    t: np.ndarray  # (n, 2)
    phi: np.ndarray  # (n,) rad
    logs: np.ndarray  # (n,)
    theta: np.ndarray  # (n,) rad
    X: np.ndarray  # (m, 3)

    def var(self, v: str) -> np.ndarray:
        return {"rotation": self.phi, "magnification": self.logs, "tilt": self.theta}[v]

    def stepped(self, layout: _Layout, dc: np.ndarray, dp: np.ndarray) -> _State:
        new = {}
        for v in _VARIABLES:
            arr = self.var(v).copy()
            cols = layout.cols[v]
            free = cols >= 0
            arr[free] += dc[layout.offsets[v] + cols[free]]
            new[v] = arr
        return _State(
            t=self.t + dc[: 2 * layout.n].reshape(-1, 2),
            phi=new["rotation"],
            logs=new["magnification"],
            theta=new["tilt"],
            X=self.X + dp.reshape(-1, 3),
        )

    @classmethod
    def from_geometry(cls, g: Geometry, X: np.ndarray) -> _State:
        return cls(
            t=np.array(g.shift_px, dtype=float),
            phi=np.deg2rad(g.rot_deg),
            logs=np.log(g.mag),
            theta=np.deg2rad(g.tilt_deg),
            X=np.array(X, dtype=float),
        )

    def geometry(self, like: Geometry) -> Geometry:
        return Geometry(
            tilt_deg=np.rad2deg(self.theta),
            rot_deg=np.rad2deg(self.phi),
            mag=np.exp(self.logs),
            shift_px=self.t,
            image_shape=like.image_shape,
            pixel_size_A=like.pixel_size_A,
        )

    def matrices(self) -> np.ndarray:
        """Projection matrices ``s R(phi) P R_y(theta)`` (n, 2, 3)."""
        s = np.exp(self.logs)
        cp, sp_ = np.cos(self.phi), np.sin(self.phi)
        ct, st = np.cos(self.theta), np.sin(self.theta)
        m = np.empty((self.phi.size, 2, 3))
        m[:, 0] = np.stack([cp * ct, -sp_, cp * st], axis=1)
        m[:, 1] = np.stack([sp_ * ct, cp, sp_ * st], axis=1)
        return s[:, None, None] * m


def _model(state: _State, vi: np.ndarray, X: np.ndarray, derivatives: bool = True):
    """Predictions (N, 2) of points ``X`` (N, 3) in views ``vi``, and their derivatives.

    Returns ``pred``, ``d_var`` (N, 2, 3) with respect to (phi, log s, theta),
    and ``d_X`` (N, 2, 3).
    """
    s = np.exp(state.logs)[vi]
    cp, sp_ = np.cos(state.phi)[vi], np.sin(state.phi)[vi]
    ct, st = np.cos(state.theta)[vi], np.sin(state.theta)[vi]
    x, y, z = X[:, 0], X[:, 1], X[:, 2]
    ux = ct * x + st * z
    rx = cp * ux - sp_ * y
    ry = sp_ * ux + cp * y
    pred = np.stack([s * rx, s * ry], axis=1) + state.t[vi]
    if not derivatives:
        return pred, None, None
    dux = -st * x + ct * z
    d_var = np.empty((vi.size, 2, 3))
    d_var[:, 0, 0], d_var[:, 1, 0] = -s * ry, s * rx
    d_var[:, 0, 1], d_var[:, 1, 1] = s * rx, s * ry
    d_var[:, 0, 2], d_var[:, 1, 2] = s * dux * cp, s * dux * sp_
    d_X = np.empty((vi.size, 2, 3))
    d_X[:, 0] = np.stack([cp * ct, -sp_, cp * st], axis=1)
    d_X[:, 1] = np.stack([sp_ * ct, cp, sp_ * st], axis=1)
    d_X *= s[:, None, None]
    return pred, d_var, d_X


def _local_camera(layout: _Layout, vi: np.ndarray, d_var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-observation camera Jacobian blocks and their columns.

    Returns ``jl`` (N, 2, 5), the derivatives with respect to
    ``(tx, ty, rotation, magnification, tilt)`` of the observation's view, and
    ``cidx`` (N, 5), their columns in the vector of view parameters; a variable
    that is not free points at the dummy column ``n_cam`` (its derivative is 0).
    """
    n_obs = vi.size
    jl = np.zeros((n_obs, 2, 5))
    jl[:, 0, 0] = 1.0
    jl[:, 1, 1] = 1.0
    cidx = np.empty((n_obs, 5), dtype=np.intp)
    cidx[:, 0] = 2 * vi
    cidx[:, 1] = 2 * vi + 1
    for k, v in enumerate(_VARIABLES):
        c = layout.cols[v][vi]
        free = c >= 0
        cidx[:, 2 + k] = np.where(free, layout.offsets[v] + c, layout.n_cam)
        jl[:, :, 2 + k] = np.where(free[:, None], d_var[:, :, k], 0.0)
    return jl, cidx


def _camera_jacobian(layout: _Layout, vi: np.ndarray, d_var: np.ndarray) -> sp.csr_matrix:
    """Sparse Jacobian (2N, n_cam) of the predictions with respect to the view parameters."""
    jl, cidx = _local_camera(layout, vi, d_var)
    rows = np.repeat(np.arange(2 * vi.size), 5)
    cols = np.broadcast_to(cidx[:, None, :], jl.shape).ravel()
    keep = cols < layout.n_cam
    return sp.csr_matrix((jl.ravel()[keep], (rows[keep], cols[keep])), shape=(2 * vi.size, layout.n_cam))


@numba.njit(cache=True, nogil=True)
def _accumulate_normal_equations(jl, cidx, dxw, rw, tj, n_cam, m):
    """Normal-equation blocks from the per-observation Jacobian blocks (all weighted).

    Returns ``U = Jc^T Jc`` (n_cam, n_cam), ``gc = Jc^T r``, the coupling
    ``W = Jc^T Jp`` (n_cam, 3m), the point blocks ``V_j = Jp_j^T Jp_j``
    (m, 3, 3) and ``gp_j = Jp_j^T r`` (m, 3). Columns equal to ``n_cam`` are
    variables that are not free and are skipped.
    """
    u = np.zeros((n_cam, n_cam))
    gc = np.zeros(n_cam)
    wcp = np.zeros((n_cam, 3 * m))
    vv = np.zeros((m, 3, 3))
    gp = np.zeros((m, 3))
    for e in range(jl.shape[0]):
        j = tj[e]
        for a in range(2):
            r = rw[e, a]
            for b in range(3):
                xb = dxw[e, a, b]
                gp[j, b] += xb * r
                for c in range(3):
                    vv[j, b, c] += xb * dxw[e, a, c]
            for p in range(5):
                cp = cidx[e, p]
                if cp == n_cam:
                    continue
                jp = jl[e, a, p]
                gc[cp] += jp * r
                for q in range(5):
                    cq = cidx[e, q]
                    if cq != n_cam:
                        u[cp, cq] += jp * jl[e, a, q]
                for b in range(3):
                    wcp[cp, 3 * j + b] += jp * dxw[e, a, b]
    return u, gc, wcp, vv, gp


# --------------------------------------------------------------------------- #
# The least-squares problem
# --------------------------------------------------------------------------- #


@dataclass
class _Linearization:
    cost: float
    jl: np.ndarray  # (N, 2, 5) weighted camera blocks
    cidx: np.ndarray  # (N, 5) their columns (n_cam = not free)
    dxw: np.ndarray  # (N, 2, 3) weighted point blocks
    u: np.ndarray  # (n_cam, n_cam), data + priors
    gc: np.ndarray  # (n_cam,)
    wcp: np.ndarray  # (n_cam, 3m) dense camera-point coupling
    vv: np.ndarray  # (m, 3, 3)
    gp: np.ndarray  # (m, 3)
    sum_w: float


class _Problem:
    """Observations, parameter layout and priors of one bundle adjustment."""

    def __init__(self, layout: _Layout, options: BundleOptions, vi, tj, meas, m, state0: _State, image_shape,
                 tilt_anchor: np.ndarray | None = None):
        self.layout = layout
        self.vi, self.tj, self.meas, self.m = vi, tj, meas, m
        self.starts = np.searchsorted(tj, np.arange(m))
        n = layout.n
        # Translation gauge: three rows sum_i M0_i^T (t_i - t0_i) / n, in px.
        m0 = state0.matrices()
        self.t0 = state0.t.copy()
        lg = np.zeros((3, layout.n_cam))
        lg[:, : 2 * n] = np.transpose(m0, (2, 0, 1)).reshape(3, 2 * n) / n
        self.lg = lg
        # Smoothness priors between neighbours in tilt order.
        tilt_order = np.argsort(state0.theta, kind="stable")
        radius = max(image_shape) / 2.0
        rows, self.prior_terms = [], []
        for v in _VARIABLES:
            model = getattr(options, v)
            cols = layout.cols[v]
            if model.smoothness <= 0 or model.mode == "fixed":
                continue
            a, b = tilt_order[:-1], tilt_order[1:]
            # pairs whose difference can change (both in the same group -> always zero)
            live = (cols[a] != cols[b]) & ((cols[a] >= 0) | (cols[b] >= 0))
            a, b = a[live], b[live]
            if a.size == 0:
                continue
            weight = model.smoothness * radius
            rows_v = np.zeros((a.size, layout.n_cam))
            for r, (i, k) in enumerate(zip(a, b)):
                if cols[i] >= 0:
                    rows_v[r, layout.offsets[v] + cols[i]] += weight
                if cols[k] >= 0:
                    rows_v[r, layout.offsets[v] + cols[k]] -= weight
            base = state0.theta if v == "tilt" else None
            self.prior_terms.append((v, a, b, weight, base))
            rows.append(rows_v)
        # Tilt anchor: the centring matrix leaves the common offset to the gauge.
        self.anchor = None
        if options.tilt_anchor_weight > 0 and layout.sizes["tilt"] > 0 and tilt_anchor is not None:
            cols = layout.cols["tilt"]
            rows_a = options.tilt_anchor_weight * radius * (np.eye(n) - 1.0 / n)
            rows_v = np.zeros((n, layout.n_cam))
            free = np.flatnonzero(cols >= 0)
            np.add.at(rows_v.T, layout.offsets["tilt"] + cols[free], rows_a[:, free].T)
            self.anchor = (rows_a, tilt_anchor)
            rows.append(rows_v)
        self.ls = np.concatenate(rows) if rows else np.zeros((0, layout.n_cam))
        self.prior_l = np.concatenate([self.ls, self.lg])
        self.prior_info = _gram(self.prior_l)
        self.smooth_info = _gram(self.ls)
        self.gauge_info = _gram(self.lg)

    def prior_residual(self, state: _State) -> np.ndarray:
        parts = []
        for v, a, b, weight, base in self.prior_terms:
            val = state.var(v) if base is None else state.var(v) - base
            parts.append(weight * (val[a] - val[b]))
        if self.anchor is not None:
            parts.append(self.anchor[0] @ (state.theta - self.anchor[1]))
        parts.append(_matvec(self.lg[:, : 2 * self.layout.n], (state.t - self.t0).ravel()))
        return np.concatenate(parts)

    def residuals(self, state: _State) -> np.ndarray:
        pred, _, _ = _model(state, self.vi, state.X[self.tj], derivatives=False)
        return pred - self.meas

    def cost(self, state: _State, w: np.ndarray) -> float:
        r = self.residuals(state)
        return 0.5 * float(np.sum(w[:, None] * r**2)) + 0.5 * float(np.sum(self.prior_residual(state) ** 2))

    def linearize(self, state: _State, w: np.ndarray, *, priors: bool = True) -> _Linearization:
        pred, d_var, d_X = _model(state, self.vi, state.X[self.tj])
        r = pred - self.meas
        sqrtw = np.sqrt(w)
        rw = r * sqrtw[:, None]
        jl, cidx = _local_camera(self.layout, self.vi, d_var)
        jl *= sqrtw[:, None, None]
        dxw = d_X * sqrtw[:, None, None]
        u, gc, wcp, vv, gp = _accumulate_normal_equations(jl, cidx, dxw, rw, self.tj, self.layout.n_cam, self.m)
        cost = 0.5 * float(np.sum(rw**2))
        if priors:
            rp = self.prior_residual(state)
            u += self.prior_info
            gc = gc + np.einsum("rc,r->c", self.prior_l, rp)
            cost += 0.5 * float(rp @ rp)
        return _Linearization(cost, jl, cidx, dxw, u, gc, wcp, vv, gp, float(w.sum()))

    def schur(self, lin: _Linearization, lam: float, *, pinv: bool = False):
        """Reduced camera system ``S`` and the block inverses of the (damped) point blocks."""
        diag_v = np.einsum("jii->ji", lin.vv)
        floor = 1e-12 * max(float(diag_v.mean()), 1e-300)
        vd = lin.vv + (lam * diag_v + floor)[:, :, None] * np.eye(3)
        vinv = np.linalg.pinv(vd, hermitian=True) if pinv else np.linalg.inv(vd)
        n_cam = lin.u.shape[0]
        t = np.einsum("cjb,jab->cja", lin.wcp.reshape(n_cam, self.m, 3), vinv).reshape(n_cam, -1)
        s = np.array(lin.u, order="C")
        _subtract_gram(s, np.ascontiguousarray(t), np.ascontiguousarray(lin.wcp))
        return s, vinv, t

    def apply_jacobian(self, lin: _Linearization, dc: np.ndarray, dp: np.ndarray) -> np.ndarray:
        """Weighted ``J @ (dc, dp)`` (N, 2) of the data rows."""
        dce = np.append(dc, 0.0)
        return np.einsum("eai,ei->ea", lin.jl, dce[lin.cidx]) + np.einsum(
            "eai,ei->ea", lin.dxw, dp.reshape(-1, 3)[self.tj]
        )


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` without BLAS (see the note on threads below)."""
    return float(np.einsum("i,i->", a, b))


def _matvec(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``a @ x`` without BLAS (see the note on threads below)."""
    return np.einsum("ij,j->i", a, x)


def _gram(rows: np.ndarray) -> np.ndarray:
    """``rows^T rows`` of a sparse-ish prior matrix, without BLAS."""
    m = sp.csr_matrix(rows)
    return (m.T @ m).toarray()


# The dense kernels below, and the vector products in the iteration loop, avoid
# BLAS/LAPACK on purpose: the reduced systems have a few hundred unknowns, where a
# threaded BLAS gains little and, on a machine whose cores are busy, its threads
# can stall each call for tens to hundreds of milliseconds (measured on 2 cores).


# fastmath lets LLVM vectorise the dot-product reductions (reassociation only changes rounding).
@numba.njit(cache=True, nogil=True, fastmath=True)
def _cholesky_inplace(a: np.ndarray) -> bool:
    """Overwrite the lower triangle of a symmetric ``a`` (n, n) by its Cholesky factor.

    Reads only the lower triangle; returns False when ``a`` is not positive definite.
    """
    n = a.shape[0]
    for j in range(n):
        d = a[j, j]
        for k in range(j):
            d -= a[j, k] * a[j, k]
        if not d > 0.0:
            return False
        d = np.sqrt(d)
        a[j, j] = d
        for i in range(j + 1, n):
            v = a[i, j]
            for k in range(j):
                v -= a[i, k] * a[j, k]
            a[i, j] = v / d
    return True


@numba.njit(cache=True, nogil=True, fastmath=True)
def _cholesky_substitute(lower: np.ndarray, b: np.ndarray) -> None:
    """Overwrite ``b`` (n, k) by ``(L L^T)^-1 b`` for the factor in the lower triangle of ``lower``."""
    n, k = b.shape
    for i in range(n):  # L y = b, row by row
        for q in range(i):
            f = lower[i, q]
            for c in range(k):
                b[i, c] -= f * b[q, c]
        inv = 1.0 / lower[i, i]
        for c in range(k):
            b[i, c] *= inv
    for i in range(n - 1, -1, -1):  # L^T x = y
        inv = 1.0 / lower[i, i]
        for c in range(k):
            b[i, c] *= inv
        for q in range(i):
            f = lower[i, q]
            for c in range(k):
                b[q, c] -= f * b[i, c]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _subtract_gram(s: np.ndarray, t: np.ndarray, w: np.ndarray) -> None:
    """``s -= t @ w.T`` for a product known to be symmetric (both triangles written)."""
    n, k = t.shape
    for i in range(n):
        for j in range(i + 1):
            acc = 0.0
            for q in range(k):
                acc += t[i, q] * w[j, q]
            s[i, j] -= acc
            if j != i:
                s[j, i] -= acc


def _cholesky(a: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """Cholesky factor (in the lower triangle) of symmetric positive-definite ``a``; LinAlgError otherwise."""
    work = a if overwrite and a.flags.c_contiguous and a.dtype == np.float64 else np.array(a, dtype=float, order="C")
    if not _cholesky_inplace(work):
        raise np.linalg.LinAlgError("matrix is not positive definite")
    return work


def _substitute(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    rhs = np.array(b, dtype=float, order="C").reshape(lower.shape[0], -1)
    _cholesky_substitute(lower, rhs)
    return rhs.reshape(np.shape(b))


def _spd_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^-1 b`` for symmetric positive-definite ``a``; raises LinAlgError otherwise."""
    return _substitute(_cholesky(a), b)


def _solve_step(problem: _Problem, lin: _Linearization, lam: float):
    s, vinv, t = problem.schur(lin, lam)
    diag_u = np.diag(lin.u).copy()
    floor = 1e-12 * max(float(diag_u.mean()), 1e-300)
    s[np.diag_indices_from(s)] += lam * diag_u + floor
    rhs = _matvec(t, lin.gp.ravel()) - lin.gc
    dc = _substitute(_cholesky(s, overwrite=True), rhs)
    dp = np.einsum("jab,jb->ja", vinv, -lin.gp - np.einsum("ck,c->k", lin.wcp, dc).reshape(-1, 3))
    return dc, dp.ravel()


def _levenberg_marquardt(problem: _Problem, state: _State, w: np.ndarray, max_iter: int, tol: float):
    """Minimise the weighted cost from ``state``; returns (state, iterations, converged)."""
    if max_iter <= 0:
        return state, 0, False
    lam = 1e-4
    lin = problem.linearize(state, w)
    for it in range(1, max_iter + 1):
        while True:
            try:
                dc, dp = _solve_step(problem, lin, lam)
            except np.linalg.LinAlgError:
                lam *= 10.0
                if lam > 1e12:
                    raise AlignmentError(
                        "bundle adjustment: the normal equations are singular; the tracks do not determine "
                        "the free variables (too few points, or all tracks in a degenerate configuration)"
                    ) from None
                continue
            jd = problem.apply_jacobian(lin, dc, dp).ravel()
            jd_prior = _matvec(problem.prior_l, dc)
            # predicted decrease of the Gauss-Newton model
            pred = -(_dot(lin.gc, dc) + _dot(lin.gp.ravel(), dp)) - 0.5 * (_dot(jd, jd) + _dot(jd_prior, jd_prior))
            if pred <= 1e-15 * lin.cost + 1e-300:
                return state, it - 1, True
            new = state.stepped(problem.layout, dc, dp)
            new_cost = problem.cost(new, w)
            if new_cost < lin.cost:
                break
            lam *= 10.0
            if lam > 1e12:
                return state, it - 1, False
        state = new
        disp = np.sqrt(_dot(jd, jd) / max(lin.sum_w, 1.0))
        lam = max(lam * 0.3, 1e-10)
        if disp < tol:
            return state, it, True
        lin = problem.linearize(state, w)
    return state, max_iter, False


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _triangulate(m_views: np.ndarray, t: np.ndarray, vi, tj, meas, m: int) -> np.ndarray:
    """Least-squares 3-D positions of tracks sorted by track (``tj``), given the view matrices."""
    a = m_views[vi]
    starts = np.searchsorted(tj, np.arange(m))
    ata = np.add.reduceat(np.einsum("eai,eaj->eij", a, a), starts, axis=0)
    atb = np.add.reduceat(np.einsum("eai,ea->ei", a, meas - t[vi]), starts, axis=0)
    return np.einsum("jab,jb->ja", np.linalg.pinv(ata, hermitian=True), atb)


def _robust_sigma(r: np.ndarray, dof_factor: float) -> float:
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(r))) * dof_factor
    return max(sigma, _SIGMA_FLOOR_PX)


def _check_view_support(layout: _Layout, options: BundleOptions, vi: np.ndarray, tilt_deg, n: int, what: str) -> None:
    """Every view needs points for its shift and its own free variables; blocks need one spare point."""
    counts = np.bincount(vi, minlength=n)
    for i in range(n):
        own = [v for v in _VARIABLES if getattr(options, v).mode == "per-view" and layout.cols[v][i] >= 0]
        need = int(np.ceil((2 + len(own)) / 2))
        if counts[i] < need:
            free = ", ".join(["shift"] + own)
            raise AlignmentError(
                f"bundle adjustment: view {i} (tilt {tilt_deg[i]:.1f} deg) has {counts[i]} {what} point(s); "
                f"its free variables ({free}) need at least {need}"
            )
    for v in _VARIABLES:
        if getattr(options, v).mode not in ("blocks", "global"):
            continue
        cols = layout.cols[v]
        for g in range(layout.sizes[v]):
            views = np.flatnonzero(cols == g)
            if counts[views].sum() < views.size + 1:
                raise AlignmentError(
                    f"bundle adjustment: the {v} of views {views.tolist()} has {counts[views].sum()} {what} "
                    f"point(s); it needs at least {views.size + 1} (one per view for the shifts, plus one)"
                )


def _surface_slope(X: np.ndarray) -> float:
    """Slope ``a`` along x of the plane(s) ``z = a x + b y + c_k`` through the track cloud.

    Beads usually sit on the two surfaces of the section; one plane through
    both would be steered by which surface the beads at large ``|x|`` happen
    to be on. So the points are split into two surfaces (two-means on the
    height above the current plane) and the planes share a slope but not an
    offset; the split is used only when the surfaces are clearly apart (gap
    over 5 pooled standard deviations, 3 or more points on each), else one
    plane is fitted. Iterated from a level start until the split is stable.
    """
    x, y, z = X[:, 0], X[:, 1], X[:, 2]
    slope = np.zeros(2)
    split = None
    for _ in range(20):
        h = z - slope[0] * x - slope[1] * y
        upper = h > np.median(h)
        for _ in range(50):  # one-dimensional two-means
            if upper.all() or not upper.any():
                break
            new = h > 0.5 * (h[upper].mean() + h[~upper].mean())
            if np.array_equal(new, upper):
                break
            upper = new
        two = False
        if 3 <= upper.sum() <= len(h) - 3:
            within = np.sqrt(
                (np.sum((h[upper] - h[upper].mean()) ** 2) + np.sum((h[~upper] - h[~upper].mean()) ** 2))
                / max(len(h) - 2, 1)
            )
            two = h[upper].mean() - h[~upper].mean() > 5.0 * within
        columns = [x, y] + ([upper.astype(float), (~upper).astype(float)] if two else [np.ones_like(x)])
        slope_new = np.linalg.lstsq(np.column_stack(columns), z, rcond=None)[0][:2]
        key = upper if two else None
        done = np.allclose(slope_new, slope, rtol=0, atol=1e-12) and (
            (key is None and split is None) or (key is not None and split is not None and np.array_equal(key, split))
        )
        slope, split = slope_new, key
        if done:
            break
    return float(slope[0])


def _level(state: _State) -> _State:
    """Rotate the solution about y so that the tracks' best-fit surface has no slope along x.

    ``X' = R_y(beta) X`` with ``tan(beta)`` the slope, and ``theta' = theta - beta``
    so that ``R_y(theta') X' = R_y(theta) X``: the projections are unchanged.
    """
    theta = state.theta.copy()
    pts = state.X.copy()
    for _ in range(3):  # the slope fit is not exactly rotation-equivariant; repeat to a level result
        beta = np.arctan(_surface_slope(pts))
        pts = pts @ rotation_y(np.rad2deg(beta)).T
        theta -= beta
    return _State(t=state.t, phi=state.phi, logs=state.logs, theta=theta, X=pts)


def _recentre(state: _State) -> _State:
    c = state.X.mean(axis=0)
    return _State(
        t=state.t + state.matrices() @ c, phi=state.phi, logs=state.logs, theta=state.theta, X=state.X - c
    )


def _gauge_fixed_covariance(problem: _Problem, state: _State, w: np.ndarray) -> np.ndarray:
    """``S_g^-1 S S_g^-1`` of the view parameters (unit noise): ``S`` the information with the track
    positions marginalised (data and smoothness priors), ``S_g`` the same plus the translation-gauge rows."""
    lin = problem.linearize(state, w, priors=False)
    s_data, _, _ = problem.schur(lin, 0.0, pinv=True)
    s_info = s_data + problem.smooth_info
    s_g = s_info + problem.gauge_info
    try:
        inv = _spd_solve(s_g, np.eye(s_g.shape[0]))
    except np.linalg.LinAlgError:  # a parameter the kept points do not determine
        inv = np.linalg.pinv(s_g, hermitian=True)
    # S_info = S_g - Lg^T Lg with Lg the three gauge rows, so the sandwich is a rank-3 update of S_g^-1
    side = np.einsum("gc,cd->gd", problem.lg, inv)
    cov = inv - np.einsum("gc,gd->cd", side, side)
    return 0.5 * (cov + cov.T)


def _reference_view(tilt_deg: np.ndarray, reference_view) -> int:
    n = tilt_deg.size
    if reference_view is None:
        return int(np.argmin(np.abs(tilt_deg)))
    if isinstance(reference_view, bool) or not isinstance(reference_view, (int, np.integer)) or not 0 <= reference_view < n:
        raise ConfigError(f"reference_view: expected a view index in 0..{n - 1}, got {reference_view!r}")
    return int(reference_view)


def _check_order(order, n: int) -> np.ndarray:
    order = np.asarray(order)
    if order.shape != (n,) or not np.issubdtype(order.dtype, np.integer) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ConfigError(f"acquisition_order: expected a permutation of the {n} view indices")
    return order


def _observations(mask: np.ndarray):
    """Observed (view, track) pairs of the usable tracks, sorted by track then view."""
    per_track = mask.sum(axis=0)
    used = np.flatnonzero(per_track >= _MIN_TRACK_POINTS)
    tj_local, vi = np.nonzero(mask[:, used].T)
    return used, vi, tj_local


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def solve(
    xy: np.ndarray,
    initial: Geometry,
    *,
    options: BundleOptions = BundleOptions(),
    reference_view: int | None = None,
    acquisition_order: np.ndarray | None = None,
    initial_points: np.ndarray | None = None,
    tilt_anchor_deg: np.ndarray | None = None,
) -> BundleSolution:
    """Fit view parameters and 3-D track positions to measured track points.

    Parameters
    ----------
    xy : (n, m, 2) array
        Measured point of track ``j`` in view ``i``, centred raw-image
        coordinates in px (DESIGN.md section 3); NaN where missing.
    initial : Geometry
        Start of the fit (nominal tilts, nominal tilt axis, coarse shifts); also
        the base the variable models correct.
    options : BundleOptions
        Variable models, gauge, robustness and convergence settings.
    reference_view : int, optional
        View whose magnification (and, during the fit, tilt) is fixed; default
        the one with the smallest ``|initial tilt|``.
    acquisition_order : (n,) int array, optional
        ``acquisition_order[k]`` is the view acquired ``k``-th; when given,
        ``"blocks"`` group consecutive acquisitions instead of tilts.
    initial_points : (m, 3) array, optional
        Start positions of the tracks; NaN rows (or None) are triangulated from
        ``initial``.
    tilt_anchor_deg : (n,) array, optional
        Anchor of the tilt prior (``options.tilt_anchor_weight``), degrees;
        default the initial tilts.

    Returns
    -------
    BundleSolution

    Raises
    ------
    ConfigError
        For arrays of the wrong shape or with infinite values, or bad options.
    AlignmentError
        When fewer than 3 tracks have 3 points, or a view has too few points
        for its free variables.
    """
    if not isinstance(initial, Geometry):
        raise ConfigError(f"initial: expected a Geometry, got {type(initial).__name__}")
    if not isinstance(options, BundleOptions):
        raise ConfigError(f"options: expected BundleOptions, got {type(options).__name__}")
    n = initial.n_views
    try:
        xy = np.asarray(xy, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError("xy: expected a numeric array of shape (n_views, n_tracks, 2)") from None
    if xy.ndim != 3 or xy.shape[0] != n or xy.shape[2] != 2:
        raise ConfigError(
            f"xy: expected shape (n_views={n}, n_tracks, 2) to match the initial geometry, got {xy.shape}"
        )
    if np.isinf(xy).any():
        raise ConfigError("xy: contains infinite coordinates; mark missing points with NaN")
    m_all = xy.shape[1]
    ref = _reference_view(initial.tilt_deg, reference_view)
    if acquisition_order is not None:
        acquisition_order = _check_order(acquisition_order, n)
    if initial_points is not None:
        initial_points = np.asarray(initial_points, dtype=float)
        if initial_points.shape != (m_all, 3):
            raise ConfigError(f"initial_points: expected shape ({m_all}, 3), got {initial_points.shape}")
        if np.isinf(initial_points).any():
            raise ConfigError("initial_points: contains infinite values")

    anchor = initial.tilt_deg if tilt_anchor_deg is None else np.asarray(tilt_anchor_deg, dtype=float)
    if anchor.shape != (n,) or not np.all(np.isfinite(anchor)):
        raise ConfigError(f"tilt_anchor_deg: expected {n} finite tilts in degrees, got shape {anchor.shape}")
    anchor = np.deg2rad(anchor)

    observed = np.all(np.isfinite(xy), axis=-1)
    used, vi, tj = _observations(observed)
    if used.size < _MIN_TRACKS:
        raise AlignmentError(
            f"bundle adjustment needs at least {_MIN_TRACKS} tracks seen in {_MIN_TRACK_POINTS} views; got {used.size}"
        )
    m = used.size
    meas = xy[vi, used[tj]]
    layout = _make_layout(options, initial.tilt_deg, ref, acquisition_order)
    _check_view_support(layout, options, vi, initial.tilt_deg, n, "measured")

    state = _State.from_geometry(initial, np.zeros((m, 3)))
    X0 = _triangulate(state.matrices(), state.t, vi, tj, meas, m)
    if initial_points is not None:
        given = initial_points[used]
        ok = np.all(np.isfinite(given), axis=1)
        X0[ok] = given[ok]
    state.X = X0
    budget = int(options.max_iterations)
    tol = float(options.tolerance)
    total = 0

    # Intermediate stages only need to get close; the last stage polishes to the tolerance.
    loose = max(tol, 1e-3)

    # Stage 0: shifts and positions with the angles at their start (a linear problem).
    w = np.ones(vi.size)
    frozen = _Problem(_frozen_layout(n), options, vi, tj, meas, m, state, initial.image_shape)
    state, its, _ = _levenberg_marquardt(frozen, state, w, min(budget, 10), loose)
    total += its

    problem = _Problem(layout, options, vi, tj, meas, m, state, initial.image_shape, tilt_anchor=anchor)
    p_eff = layout.n_cam + 3 * m - 3
    n_eq = 2 * vi.size
    dof_factor = np.sqrt(n_eq / max(n_eq - p_eff, 1))

    def fit(weights: np.ndarray, tolerance: float) -> bool:
        nonlocal state, total
        state, its, ok = _levenberg_marquardt(problem, state, weights, budget - total, tolerance)
        total += its
        return ok

    def normalised_residuals() -> np.ndarray:
        r = problem.residuals(state)
        return np.linalg.norm(r, axis=1) / _robust_sigma(r, dof_factor)

    c = options.robust_threshold
    converged = fit(w, loose if options.robust else tol)
    if options.robust:
        for _ in range(2):  # convex Huber stage: a start Tukey's biweight can trust
            u = normalised_residuals()
            w = np.minimum(1.0, _HUBER_K / np.maximum(u, 1e-300))
            fit(w, loose)
        for _ in range(5):  # Tukey's biweight, until the weights settle
            u = normalised_residuals()
            w_new = np.where(u < c, (1.0 - (u / c) ** 2) ** 2, 0.0)
            _check_view_support(layout, options, vi[w_new > 0], initial.tilt_deg, n, "inlier")
            settled = np.array_equal(w_new == 0, w == 0) and float(np.max(np.abs(w_new - w))) < 0.05
            w = w_new
            fit(w, loose)
            if settled:
                break
        keep = None
        for _ in range(5):  # least squares on the points within the threshold
            keep_new = normalised_residuals() <= c
            if keep is not None and np.array_equal(keep_new, keep):
                break
            keep = keep_new
            _check_view_support(layout, options, vi[keep], initial.tilt_deg, n, "inlier")
            w = keep.astype(float)
            fit(w, loose)
        converged = fit(w, tol)
    keep = w > 0
    if not converged:
        logger.warning("bundle adjustment did not converge in %d iterations", total)

    # Covariance in the fit's gauge, before the final gauge moves.
    r = problem.residuals(state)
    n_kept = int(keep.sum())
    variance = float(np.sum(r[keep] ** 2)) / max(2 * n_kept - p_eff, 1)
    cov = variance * _gauge_fixed_covariance(problem, state, keep.astype(float))
    scale = layout.unit_scale()
    cov = cov * scale[:, None] * scale[None, :]
    sigma_px = _robust_sigma(r[keep], np.sqrt(2 * n_kept / max(2 * n_kept - p_eff, 1)))

    state = _recentre(state)
    levelled = options.tilt_gauge == "level" and options.tilt.mode != "fixed"
    if levelled:
        state = _level(state)
    geometry = state.geometry(initial)
    # Values the fit did not touch are returned bit for bit (no degree-radian round trip).
    fixed = {v: layout.cols[v] < 0 for v in _VARIABLES}
    geometry = geometry.replace(
        rot_deg=np.where(fixed["rotation"], initial.rot_deg, geometry.rot_deg),
        mag=np.where(fixed["magnification"], initial.mag, geometry.mag),
        tilt_deg=geometry.tilt_deg if levelled else np.where(fixed["tilt"], initial.tilt_deg, geometry.tilt_deg),
    )

    points = np.full((m_all, 3), np.nan)
    points[used] = state.X
    # Tracks too short for the fit: positions from the fitted geometry where they have two points.
    short = np.flatnonzero((observed.sum(axis=0) == 2))
    if short.size:
        tjs, vis = np.nonzero(observed[:, short].T)
        points[short] = _triangulate(state.matrices(), state.t, vis, tjs, xy[vis, short[tjs]], short.size)
    residual = np.full((n, m_all, 2), np.nan)
    proj = geometry.project(np.nan_to_num(points))
    has = observed & np.all(np.isfinite(points), axis=1)[None, :]
    residual[has] = proj[has] - xy[has]
    kept = np.zeros((n, m_all), dtype=bool)
    kept[vi[keep], used[tj[keep]]] = True
    rejected = np.zeros((n, m_all), dtype=bool)
    rejected[vi[~keep], used[tj[~keep]]] = True
    report = ResidualReport.from_residuals(residual, kept, rejected)
    logger.info(
        "bundle adjustment: %d views, %d tracks, %d points (%d rejected), residual %.3f px RMS, %d iterations",
        n, m, n_kept, int((~keep).sum()), report.rms_px, total,
    )
    return BundleSolution(
        geometry=geometry,
        points_xyz=points,
        residual_xy=residual,
        kept=kept,
        rejected=rejected,
        report=report,
        covariance=cov,
        parameter_names=list(layout.names),
        sigma_px=float(sigma_px),
        iterations=int(total),
        converged=bool(converged),
        info={"reference_view": ref, "tracks_used": used.tolist(), "residual_variance_px2": variance},
    )


def crlb_alignment_error(
    solution_or_geometry: BundleSolution | Geometry,
    points_xyz: np.ndarray,
    observed: np.ndarray,
    sigma_px: float,
    *,
    options: BundleOptions = BundleOptions(),
    thickness_px: float,
    reference_view: int | None = None,
    acquisition_order: np.ndarray | None = None,
) -> float:
    """The lowest alignment error a bundle adjustment can reach (Cramér-Rao bound, DESIGN.md section 5).

    For Gaussian localisation noise ``sigma_px`` per axis, the covariance of
    the view parameters is ``C = sigma^2 (J^T J)^+`` (``J``: Jacobian of all
    reprojections with respect to the free parameters of ``options``, track
    positions included and marginalised, gauge fixed as in :func:`solve`;
    smoothness priors count as information). It is propagated to the
    alignment-error grid ``X_k`` (:func:`simtomo.alignment_error.error_grid`)
    through ``K = d p_i(X_k) / d(view parameters)``; the seven similarity
    directions (:func:`simtomo.alignment_error.gauge_jacobian`) are projected
    out by ``Q``, and the result is ``sqrt(trace(Q K C K^T Q) / (n m_grid))``:
    the expected RMS over views of the alignment error, in px.

    Parameters
    ----------
    solution_or_geometry : BundleSolution or Geometry
        Geometry at which the bound is evaluated (usually the truth).
    points_xyz : (m, 3) array
        Track positions, px (NaN allowed for tracks that are left out).
    observed : (n, m) bool array
        Which points are measured (e.g. ``solution.kept``); tracks with fewer
        than 3 are left out, as in :func:`solve`.
    sigma_px : float
        Localisation noise per axis, px.
    options : BundleOptions
        Which variables are free (the robust settings do not matter).
    thickness_px : float
        Specimen thickness for the error grid, px.
    reference_view : int, optional
        As in :func:`solve`; the bound does not depend on it.
    acquisition_order : (n,) int array, optional
        As in :func:`solve`, for ``"blocks"`` in acquisition order.

    Returns
    -------
    float
        The bound, px RMS over views.
    """
    geometry = solution_or_geometry.geometry if isinstance(solution_or_geometry, BundleSolution) else solution_or_geometry
    if not isinstance(geometry, Geometry):
        raise ConfigError(f"solution_or_geometry: expected a BundleSolution or Geometry, got {type(geometry).__name__}")
    n = geometry.n_views
    pts = np.asarray(points_xyz, dtype=float)
    obs = np.asarray(observed, dtype=bool)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ConfigError(f"points_xyz: expected shape (m, 3), got {pts.shape}")
    if obs.shape != (n, pts.shape[0]):
        raise ConfigError(f"observed: expected shape ({n}, {pts.shape[0]}), got {obs.shape}")
    if acquisition_order is not None:
        acquisition_order = _check_order(acquisition_order, n)
    if not (np.isfinite(sigma_px) and sigma_px >= 0):
        raise ConfigError(f"sigma_px: expected a finite value >= 0, got {sigma_px!r}")
    used, vi, tj = _observations(obs)
    if used.size < _MIN_TRACKS:
        raise AlignmentError(
            f"bundle adjustment needs at least {_MIN_TRACKS} tracks seen in {_MIN_TRACK_POINTS} views; got {used.size}"
        )
    if not np.all(np.isfinite(pts[used])):
        raise ConfigError("points_xyz: expected finite positions for every track with 3 or more observed points")
    ref = _reference_view(geometry.tilt_deg, reference_view)
    layout = _make_layout(options, geometry.tilt_deg, ref, acquisition_order)
    _check_view_support(layout, options, vi, geometry.tilt_deg, n, "measured")
    state = _State.from_geometry(geometry, pts[used])
    meas = np.zeros((vi.size, 2))  # residuals do not enter the information
    problem = _Problem(layout, options, vi, tj, meas, used.size, state, geometry.image_shape)
    cov = _gauge_fixed_covariance(problem, state, np.ones(vi.size))

    grid = error_grid(geometry.image_shape, thickness_px)
    mg = grid.shape[0]
    gvi = np.repeat(np.arange(n), mg)
    gk = np.tile(np.arange(mg), n)
    _, d_var, _ = _model(state, gvi, grid[gk])
    k = _camera_jacobian(layout, gvi, d_var)
    d = gauge_jacobian(geometry, grid).reshape(-1, 7)
    a = (k.T @ k).toarray()
    b = np.asarray(k.T @ d)
    e = np.einsum("rg,rh->gh", d, d)
    projected = a - np.einsum("cg,gd->cd", b, np.linalg.solve(e, b.T))
    value = float(sigma_px) ** 2 * float(np.sum(cov * projected)) / (n * mg)
    return float(np.sqrt(max(value, 0.0)))
