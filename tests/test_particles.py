"""Particle refinement (aligners/particles.py): blob detection, peak measurement, the refinement, failure on noise."""

from __future__ import annotations

import numpy as np
import pytest

from aligners.coarse import binned_line_integrals
from aligners.particles import (
    ParticleOptions,
    blob_filter,
    detect_particles,
    measure_particles,
    refine_by_particles,
    view_offsets,
)
from simtomo.alignment_error import alignment_error
from simtomo.errors import AlignmentError, ConfigError
from simtomo.score import thickness_px


def _gaussian_image(shape: tuple[int, ...], centres: np.ndarray, sigma: float) -> np.ndarray:
    """Unit-peak Gaussian blobs at ``centres`` (array index order), summed on a grid of ``shape``."""
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    out = np.zeros(shape)
    for c in centres:
        r2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        out += np.exp(-r2 / (2 * sigma**2))
    return out


def test_detect_particles_finds_every_blob_first():
    rng = np.random.default_rng(0)
    shape = (24, 64, 64)
    # blobs on a jittered lattice, well apart, inside the kept region
    zyx = np.array([(z, y, x) for z in (8.0, 15.0) for y in (14.0, 26.0, 38.0, 50.0) for x in (14.0, 32.0, 50.0)])
    zyx += rng.uniform(-0.4, 0.4, zyx.shape)
    vol = _gaussian_image(shape, zyx, 1.5) + rng.normal(0, 0.02, shape)
    found = detect_particles(vol, sigma_px=1.5, count=len(zyx), half_depth=10.0, half_width=(28.0, 28.0))
    # centred (x, y, z) voxels back to array indices
    idx = found[:, ::-1] + (np.array(shape) - 1) / 2.0
    assert len(found) == len(zyx)
    dist = np.linalg.norm(zyx[:, None, :] - idx[None, :, :], axis=-1)
    # every blob has its own detection at the voxel nearest its centre
    assert np.all(dist.min(axis=1) <= 0.75), dist.min(axis=1)
    assert len(set(dist.argmin(axis=1))) == len(zyx)


def test_detect_particles_keeps_only_the_slab_and_the_strongest():
    shape = (40, 48, 48)
    zyx = np.array([[19.5, 23.5, 23.5], [19.5, 23.5, 10.0], [3.0, 23.5, 35.0]])
    vol = _gaussian_image(shape, zyx, 1.5)
    vol += 2.0 * _gaussian_image(shape, zyx[1:2], 1.5)  # the second blob is three times as strong
    found = detect_particles(vol, sigma_px=1.5, count=1, half_depth=10.0, half_width=(20.0, 20.0))
    np.testing.assert_allclose(found[0], [10.0 - 23.5, 0.0, 0.0], atol=0.51)
    # the blob at depth 3 (16.5 voxels off centre) lies outside a 10-voxel half-depth
    found = detect_particles(vol, sigma_px=1.5, count=5, half_depth=10.0, half_width=(20.0, 20.0))
    assert len(found) == 2


def test_measure_particles_is_subpixel_and_refuses_an_empty_box():
    rng = np.random.default_rng(1)
    h, w = 96, 128
    # blobs far apart: a 12-point jittered grid
    xy = np.array([[x, y] for x in (-45.0, -15.0, 15.0, 45.0) for y in (-28.0, 0.0, 28.0)]) + rng.uniform(-2, 2, (12, 2))
    rc = np.column_stack([xy[:, 1] + (h - 1) / 2.0, xy[:, 0] + (w - 1) / 2.0])
    view = blob_filter(_gaussian_image((h, w), rc, 1.5), 1.5)[None]
    predicted = xy[None] + rng.uniform(-2.0, 2.0, (1, 12, 2))
    found, heights = measure_particles(view, predicted, 3)
    assert np.all(np.isfinite(found))
    np.testing.assert_allclose(found[0], xy, atol=0.05)
    assert np.all(heights > 0)
    # a box 8 px from every blob has its maximum on its border: no measurement
    far, far_heights = measure_particles(view, xy[None] + np.array([8.0, 0.0]), 3)
    assert np.all(np.isnan(far)) and np.all(np.isnan(far_heights))
    # a view where every prediction falls outside (a high-tilt view of a small field) measures nothing
    outside, _ = measure_particles(np.concatenate([view, view]), np.stack([xy, xy + 500.0]), 3)
    assert np.all(np.isfinite(outside[0])) and np.all(np.isnan(outside[1]))


