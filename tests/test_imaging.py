import numpy as np
import pytest
from conftest import centroid

import simtomo
from simtomo.config import DetectorConfig, OpticsConfig, apply_overrides
from simtomo.imaging import add_noise, ctf, electron_wavelength_A, expected_counts

EMPTY = {"beads": {"count": 0}, "content": {"vesicles": 0, "actin_filaments": 0, "microtubules": 0, "proteins": 0}}


def flat_series(seed=0, **sections):
    overrides = {k: dict(v) for k, v in EMPTY.items()}
    for k, v in sections.items():
        overrides.setdefault(k, {}).update(v)
    return simtomo.simulate(apply_overrides(simtomo.preset("tiny"), overrides), seed)


def test_flat_views_have_poisson_mean_and_variance():
    series = flat_series()
    cfg = series.config
    n_px = np.prod(cfg.detector.image_shape)
    ice = series.specimen.ice_path_px(series.geometry.tilt_deg) * cfg.detector.pixel_size_A / 10.0
    expected = (
        series.scheme.dose_e_per_A2
        * (cfg.detector.pixel_size_A / series.geometry.mag) ** 2
        * np.exp(-ice / cfg.optics.ice_mean_free_path_nm)
    )
    mean = series.stack.mean(axis=(1, 2))
    var = series.stack.var(axis=(1, 2), ddof=1)
    # 5 standard errors: sd of a mean is sqrt(lam/N); of a Poisson variance about lam*sqrt(2/N)
    assert np.all(np.abs(mean - expected) < 5 * np.sqrt(expected / n_px)), np.max(np.abs(mean - expected))
    assert np.all(np.abs(var - expected) < 5 * expected * np.sqrt(2.0 / n_px) + 1)
    # pooled over all views the match is tighter still
    assert np.mean(var / expected) == pytest.approx(1.0, abs=5 * np.sqrt(2.0 / (n_px * len(mean))))
    assert series.stack.dtype == np.float32 and np.all(series.stack == np.round(series.stack))


def test_per_view_doses_sum_to_the_total():
    series = flat_series(tilt={"dose_weighting": "cos", "total_dose_e_per_A2": 80.0})
    assert series.scheme.dose_e_per_A2.sum() == pytest.approx(80.0, rel=1e-12)
    assert series.truth().dose_e_per_A2.sum() == pytest.approx(80.0, rel=1e-12)


def test_ice_attenuation_grows_as_one_over_cos_tilt():
    series = flat_series(detector={"poisson_noise": False}, misalignment={"mag_drift": 0.0})
    cfg = series.config
    t_px = cfg.specimen.thickness_nm * 10.0 / cfg.detector.pixel_size_A
    mean = series.stack.mean(axis=(1, 2)) / series.scheme.dose_e_per_A2 / cfg.detector.pixel_size_A**2
    cos = np.cos(np.deg2rad(series.geometry.tilt_deg))
    predicted = np.exp(-cfg.specimen.thickness_nm / cos / cfg.optics.ice_mean_free_path_nm)
    np.testing.assert_allclose(mean, predicted, rtol=1e-6)
    np.testing.assert_allclose(series.specimen.ice_path_px(series.geometry.tilt_deg), t_px / cos)


def test_tilted_slab_changes_the_path():
    series = flat_series(specimen={"slab_tilt_y_deg": 10.0})
    path = series.specimen.ice_path_px(np.array([-10.0, 0.0, 10.0]))
    # a slab tilted by +10 about y is seen face-on at tilt -10 (R_y(-10) undoes it)
    t = series.specimen.thickness_px
    np.testing.assert_allclose(path, [t, t / np.cos(np.deg2rad(10)), t / np.cos(np.deg2rad(20))], rtol=1e-12)


def test_electron_wavelength_at_300_kv():
    assert electron_wavelength_A(300.0) == pytest.approx(0.019687, rel=1e-4)
    assert electron_wavelength_A(200.0) == pytest.approx(0.025079, rel=1e-4)


def test_ctf_amplitude_contrast_at_zero_and_first_zero():
    optics = OpticsConfig(ctf=True, defocus_um=2.0, cs_mm=0.0, amplitude_contrast=0.1)
    shape, px = (512, 512), 2.0
    transfer = ctf(shape, px, optics)
    assert transfer[0, 0] == pytest.approx(0.1)
    # with Cs = 0 the CTF along kx is sqrt(1-A^2) sin(chi) + A cos(chi); first zero where tan(chi) = -A/sqrt(1-A^2), i.e. chi = pi - atan(A/sqrt(1-A^2))
    lam = electron_wavelength_A(300.0)
    chi0 = np.pi - np.arctan(0.1 / np.sqrt(1 - 0.01))
    k0 = np.sqrt(chi0 / (np.pi * lam * 2.0e4)) * px  # cycles per pixel
    kx = np.fft.rfftfreq(512)
    row = transfer[0]
    crossing = np.flatnonzero(np.diff(np.sign(row)) != 0)[0]
    assert kx[crossing] <= k0 <= kx[crossing + 1]
    # underfocus: positive transfer at low frequency, so protein (positive phase) darkens the image
    assert row[3] > 0.1


