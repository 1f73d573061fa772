"""Fourier-shell metrics: FSC, transfer, measured wedge, resolution (simtomo.resolution)."""

import math

import numpy as np
import pytest

from simtomo.errors import ConfigError
from simtomo.geometry import Geometry, rotation_y
from simtomo.projector import project_gaussians
from simtomo.resolution import (
    ShellCurve,
    crowther_limit_A,
    fsc,
    fsc_xy,
    measured_wedge,
    predicted_transfer,
    resolution_A,
    soft_mask,
    transfer,
)
from simtomo.specimen import Gaussians
from simtomo.voxelize import voxelize_gaussians

SHAPE = (24, 40, 36)  # anisotropic, even and odd mixed below


def full_grid(shape):
    """|k| (cycles/voxel) and k vectors on the full fftn grid, computed without rfft."""
    kz, ky, kx = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij")
    return np.sqrt(kz**2 + ky**2 + kx**2), (kz, ky, kx)


def brute_shells(shape, n_shells):
    k, _ = full_grid(shape)
    shell = np.floor(k / (0.5 / n_shells)).astype(int)
    return shell, shell < n_shells


def brute_sum(shape, n_shells, values):
    shell, inside = brute_shells(shape, n_shells)
    return np.bincount(shell[inside], weights=values[inside], minlength=n_shells)


def smooth_volume(rng, shape, sigma_vox=1.5):
    """White noise low-passed by a Gaussian: a spectrum that falls across the shells."""
    k, _ = full_grid(shape)
    return np.real(np.fft.ifftn(np.fft.fftn(rng.standard_normal(shape)) * np.exp(-2 * np.pi**2 * sigma_vox**2 * k**2)))


# --------------------------------------------------------------------------- FSC


