"""3-D Gaussian bead fits (simtomo.beadfit)."""

import math

import numpy as np
import pytest
from scipy.optimize import least_squares
from scipy.special import erf

from simtomo.beadfit import FWHM_PER_SIGMA, BeadFits, _axis_terms, fit_beads
from simtomo.errors import ConfigError
from simtomo.specimen import Gaussians, solid_spheres
from simtomo.voxelize import voxelize_gaussians, voxelize_shells


def erf_blobs(shape, centres_px, sigma_px, amplitude, background, binning=1):
    """Exact voxel means of axis-aligned Gaussians (peak ``amplitude``) on a constant background.

    Written here independently of simtomo: voxel ``i`` of an axis of n voxels spans
    ``binning * (i - (n - 1) / 2 +- 1/2)`` pixels.
    """
    vol = np.full(shape, float(background))
    centres = np.atleast_2d(np.asarray(centres_px, dtype=float))
    sigmas = np.broadcast_to(np.asarray(sigma_px, dtype=float), centres.shape)
    for c, s in zip(centres, sigmas):
        factors = []
        for axis, n in zip(range(3), shape[::-1]):  # x, y, z
            edges = binning * (np.arange(n + 1) - 0.5 - (n - 1) / 2.0)
            cdf = erf((edges - c[axis]) / (math.sqrt(2) * s[axis]))
            factors.append(math.sqrt(math.pi / 2) * s[axis] * np.diff(cdf) / binning)
        fx, fy, fz = factors
        vol += amplitude * fz[:, None, None] * fy[None, :, None] * fx[None, None, :]
    return vol


def grid_positions(rng, n_side, spacing, z_levels):
    xs = (np.arange(n_side) - (n_side - 1) / 2) * spacing
    pts = np.array([[x, y, z] for x in xs for y in xs for z in z_levels], dtype=float)
    return pts + rng.uniform(-0.5, 0.5, pts.shape)  # sub-voxel positions


