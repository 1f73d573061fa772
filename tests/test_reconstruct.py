"""Reconstruction and reprojection (simtomo.reconstruct): geometry, amplitude, adjointness, SIRT, inputs."""

import math

import numba
import numpy as np
import pytest
from conftest import random_geometry
from scipy.optimize import least_squares

from simtomo import reconstruct as rec
from simtomo.errors import ConfigError
from simtomo.geometry import Geometry
from simtomo.projector import project_gaussians
from simtomo.reconstruct import log_intensity, reconstruct, reproject
from simtomo.similarity import Similarity
from simtomo.specimen import Gaussians
from simtomo.voxelize import voxelize_gaussians

# Blob centres: y values at least 10 px apart, so that no blob's back-projection
# streaks (which stay in the blob's own y rows) reach another blob's window.
BLOB_Y = np.array([-16.3, -5.6, 5.2, 15.7])
GAUGE = Similarity.from_params([0.12, -0.2, 0.25, 3.0, -2.0, 1.5, math.log(1.04)])


def project(gaussians: Gaussians, geometry: Geometry) -> np.ndarray:
    """Noise-free pixel-integrated line integrals of every view, float32."""
    return np.stack([project_gaussians(gaussians, geometry, i) for i in range(geometry.n_views)]).astype(np.float32)


def blob_centre(vol: np.ndarray, guess: np.ndarray, b: float, radius: int) -> np.ndarray:
    """Centre (x, y, z) in volume coordinates of the blob near ``guess``.

    Local and background-subtracted: a 3-D Gaussian with separate widths plus a
    constant is fitted to the (2 radius + 1)^3 voxels around the voxel nearest
    the guess. Unlike a thresholded centroid it does not depend on where the
    voxel grid cuts the blob.
    """
    nz, ny, nx = vol.shape
    centre = (np.array([nx, ny, nz]) - 1) / 2.0
    c = np.round(guess / b + centre).astype(int)
    sub = vol[c[2] - radius : c[2] + radius + 1, c[1] - radius : c[1] + radius + 1, c[0] - radius : c[0] + radius + 1]
    sub = sub.astype(float)
    assert sub.shape == (2 * radius + 1,) * 3
    zz, yy, xx = np.meshgrid(*[np.arange(-radius, radius + 1.0)] * 3, indexing="ij")

    def residual(p):
        a, x0, y0, z0, sx, sy, sz, bg = p
        model = a * np.exp(-((xx - x0) ** 2) / (2 * sx**2) - (yy - y0) ** 2 / (2 * sy**2) - (zz - z0) ** 2 / (2 * sz**2))
        return (model + bg - sub).ravel()

    p = least_squares(residual, [sub.max(), 0, 0, 0, 2 / b, 2 / b, 3 / b, 0]).x
    return b * (p[1:4] + c - centre)


def ball_sum(vol: np.ndarray, centre: np.ndarray, radius: float, b: float = 1.0) -> float:
    """Sum of the voxels whose centres lie within ``radius`` px of ``centre`` (x, y, z)."""
    nz, ny, nx = vol.shape
    z, y, x = (b * (np.arange(n) - (n - 1) / 2.0) for n in (nz, ny, nx))
    d2 = (x[None, None, :] - centre[0]) ** 2 + (y[None, :, None] - centre[1]) ** 2 + (z[:, None, None] - centre[2]) ** 2
    return float(vol[d2 <= radius**2].sum())


@pytest.fixture(scope="module")
def blobs():
    """Four small blobs seen under a geometry far from nominal (shifts to 60 px, any rotation, mag 0.8-1.2)."""
    rng = np.random.default_rng(7)
    geometry = random_geometry(rng, 41, shape=(240, 240), shift=60.0, max_tilt=60.0)
    centres = np.column_stack([rng.uniform(-8, 8, 4), BLOB_Y, rng.uniform(-6, 6, 4)])
    gaussians = Gaussians(centres, np.full(4, 1.8), np.ones(4))
    # the field is large enough that every blob is inside every view
    assert np.abs(geometry.project(centres)).max() < 120 - 10
    return geometry, gaussians, project(gaussians, geometry)


# --------------------------------------------------------------------------- log_intensity


def test_log_intensity_values_and_zero_counts():
    counts = np.array([[[100.0, 50.0], [0.0, 250.0]], [[10.0, 10.0], [10.0, 10.0]]], dtype=np.float32)
    out = log_intensity(counts)
    assert out.dtype == np.float32 and out.shape == counts.shape
    i0 = counts.mean(axis=(1, 2), keepdims=True)
    expected = -np.log(np.maximum(counts, 0.5) / i0)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
    assert np.all(np.isfinite(out))
    assert out[0, 1, 0] == pytest.approx(-math.log(0.5 / 100.0), rel=1e-6)  # zero clipped at 0.5
    np.testing.assert_array_equal(out[1], 0.0)


