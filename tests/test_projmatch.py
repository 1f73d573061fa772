"""Projection matching (aligners/projmatch.py): the motion fit, the stop rule, convergence, failure on noise, accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest

import simtomo
from aligners.coarse import binned_line_integrals
from aligners.landmarks import LandmarkOptions, refine_by_landmarks
from aligners.projmatch import (
    ProjmatchAligner,
    ProjmatchParams,
    estimate_thickness,
    fit_view_motion,
    geometry_from_dict,
)
from simtomo.alignment_error import alignment_error
from simtomo.config import apply_overrides, preset
from simtomo.errors import AlignmentError, ConfigError
from simtomo.observation import Observation
from simtomo.score import thickness_px

# A small series with the standard workload's content density: 256 px, 41 views, 100 nm.
_SMALL = {
    "detector": {"image_shape": [256, 256]},
    "tilt": {"step_deg": 3.0},
    "specimen": {"thickness_nm": 100.0},
    "content": {"proteins": 600, "vesicles": 3, "actin_filaments": 3, "microtubules": 1},
    "misalignment": {"initial_offset_nm": 40.0, "shift_walk_nm": 16.0, "backlash_nm": 32.0},
}


@pytest.fixture(scope="module")
def small_series():
    return simtomo.simulate(apply_overrides(preset("standard-nobeads"), _SMALL), seed=0)


def _offset_start(geometry, px: float, seed: int):
    """The geometry with every view's shift moved ``px`` pixels in a random direction."""
    rng = np.random.default_rng(seed)
    ang = rng.uniform(0, 2 * np.pi, geometry.n_views)
    return geometry.replace(shift_px=geometry.shift_px + px * np.stack([np.cos(ang), np.sin(ang)], axis=1))


# --------------------------------------------------------------------------- motion fit


@pytest.mark.parametrize("tilt_deg", [-50.0, 35.0])
def test_fit_view_motion_recovers_small_motion(tilt_deg):
    rng = np.random.default_rng(3)
    q = rng.uniform(-100, 100, (60, 2))
    e, sigma, omega, dtheta = np.array([0.7, -0.4]), 0.004, math.radians(0.3), math.radians(0.5)
    t = math.tan(math.radians(tilt_deg))
    dq = np.stack([
        e[0] + sigma * q[:, 0] - omega * q[:, 1] - t * q[:, 0] * dtheta,
        e[1] + sigma * q[:, 1] + omega * q[:, 0],
    ], axis=1)
    dq[:3] += 25.0  # gross outliers are rejected
    fit = fit_view_motion(q, dq, tilt_deg, tilt_regularisation=0.0)
    assert np.allclose(fit.shift, e, atol=1e-6)
    assert fit.log_mag == pytest.approx(sigma, abs=1e-8)
    assert fit.rotation_rad == pytest.approx(omega, abs=1e-8)
    assert fit.tilt_rad == pytest.approx(dtheta, abs=1e-8)
    assert fit.n_used == 57


def test_fit_view_motion_shift_only():
    q = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    dq = np.array([[1.0, 2.0], [1.2, 2.0], [1.0, 2.1]])
    fit = fit_view_motion(q, dq, 10.0, refine=("shift",))
    assert fit.log_mag == 0.0 and fit.rotation_rad == 0.0 and fit.tilt_rad == 0.0
    assert np.allclose(fit.shift, dq.mean(axis=0), atol=1e-9)


def test_estimate_thickness_of_a_slab():
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 0.05, (60, 64, 64)).astype(np.float32)
    vol[20:40] += rng.normal(0, 1.0, (20, 64, 64)).astype(np.float32)
    assert estimate_thickness(vol, 2.0) == pytest.approx(40.0, abs=4.0)


