"""Speed benchmarks of the simulator and its numba kernels (pytest-benchmark).

Every test here is marked ``benchmark`` and so left out of the default run; run them with::

    python -m pytest -m benchmark --benchmark-enable tests/test_benchmarks.py

Each benchmark also checks what it timed, where that is cheap: a fast wrong
answer is no result.

The functions at the top, :func:`reference_project_gaussians` and
:func:`reference_project_shells`, are the plain NumPy baselines that the numba
kernels of :mod:`simtomo.projector` are measured (and checked) against. They
compute the same quantities by the same definitions, vectorised with NumPy
instead of compiled loops, and share no code with the kernels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from simtomo.geometry import Geometry
from simtomo.projector import GAUSSIAN_CUTOFF_SIGMA, project_gaussians, project_shells, project_voxels
from simtomo.specimen import Gaussians, Shells, VoxelPhantom

pytestmark = pytest.mark.benchmark

# Agreement of the Gaussian kernel with its reference. Both integrate the same
# erf products over the same footprints, so only rounding (libm vs. cephes erf,
# a few ulp) separates them.
GAUSSIAN_RTOL = 1e-9

# Agreement of the shell kernel with its reference, as max |difference| over the
# image maximum. The reference uses 8x8 Gauss-Legendre nodes in every pixel; the
# kernel only within 0.75 px of a rim and 2x2 nodes elsewhere, where the chord
# profile is smooth but still curved near the rims. Measured on the case below:
# 1.5e-4 (max |diff| / max, at a pixel just beyond the 0.75 px rim band), so
# 1e-6 is out of reach by design; 1e-3 leaves room for other radii and
# magnifications while still catching a misplaced or mis-weighted shell.
# (Both are ~2.5e-3 from a 48x48 quadrature, from the square-root edge at the
# rims that 8x8 nodes under-resolve: the kernel's real accuracy limit.)
SHELL_RTOL = 1e-3


# --------------------------------------------------------------------------- #
# Plain NumPy baselines
# --------------------------------------------------------------------------- #


def _view_centres(geometry: Geometry, view: int, centers_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projected centres in array-index units (col, row), from the public ``Geometry.project``."""
    h, w = geometry.image_shape
    p = geometry.project(centers_px)[view]
    return p[:, 0] + (w - 1) / 2.0, p[:, 1] + (h - 1) / 2.0