def test_view_offsets_find_a_view_far_off_and_nothing_in_noise():
    rng = np.random.default_rng(3)
    h, w = 128, 160
    xy = np.column_stack([rng.uniform(-70, 70, 60), rng.uniform(-55, 55, 60)])
    rc = np.column_stack([xy[:, 1] + (h - 1) / 2.0, xy[:, 0] + (w - 1) / 2.0])
    view = blob_filter(_gaussian_image((h, w), rc, 1.5) + rng.normal(0, 0.05, (h, w)), 1.5)
    noise = blob_filter(rng.normal(0, 1.0, (h, w)), 1.5)
    # the model puts every particle 7 px left of and 4 px below where the view has it
    predicted = np.stack([xy - np.array([7.0, -4.0])] * 2)
    offsets, significance = view_offsets(np.stack([view, noise]), predicted, 1.5, 12)
    np.testing.assert_array_equal(offsets[0], [7.0, -4.0])
    assert significance[0] > 8.0
    np.testing.assert_array_equal(offsets[1], [0.0, 0.0])
    assert significance[1] < 8.0


def _line_integrals(series, binning: int) -> np.ndarray:
    images = binned_line_integrals(series.observation().stack, binning).images
    lo, hi = np.percentile(images, [0.5, 99.5])
    return np.clip(images, lo, hi)


def _smoothly_wrong(truth):
    """The truth with errors like those projection matching leaves: smooth in tilt, a few px, a 0.3 degree axis error."""
    u = np.deg2rad(truth.tilt_deg) / np.deg2rad(60.0)
    shift = truth.shift_px + np.column_stack([3.0 * u**2 - 1.0, 2.0 * u**3])
    return truth.replace(shift_px=shift, rot_deg=truth.rot_deg + 0.3 + 0.4 * u**2, mag=truth.mag * (1 + 0.005 * u))


def test_particles_recover_smooth_errors(standard_nobeads_series):
    """From smooth errors of 1.8 px on the standard workload, two rounds reach a fraction of a pixel.

    Measured (seed 0, binning 2, default options): start 1.81 px; the three passes of the first round
    0.67/0.40/0.31 px, of the second (particles detected again) 0.24/0.24/0.24 px; 25 s.
    """
    series = standard_nobeads_series
    truth = series.geometry
    thick = thickness_px(series.truth())
    start = _smoothly_wrong(truth)
    e_start = alignment_error(start, truth, thickness_px=thick).rms_px
    passes = refine_by_particles(_line_integrals(series, 2), 2, start, thick,
                                 acquisition_order=series.observation().acquisition_order,
                                 nominal_tilt_deg=series.observation().tilt_deg)
    assert [p.round for p in passes] == [1, 1, 1, 2, 2, 2]
    e_end = alignment_error(passes[-1].geometry, truth, thickness_px=thick).rms_px
    assert e_start > 1.5
    assert e_end < 0.3, (e_start, e_end)


def test_particles_refuse_pure_noise(standard_nobeads_series):
    """Blob peaks in noise are as high as the best of the search box, 1.6-2.1 noise sd: no particle is significant."""
    truth = standard_nobeads_series.geometry
    noise = np.random.default_rng(2).normal(0.0, 1.0, (truth.n_views, 256, 256)).astype(np.float32)
    with pytest.raises(AlignmentError, match="correlation too low"):
        refine_by_particles(noise, 4, truth, 250.0, options=ParticleOptions(count=400, sigma_px=1.0))


def test_particles_name_a_stack_that_does_not_fit_the_geometry(standard_nobeads_series):
    truth = standard_nobeads_series.geometry
    with pytest.raises(ConfigError, match="expected 61 views"):
        refine_by_particles(np.zeros((60, 64, 64), np.float32), 16, truth, 250.0)
    with pytest.raises(ConfigError, match="thickness_px"):
        refine_by_particles(np.zeros((61, 64, 64), np.float32), 16, truth, 0.0)


@pytest.mark.parametrize("key, value", [("count", 0), ("search_px", 1), ("sigma_px", -1.0), ("rounds", 0),
                                        ("min_significance", float("nan")), ("z_margin", 1.0),
                                        ("max_rounds", 1), ("capture_px", 0.0), ("tolerance_px", -0.1)])
def test_particle_options_name_the_bad_field(key, value):
    with pytest.raises(ConfigError, match=f"particles.{key}"):
        ParticleOptions(**{key: value})