def test_log_intensity_accepts_integer_counts():
    counts = np.array([[[3, 5], [7, 9]]], dtype=np.uint16)
    np.testing.assert_allclose(log_intensity(counts), -np.log(counts / 6.0), atol=2e-6)


@pytest.mark.parametrize(
    "stack, match",
    [
        (np.zeros((0, 4, 4)), "non-empty"),
        (np.ones(4), "non-empty"),
        (np.stack([np.ones((3, 3)), np.full((3, 3), np.nan)]), "view 1 .*NaN"),
        (np.stack([np.ones((3, 3)), np.ones((3, 3)), np.full((3, 3), np.inf)]), "view 2 .*NaN or infinite"),
        (np.stack([np.ones((3, 3)), np.zeros((3, 3))]), "view 1 has mean count 0"),
        (np.stack([-np.ones((3, 3))]), "view 0 has mean count -1"),
    ],
)
def test_log_intensity_rejects_bad_stacks(stack, match):
    with pytest.raises(ConfigError, match=match):
        log_intensity(stack)


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("b", [1, 2])
def test_wbp_puts_blobs_where_they_are_under_a_random_geometry(blobs, b):
    geometry, gaussians, proj = blobs
    vol = reconstruct(proj, geometry, (40 // b, 56 // b, 48 // b), voxel_size_px=b)
    assert vol.dtype == np.float32 and vol.shape == (40 // b, 56 // b, 48 // b)
    for c in gaussians.centers_px:
        assert np.linalg.norm(blob_centre(vol, c, b, 4 if b == 1 else 3) - c) < 0.1


def test_wbp_with_a_gauge_puts_specimen_point_y_at_g_inverse_y(blobs):
    # view i sees volume point X at p_i(G X), so the blob at Y lands at X = G^-1(Y)
    geometry, gaussians, proj = blobs
    vol = reconstruct(proj, geometry, (40, 56, 48), gauge=GAUGE)
    expected = GAUGE.inverse().apply(gaussians.centers_px)
    assert np.abs(expected).max() < 20  # inside the grid with room for the window
    for x in expected:
        assert np.linalg.norm(blob_centre(vol, x, 1, 4) - x) < 0.1
    # the density is that of the specimen: a blob's mass near Y without the gauge
    # equals s^3 times its mass near G^-1(Y) with it
    plain = reconstruct(proj, geometry, (40, 56, 48))
    s = GAUGE.scale
    for x, y in zip(expected, gaussians.centers_px):
        assert ball_sum(vol, x, 6.0 / s) * s**3 == pytest.approx(ball_sum(plain, y, 6.0), rel=0.02)


def test_a_view_permutation_does_not_change_the_volume(blobs):
    # angular intervals come from the sorted tilts, whatever the storage order
    geometry, _, proj = blobs
    perm = np.random.default_rng(3).permutation(geometry.n_views)
    a = reconstruct(proj, geometry, (20, 28, 24), voxel_size_px=2)
    b = reconstruct(proj[perm], geometry.select(perm), (20, 28, 24), voxel_size_px=2)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_angular_intervals():
    np.testing.assert_allclose(rec._angular_intervals(np.arange(-60, 61, 3.0)), np.deg2rad(3.0))
    tilts = np.array([10.0, -20.0, 0.0, 40.0])  # sorted: -20, 0, 10, 40
    np.testing.assert_allclose(np.rad2deg(rec._angular_intervals(tilts)), [20.0, 20.0, 15.0, 30.0])
    assert rec._angular_intervals(np.arange(-90, 90, 1.0)).sum() == pytest.approx(math.pi)


# --------------------------------------------------------------------------- amplitude


@pytest.fixture(scope="module")
def full_range_blob():
    """A smooth blob (sigma 4 px) seen every degree over the half circle."""
    geometry = Geometry.nominal(np.arange(-90, 90, 1.0), (96, 96), 8.0)
    blob = Gaussians(np.array([[2.3, -1.7, 1.2]]), [4.0], [1.0])
    return geometry, blob, project(blob, geometry)


@pytest.mark.parametrize("b", [1, 2])
def test_wbp_amplitude_matches_the_voxelised_density(full_range_blob, b):
    geometry, blob, proj = full_range_blob
    n = 48 // b
    vol = reconstruct(proj, geometry, (n, n, n), voxel_size_px=b)
    truth = np.zeros((n, n, n))
    voxelize_gaussians(truth, blob, binning=b)
    # the box of +-12 px around the blob holds 99.9 % of its mass
    box = slice(n // 2 - 12 // b, n // 2 + 12 // b)
    assert vol[box, box, box].mean() == pytest.approx(truth[box, box, box].mean(), rel=0.01)
    # the peak loses what the bilinear back-projection blurs (variance b^2/6 along u)
    assert vol.max() == pytest.approx(truth.max(), rel=0.05)
    # over the whole grid the ramp filter's small negative surround shows
    assert vol.mean() == pytest.approx(truth.mean(), rel=0.04)


def test_binned_volume_has_the_units_of_the_unbinned_one(full_range_blob):
    geometry, _, proj = full_range_blob
    fine = reconstruct(proj, geometry, (48, 48, 48))
    coarse = reconstruct(proj, geometry, (24, 24, 24), voxel_size_px=2)
    block_mean = fine.reshape(24, 2, 24, 2, 24, 2).mean(axis=(1, 3, 5))
    inner = slice(6, 18)
    assert coarse[inner, inner, inner].mean() == pytest.approx(block_mean[inner, inner, inner].mean(), rel=0.01)
    assert coarse.max() == pytest.approx(block_mean.max(), rel=0.05)


# --------------------------------------------------------------------------- sirt-like weighting


def test_sirt_like_filter_is_the_ramp_at_low_and_flat_at_high_frequency():
    npad, k0 = 256, 0.01
    ramp = rec._ramp_filter(npad, 1.0)
    k = np.fft.rfftfreq(npad)
    np.testing.assert_allclose(ramp[1:], k[1:], rtol=0.03, atol=2e-3)  # Ram-Lak: |k| away from DC
    assert 0 < ramp[0] < 0.01  # a small DC, not zero: a finite row keeps its mean
    sl10 = rec._ramp_filter(npad, 1.0, "sirt-like", iterations=10, k0=k0)
    sl40 = rec._ramp_filter(npad, 1.0, "sirt-like", iterations=40, k0=k0)
    assert np.all(sl10 <= ramp + 1e-12) and np.all(sl10 <= sl40 + 1e-12)
    low = k <= k0
    np.testing.assert_array_equal(sl10[low], ramp[low])
    # at high k, 1 - (1 - k0/k)^N -> N k0 / k: the filter flattens to about N k0
    high = k > 0.3
    np.testing.assert_allclose(sl10[high], 10 * k0, rtol=0.2)
    np.testing.assert_allclose(rec._sirt_like_factor(np.array([0.5]), 10**6, k0), 1.0)
    # spacing: the response is per specimen pixel
    np.testing.assert_allclose(rec._ramp_filter(npad, 2.0), ramp / 2.0)


def test_sirt_like_wbp_mimics_sirt():
    geometry = Geometry.nominal(np.arange(-90, 90, 2.0), (96, 96), 8.0)
    blob = Gaussians(np.array([[2.3, -1.7, 1.2]]), [1.5], [1.0])
    proj = project(blob, geometry)
    shape = (48, 48, 48)
    for n_iter in (5, 10):
        sirt = reconstruct(proj, geometry, shape, method="sirt", iterations=n_iter)
        fake = reconstruct(proj, geometry, shape, weighting="sirt-like", sirt_like_iterations=n_iter)
        assert fake.max() == pytest.approx(sirt.max(), rel=0.05)
        assert np.corrcoef(fake.ravel(), sirt.ravel())[0, 1] > 0.99
    ramp = reconstruct(proj, geometry, shape)
    assert fake.max() < 0.6 * ramp.max()  # the mimicked SIRT is much smoother than the ramp
    assert fake.sum() == pytest.approx(ramp.sum(), rel=0.02)  # and keeps the mass


# --------------------------------------------------------------------------- projector pair


@pytest.mark.parametrize("gauge", [None, GAUGE], ids=["rows-fixed", "general"])
@pytest.mark.parametrize("b", [1, 1.5])
def test_projector_and_back_projector_are_adjoint(blobs, gauge, b):
    geometry, _, proj = blobs
    shape = (14, 20, 18)
    setup = rec._setup(proj, geometry, shape, b, gauge)
    assert setup.frame.rows_fixed == (gauge is None)
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.standard_normal((geometry.n_views,) + setup.frame.shape).astype(np.float32)
    w = rng.uniform(0.5, 2.0, geometry.n_views)
    ax = np.zeros_like(y)
    rec._project(x, setup.frame, w, ax)
    aty = np.zeros_like(x)
    rec._backproject(y, setup.frame, w, aty)
    lhs = np.dot(ax.ravel().astype(float), y.ravel())
    rhs = np.dot(x.ravel().astype(float), aty.ravel())
    assert abs(lhs - rhs) < 1e-5 * abs(lhs)


@pytest.mark.parametrize("gauge", [None, GAUGE], ids=["rows-fixed", "general"])
def test_compiled_back_projector_agrees_with_the_reference(blobs, gauge):
    geometry, _, proj = blobs
    shape = (12, 18, 16)
    setup = rec._setup(proj, geometry, shape, 2, gauge)
    img = np.random.default_rng(2).standard_normal((geometry.n_views,) + setup.frame.shape).astype(np.float32)
    w = np.linspace(0.5, 1.5, geometry.n_views)
    fast = np.zeros(shape, dtype=np.float32)
    rec._backproject(img, setup.frame, w, fast)
    ref = rec._reference_backproject(img, setup.frame, w, shape)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_reconstruct_agrees_with_the_reference_wbp(blobs):
    geometry, _, proj = blobs
    shape = (10, 28, 24)
    fast = reconstruct(proj, geometry, shape, voxel_size_px=2)
    ref = rec._reference_wbp(proj, geometry, shape, voxel_size_px=2)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# --------------------------------------------------------------------------- SIRT


def test_sirt_residual_falls_every_iteration_and_beats_wbp():
    rng = np.random.default_rng(5)
    geometry = random_geometry(rng, 21, shape=(120, 128), shift=30.0, max_tilt=60.0)
    centres = np.column_stack([rng.uniform(-8, 8, 4), BLOB_Y, rng.uniform(-6, 6, 4)])
    proj = project(Gaussians(centres, np.full(4, 2.0), np.ones(4)), geometry)
    shape = (32, 48, 40)
    vol, history = rec._sirt(rec._setup(proj, geometry, shape, 1, None), 15)
    assert len(history) == 15
    assert np.all(np.diff(history) < 0)
    assert history[-1] < 0.05 * history[0]
    np.testing.assert_array_equal(vol, reconstruct(proj, geometry, shape, method="sirt", iterations=15))
    wbp = reconstruct(proj, geometry, shape)
    err_sirt = np.sqrt(np.mean((reproject(vol, geometry) - proj) ** 2))
    err_wbp = np.sqrt(np.mean((reproject(wbp, geometry) - proj) ** 2))
    assert err_sirt < 0.5 * err_wbp


# --------------------------------------------------------------------------- reproject


@pytest.mark.parametrize("gauge", [None, GAUGE], ids=["no-gauge", "gauge"])
@pytest.mark.parametrize("b, sigma, tol", [(1, 3.0, 0.03), (2, 4.0, 0.05)])
def test_reproject_matches_the_analytic_projector(gauge, b, sigma, tol):
    rng = np.random.default_rng(9)
    geometry = random_geometry(rng, 9, shape=(120, 128), shift=30.0, max_tilt=60.0)
    centres = np.column_stack([rng.uniform(-8, 8, 4), BLOB_Y, rng.uniform(-6, 6, 4)])
    specimen = Gaussians(centres, np.full(4, sigma), np.ones(4))
    expected = project(specimen, geometry)
    # the volume holds the specimen in the gauge frame: density at X is that at G X
    if gauge is None:
        in_volume = specimen
    else:
        in_volume = Gaussians(gauge.inverse().apply(centres), np.full(4, sigma / gauge.scale), np.ones(4))
    vol = np.zeros((40 // b, 56 // b, 48 // b), dtype=np.float32)
    voxelize_gaussians(vol, in_volume, binning=b)
    got = reproject(vol, geometry, voxel_size_px=b, gauge=gauge)
    assert got.shape == expected.shape and got.dtype == np.float32
    # the splat and the voxels blur a little (variance ~ b^2/4): a few % RMS, mass kept
    assert np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected**2)) < tol
    assert got.sum() == pytest.approx(expected.sum(), rel=0.005)
    subset = reproject(vol, geometry, voxel_size_px=b, gauge=gauge, views=[4, 0])
    np.testing.assert_allclose(subset, got[[4, 0]], rtol=0, atol=1e-6 * np.abs(got).max())


# --------------------------------------------------------------------------- simulated data


def test_true_geometry_reconstructs_the_tiny_phantom(tiny_series):
    stack = log_intensity(tiny_series.stack)
    phantom = tiny_series.phantom(binning=2)
    vol = reconstruct(stack, tiny_series.geometry, phantom.shape, voxel_size_px=2)
    corr = np.corrcoef(vol.ravel(), phantom.ravel())[0, 1]
    g = tiny_series.geometry
    nominal = Geometry.nominal(tiny_series.scheme.tilt_deg, g.image_shape, g.pixel_size_A, rot_deg=float(np.median(g.rot_deg)))
    wrong = reconstruct(stack, nominal, phantom.shape, voxel_size_px=2)
    corr_nominal = np.corrcoef(wrong.ravel(), phantom.ravel())[0, 1]
    assert corr > 0.6
    assert corr_nominal < 0.2


# --------------------------------------------------------------------------- threads


def test_workers_sets_and_restores_numba_threads(blobs):
    geometry, _, proj = blobs
    before = numba.get_num_threads()
    one = reconstruct(proj, geometry, (10, 14, 12), voxel_size_px=4, workers=1)
    assert numba.get_num_threads() == before
    many = reconstruct(proj, geometry, (10, 14, 12), voxel_size_px=4)
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-6 * np.abs(many).max())
    with pytest.raises(ConfigError, match="workers"):
        reconstruct(proj, geometry, (10, 14, 12), workers=0)
    assert numba.get_num_threads() == before


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small():
    geometry = Geometry.nominal(np.linspace(-60, 60, 5), (16, 20), 8.0)
    return geometry, np.zeros((5, 16, 20), dtype=np.float32)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(projections=np.zeros((4, 16, 20))), "projections: the stack has 4 views but the geometry has 5"),
        (dict(projections=np.zeros((5, 16, 21))), r"projections: views are \(16, 21\) px but geometry.image_shape is \(16, 20\)"),
        (dict(projections=np.zeros((16, 20))), r"projections: expected an \(n, h, w\) stack"),
        (dict(projections=np.zeros((5, 16, 20), dtype=complex)), "projections: expected real values"),
        (dict(geometry="nominal"), "geometry: expected a simtomo Geometry"),
        (dict(shape=(4, 4)), "shape: expected three positive integers"),
        (dict(shape=(4, 0, 4)), "shape: expected three positive integers"),
        (dict(shape=(4, 4.5, 4)), "shape: expected three positive integers"),
        (dict(voxel_size_px=0), "voxel_size_px: expected a positive number"),
        (dict(voxel_size_px=float("nan")), "voxel_size_px: expected a positive number"),
        (dict(voxel_size_px="2"), "voxel_size_px: expected a positive number"),
        (dict(voxel_size_px=True), "voxel_size_px: expected a positive number"),
        (dict(method="art"), "method: expected one of 'wbp', 'sirt', got 'art'"),
        (dict(weighting="hamming"), "weighting: expected one of 'ramp', 'sirt-like', got 'hamming'"),
        (dict(sirt_like_iterations=0), "sirt_like_iterations: expected an integer >= 1"),
        (dict(iterations=2.5), "iterations: expected an integer >= 1"),
        (dict(gauge=np.eye(4)), "gauge: expected a simtomo.similarity.Similarity"),
        (dict(workers=-1), "workers: expected an integer >= 1"),
    ],
)
def test_reconstruct_rejects_bad_input(small, change, match):
    geometry, proj = small
    kwargs = dict(projections=proj, geometry=geometry, shape=(4, 8, 8))
    kwargs.update(change)
    with pytest.raises(ConfigError, match=match):
        reconstruct(kwargs.pop("projections"), kwargs.pop("geometry"), kwargs.pop("shape"), **kwargs)


