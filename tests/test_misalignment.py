"""Stage-shift, backlash and drift model of the true acquisition geometry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simtomo.config import MisalignmentConfig, TiltConfig
from simtomo.errors import ConfigError
from simtomo.misalignment import (
    Misalignment,
    direction_reversals,
    simulate_misalignment,
    smooth_drift,
    stage_shifts_px,
)
from simtomo.tiltscheme import dose_symmetric, make_tilt_scheme

QUIET = dict(
    initial_offset_nm=0.0,
    shift_walk_nm=0.0,
    backlash_nm=0.0,
    rot_drift_deg=0.0,
    mag_drift=0.0,
    tilt_offset_deg=0.0,
    tilt_jitter_deg=0.0,
)


def _simulate(cfg, scheme, seed=0, pixel_size_A=8.0):
    return simulate_misalignment(
        cfg, scheme, image_shape=(64, 64), pixel_size_A=pixel_size_A, rng=np.random.default_rng(seed)
    )


def test_direction_reversals_hand_worked_dose_symmetric():
    seq = dose_symmetric(-9, 9, 3, group_size=2)
    # [0, 3, -3, -6, 6, 9, -9]: moves + - - + + -; reversals where a move differs from the one before.
    np.testing.assert_array_equal(seq, [0, 3, -3, -6, 6, 9, -9])
    np.testing.assert_array_equal(np.flatnonzero(direction_reversals(seq)), [2, 4, 6])


def test_direction_reversals_edge_cases():
    # First move has no previous direction: [0, 3, -3] reverses only at index 2.
    np.testing.assert_array_equal(direction_reversals(np.array([0.0, 3.0, -3.0])), [False, False, True])
    np.testing.assert_array_equal(direction_reversals(np.array([5.0])), [False])
    np.testing.assert_array_equal(direction_reversals(np.arange(6.0)), np.zeros(6, bool))
    # A repeated angle is no move: the direction before it carries over.
    np.testing.assert_array_equal(
        direction_reversals(np.array([0.0, 3.0, 3.0, 6.0, 0.0])), [False, False, False, False, True]
    )


def _axis_and_normal(phi_deg):
    """R(phi) @ (0, 1), the tilt axis, and R(phi) @ (1, 0), across it (DESIGN.md section 3)."""
    phi = np.deg2rad(phi_deg)
    return np.array([-np.sin(phi), np.cos(phi)]), np.array([np.cos(phi), np.sin(phi)])


@pytest.mark.parametrize("phi_deg", [85.3, 0.0, -30.0, 137.0])
@pytest.mark.parametrize("seed", [3, 4])
def test_backlash_jumps_exactly_at_reversals_alternating_with_direction(phi_deg, seed):
    seq = dose_symmetric(-60, 60, 3, group_size=2)
    backlash = 7.5
    shifts = stage_shifts_px(
        seq, initial_offset_px=0.0, walk_px=0.0, backlash_px=backlash, tilt_axis_deg=phi_deg,
        rng=np.random.default_rng(seed),
    )
    assert shifts.shape == (seq.size, 2)
    np.testing.assert_array_equal(shifts[0], [0.0, 0.0])
    jumps = np.diff(shifts, axis=0, prepend=np.zeros((1, 2)))
    reversal = direction_reversals(seq)
    moved = np.linalg.norm(jumps, axis=1) > 1e-12
    np.testing.assert_array_equal(moved, reversal)
    # Positive side: (0, 3) then 9 pairs and a lone 60 = 11 groups; negative: 10 pairs;
    # 21 alternating groups give 20 switches.
    assert reversal.sum() == 20
    np.testing.assert_allclose(np.linalg.norm(jumps[reversal], axis=1), backlash, rtol=1e-12)
    # Every jump is backlash * u * d_k for one unit vector u: dividing out d_k leaves the same vector.
    direction = np.sign(np.diff(seq, prepend=seq[0]))
    u = jumps[reversal] * direction[reversal][:, None] / backlash
    np.testing.assert_allclose(u, np.broadcast_to(u[0], u.shape), atol=1e-12)
    # The series alternates direction at each reversal, so the jumps alternate in sign.
    signs = np.sign(jumps[reversal] @ u[0])
    np.testing.assert_array_equal(signs[1:], -signs[:-1])
    # Jumps lie across the tilt axis: perpendicular to R(phi) @ (0, 1), along R(phi) @ (1, 0).
    axis, normal = _axis_and_normal(phi_deg)
    np.testing.assert_allclose(jumps[reversal] @ axis, 0.0, rtol=0, atol=1e-12)
    # The documented first draw is u's sign s (+1 when the uniform is < 0.5): the jump points
    # along +u when tilting up (lag in the direction of travel), along -u when tilting down.
    s = 1.0 if np.random.default_rng(seed).random() < 0.5 else -1.0
    np.testing.assert_allclose(u[0], s * normal, atol=1e-12)


def test_backlash_sign_is_random_per_series():
    seq = dose_symmetric(-60, 60, 3, group_size=2)
    reversal = direction_reversals(seq)
    first = np.flatnonzero(reversal)[0]
    _, normal = _axis_and_normal(85.3)
    signs = set()
    for seed in range(20):
        shifts = stage_shifts_px(
            seq, initial_offset_px=0.0, walk_px=0.0, backlash_px=2.0, tilt_axis_deg=85.3,
            rng=np.random.default_rng(seed),
        )
        jump = shifts[first] - shifts[first - 1]
        assert abs(abs(jump @ normal) - 2.0) <= 1e-12
        signs.add(np.sign(jump @ normal) * np.sign(seq[first] - seq[first - 1]))
    assert signs == {-1.0, 1.0}


def test_stage_shift_walk_statistics():
    seq = np.arange(401.0)  # unidirectional: no reversals, pure walk
    rng = np.random.default_rng(11)
    shifts = stage_shifts_px(seq, initial_offset_px=0.0, walk_px=2.0, backlash_px=100.0, tilt_axis_deg=85.3, rng=rng)
    steps = np.diff(shifts, axis=0)
    assert 1.8 < steps.std() < 2.2
    np.testing.assert_array_equal(shifts[0], [0.0, 0.0])


@pytest.mark.parametrize(("n", "rms"), [(61, 0.2), (7, 0.003), (2, 5.0)])
def test_smooth_drift_rms_and_mean(n, rms):
    drift = smooth_drift(n, rms, np.random.default_rng(5))
    assert drift.shape == (n,)
    assert abs(np.sqrt(np.mean(drift**2)) - rms) <= 1e-12 * rms
    assert abs(drift.mean()) <= 1e-12 * rms


def test_smooth_drift_zero_cases_and_draw_count():
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    np.testing.assert_array_equal(smooth_drift(10, 0.0, rng_a), np.zeros(10))
    np.testing.assert_array_equal(smooth_drift(1, 3.0, np.random.default_rng(1)), [0.0])
    # A zero drift still consumes its draws, so later draws do not depend on it.
    smooth_drift(10, 0.5, rng_b)
    assert rng_a.standard_normal() == rng_b.standard_normal()


def test_smooth_drift_is_smooth():
    drift = smooth_drift(200, 1.0, np.random.default_rng(2))
    # A random walk is strongly autocorrelated; white noise would give ~0.
    assert np.corrcoef(drift[:-1], drift[1:])[0, 1] > 0.8


def test_true_tilts_are_nominal_plus_offset_within_jitter():
    scheme = make_tilt_scheme(TiltConfig())
    cfg = MisalignmentConfig(tilt_offset_deg=1.5, tilt_jitter_deg=0.2)
    geo = _simulate(cfg, scheme).geometry
    error = geo.tilt_deg - scheme.tilt_deg - 1.5
    assert np.all(np.abs(error) < 5 * 0.2)
    assert 0.12 < error.std() < 0.28
    exact = _simulate(dataclasses.replace(cfg, tilt_jitter_deg=0.0), scheme).geometry
    np.testing.assert_allclose(exact.tilt_deg, scheme.tilt_deg + 1.5, rtol=0, atol=1e-12)


def test_rotation_and_magnification_drift_rms():
    scheme = make_tilt_scheme(TiltConfig())
    cfg = MisalignmentConfig(tilt_axis_deg=85.3, rot_drift_deg=0.2, mag_drift=0.003)
    geo = _simulate(cfg, scheme).geometry
    assert np.sqrt(np.mean((geo.rot_deg - 85.3) ** 2)) == pytest.approx(0.2, rel=1e-9)
    assert np.sqrt(np.mean((geo.mag - 1.0) ** 2)) == pytest.approx(0.003, rel=1e-9)
    assert geo.rot_deg.std() > 0


def test_drift_evolves_in_acquisition_order():
    scheme = make_tilt_scheme(TiltConfig())
    cfg = MisalignmentConfig(**{**QUIET, "initial_offset_nm": 40.0, "shift_walk_nm": 12.0, "backlash_nm": 48.0})
    geo = _simulate(cfg, scheme, seed=9).geometry
    # The documented draw order starts with the stage shifts, in acquisition order, at 10/8 px per nm.
    expected = stage_shifts_px(
        scheme.acquired_tilt_deg, initial_offset_px=50.0, walk_px=15.0, backlash_px=60.0,
        tilt_axis_deg=cfg.tilt_axis_deg, rng=np.random.default_rng(9),
    )
    np.testing.assert_allclose(geo.shift_px[scheme.acquisition_order], expected, rtol=1e-12)
    # Stored by nominal tilt, the first acquired view (0 deg) sits mid-stack, not at index 0.
    assert scheme.acquisition_order[0] == 30
    np.testing.assert_allclose(geo.shift_px[30], expected[0], rtol=1e-12)


def test_documented_draw_order():
    scheme = make_tilt_scheme(TiltConfig(step_deg=3))
    cfg = MisalignmentConfig(motion_blur_nm=1.6)
    mis = _simulate(cfg, scheme, seed=21)
    rng = np.random.default_rng(21)
    n, acq = scheme.n_views, scheme.acquisition_order
    shifts = stage_shifts_px(
        scheme.acquired_tilt_deg, initial_offset_px=50.0, walk_px=15.0, backlash_px=60.0,
        tilt_axis_deg=cfg.tilt_axis_deg, rng=rng,
    )
    rot = cfg.tilt_axis_deg + smooth_drift(n, cfg.rot_drift_deg, rng)
    mag = 1.0 + smooth_drift(n, cfg.mag_drift, rng)
    tilt = scheme.acquired_tilt_deg + cfg.tilt_offset_deg + cfg.tilt_jitter_deg * rng.standard_normal(n)
    motion = (2.0 / np.sqrt(2.0)) * rng.standard_normal((n, 2))
    geo = mis.geometry
    np.testing.assert_allclose(geo.shift_px[acq], shifts, rtol=1e-12)
    np.testing.assert_allclose(geo.rot_deg[acq], rot, rtol=1e-12)
    np.testing.assert_allclose(geo.mag[acq], mag, rtol=1e-12)
    np.testing.assert_allclose(geo.tilt_deg[acq], tilt, rtol=1e-12)
    np.testing.assert_allclose(mis.motion_px[acq], motion, rtol=1e-12)


@pytest.mark.parametrize("phi_deg", [85.3, -12.0])
def test_backlash_through_simulate_misalignment(phi_deg):
    scheme = make_tilt_scheme(TiltConfig(step_deg=3))
    cfg = MisalignmentConfig(**{**QUIET, "backlash_nm": 4.0, "tilt_axis_deg": phi_deg, "rot_drift_deg": 0.2})
    geo = _simulate(cfg, scheme, pixel_size_A=8.0).geometry
    shifts_acq = geo.shift_px[scheme.acquisition_order]
    steps = np.diff(shifts_acq, axis=0, prepend=np.zeros((1, 2)))
    jumps = np.linalg.norm(steps, axis=1)
    reversal = direction_reversals(scheme.acquired_tilt_deg)
    np.testing.assert_array_equal(jumps > 1e-12, reversal)
    np.testing.assert_allclose(jumps[reversal], 5.0, rtol=1e-12)  # 4 nm at 8 Å/px
    # Perpendicular to the mean tilt axis cfg.tilt_axis_deg, whatever the rotation drift.
    axis, _ = _axis_and_normal(phi_deg)
    np.testing.assert_allclose(steps[reversal] @ axis, 0.0, rtol=0, atol=1e-12)


def test_same_seed_reproduces_other_seed_differs():
    scheme = make_tilt_scheme(TiltConfig())
    cfg = MisalignmentConfig(motion_blur_nm=2.0)
    a, b, c = _simulate(cfg, scheme, 4), _simulate(cfg, scheme, 4), _simulate(cfg, scheme, 5)
    for name in ("tilt_deg", "rot_deg", "mag", "shift_px"):
        np.testing.assert_array_equal(getattr(a.geometry, name), getattr(b.geometry, name))
        assert not np.allclose(getattr(a.geometry, name), getattr(c.geometry, name))
    np.testing.assert_array_equal(a.motion_px, b.motion_px)
    assert not np.allclose(a.motion_px, c.motion_px)


def test_standard_defaults_give_realistic_shifts():
    scheme = make_tilt_scheme(TiltConfig())
    mis = _simulate(MisalignmentConfig(), scheme, seed=2024)
    size = np.linalg.norm(mis.geometry.shift_px, axis=1)
    # DESIGN.md section 6: stage shifts of tens to hundreds of pixels at 8 Å/px.
    assert 10 < np.median(size) < 1000
    assert 30 < size.max() < 1500
    assert mis.geometry.n_views == 61
    assert mis.geometry.pixel_size_A == 8.0 and mis.geometry.image_shape == (64, 64)
    np.testing.assert_array_equal(mis.motion_px, np.zeros((61, 2)))  # motion_blur_nm defaults to 0


def test_motion_rms_length():
    scheme = make_tilt_scheme(TiltConfig(min_deg=-80, max_deg=80, step_deg=0.5))
    mis = _simulate(MisalignmentConfig(**QUIET, motion_blur_nm=1.6), scheme, pixel_size_A=8.0)
    rms_length = np.sqrt(np.mean(np.sum(mis.motion_px**2, axis=1)))
    assert rms_length == pytest.approx(2.0, rel=0.1)  # 1.6 nm = 2 px


def test_misalignment_arrays_are_read_only():
    mis = _simulate(MisalignmentConfig(), make_tilt_scheme(TiltConfig(step_deg=3)))
    with pytest.raises(ValueError):
        mis.motion_px[0, 0] = 1.0
    with pytest.raises(ConfigError, match="motion_px"):
        Misalignment(geometry=mis.geometry, motion_px=np.zeros((3, 2)))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: smooth_drift(5, -0.1, np.random.default_rng()), r"rms: expected a finite value >= 0, got -0.1"),
        (lambda: smooth_drift(0, 0.1, np.random.default_rng()), r"n: expected an integer >= 1, got 0"),
        (
            lambda: stage_shifts_px([0.0, 1.0], initial_offset_px=0, walk_px=0, backlash_px=-1, tilt_axis_deg=0.0, rng=np.random.default_rng()),
            r"backlash_px: expected a finite value >= 0, got -1",
        ),
        (
            lambda: stage_shifts_px([0.0, 1.0], initial_offset_px=float("nan"), walk_px=0, backlash_px=0, tilt_axis_deg=0.0, rng=np.random.default_rng()),
            r"initial_offset_px",
        ),
        (
            lambda: stage_shifts_px([0.0, 1.0], initial_offset_px=0, walk_px=-2, backlash_px=0, tilt_axis_deg=0.0, rng=np.random.default_rng()),
            r"walk_px",
        ),
        (
            lambda: stage_shifts_px(
                [0.0, 1.0], initial_offset_px=0, walk_px=0, backlash_px=0, tilt_axis_deg=float("inf"),
                rng=np.random.default_rng(),
            ),
            r"tilt_axis_deg: expected a finite angle, got inf",
        ),
        (lambda: direction_reversals(np.zeros((2, 2))), r"acquired_tilt_deg: expected a non-empty 1-D array"),
        (lambda: _simulate(MisalignmentConfig(), make_tilt_scheme(TiltConfig()), pixel_size_A=0.0), r"pixel_size_A: expected a positive size, got 0.0"),
        (
            lambda: _simulate(
                MisalignmentConfig(tilt_offset_deg=25.0), make_tilt_scheme(TiltConfig(min_deg=-80, max_deg=80))
            ),
            r"tilt_offset_deg.*±90",
        ),
    ],
)
def test_bad_input_names_the_parameter(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