# --------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("binning", [1, 2])
@pytest.mark.parametrize("sigma", [1.2, 2.0])
def test_recovers_voxelized_gaussians(binning, sigma):
    """Voxel means of simtomo's voxelizer are the fit model: centre and width come back to rounding."""
    rng = np.random.default_rng(int(10 * sigma) + binning)
    pos = grid_positions(rng, 3, 20.0, [-12.0, 12.0])
    n = 72 // binning
    vol = np.full((48 // binning, n, n), 0.3)
    peak = 2.0
    voxelize_gaussians(vol, Gaussians(pos, np.full(len(pos), sigma), np.full(len(pos), peak)), binning=binning)
    start = pos + rng.uniform(-0.4, 0.4, pos.shape)  # expected positions are only approximately known
    fits = fit_beads(vol, start, voxel_size_px=binning)
    assert fits.ok.all(), fits.reason
    assert np.abs(fits.center_px - pos).max() < 1e-6
    np.testing.assert_allclose(fits.fwhm_px, FWHM_PER_SIGMA * sigma, rtol=1e-6)
    np.testing.assert_allclose(fits.amplitude, peak, rtol=1e-6)
    # the voxelizer drops the tails beyond 5 sigma (~6e-7 of the peak), the fit puts them in the background
    np.testing.assert_allclose(fits.background, 0.3, atol=1e-6)
    np.testing.assert_allclose(fits.median_fwhm_px, 2.3548200450309493 * sigma, rtol=1e-6)


@pytest.mark.parametrize("binning", [1, 2])
def test_recovers_anisotropic_widths_per_axis(binning):
    rng = np.random.default_rng(20 + binning)
    pos = grid_positions(rng, 2, 24.0, [-14.0, 14.0])  # far enough apart that no tail reaches a neighbour's box
    sigma = np.array([1.2, 1.6, 2.6])  # x, y, z: elongated in z like a missing-wedge blob
    vol = erf_blobs((64 // binning, 64 // binning, 64 // binning), pos, sigma, 1.5, -0.2, binning)
    fits = fit_beads(vol, pos, voxel_size_px=binning, diameter_px=6.0)
    assert fits.ok.all(), fits.reason
    assert np.abs(fits.center_px - pos).max() < 1e-6
    np.testing.assert_allclose(fits.fwhm_px, np.broadcast_to(FWHM_PER_SIGMA * sigma, (len(pos), 3)), rtol=1e-6)
    np.testing.assert_allclose(fits.background, -0.2, atol=1e-8)


def test_dark_beads_with_negative_polarity():
    rng = np.random.default_rng(3)
    pos = grid_positions(rng, 2, 20.0, [0.0])
    vol = erf_blobs((24, 48, 48), pos, 1.7, -0.8, 5.0)
    fits = fit_beads(vol, pos, polarity=-1)
    assert fits.ok.all(), fits.reason
    assert np.abs(fits.center_px - pos).max() < 1e-6
    np.testing.assert_allclose(fits.amplitude, -0.8, rtol=1e-6)
    np.testing.assert_allclose(fits.background, 5.0, atol=1e-8)
    # with the wrong polarity there is no bright blob to fit
    assert not fit_beads(vol, pos, polarity=+1, diameter_px=4.0).ok.any()


def test_solid_gold_spheres_fit_at_their_centres():
    """The real use: uniform spheres (10 nm gold at 8 A/px) are not Gaussians, but symmetric."""
    rng = np.random.default_rng(4)
    pos = grid_positions(rng, 2, 40.0, [-20.0, 20.0])
    vol = np.zeros((80, 96, 96))
    voxelize_shells(vol, solid_spheres(pos, np.full(len(pos), 6.25), np.full(len(pos), 1.0)))
    fits = fit_beads(vol, pos, diameter_px=12.5)
    assert fits.ok.all(), fits.reason
    assert np.abs(fits.center_px - pos).max() < 0.02  # rim voxels are 6^3 sub-sampled, not exact
    fw = fits.fwhm_px
    assert np.ptp(fw) < 0.01 * fw.mean()  # isotropic
    assert 0.6 * 12.5 < fw.mean() < 0.75 * 12.5  # a Gaussian fit to a ball of diameter D: FWHM ~ 0.67 D


# --------------------------------------------------------------------------- noise


def crlb(box_shape, p, sigma_noise):
    """Cramer-Rao bound (standard deviations) of the 8 parameters, from a finite-difference Jacobian."""

    def model(q):
        nz, ny, nx = box_shape
        cx, cy, cz, sx, sy, sz, a, b = q
        fac = []
        for c, s, n in ((cx, sx, nx), (cy, sy, ny), (cz, sz, nz)):
            e = np.arange(n + 1) - 0.5
            fac.append(math.sqrt(math.pi / 2) * s * np.diff(erf((e - c) / (math.sqrt(2) * s))))
        return (b + a * fac[2][:, None, None] * fac[1][None, :, None] * fac[0][None, None, :]).ravel()

    h = 1e-6
    jac = np.stack([(model(p + h * e) - model(p - h * e)) / (2 * h) for e in np.eye(8)], axis=1)
    return sigma_noise * np.sqrt(np.diag(np.linalg.inv(jac.T @ jac))), model


def test_noisy_fits_reach_the_cramer_rao_bound_and_agree_with_least_squares():
    rng = np.random.default_rng(5)
    sigma, amp, bg, noise = 1.5, 1.0, 0.2, 0.05
    pos = grid_positions(rng, 4, 16.0, [-10.0, 10.0])  # 32 beads
    clean = erf_blobs((40, 72, 72), pos, sigma, amp, bg)
    vol = clean + rng.normal(0, noise, clean.shape)
    fits = fit_beads(vol, pos, box_px=15)
    assert fits.ok.all(), fits.reason

    half = 7
    box_shape = (15, 15, 15)
    dims = np.array(vol.shape[::-1])
    idx = pos + (dims - 1) / 2.0
    z_errs = []
    for k in range(len(pos)):
        origin = np.rint(idx[k]).astype(int) - half
        local = idx[k] - origin
        truth = np.concatenate([local, [sigma] * 3, [amp, bg]])
        sd, model = crlb(box_shape, truth, noise)
        err_c = fits.center_px[k] - pos[k]
        err_s = fits.fwhm_px[k] / FWHM_PER_SIGMA - sigma
        assert np.all(np.abs(err_c) < 4 * sd[:3]), (k, err_c / sd[:3])
        assert np.all(np.abs(err_s) < 4 * sd[3:6]), (k, err_s / sd[3:6])
        z_errs.append(np.concatenate([err_c / sd[:3], err_s / sd[3:6]]))
        # scipy's least_squares on the same box finds the same minimum
        box = vol[origin[2] : origin[2] + 15, origin[1] : origin[1] + 15, origin[0] : origin[0] + 15].ravel()
        ref = least_squares(lambda q: model(q) - box, truth, method="lm", xtol=1e-12, ftol=1e-12, gtol=1e-12)
        mine = np.concatenate([fits.center_px[k] - pos[k] + local, fits.fwhm_px[k] / FWHM_PER_SIGMA])
        np.testing.assert_allclose(mine, ref.x[:6], atol=1e-6)
        assert fits.amplitude[k] == pytest.approx(ref.x[6], abs=1e-6)
    # efficient: normalised errors have unit RMS (192 samples: 1 +- 0.05)
    rms = float(np.sqrt(np.mean(np.square(z_errs))))
    assert 0.8 < rms < 1.2, rms


# --------------------------------------------------------------------------- edges and bad beads


def test_beads_at_the_volume_edge():
    shape = (30, 64, 64)
    pos = np.array(
        [
            [0.3, -0.4, 0.2],  # centre: fine
            [20.0, 0.0, 14.0],  # centre 0.8 voxel from the top face: too close
            [-20.0, 10.0, -11.6],  # 3 voxels from the bottom face: box clipped, still fitted
            [0.0, 40.0, 0.0],  # outside the volume altogether
        ]
    )
    vol = erf_blobs(shape, pos, 1.3, 1.0, 0.1)
    fits = fit_beads(vol, pos, diameter_px=5.0)
    np.testing.assert_array_equal(fits.ok, [True, False, True, False])
    assert "edge" in fits.reason[1] and "edge" in fits.reason[3]
    assert np.isnan(fits.center_px[1]).all() and np.isnan(fits.amplitude[3])
    np.testing.assert_allclose(fits.center_px[[0, 2]], pos[[0, 2]], atol=1e-6)
    np.testing.assert_allclose(fits.fwhm_px[[0, 2]], FWHM_PER_SIGMA * 1.3, rtol=1e-6)
    # a stricter margin rejects the clipped bead too
    strict = fit_beads(vol, pos, diameter_px=5.0, edge_margin_px=4.0)
    np.testing.assert_array_equal(strict.ok, [True, False, False, False])
    np.testing.assert_allclose(strict.median_fwhm_px, FWHM_PER_SIGMA * 1.3, rtol=1e-6)


def test_missing_bead_is_flagged_without_raising():
    rng = np.random.default_rng(6)
    pos = np.array([[-12.0, 0.0, 0.0], [12.0, 0.0, 0.0]])
    vol = erf_blobs((32, 32, 48), pos[:1], 1.5, 1.0, 0.0) + rng.normal(0, 0.01, (32, 32, 48))
    fits = fit_beads(vol, pos, diameter_px=6.0)
    assert fits.ok[0] and not fits.ok[1]
    assert fits.reason[1]
    np.testing.assert_allclose(fits.median_fwhm_px, fits.fwhm_px[0])
    assert fits.n_ok == 1


def test_automatic_box_matches_an_explicit_one():
    rng = np.random.default_rng(7)
    pos = grid_positions(rng, 3, 20.0, [0.0])
    vol = erf_blobs((40, 72, 72), pos, np.array([1.1, 1.4, 3.0]), 1.0, 0.5)
    auto = fit_beads(vol, pos)
    explicit = fit_beads(vol, pos, box_px=(11, 13, 25))
    assert auto.ok.all() and explicit.ok.all()
    np.testing.assert_allclose(auto.center_px, explicit.center_px, atol=1e-6)
    np.testing.assert_allclose(auto.fwhm_px, explicit.fwhm_px, rtol=1e-6)


def test_empty_results():
    fits = fit_beads(np.zeros((8, 8, 8)), np.zeros((0, 3)))
    assert len(fits) == 0 and np.isnan(fits.median_fwhm_px).all()
    flat = fit_beads(np.zeros((16, 16, 16)), [[0.0, 0.0, 0.0]], diameter_px=4)
    assert not flat.ok[0] and np.isnan(flat.median_fwhm_px).all()


# --------------------------------------------------------------------------- internals


def test_axis_derivatives_match_finite_differences():
    c, s, n = np.array([4.3, 5.9]), np.array([0.7, 2.2]), 11
    terms = _axis_terms(c, s, n)
    h = 1e-6
    dc = (_axis_terms(c + h, s, n)[:, 0] - _axis_terms(c - h, s, n)[:, 0]) / (2 * h)
    ds = (_axis_terms(c, s + h, n)[:, 0] - _axis_terms(c, s - h, n)[:, 0]) / (2 * h)
    np.testing.assert_allclose(terms[:, 1], dc, atol=1e-8)
    np.testing.assert_allclose(terms[:, 2], ds, atol=1e-8)
    # voxel means of a unit-peak Gaussian sum to its integral sqrt(2 pi) s
    np.testing.assert_allclose(_axis_terms(5.0, 1.0, 11)[0, 0].sum(), math.sqrt(2 * math.pi), rtol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    vol = np.zeros((8, 8, 8))
    for bad in (0, -2, float("nan")):
        with pytest.raises(ConfigError, match="voxel_size_px"):
            fit_beads(vol, [[0, 0, 0]], voxel_size_px=bad)
    with pytest.raises(ConfigError, match="positions_px"):
        fit_beads(vol, np.zeros((3, 2)))
    with pytest.raises(ConfigError, match="volume"):
        fit_beads(np.zeros((8, 8)), [[0, 0, 0]])
    with pytest.raises(ConfigError, match="polarity"):
        fit_beads(vol, [[0, 0, 0]], polarity=0)
    with pytest.raises(ConfigError, match="box_px"):
        fit_beads(vol, [[0, 0, 0]], box_px=-3)
    with pytest.raises(ConfigError, match="box_px"):
        fit_beads(vol, [[0, 0, 0]], box_px=(3, 3))
    with pytest.raises(ConfigError, match="diameter_px"):
        fit_beads(vol, [[0, 0, 0]], diameter_px=0)
    with pytest.raises(ConfigError, match="edge_margin_px"):
        fit_beads(vol, [[0, 0, 0]], edge_margin_px=-1)
    with pytest.raises(ConfigError, match="reason"):
        BeadFits(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2), np.zeros(2), np.ones(2, bool), ("",))


# --------------------------------------------------------------------------- benchmark


@pytest.mark.benchmark
@pytest.mark.parametrize("binning", [1, 4])
def test_benchmark_25_gold_beads(benchmark, binning):
    """25 gold beads of 10 nm (12.5 px) in a noisy volume, as in the `standard` workload."""
    rng = np.random.default_rng(0)
    shape = (256 // binning, 400 // binning, 400 // binning)
    vol = np.zeros(shape, np.float32)
    pos = np.stack([rng.uniform(-160, 160, 25), rng.uniform(-160, 160, 25), rng.uniform(-90, 90, 25)], axis=1)
    voxelize_shells(vol, solid_spheres(pos, np.full(25, 6.25), np.full(25, 1.0)), binning=binning)
    vol += rng.normal(0, 0.05, shape).astype(np.float32)
    fits = benchmark(fit_beads, vol, pos, voxel_size_px=binning, diameter_px=12.5)
    assert fits.ok.all()