def test_reconstruct_rejects_non_finite_values_naming_the_view(small):
    geometry, proj = small
    bad = proj.copy()
    bad[3, 2, 2] = np.inf
    with pytest.raises(ConfigError, match="projections: view 3 contains NaN or infinite"):
        reconstruct(bad, geometry, (4, 8, 8))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(volume=np.zeros((8, 8))), r"volume: expected a non-empty \(nz, ny, nx\) array"),
        (dict(volume=np.full((4, 8, 8), np.nan)), "volume: contains NaN or infinite"),
        (dict(views=[0, 5]), r"views: expected a list of view indices in \[0, 5\)"),
        (dict(views=[1.0]), "views: expected a list of view indices"),
        (dict(voxel_size_px=-2), "voxel_size_px: expected a positive number"),
        (dict(geometry=None), "geometry: expected a simtomo Geometry"),
        (dict(gauge="G"), "gauge: expected a simtomo.similarity.Similarity"),
    ],
)
def test_reproject_rejects_bad_input(small, change, match):
    geometry, _ = small
    kwargs = dict(volume=np.zeros((4, 8, 8), dtype=np.float32), geometry=geometry)
    kwargs.update(change)
    with pytest.raises(ConfigError, match=match):
        reproject(kwargs.pop("volume"), kwargs.pop("geometry"), **kwargs)