def test_params_reject_bad_values():
    with pytest.raises(ConfigError, match="binnings"):
        ProjmatchParams(binnings=(2, 4))
    with pytest.raises(ConfigError, match="refine"):
        ProjmatchParams(refine=("shift", "skew"))
    with pytest.raises(ConfigError, match="folds"):
        ProjmatchParams(folds=1)
    with pytest.raises(ConfigError, match="method"):
        ProjmatchParams(method="fbp")
    with pytest.raises(ConfigError, match="clip_percentile"):
        ProjmatchParams(clip_percentile=40.0)
    with pytest.raises(ConfigError, match="landmark_fine_passes"):
        ProjmatchParams(landmark_fine_passes=-1)
    with pytest.raises(ConfigError, match="tilt_anchor_weight"):
        ProjmatchParams(tilt_anchor_weight=-2.0)
    with pytest.raises(ConfigError, match="particle_rounds"):
        ProjmatchParams(particle_rounds=-1)
    with pytest.raises(ConfigError, match="particle_size_nm"):
        ProjmatchParams(particle_size_nm=0.0)
    with pytest.raises(ConfigError, match="particle_binning"):
        ProjmatchParams(particle_binning=0)


# --------------------------------------------------------------------------- behaviour


def test_converges_from_5px_start(small_series):
    """From the true geometry moved 5 px per view: the error falls iteration by iteration and the stop rule fires.

    Measured (seed 0, one stage at binning 2): 5.0 px at the start, 3.3 after
    the first iteration, 2.1 at the end. The remainder is the smooth part of
    the random start (patterns over tilt that neighbouring views share),
    which leave-out matching corrects only slowly; see the module notes.
    """
    truth = small_series.geometry
    thick = thickness_px(small_series.truth())
    start = _offset_start(truth, 5.0, seed=1)
    e0 = alignment_error(start, truth, thickness_px=thick).rms_px
    assert e0 == pytest.approx(5.0, abs=0.3)
    params = ProjmatchParams(initial_geometry=start, binnings=(2,), max_iterations=12, tolerance_px=0.25, axis_flatten=False,
                             particle_rounds=0)
    result = ProjmatchAligner(params).align(small_series.observation())
    its = result.info["iterations"]
    errors = np.array(
        [alignment_error(geometry_from_dict(r["geometry"], truth), truth, thickness_px=thick).rms_px for r in its]
    )
    # the stop rule fired before the iteration cap
    assert result.info["converged"] and len(its) < 12
    assert its[-1]["max_update_px"] < params.tolerance_px
    # the error falls iteration by iteration (allowing 0.02 px of noise)
    assert np.all(np.diff(errors) < 0.02), errors
    assert errors[0] < 0.75 * e0
    assert errors[-1] < 0.5 * e0
    assert len(result.residuals.per_view_rms_px) == truth.n_views


def test_pure_noise_fails(small_series):
    rng = np.random.default_rng(5)
    obs = small_series.observation()
    noise = rng.poisson(100.0, obs.stack.shape).astype(np.float32)
    noisy = Observation(stack=noise, tilt_deg=obs.tilt_deg, pixel_size_A=obs.pixel_size_A, tilt_axis_deg=obs.tilt_axis_deg)
    start = small_series.geometry
    with pytest.raises(AlignmentError, match="correlation too low"):
        ProjmatchAligner(ProjmatchParams(initial_geometry=start, thickness_px=100.0)).align(noisy)
    # from scratch the coarse alignment already refuses
    with pytest.raises(AlignmentError, match="correlation too low"):
        ProjmatchAligner(ProjmatchParams()).align(noisy)


def test_decluttered_landmarks_stay_at_the_true_geometry(standard_nobeads_series):
    """One landmark pass started from the truth: subtracting the other layers keeps it there.

    Measured (seed 0, binning 4): 0.47 px after a plain pass, 0.19 px after a
    decluttered one; the other layers' content in each window is clutter
    that the plain correlation follows.
    """
    series = standard_nobeads_series
    truth = series.geometry
    thick = thickness_px(series.truth())
    stage = binned_line_integrals(series.observation().stack, 4)
    lo, hi = np.percentile(stage.images, [0.5, 99.5])
    images = np.clip(stage.images, lo, hi)
    vol_shape = ProjmatchAligner()._volume_shape(truth, images.shape[1:], 4, thick)
    errors = {}
    for declutter in (False, True):
        g, _, _ = refine_by_landmarks(images, 4, truth, vol_shape, thick,
                                      options=LandmarkOptions(iterations=1, declutter=declutter))
        errors[declutter] = alignment_error(g, truth, thickness_px=thick).rms_px
    assert errors[True] < 0.25, errors
    assert errors[True] < 0.5 * errors[False], errors