def test_content_exponent_is_filtered_by_exactly_the_ctf():
    """-log(N / flux) of a point of protein is 2 phi times the CTF's kernel: contrast flips where the CTF is negative."""
    shape = (64, 64)
    detector = DetectorConfig(image_shape=shape, poisson_noise=False)
    optics = OpticsConfig(ctf=True, defocus_um=1.0)
    content = np.zeros(shape)
    content[0, 0] = 1.0  # a delta: its transform is 1 everywhere
    counts = expected_counts(
        np.zeros(shape), content, dose_e_per_A2=1.0, mag=1.0, ice_path_px=0.0, phase_per_px=0.01, detector=detector, optics=optics
    )
    flux = detector.pixel_size_A**2
    transfer = np.fft.rfft2(-np.log(counts / flux)) / (2 * 0.01)
    np.testing.assert_allclose(transfer.real, ctf(shape, detector.pixel_size_A, optics), atol=1e-9)
    np.testing.assert_allclose(transfer.imag, 0.0, atol=1e-9)
    assert (ctf(shape, detector.pixel_size_A, optics) < 0).any()  # there are flipped frequencies to check


def test_magnified_view_spreads_the_dose_hand_worked():
    # 2 e/A^2 on 8 A pixels magnified 1.25x: each pixel sees (8 / 1.25)^2 = 40.96 A^2, i.e. 81.92 e
    detector = DetectorConfig(image_shape=(16, 16), poisson_noise=False)
    counts = expected_counts(
        np.zeros((16, 16)), np.zeros((16, 16)), dose_e_per_A2=2.0, mag=1.25, ice_path_px=0.0, phase_per_px=0.0,
        detector=detector, optics=OpticsConfig(),
    )
    np.testing.assert_allclose(counts, 81.92, rtol=1e-12)
    # 350 px of ice at 0.8 nm/px with a 350 nm mean free path: exp(-0.8)
    thick = expected_counts(
        np.zeros((16, 16)), np.zeros((16, 16)), dose_e_per_A2=2.0, mag=1.0, ice_path_px=350.0, phase_per_px=0.0,
        detector=detector, optics=OpticsConfig(),
    )
    np.testing.assert_allclose(thick, 128.0 * np.exp(-0.8), rtol=1e-12)


def test_motion_blur_and_mtf_keep_mass_and_centre():
    detector = DetectorConfig(image_shape=(96, 96), poisson_noise=False, mtf_sigma_px=1.0)
    gold = np.zeros((96, 96))
    yy, xx = np.mgrid[:96, :96] - 47.5
    gold += 2.0 * np.exp(-(xx**2 + yy**2) / (2 * 3.0**2))
    kwargs = dict(dose_e_per_A2=1.0, mag=1.0, ice_path_px=0.0, phase_per_px=0.0, optics=OpticsConfig())
    sharp = expected_counts(gold, np.zeros_like(gold), detector=DetectorConfig(image_shape=(96, 96), poisson_noise=False), **kwargs)
    blurred = expected_counts(gold, np.zeros_like(gold), detector=detector, motion_px=np.array([6.0, -3.0]), **kwargs)
    deficit_sharp, deficit_blur = 64.0 - sharp, 64.0 - blurred
    assert deficit_blur.sum() == pytest.approx(deficit_sharp.sum(), rel=1e-6)
    np.testing.assert_allclose(centroid(deficit_blur), centroid(deficit_sharp), atol=1e-6)
    # a uniform smear of length d adds d^2/12 to the variance along d; the MTF adds sigma^2 on each axis
    def second_moment(img, axis):
        c = np.arange(96) - 47.5
        prof = img.sum(axis=axis)
        return (prof * c**2).sum() / prof.sum()
    assert second_moment(deficit_blur, 0) - second_moment(deficit_sharp, 0) == pytest.approx(36 / 12 + 1.0, rel=0.02)
    assert second_moment(deficit_blur, 1) - second_moment(deficit_sharp, 1) == pytest.approx(9 / 12 + 1.0, rel=0.02)


def test_read_noise_adds_its_variance():
    detector = DetectorConfig(image_shape=(256, 256), read_noise_e=3.0)
    counts = np.full((256, 256), 50.0)
    image = add_noise(counts, detector, np.random.default_rng(0))
    assert image.var() == pytest.approx(50.0 + 9.0, rel=0.03)
    assert image.mean() == pytest.approx(50.0, abs=0.1)
