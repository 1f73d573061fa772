"""Along-axis shifts from the tilt-axis profile (aligners/axisprofile.py)."""

from __future__ import annotations

import numpy as np
import pytest

import simtomo
from aligners.axisprofile import along_axis_shifts, apply_along_axis_shifts
from aligners.coarse import binned_line_integrals
from simtomo.alignment_error import alignment_error
from simtomo.config import apply_overrides, preset
from simtomo.errors import ConfigError
from simtomo.geometry import rotation_2d

# The standard workload's content density on 384 px, 41 views, 100 nm.
_SMALL = {
    "detector": {"image_shape": [384, 384]},
    "tilt": {"step_deg": 3.0},
    "specimen": {"thickness_nm": 100.0},
    "content": {"proteins": 1200, "vesicles": 4, "actin_filaments": 4, "microtubules": 1},
    # stage errors scaled to the field, so the band stays inside every view
    "misalignment": {"initial_offset_nm": 16.0, "shift_walk_nm": 6.0, "backlash_nm": 12.0},
}


@pytest.fixture(scope="module")
def small():
    series = simtomo.simulate(apply_overrides(preset("standard-nobeads"), _SMALL), seed=1)
    return series, binned_line_integrals(series.observation().stack, 1).images


def _along_axis_pattern(tilt_deg: np.ndarray) -> np.ndarray:
    """A smooth along-axis error of the kind cumulated coarse alignment leaves: ~4 px at the ends."""
    th = np.deg2rad(tilt_deg)
    pattern = 4.0 * np.sin(th) + 3.0 * th**2
    return pattern - pattern.mean()


def test_apply_moves_every_projection_along_the_tilt_axis(small):
    series, _ = small
    g = series.geometry
    s = np.linspace(-2.0, 3.0, g.n_views)
    moved = apply_along_axis_shifts(g, s)
    pts = np.array([[10.0, -20.0, 5.0], [-40.0, 30.0, -12.0]])
    axis = rotation_2d(g.rot_deg) @ np.array([0.0, 1.0])  # unit tilt-axis direction per view
    expected = g.project(pts) + (s * g.mag)[:, None, None] * axis[:, None, :]
    np.testing.assert_allclose(moved.project(pts), expected, atol=1e-9)


def test_true_geometry_measures_no_shift(small):
    series, images = small
    result = along_axis_shifts(images, 1, series.geometry, degree=None)
    assert result.used.all()
    # measured on 384 px views: noise and the band edges' depth content
    assert np.sqrt(np.nanmean(result.measured_px**2)) < 0.35
    assert np.median(result.correlation) > 0.6


def test_recovers_a_smooth_along_axis_error(small):
    series, images = small
    true = series.geometry
    wrong = apply_along_axis_shifts(true, -_along_axis_pattern(true.tilt_deg))
    thickness = series.config.specimen.thickness_nm * 10 / series.config.detector.pixel_size_A
    before = alignment_error(wrong, true, thickness_px=thickness).rms_px
    result = along_axis_shifts(images, 1, wrong)
    fixed = apply_along_axis_shifts(wrong, result.shift_px)
    after = alignment_error(fixed, true, thickness_px=thickness).rms_px
    assert before > 2.0
    assert after < 0.2
    residual = result.shift_px - _along_axis_pattern(true.tilt_deg)
    assert np.sqrt(np.mean((residual - residual.mean()) ** 2)) < 0.2


def test_pure_noise_gives_no_correction():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((21, 128, 128)).astype(np.float32)
    g = simtomo.Geometry.nominal(np.linspace(-60, 60, 21), (128, 128), 8.0)
    result = along_axis_shifts(images, 1, g)
    assert not result.used.any()
    assert np.all(result.shift_px == 0)


def test_bad_fractions_are_named(small):
    series, images = small
    with pytest.raises(ConfigError, match="strip_fraction"):
        along_axis_shifts(images, 1, series.geometry, strip_fraction=0.8)
    with pytest.raises(ConfigError, match="too short"):
        along_axis_shifts(images[:, :40], 1, series.geometry.replace(image_shape=(40, 384)))