def test_standard_nobeads_seed0_meets_the_target(standard_nobeads_series):
    """The default pipeline (coarse start, matching at binning 4, then particle rounds at binning 2) on the standard workload.

    Measured (seed 0): coarse start 2.21 px; matching 1.02 px; the six
    particle passes 0.37/0.27/0.25, then (particles detected again)
    0.22/0.23/0.23 px. On seeds 1-4 matching reaches 1.56/1.43/1.57/1.69 px
    and the particle rounds 0.24/0.19/0.24/0.21 px; see
    tests/test_benchmarks_projmatch.py.
    """
    series = standard_nobeads_series
    truth = series.geometry
    thick = thickness_px(series.truth())
    result = ProjmatchAligner().align(series.observation())
    its = result.info["iterations"]
    start = geometry_from_dict(result.info["start_geometry"], truth)
    e_start = alignment_error(start, truth, thickness_px=thick).rms_px
    e_end = alignment_error(result.geometry, truth, thickness_px=thick).rms_px
    matched = [r for r in its if r["stage"] == "matching"]
    e_matched = alignment_error(geometry_from_dict(matched[-1]["geometry"], truth), truth, thickness_px=thick).rms_px
    assert result.info["converged"]
    assert e_matched < 0.85 * e_start, (e_start, e_matched)
    # after the matching stage come the particle passes (2 rounds of 3), at binning 2; the last is the result
    assert [r["stage"] for r in its] == ["matching"] * len(matched) + ["particles"] * 6
    assert [r["round"] for r in its[len(matched):]] == [1, 1, 1, 2, 2, 2]
    assert its[-1]["binning"] == 2
    np.testing.assert_allclose(result.geometry.shift_px, geometry_from_dict(its[-1]["geometry"], truth).shift_px)
    assert e_end < 0.3, (e_start, e_matched, e_end)


def test_standard_seed0_brings_in_views_the_matching_left_far_off(standard_series):
    """On `standard` (gold beads) the matching leaves the -60 degree views about 10 px off, beyond the
    particles' search box; the view offsets bring them in.

    Measured (seed 0): matching 3.18 px (view 0 at 10.4 px); after the particle rounds 0.24 px
    (view 0 at 0.29 px). Without the view offsets six rounds were needed for 0.25 px.
    """
    series = standard_series
    truth = series.geometry
    thick = thickness_px(series.truth())
    result = ProjmatchAligner().align(series.observation())
    err = alignment_error(result.geometry, truth, thickness_px=thick)
    assert err.rms_px < 0.3, err.rms_px
    assert err.per_view_px.max() < 0.8, err.per_view_px


def test_standard_nobeads_from_5px_start_ends_under_the_target(standard_nobeads_series):
    """The default pipeline from the true geometry moved 5 px per view in random directions.

    Measured (seed 0): 4.96 px at the start; the matching reaches 1.27 px in
    its 12 iterations (its stop rule does not fire within them), the particle
    rounds 0.36/0.28/0.25, then 0.23/0.23/0.24 px.
    """
    series = standard_nobeads_series
    truth = series.geometry
    thick = thickness_px(series.truth())
    start = _offset_start(truth, 5.0, seed=1)
    assert alignment_error(start, truth, thickness_px=thick).rms_px == pytest.approx(5.0, abs=0.3)
    result = ProjmatchAligner(ProjmatchParams(initial_geometry=start)).align(series.observation())
    its = result.info["iterations"]
    matched = geometry_from_dict([r for r in its if r["stage"] == "matching"][-1]["geometry"], truth)
    assert alignment_error(matched, truth, thickness_px=thick).rms_px < 1.6
    assert alignment_error(result.geometry, truth, thickness_px=thick).rms_px < 0.3