@pytest.mark.parametrize("shape", [SHAPE, (17, 30, 25), (32, 32, 32)])
def test_fsc_of_a_volume_with_itself_and_its_negative(shape):
    v = np.random.default_rng(0).standard_normal(shape)
    same = fsc(v, v)
    assert np.all(np.abs(same.values - 1.0) < 1e-12)
    assert np.all(np.abs(fsc(v, -v).values + 1.0) < 1e-12)
    # default shells: width 1 / min(shape) up to Nyquist, centres reported
    ns = max(min(shape) // 2, 16)
    assert len(same) == ns
    np.testing.assert_allclose(same.frequency_per_px, (np.arange(ns) + 0.5) * 0.5 / ns, rtol=1e-15)
    assert same.nyquist_per_px == 0.5


@pytest.mark.parametrize("shape", [SHAPE, (17, 30, 25)])
def test_fsc_equals_the_full_space_sums_and_counts_honestly(shape):
    """Half-space weighting: sums and n_voxels equal those over the full fftn grid (even and odd nx)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    b += 0.7 * a
    ns = 16
    curve = fsc(a, b, n_shells=ns)
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    s_ab = brute_sum(shape, ns, np.real(fa * np.conj(fb)))
    s_aa = brute_sum(shape, ns, np.abs(fa) ** 2)
    s_bb = brute_sum(shape, ns, np.abs(fb) ** 2)
    np.testing.assert_allclose(curve.values, s_ab / np.sqrt(s_aa * s_bb), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(curve.n_voxels, brute_sum(shape, ns, np.ones(shape)).astype(int))


def test_fsc_of_two_noisy_copies_matches_the_snr_per_shell():
    """E[FSC] = P_signal / (P_signal + P_noise) per shell, within 4 standard errors (1 - rho^2) / sqrt(n)."""
    rng = np.random.default_rng(3)
    shape = (32, 48, 40)
    v = smooth_volume(rng, shape)
    sigma_n = 0.02  # puts the 0.5 crossing mid-range
    curve = fsc(v + rng.normal(0, sigma_n, shape), v + rng.normal(0, sigma_n, shape))
    ns = len(curve)
    p_signal = brute_sum(shape, ns, np.abs(np.fft.fftn(v)) ** 2)
    p_noise = curve.n_voxels * sigma_n**2 * v.size  # white noise: sigma^2 N per Fourier sample
    expected = p_signal / (p_signal + p_noise)
    assert expected.max() > 0.99 and expected.min() < 0.01  # the test spans the whole curve
    se = (1.0 - expected**2) / np.sqrt(curve.n_voxels)
    assert np.all(np.abs(curve.values - expected) <= 4.0 * se + 1e-9), np.abs(curve.values - expected) / se


def test_fsc_mask_multiplies_both_volumes():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    m = soft_mask(SHAPE, edge_voxels=5)
    np.testing.assert_allclose(fsc(a, b, mask=m).values, fsc(a * m, b * m).values, atol=1e-12)


def test_fsc_xy_with_zero_slab_is_the_frc_of_the_z_projections():
    rng = np.random.default_rng(5)
    a = rng.standard_normal(SHAPE)
    b = a + 2.0 * rng.standard_normal(SHAPE)
    curve = fsc_xy(a, b, kz_max=0.0, n_shells=20)
    # independent: 2-D FRC of the sums along z, on the full fft2 grid
    pa, pb = np.fft.fft2(a.sum(axis=0)), np.fft.fft2(b.sum(axis=0))
    ky, kx = np.meshgrid(np.fft.fftfreq(SHAPE[1]), np.fft.fftfreq(SHAPE[2]), indexing="ij")
    shell = np.floor(np.hypot(ky, kx) / (0.5 / 20)).astype(int)
    ok = shell < 20
    def per_shell(values):
        return np.bincount(shell[ok], values[ok], minlength=20)

    frc = per_shell(np.real(pa * np.conj(pb))) / np.sqrt(per_shell(np.abs(pa) ** 2) * per_shell(np.abs(pb) ** 2))
    np.testing.assert_allclose(curve.values, frc, atol=1e-12)
    np.testing.assert_array_equal(curve.n_voxels, np.bincount(shell[ok], minlength=20))
    # the default slab (kz = 0, +-1/nz) holds three planes' worth of samples
    default = fsc_xy(a, b, n_shells=20)
    assert default.n_voxels.sum() > 2.5 * curve.n_voxels.sum()
    assert len(fsc_xy(a, b)) == max(min(SHAPE[1:]) // 2, 16)


# --------------------------------------------------------------------------- transfer


def test_transfer_of_a_subvoxel_shift_is_the_shell_averaged_cosine():
    rng = np.random.default_rng(6)
    shape = (20, 32, 28)
    v = rng.standard_normal(shape)
    d = np.array([0.37, -0.61, 0.23])  # (z, y, x) voxels
    _, (kz, ky, kx) = full_grid(shape)
    phase = 2 * np.pi * (kz * d[0] + ky * d[1] + kx * d[2])
    shifted = np.real(np.fft.ifftn(np.fft.fftn(v) * np.exp(-1j * phase)))
    curve = transfer(shifted, v, n_shells=16)
    power = np.abs(np.fft.fftn(v)) ** 2
    expected = brute_sum(shape, 16, power * np.cos(phase)) / brute_sum(shape, 16, power)
    # shells stop below Nyquist, where the shifted volume's spectrum is exactly F exp(-i phase)
    np.testing.assert_allclose(curve.values, expected, atol=1e-12)
    assert expected[-1] < 0.5  # the shift really costs signal at high frequency


@pytest.mark.parametrize("voxel_size", [1, 2])
def test_transfer_of_a_gaussian_blur_is_the_debye_waller_envelope(voxel_size):
    rng = np.random.default_rng(7)
    shape = (32, 40, 36)
    spectrum = np.fft.fftn(rng.standard_normal(shape))
    v = np.real(np.fft.ifftn(spectrum / np.abs(spectrum)))  # flat power: every sample weighs the same
    s_vox = 1.1
    k, _ = full_grid(shape)
    mult = np.exp(-2 * np.pi**2 * s_vox**2 * k**2)
    blurred = np.real(np.fft.ifftn(np.fft.fftn(v) * mult))
    curve = transfer(blurred, v, voxel_size_px=voxel_size)
    ns = len(curve)
    shell, inside = brute_shells(shape, ns)
    counts = np.bincount(shell[inside], minlength=ns)
    mean_mult = np.bincount(shell[inside], mult[inside], minlength=ns) / counts
    np.testing.assert_allclose(curve.values, mean_mult, atol=1e-12)
    # against the theory at the shell centres (per pixel: sigma_px = s_vox * voxel size)
    predicted = predicted_transfer(curve.frequency_per_px, s_vox * voxel_size)
    spread = np.array([np.ptp(mult[inside & (shell == i)]) for i in range(ns)])
    assert np.all(np.abs(curve.values - predicted) <= 1e-3 + 0.5 * spread)
    assert curve.frequency_per_px[-1] == pytest.approx((ns - 0.5) * 0.5 / ns / voxel_size)


def test_transfer_keeps_the_scale_that_fsc_ignores():
    v = np.random.default_rng(8).standard_normal(SHAPE)
    assert np.allclose(transfer(0.3 * v, v).values, 0.3, atol=1e-12)
    assert np.allclose(fsc(0.3 * v, v).values, 1.0, atol=1e-12)


def test_predicted_transfer_numbers():
    k = np.array([0.0, 0.1, 0.25])
    np.testing.assert_allclose(predicted_transfer(k, 1.5), np.exp(-2 * np.pi**2 * 2.25 * k**2))
    assert predicted_transfer(0.1, 1.5) == pytest.approx(math.exp(-0.444132), rel=1e-5)
    with pytest.raises(ConfigError, match="sigma_px"):
        predicted_transfer(k, -1.0)


# --------------------------------------------------------------------------- measured wedge


def brute_wedge(shape, lo_deg, hi_deg, step_deg=0.01):
    """Fourier samples within a hair of some view's central plane k . d(theta) = 0, d = row 2 of R_y(theta)."""
    nz, ny, nx = shape
    kz = np.fft.fftfreq(nz)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    norm = np.hypot(kz, kx)
    best = np.full(norm.shape, np.inf)
    for beam in rotation_y(np.arange(lo_deg, hi_deg + step_deg / 2, step_deg))[:, 2, :]:
        best = np.minimum(best, np.abs(kx * beam[0] + kz * beam[2]))
    with np.errstate(invalid="ignore", divide="ignore"):
        sin_angle = np.where(norm > 0, best / norm, 0.0)
    return sin_angle, norm


@pytest.mark.parametrize("tilts", [(-60.0, 60.0), (-50.0, 35.0), (10.0, 70.0)])
def test_measured_wedge_agrees_with_the_central_planes_of_rotation_y(tilts):
    shape = (40, 6, 64)
    mask = measured_wedge(shape, np.linspace(*tilts, 7))
    assert mask.shape == (40, 6, 33) and mask.dtype == bool
    assert np.all(mask == mask[:, :1, :])  # independent of ky
    # classify away from the rim: in the wedge shrunk by 0.05 degrees, out of the wedge widened by as much
    tol = math.sin(math.radians(0.02))
    inside = brute_wedge(shape, tilts[0] + 0.05, tilts[1] - 0.05)[0] <= tol
    outside = brute_wedge(shape, tilts[0] - 0.05, tilts[1] + 0.05)[0] > tol
    assert np.all(mask[:, 0][inside]) and not np.any(mask[:, 0][outside])
    assert inside.sum() > 100 and outside.sum() > 100


def test_measured_wedge_margin_and_full_range():
    shape = (32, 4, 32)
    base = measured_wedge(shape, [-40, 40])
    wider = measured_wedge(shape, [-40, 40], margin_deg=10)
    assert np.all(wider >= base) and wider.sum() > base.sum()
    np.testing.assert_array_equal(wider, measured_wedge(shape, [-50, 50]))
    assert measured_wedge(shape, [-90, 90]).all()
    only_zero = measured_wedge(shape, [0.0])  # one view: the plane kz = 0 plus the ky axis
    kz = np.fft.fftfreq(32)
    np.testing.assert_array_equal(only_zero[:, 0, 1:], np.broadcast_to((kz == 0)[:, None], (32, 16)))


def test_measured_wedge_sign_from_projections_of_a_tilted_sheet():
    """A thin sheet tilted by alpha about y projects to a sharp line only when seen edge-on.

    The projector (DESIGN.md R_y convention) tells at which tilt that happens; the
    sheet's Fourier energy lies along its normal, which the wedge of that tilt must
    contain and the wedge of the opposite tilt must not.
    """
    alpha = 40.0
    a = math.radians(alpha)
    along = np.array([-math.sin(a), 0.0, math.cos(a)])  # in the sheet, in the xz plane
    u, v = np.meshgrid(np.arange(-14.0, 14.5, 0.7), np.arange(-14.0, 14.5, 0.7), indexing="ij")
    pts = u.reshape(-1, 1) * along + v.reshape(-1, 1) * np.array([0.0, 1.0, 0.0])
    sheet = Gaussians(pts, np.full(len(pts), 0.8), np.ones(len(pts)))
    tilts = np.arange(-60.0, 61.0, 5.0)
    geom = Geometry.nominal(tilts, (48, 48), 8.0)
    peak = [project_gaussians(sheet, geom, i).max() for i in range(len(tilts))]
    edge_on = tilts[int(np.argmax(peak))]
    assert edge_on == alpha  # sharpest line where the beam runs within the sheet

    vol = np.zeros((48, 48, 48))
    voxelize_gaussians(vol, sheet)
    power = np.abs(np.fft.rfftn(vol)) ** 2
    kz, ky, kx = np.meshgrid(np.fft.fftfreq(48), np.fft.fftfreq(48), np.fft.rfftfreq(48), indexing="ij")
    power[np.sqrt(kz**2 + ky**2 + kx**2) < 0.1] = 0  # where the finite sheet's spread is a few degrees
    share = {t: power[measured_wedge(vol.shape, [t - 5, t + 5])].sum() / power.sum() for t in (edge_on, -edge_on)}
    assert share[edge_on] > 0.7 and share[-edge_on] < 0.01, share


def test_region_restriction_ignores_noise_outside_the_wedge():
    rng = np.random.default_rng(9)
    shape = (32, 32, 32)
    v = smooth_volume(rng, shape, 1.0)
    wedge = measured_wedge(shape, np.arange(-60, 61, 3))
    noise_f = np.fft.rfftn(rng.standard_normal(shape)) * ~wedge
    noisy = v + 0.05 * np.fft.irfftn(noise_f, s=shape, axes=(0, 1, 2))
    inside = fsc(noisy, v, region=wedge)
    everywhere = fsc(noisy, v)
    np.testing.assert_allclose(inside.values, 1.0, atol=1e-10)
    assert everywhere.values[-4:].max() < 0.9
    assert np.all(inside.n_voxels[1:] < everywhere.n_voxels[1:])  # shell 0 is DC alone


# --------------------------------------------------------------------------- soft mask


def test_soft_mask_tapers_to_zero_at_the_faces():
    m = soft_mask((10, 40, 33), edge_voxels=8)
    assert m.shape == (10, 40, 33) and m.dtype == np.float32
    taper = lambda n, e: 0.5 * (1 - np.cos(np.pi * (np.minimum(np.arange(n), n - 1 - np.arange(n)) + 0.5) / e))
    # x (33 voxels): voxel i lies i + 1/2 from the face, raised cosine over 8 voxels, then flat
    x = np.where(np.arange(33) < 8, taper(33, 8), 1.0)
    x = np.minimum(x, x[::-1])
    # z (10 voxels, shorter than two tapers): the taper narrows to 5 voxels so the centre reaches ~1
    z = taper(10, 5)
    y = np.minimum(np.where(np.arange(40) < 8, taper(40, 8), 1.0), np.where(np.arange(40) < 8, taper(40, 8), 1.0)[::-1])
    np.testing.assert_allclose(m, z[:, None, None] * y[None, :, None] * x[None, None, :], atol=1e-6)
    assert m.max() == pytest.approx(0.5 * (1 - np.cos(np.pi * 4.5 / 5)), rel=1e-6)
    assert m[0, 0, 0] < 1e-3 and m.min() > 0
    assert np.all(soft_mask((4, 5, 6), edge_voxels=0) == 1.0)


# --------------------------------------------------------------------------- resolution numbers


def synthetic_curve(ns=64, counts=None):
    k = (np.arange(ns) + 0.5) * 0.5 / ns
    return k, ShellCurve(k, 1.2 - 2.5 * k, np.full(ns, 1000) if counts is None else counts)


def test_resolution_interpolates_the_crossing():
    k, curve = synthetic_curve()
    # linear curve: 1.2 - 2.5 k = 0.5 at k = 0.28 cycles/px
    assert resolution_A(curve, 8.0) == pytest.approx(8.0 / 0.28, rel=1e-12)
    assert resolution_A(curve, 8.0, threshold=0.143) == pytest.approx(8.0 / ((1.2 - 0.143) / 2.5), rel=1e-12)
    np.testing.assert_allclose(curve.frequency_per_A(8.0), k / 8.0)


def test_resolution_skips_sparse_low_shells_and_reports_limits():
    ns = 64
    k = (np.arange(ns) + 0.5) * 0.5 / ns
    vals = 1.2 - 2.5 * k
    vals[:2] = 0.1  # a noisy dip in shells with a handful of samples
    counts = np.full(ns, 1000)
    counts[:2] = 6
    curve = ShellCurve(k, vals, counts)
    assert resolution_A(curve, 8.0) == pytest.approx(8.0 / 0.28, rel=1e-12)
    assert resolution_A(curve, 8.0, min_voxels=0) == math.inf  # counted: the curve starts below
    never = ShellCurve(k, np.full(ns, 0.9), np.full(ns, 1000), nyquist_per_px=0.25)
    assert resolution_A(never, 8.0) == pytest.approx(32.0)  # Nyquist period at voxel size 2
    derived = ShellCurve(k, np.full(ns, 0.9), np.full(ns, 1000))
    assert resolution_A(derived, 8.0) == pytest.approx(16.0)


def test_resolution_of_a_computed_fsc_follows_its_voxel_size():
    rng = np.random.default_rng(10)
    shape = (32, 32, 32)
    v = smooth_volume(rng, shape)
    a, b = v + rng.normal(0, 0.02, shape), v + rng.normal(0, 0.02, shape)
    r1 = resolution_A(fsc(a, b, voxel_size_px=1), 8.0)
    r2 = resolution_A(fsc(a, b, voxel_size_px=2), 8.0)
    assert 16.0 < r1 < 80.0 and r2 == pytest.approx(2 * r1, rel=1e-12)


def test_crowther_limit_numbers():
    # 200 nm at 8 A/px = 250 px thick, 2 degree steps: 250 * 0.0349 * 8 = 69.8 A
    assert crowther_limit_A(2.0, 250.0, 8.0) == pytest.approx(69.81317, rel=1e-6)
    # pi D / N for N = 60 views over 180 degrees (3 degree steps)
    assert crowther_limit_A(3.0, 100.0, 1.0) == pytest.approx(math.pi * 100 / 60, rel=1e-12)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    v = np.zeros(SHAPE)
    with pytest.raises(ConfigError, match=r"volumes a and b.*\(24, 40, 36\).*\(24, 40, 35\)"):
        fsc(v, np.zeros((24, 40, 35)))
    with pytest.raises(ConfigError, match=r"volumes estimated and true"):
        transfer(v, np.zeros((24, 40, 35)))
    for bad in (0, -1, float("nan")):
        with pytest.raises(ConfigError, match="voxel_size_px"):
            fsc(v, v, voxel_size_px=bad)
        with pytest.raises(ConfigError, match="voxel_size_px"):
            transfer(v, v, voxel_size_px=bad)
    with pytest.raises(ConfigError, match="region"):
        fsc(v, v, region=np.ones(SHAPE, dtype=bool))
    with pytest.raises(ConfigError, match="region"):
        fsc(v, v, region=np.ones((24, 40, 19)))  # not boolean
    with pytest.raises(ConfigError, match="mask"):
        fsc(v, v, mask=np.ones((24, 40, 35)))
    with pytest.raises(ConfigError, match="n_shells"):
        fsc(v, v, n_shells=0)
    with pytest.raises(ConfigError, match="a:"):
        fsc(np.zeros((4, 4)), np.zeros((4, 4)))
    bad_v = v.copy()
    bad_v[0, 0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        fsc(bad_v, v)
    with pytest.raises(ConfigError, match="shape"):
        measured_wedge((4, 4), [0])
    with pytest.raises(ConfigError, match="tilt_deg"):
        measured_wedge(SHAPE, [])
    with pytest.raises(ConfigError, match="margin_deg"):
        measured_wedge(SHAPE, [-10, 10], margin_deg=-20)
    with pytest.raises(ConfigError, match="edge_voxels"):
        soft_mask(SHAPE, edge_voxels=-1)
    with pytest.raises(ConfigError, match="kz_max"):
        fsc_xy(v, v, kz_max=-0.1)
    with pytest.raises(ConfigError, match="pixel_size_A"):
        resolution_A(synthetic_curve()[1], 0.0)
    with pytest.raises(ConfigError, match="curve"):
        resolution_A(np.ones(4), 8.0)
    with pytest.raises(ConfigError, match="tilt_step_deg"):
        crowther_limit_A(0.0, 250, 8)
    with pytest.raises(ConfigError, match="diameter_px"):
        crowther_limit_A(2.0, -1, 8)
    with pytest.raises(ConfigError, match="equal lengths"):
        ShellCurve(np.arange(3.0), np.ones(4), np.ones(3))


# --------------------------------------------------------------------------- benchmark


@pytest.mark.benchmark
def test_benchmark_fsc_large(benchmark):
    rng = np.random.default_rng(0)
    shape = (128, 512, 512)
    a = rng.standard_normal(shape, dtype=np.float32)
    b = a + rng.standard_normal(shape, dtype=np.float32)
    region = measured_wedge(shape, np.arange(-60, 61, 2))
    mask = soft_mask(shape)
    curve = benchmark(fsc, a, b, region=region, mask=mask)
    # white signal and noise of equal power: FSC = 1/sqrt(2) within 4 standard errors (1 - rho^2) / sqrt(n)
    assert np.all(np.abs(curve.values[1:] - 0.5**0.5) < 4 * 0.5 / np.sqrt(curve.n_voxels[1:]))
