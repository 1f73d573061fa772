"""Tests of the shared image operations, the coarse alignment, the tilt-axis search and the xcorr aligner.

The standard-nobeads figures asserted here were measured (seed 0) as: tilt axis
from a start 3 degrees off, 85.07 deg against a true mean of 85.30 (error
0.23 deg); alignment error of the xcorr geometry 2.15 px RMS, worst view 4.54 px
(the floor of a shifts-only model, i.e. the true shifts with nominal tilts,
magnification and one tilt axis, is 1.92 px RMS / 4.4 px).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import centroid

import simtomo
from aligners import imageops
from aligners.coarse import BinnedStack, binned_line_integrals, coarse_align, find_tilt_axis
from aligners.xcorr import XcorrAligner, XcorrParams
from simtomo.alignment_error import alignment_error
from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry, pixel_coordinates, rotation_2d
from simtomo.imaging import log_intensity
from simtomo.observation import Observation
from simtomo.projector import project_gaussians
from simtomo.registry import _param_help
from simtomo.specimen import Gaussians
from simtomo.transforms import view_to_aligned


def gaussian_image(shape, centre, sigma):
    x, y = pixel_coordinates(shape)
    return np.exp(-((x[None, :] - centre[0]) ** 2 + (y[:, None] - centre[1]) ** 2) / (2 * sigma**2))


def texture(shape, seed=0, lowpass=0.2):
    """A band-limited random texture (periodic, so Fourier shifts of it are exact)."""
    rng = np.random.default_rng(seed)
    return imageops.bandpass(rng.standard_normal(shape), lowpass=lowpass, highpass=0.01).astype(float)


# --------------------------------------------------------------------------- #
# imageops
# --------------------------------------------------------------------------- #


def test_log_intensity_follows_the_definition():
    rng = np.random.default_rng(0)
    counts = rng.uniform(0.0, 200.0, (3, 16, 20)).astype(np.float32)
    counts[0, 0, :5] = [0.0, 0.1, 0.49, 0.5, 0.51]
    out = log_intensity(counts)
    assert out.dtype == np.float32 and out.shape == counts.shape
    expected = -np.log(np.maximum(counts.astype(float), 0.5) / counts.mean(axis=(1, 2), keepdims=True))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # clipped at 0.5 counts: the first four pixels of view 0 share one value
    assert np.ptp(out[0, 0, :4]) == 0


@pytest.mark.parametrize(
    "bad, words",
    [
        (lambda s: s.__setitem__((2, 3, 3), np.nan), ["view 2", "NaN"]),
        (lambda s: s.__setitem__(1, 0.0), ["view 1", "mean"]),
    ],
)
def test_log_intensity_names_the_bad_view(bad, words):
    stack = np.full((3, 8, 8), 50.0)
    bad(stack)
    with pytest.raises(ConfigError) as err:
        log_intensity(stack)
    assert all(w in str(err.value) for w in words)
    with pytest.raises(ConfigError, match="non-empty"):
        log_intensity(np.zeros((0, 8, 8)))
    # converted view by view, a binned stack still names the series' view
    series = np.full((6, 16, 16), 50.0)
    series[4, 2, 2] = np.inf
    with pytest.raises(ConfigError, match="view 4 "):
        binned_line_integrals(series, 2)


@pytest.mark.parametrize("shape", [(64, 64), (65, 66), (67, 61)])
@pytest.mark.parametrize("factor", [2, 3])
def test_fourier_bin_keeps_centred_coordinates_and_mean(shape, factor):
    centre = (5.3, -7.1)
    image = gaussian_image(shape, centre, 4.0)
    binned = imageops.fourier_bin(image + 0.25, factor)
    assert binned.shape == (shape[0] // factor, shape[1] // factor)
    # content at x lands at x / factor: no half-pixel shift of the centred frame
    np.testing.assert_allclose(centroid(binned - 0.25) * factor, centre, atol=0.01)
    assert abs(binned.mean() - (image + 0.25).mean()) < 2e-3


def test_bandpass_filter_values():
    shape = (64, 64)
    k = imageops.frequency_radius(shape)
    f = imageops.bandpass_filter(shape, lowpass=0.2, lowpass_rolloff=0.05, highpass=0.05)
    assert f[0, 0] == 0.0  # the mean is removed
    on_sigma = np.isclose(k, 0.05)
    np.testing.assert_allclose(f[on_sigma], 1 - np.exp(-0.5), atol=1e-6)
    above = np.isclose(k, 0.3)
    np.testing.assert_allclose(f[above], np.exp(-(0.1**2) / (2 * 0.05**2)), atol=1e-6)
    with pytest.raises(ConfigError, match="lowpass"):
        imageops.bandpass_filter(shape, lowpass=0.7)


def test_taper_window_and_edge_taper():
    win = imageops.taper_window((40, 50), 8)
    assert win[0].max() == 0 and win[:, -1].max() == 0
    assert np.all(win[8:-8, 8:-8] == 1)
    image = np.random.default_rng(1).normal(3.0, 1.0, (40, 50))
    tapered = imageops.edge_taper(image, 8)
    np.testing.assert_allclose(tapered[0], image.mean(), atol=1e-5)
    np.testing.assert_allclose(tapered[10:-10, 10:-10], image[10:-10, 10:-10], atol=1e-5)


def test_affine_resample_is_view_to_aligned_with_a_free_linear_part():
    rng = np.random.default_rng(2)
    image = rng.standard_normal((96, 80))
    for rot, shift, out_shape in ((37.0, (3.2, -4.1), (90, 100)), (90.0, (0.0, 0.0), (80, 96))):
        g = Geometry.nominal(np.zeros(1), (96, 80), 8.0, rot_deg=rot).replace(shift_px=[shift])
        expected = view_to_aligned(image, g, 0, output_shape=out_shape, order=1)
        got = imageops.affine_resample(image, g.inplane_matrices()[0], g.shift_px[0], out_shape, order=1)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cross_correlate_recovers_subpixel_shifts():
    rng = np.random.default_rng(3)
    tex = texture((256, 256))
    errors = []
    for _ in range(20):
        d = rng.uniform(-10, 10, 2)
        moved = imageops.fourier_shift(tex, d)  # moved(p) = tex(p - d)
        c = imageops.cross_correlate(imageops.edge_taper(tex, 20), imageops.edge_taper(moved, 20), max_shift=32)
        errors.append(c.shift - d)
        assert c.peak > 0.8 and c.significance > 50
    # measured: 0.007 px at most; the upsampled-DFT refinement has no pull toward pixel centres
    assert np.abs(errors).max() < 0.02


def test_dft_refinement_beats_the_parabola_on_a_sharp_peak():
    rng = np.random.default_rng(4)
    white = rng.standard_normal((128, 128))
    d = np.array([2.3, -1.45])
    moved = imageops.fourier_shift(white, d)
    dft = imageops.cross_correlate(white, moved, max_shift=16).shift
    parabola = imageops.cross_correlate(white, moved, max_shift=16, subpixel="parabolic").shift
    assert np.abs(dft - d).max() < 0.01
    assert np.abs(parabola - d).max() > 0.03  # the parabola's bias on a one-pixel peak


def test_correlate_stack_batches_and_tells_noise_from_signal():
    rng = np.random.default_rng(5)
    shifts = rng.uniform(-6, 6, (6, 2))
    textures = [texture((192, 192), seed=s) for s in range(6)]
    # crops of a texture and of its shifted copy, tapered as the aligners taper them
    a = np.stack([imageops.edge_taper(t[32:160, 32:160], 16) for t in textures])
    b = np.stack([imageops.edge_taper(imageops.fourier_shift(t, d)[32:160, 32:160], 16) for t, d in zip(textures, shifts)])
    res = imageops.correlate_stack(a, b, max_shift=12)
    assert res.valid.all()
    assert np.abs(res.shift - shifts).max() < 0.02
    assert res.significance.min() > 20
    assert np.all(res.curvature[:, 0] < 0) and np.all(res.curvature[:, 2] < 0)
    # unfiltered, the energy is the sum of squares of the mean-free image
    raw = imageops.correlate_stack(a[:2], b[:2], max_shift=12)
    np.testing.assert_allclose(raw.energy[:, 0], ((a[:2] - a[:2].mean(axis=(1, 2), keepdims=True)) ** 2).sum(axis=(1, 2)), rtol=1e-4)
    noise = imageops.correlate_stack(rng.standard_normal((50, 64, 64)), rng.standard_normal((50, 64, 64)), max_shift=12)
    assert noise.significance.max() < 8  # the threshold the aligners use
    flat = imageops.correlate_stack(np.ones((1, 32, 32)), a[:1, 40:72, 40:72], max_shift=4)
    assert not flat.valid[0] and np.isnan(flat.shift[0]).all()


def test_spectral_anisotropy_separates_lines_from_blobs():
    x, y = pixel_coordinates((64, 64))
    line = np.exp(-((y[:, None] - 0.4 * x[None, :]) ** 2) / 4.0)
    rng = np.random.default_rng(6)
    blobs = sum(gaussian_image((64, 64), rng.uniform(-25, 25, 2), 2.0) for _ in range(30))
    window = imageops.taper_window((64, 64), 16)
    aniso = imageops.spectral_anisotropy(np.stack([(line - line.mean()) * window, (blobs - blobs.mean()) * window]), highpass=0.02)
    assert aniso[0] > 0.8 and aniso[1] < 0.3


def test_extract_patches_copies_and_checks_bounds():
    image = np.arange(100.0).reshape(10, 10)
    patches = imageops.extract_patches(image, [[0, 0], [3, 4]], 3)
    np.testing.assert_array_equal(patches[1], image[3:6, 4:7])
    with pytest.raises(ConfigError, match="outside"):
        imageops.extract_patches(image, [[8, 8]], 3)


# --------------------------------------------------------------------------- #
# coarse alignment on a synthetic thin specimen: the stretch model is exact
# --------------------------------------------------------------------------- #


def thin_series(seed=0, side=256, phi=70.0, tilts=np.arange(-30.0, 31.0, 5.0)):
    """Counts of a flat layer of Gaussian blobs (z = 0) under a known geometry with random shifts."""
    rng = np.random.default_rng(seed)
    n, m = len(tilts), 2000
    centres = np.c_[rng.uniform(-1.2 * side, 1.2 * side, (m, 2)), np.zeros(m)]
    blobs = Gaussians(centres, rng.uniform(1.5, 3.0, m), rng.uniform(0.5, 1.0, m))
    geometry = Geometry(
        tilt_deg=tilts, rot_deg=np.full(n, phi), mag=np.ones(n), shift_px=rng.uniform(-8, 8, (n, 2)),
        image_shape=(side, side), pixel_size_A=8.0,
    )
    lines = np.stack([project_gaussians(blobs, geometry, i) for i in range(n)])
    return (500.0 * np.exp(-0.05 * lines)).astype(np.float32), geometry


def gauge_fixed_shifts(geometry: Geometry, ref: int) -> np.ndarray:
    """The true shifts after the specimen translation (in the layer z = 0) that puts view ``ref`` at 0."""
    rot = rotation_2d(geometry.rot_deg[0])
    c = np.cos(np.deg2rad(geometry.tilt_deg))
    u_ref = rot.T @ geometry.shift_px[ref]
    t_x, t_y = -u_ref[0] / c[ref], -u_ref[1]
    return geometry.shift_px + np.c_[t_x * c, np.full(len(c), t_y)] @ rot.T


@pytest.mark.parametrize("local_patch_size, bound", [(48, 0.03), (0, 0.1)])
def test_coarse_align_recovers_the_shifts_of_a_thin_specimen(local_patch_size, bound):
    stack, truth = thin_series()
    result = coarse_align(stack, truth.tilt_deg, 70.0, pixel_size_A=8.0, local_patch_size=local_patch_size)
    ref = result.reference_view
    assert truth.tilt_deg[ref] == 0 and result.binning == 1
    np.testing.assert_array_equal(result.geometry.shift_px[ref], 0.0)
    # measured over six such series: at most 0.009 px with local patches (the
    # default), 0.06 px from the whole-image peaks alone
    assert np.abs(result.geometry.shift_px - gauge_fixed_shifts(truth, ref)).max() < bound
    assert result.reliable.all() and np.nanmin(result.peak_correlation) > 0.5
    assert np.isnan(result.peak_correlation[ref]) and result.neighbour[ref] == -1
    np.testing.assert_array_equal(result.geometry.tilt_deg, truth.tilt_deg)
    np.testing.assert_array_equal(result.geometry.rot_deg, 70.0)
    np.testing.assert_array_equal(result.geometry.mag, 1.0)
    # pairwise shifts chain back to the cumulated ones
    for i in range(len(truth.tilt_deg)):
        j = result.neighbour[i]
        if j >= 0:
            np.testing.assert_allclose(result.shift_pairwise[i], result.geometry.shift_px[i] - result.geometry.shift_px[j])


def test_coarse_align_does_not_depend_on_the_storage_order():
    stack, truth = thin_series(seed=1)
    perm = np.random.default_rng(0).permutation(len(truth.tilt_deg))
    sorted_ = coarse_align(stack, truth.tilt_deg, 70.0)
    shuffled = coarse_align(stack[perm], truth.tilt_deg[perm], 70.0)
    np.testing.assert_allclose(shuffled.geometry.shift_px, sorted_.geometry.shift_px[perm], atol=1e-9)


def test_coarse_align_accepts_a_binned_stack():
    stack, truth = thin_series(seed=2)
    binned = binned_line_integrals(stack, 2)
    assert isinstance(binned, BinnedStack) and binned.images.shape == (len(stack), 128, 128)
    from_binned = coarse_align(binned, truth.tilt_deg, 70.0)
    from_counts = coarse_align(stack, truth.tilt_deg, 70.0, binning=2)
    assert from_binned.binning == 2
    np.testing.assert_allclose(from_binned.geometry.shift_px, from_counts.geometry.shift_px, atol=1e-6)
    # measured 0.054 px at most over four series (0.027 binned px)
    assert np.abs(from_binned.geometry.shift_px - gauge_fixed_shifts(truth, from_binned.reference_view)).max() < 0.1


def test_bad_input_is_named():
    stack, truth = thin_series(side=64, tilts=np.array([-5.0, 0.0, 5.0]))
    with pytest.raises(ConfigError, match="tilt_deg"):
        coarse_align(stack, truth.tilt_deg[:2], 70.0)
    with pytest.raises(ConfigError, match="tilt_axis_deg"):
        coarse_align(stack, truth.tilt_deg, float("nan"))
    with pytest.raises(ConfigError, match="binning"):
        coarse_align(stack, truth.tilt_deg, 70.0, binning=0)
    with pytest.raises(ConfigError, match="reference_view"):
        coarse_align(stack, truth.tilt_deg, 70.0, reference_view=3)
    with pytest.raises(ConfigError, match="stack"):
        coarse_align(stack[0], truth.tilt_deg, 70.0)
    with pytest.raises(ConfigError, match="search_deg"):
        find_tilt_axis(stack, truth.tilt_deg, search_deg=120.0)
    with pytest.raises(ConfigError, match="binning"):
        BinnedStack(np.zeros((2, 16, 16)), 0, (32, 32))


# --------------------------------------------------------------------------- #
# pure noise: no confident wrong answer
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def noise_stack():
    """Poisson noise of a flat image: nothing to correlate."""
    rng = np.random.default_rng(7)
    return rng.poisson(60.0, (21, 256, 256)).astype(np.float32), np.arange(-30.0, 31.0, 3.0)


def test_coarse_align_refuses_pure_noise(noise_stack):
    stack, tilt = noise_stack
    with pytest.raises(AlignmentError, match="correlation too low"):
        coarse_align(stack, tilt, 85.0)
    # the peaks of unrelated views stay far below the threshold of 8 robust sd (measured max 5.4)
    probe = coarse_align(stack, tilt, 85.0, min_significance=0.0)
    assert np.nanmax(probe.significance) < 8


def test_find_tilt_axis_refuses_pure_noise(noise_stack):
    stack, tilt = noise_stack
    with pytest.raises(AlignmentError, match="correlation too low"):
        find_tilt_axis(stack, tilt, start_deg=85.0)


def test_xcorr_refuses_pure_noise(noise_stack):
    stack, tilt = noise_stack
    obs = Observation(stack=stack, tilt_deg=tilt, pixel_size_A=8.0, tilt_axis_deg=85.0)
    with pytest.raises(AlignmentError, match="correlation too low"):
        XcorrAligner().align(obs)


# --------------------------------------------------------------------------- #
# the standard-nobeads workload
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def standard_nobeads():
    return simtomo.simulate("standard-nobeads", seed=0)


def test_xcorr_on_standard_nobeads(standard_nobeads):
    series = standard_nobeads
    true_axis = float(series.geometry.rot_deg.mean())
    thickness_px = series.config.specimen.thickness_nm * 10.0 / series.config.detector.pixel_size_A
    # the microscope log 3 degrees off
    params = XcorrParams(tilt_axis_deg=true_axis + 3.0)
    result = XcorrAligner(params).align(series.observation())
    axis = result.info["tilt_axis_deg"]
    assert abs(axis - true_axis) < 0.3  # measured 0.23
    np.testing.assert_array_equal(result.geometry.rot_deg, axis)
    error = alignment_error(result.geometry, series.geometry, thickness_px=thickness_px)
    # measured 2.15 px RMS and 4.54 px in the worst view; true shifts with this
    # shifts-only model give 1.92 / 4.4 px
    assert error.rms_px < 3.0
    assert error.per_view_px.max() < 6.0
    assert result.residuals is None
    assert result.info["unreliable_views"] == []
    json.dumps(result.info, allow_nan=False)


# --------------------------------------------------------------------------- #
# the plug-in contract
# --------------------------------------------------------------------------- #


def test_xcorr_params_are_documented_frozen_defaults():
    fields = dataclasses.fields(XcorrParams)
    assert all(f.default is not dataclasses.MISSING for f in fields)
    helps = _param_help(XcorrParams)
    assert set(helps) == {f.name for f in fields}
    params = XcorrParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.lowpass = 0.1  # type: ignore[misc]
    assert XcorrAligner.name == "xcorr" and XcorrAligner.Params is XcorrParams
    assert XcorrAligner().params == params
    for bad in (dict(axis_search_deg=0.0), dict(lowpass=0.9), dict(binning=0), dict(local_patch_size=-1)):
        with pytest.raises(ConfigError):
            XcorrParams(**bad)


def test_xcorr_without_search_keeps_the_given_axis():
    stack, truth = thin_series(seed=3)
    obs = Observation(stack=stack, tilt_deg=truth.tilt_deg, pixel_size_A=8.0, tilt_axis_deg=70.0)
    result = XcorrAligner(XcorrParams(search_tilt_axis=False)).align(obs)
    assert result.info["tilt_axis_deg"] == 70.0 and result.info["tilt_axis_searched"] is False
    ref = result.info["reference_view"]
    assert np.abs(result.geometry.shift_px - gauge_fixed_shifts(truth, ref)).max() < 0.03  # measured 0.008
    assert result.geometry.pixel_size_A == 8.0