def _footprint(centre: np.ndarray, half: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First index, last index (clipped to ``0..n-1``) and a padded index grid of each footprint."""
    lo = np.maximum(np.floor(centre - half), 0).astype(np.int64)
    hi = np.minimum(np.ceil(centre + half), n - 1).astype(np.int64)
    width = int(max((hi - lo).max(initial=-1) + 1, 1))
    return lo, hi, lo[:, None] + np.arange(width)[None, :]


def _erf_fractions(idx: np.ndarray, hi: np.ndarray, centre: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Fraction of a unit 1-D Gaussian in each pixel ``idx`` (pixel k spans k +- 1/2); zero past ``hi``."""
    inv = 1.0 / (math.sqrt(2.0) * sigma[:, None])
    frac = 0.5 * (erf((idx + 0.5 - centre[:, None]) * inv) - erf((idx - 0.5 - centre[:, None]) * inv))
    return np.where(idx <= hi[:, None], frac, 0.0)


def reference_project_gaussians(gaussians: Gaussians, geometry: Geometry, view: int, *, chunk: int = 1000) -> np.ndarray:
    """Plain NumPy baseline of :func:`simtomo.projector.project_gaussians`.

    Each Gaussian of width ``s sigma`` and integral ``mass s^2`` adds to every
    pixel of its footprint (``GAUSSIAN_CUTOFF_SIGMA * s sigma + 1`` px from its
    centre, clipped to the image) the product of the erf differences over the
    pixel's extent in x and in y. The footprints of ``chunk`` Gaussians are
    evaluated at once, padded to a common width, and added with ``np.add.at``
    (which adds repeated indices in order, like the sequential kernel).

    Parameters
    ----------
    gaussians : Gaussians
    geometry : Geometry
    view : int
    chunk : int
        Gaussians per vectorised batch; bounds the temporary memory.

    Returns
    -------
    (h, w) float64 array
    """
    h, w = geometry.image_shape
    out = np.zeros((h, w))
    if len(gaussians) == 0:
        return out
    s = geometry.mag[view]
    col, row = _view_centres(geometry, view, gaussians.centers_px)
    sigma = s * gaussians.sigma_px
    weight = gaussians.mass * s * s
    flat = out.reshape(-1)
    for start in range(0, len(gaussians), chunk):
        sl = slice(start, start + chunk)
        half = GAUSSIAN_CUTOFF_SIGMA * sigma[sl] + 1.0
        c_lo, c_hi, cols = _footprint(col[sl], half, w)
        r_lo, r_hi, rows = _footprint(row[sl], half, h)
        wx = _erf_fractions(cols, c_hi, col[sl], sigma[sl])
        wy = _erf_fractions(rows, r_hi, row[sl], sigma[sl])
        values = (weight[sl, None] * wy)[:, :, None] * wx[:, None, :]
        inside = (cols <= c_hi[:, None])[:, None, :] & (rows <= r_hi[:, None])[:, :, None]
        index = rows[:, :, None] * w + cols[:, None, :]
        np.add.at(flat, index[inside], values[inside])
    return out


def reference_project_shells(shells: Shells, geometry: Geometry, view: int, *, order: int = 8) -> np.ndarray:
    """Plain NumPy baseline of :func:`simtomo.projector.project_shells`.

    Every pixel of each shell's box (outer radius + 1 px around its projected
    centre, clipped to the image) gets the mean over its area of
    ``(2/s) density (sqrt((sR)^2 - d^2)_+ - sqrt((sr)^2 - d^2)_+)``, by
    ``order`` x ``order`` Gauss-Legendre quadrature everywhere (no rim
    detection), vectorised over the box's pixels and nodes.

    Returns
    -------
    (h, w) float64 array
    """
    h, w = geometry.image_shape
    out = np.zeros((h, w))
    if len(shells) == 0:
        return out
    s = geometry.mag[view]
    col, row = _view_centres(geometry, view, shells.centers_px)
    nodes, weights = np.polynomial.legendre.leggauss(order)
    nodes, weights = nodes / 2.0, weights / 2.0  # on [-1/2, 1/2], summing to 1
    w2 = weights[:, None] * weights[None, :]  # [y node, x node]
    for k in range(len(shells)):
        ro, ri = s * shells.r_outer_px[k], s * shells.r_inner_px[k]
        c_lo, c_hi = max(math.floor(col[k] - ro - 1.0), 0), min(math.ceil(col[k] + ro + 1.0), w - 1)
        r_lo, r_hi = max(math.floor(row[k] - ro - 1.0), 0), min(math.ceil(row[k] + ro + 1.0), h - 1)
        if c_lo > c_hi or r_lo > r_hi:
            continue
        dx = (np.arange(c_lo, c_hi + 1) - col[k])[:, None] + nodes[None, :]  # [col, x node]
        dy = (np.arange(r_lo, r_hi + 1) - row[k])[:, None] + nodes[None, :]  # [row, y node]
        d2 = dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2  # [row, col, y node, x node]
        chord = np.sqrt(np.maximum(ro * ro - d2, 0.0)) - np.sqrt(np.maximum(ri * ri - d2, 0.0))
        mean = np.einsum("rcij,ij->rc", chord, w2)
        out[r_lo : r_hi + 1, c_lo : c_hi + 1] += (2.0 / s * shells.density[k]) * mean
    return out


# --------------------------------------------------------------------------- #
# Workloads
# --------------------------------------------------------------------------- #


def _one_view(shape: tuple[int, int], tilt_deg: float = 30.0, rot_deg: float = 85.3, mag: float = 1.003, shift=(12.3, -7.1)) -> Geometry:
    """A single-view geometry; off-nominal rotation, magnification and shift so none of them is a no-op."""
    return Geometry([tilt_deg], [rot_deg], [mag], [shift], shape, 8.0)


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over max |b|: error relative to the image's scale, not per pixel (empty pixels are 0)."""
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def gaussian_case():
    """~5000 Gaussians of sigma 1.5-4 px over (and just past) a 1024x1024 view, with the reference image."""
    rng = np.random.default_rng(1)
    m = 5000
    centres = np.column_stack([rng.uniform(-540, 540, (m, 2)), rng.uniform(-100, 100, m)])
    gaussians = Gaussians(centres, rng.uniform(1.5, 4.0, m), rng.uniform(0.5, 1.5, m))
    geometry = _one_view((1024, 1024))
    return gaussians, geometry, reference_project_gaussians(gaussians, geometry, 0)


@pytest.fixture(scope="module")
def shell_case():
    """~50 shells of outer radius 5-60 px (a third solid spheres) over a 1024x1024 view, with the reference image."""
    rng = np.random.default_rng(2)
    m = 50
    centres = np.column_stack([rng.uniform(-540, 540, (m, 2)), rng.uniform(-100, 100, m)])
    r_out = rng.uniform(5.0, 60.0, m)
    r_in = r_out * rng.uniform(0.5, 0.95, m)
    r_in[::3] = 0.0
    shells = Shells(centres, r_in, r_out, rng.uniform(0.5, 1.5, m))
    geometry = _one_view((1024, 1024))
    return shells, geometry, reference_project_shells(shells, geometry, 0)


# --------------------------------------------------------------------------- #
# Benchmarks
# --------------------------------------------------------------------------- #


def test_simulate_standard(benchmark):
    """The whole `standard` workload in memory (61 x 1024 x 1024), once: it takes seconds."""
    from simtomo.simulate import simulate

    # Compile (or load from numba's cache) every kernel outside the timed round.
    simulate("tiny", seed=0)
    benchmark.group = "simulate"
    series = benchmark.pedantic(simulate, args=("standard",), kwargs={"seed": 0}, rounds=1, iterations=1)
    assert series.stack.shape == (61, 1024, 1024)
    assert np.isfinite(series.stack).all()
    assert series.stack.min() >= 0  # detector counts


def test_project_gaussians_numba(benchmark, gaussian_case):
    gaussians, geometry, expected = gaussian_case
    project_gaussians(gaussians, geometry, 0)  # compile outside the timing
    benchmark.group = "project_gaussians (5000, 1024^2)"
    image = benchmark(project_gaussians, gaussians, geometry, 0)
    assert _relative_error(image, expected) < GAUSSIAN_RTOL


def test_project_gaussians_numpy_reference(benchmark, gaussian_case):
    gaussians, geometry, _ = gaussian_case
    benchmark.group = "project_gaussians (5000, 1024^2)"
    image = benchmark.pedantic(reference_project_gaussians, args=(gaussians, geometry, 0), rounds=3, iterations=1)
    assert _relative_error(image, project_gaussians(gaussians, geometry, 0)) < GAUSSIAN_RTOL


def test_project_shells_numba(benchmark, shell_case):
    shells, geometry, expected = shell_case
    project_shells(shells, geometry, 0)  # compile outside the timing
    benchmark.group = "project_shells (50, 1024^2)"
    image = benchmark(project_shells, shells, geometry, 0)
    assert _relative_error(image, expected) < SHELL_RTOL


def test_project_shells_numpy_reference(benchmark, shell_case):
    shells, geometry, _ = shell_case
    benchmark.group = "project_shells (50, 1024^2)"
    image = benchmark.pedantic(reference_project_shells, args=(shells, geometry, 0), rounds=3, iterations=1)
    assert _relative_error(image, project_shells(shells, geometry, 0)) < SHELL_RTOL


def test_project_voxels(benchmark):
    """A dense 128x512x512 volume at 30 degrees; every voxel is non-zero, so no work is skipped."""
    vol = np.random.default_rng(3).random((128, 512, 512))
    phantom = VoxelPhantom(vol)
    # No rotation, magnification or shift: the view then holds the whole
    # projection, and its sum must equal the volume's (the mass check below).
    geometry = _one_view((512, 512), tilt_deg=30.0, rot_deg=0.0, mag=1.0, shift=(0.0, 0.0))
    project_voxels(VoxelPhantom(vol[:2, :8, :8]), _one_view((8, 8)), 0)  # compile outside the timing
    benchmark.group = "project_voxels (128x512x512)"
    image = benchmark.pedantic(project_voxels, args=(phantom, geometry, 0), rounds=3, iterations=1)
    assert image.shape == (512, 512)
    assert np.isfinite(image).all()
    # The kernel splits each voxel between two samples and the spline resampling
    # at a uniform offset keeps sums, so mass is kept to rounding (measured 2e-16).
    assert image.sum() == pytest.approx(vol.sum(), rel=1e-9)


def test_phantom_volume_standard_bin2(benchmark):
    """The noise-free phantom of the `standard` specimen at binning 2, built as ``simulate`` builds it."""
    from simtomo.simulate import _prepare
    from simtomo.voxelize import phantom_shape, phantom_volume

    cfg, _scheme, _mis, specimen, _seeds = _prepare("standard", 0)
    binning = 2
    phantom_volume(specimen, cfg, binning=8)  # compile outside the timing
    benchmark.group = "phantom_volume (standard, bin 2)"
    vol = benchmark.pedantic(phantom_volume, args=(specimen, cfg), kwargs={"binning": binning}, rounds=3, iterations=1)
    assert vol.shape == phantom_shape(specimen, cfg, binning)
    assert np.isfinite(vol).all() and vol.min() >= 0
    # Each bead's centre voxel lies wholly inside the gold (radius 6.25 px =
    # 3.1 voxels), so it holds at least the gold attenuation: beads are where
    # the grid convention says they are.
    nz, ny, nx = vol.shape
    c = specimen.gold.centers_px / binning + (np.array([nx, ny, nz]) - 1) / 2.0
    i, j, k = np.round(c).astype(int).T
    assert np.all(vol[k, j, i] >= specimen.gold.density.astype(np.float32))
