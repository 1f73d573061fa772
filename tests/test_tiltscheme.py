"""Tilt grids, acquisition orders and dose of the tilt schemes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simtomo.config import TiltConfig
from simtomo.errors import ConfigError
from simtomo.tiltscheme import (
    TiltScheme,
    bidirectional,
    dose_per_view,
    dose_symmetric,
    make_tilt_scheme,
    tilt_grid,
    unidirectional,
)


def test_tilt_grid_includes_max_and_has_no_float_noise():
    grid = tilt_grid(-60, 60, 3)
    assert grid.size == 41
    assert grid[0] == -60 and grid[-1] == 60
    # -60 + 20 * 3 must be exactly zero, not 7e-15, so "nearest to 0" and file output are clean.
    assert grid[20] == 0.0 and not np.signbit(grid[20])
    np.testing.assert_allclose(np.diff(grid), 3.0, rtol=0, atol=1e-9)


def test_tilt_grid_stops_below_max_when_off_grid():
    np.testing.assert_array_equal(tilt_grid(-10, 10, 4), [-10, -6, -2, 2, 6, 10])
    np.testing.assert_array_equal(tilt_grid(-10, 9, 4), [-10, -6, -2, 2, 6])
    # 0.1 is not exact in binary: 0.1 * 30 lands a hair above 3, within the 1e-6 * step tolerance.
    assert tilt_grid(0, 3, 0.1).size == 31


def test_unidirectional_runs_min_to_max():
    np.testing.assert_array_equal(unidirectional(-6, 6, 3), [-6, -3, 0, 3, 6])


def test_bidirectional_positive_first_branch_literal():
    seq = bidirectional(-60, 60, 3, start_deg=-20)
    # Grid is -60, -57, ..., -21, -18, ...: -21 is nearest to -20.
    assert seq[0] == -21
    expected = np.concatenate((np.arange(-21, 61, 3), np.arange(-24, -61, -3)))
    np.testing.assert_array_equal(seq, expected)
    turn = int(np.argmax(seq))
    assert turn == 27 and seq[turn] == 60 and seq[turn + 1] == -24
    assert seq[-1] == -60
    assert sorted(seq.tolist()) == tilt_grid(-60, 60, 3).tolist()


def test_bidirectional_negative_first_branch_mirrors():
    np.testing.assert_array_equal(
        bidirectional(-9, 9, 3, start_deg=0, first_branch="negative"),
        [0, -3, -6, -9, 3, 6, 9],
    )
    np.testing.assert_array_equal(bidirectional(-9, 9, 3, start_deg=0), [0, 3, 6, 9, -3, -6, -9])


def test_dose_symmetric_group_two_hand_worked():
    # Grid -9..9 step 3 (Hagen et al. 2017, Fig. 1): 0 opens the +group (0, 3), -group (-3, -6), +group (6, 9), -group (-9).
    np.testing.assert_array_equal(dose_symmetric(-9, 9, 3, group_size=2), [0, 3, -3, -6, 6, 9, -9])


def test_dose_symmetric_group_one_alternates_every_view():
    np.testing.assert_array_equal(dose_symmetric(-9, 9, 3, group_size=1), [0, 3, -3, 6, -6, 9, -9])


def test_dose_symmetric_asymmetric_range_finishes_longer_side():
    # Negative side holds only -3, -6; after it runs out the positive side continues.
    np.testing.assert_array_equal(dose_symmetric(-6, 15, 3, group_size=2), [0, 3, -3, -6, 6, 9, 12, 15])
    np.testing.assert_array_equal(dose_symmetric(-15, 3, 3, group_size=2), [0, 3, -3, -6, -9, -12, -15])


def test_dose_symmetric_starts_nearest_zero_on_offset_grid():
    # Grid -8, -5, -2, 1, 4, 7: 1 is closest to 0.
    np.testing.assert_array_equal(dose_symmetric(-8, 7, 3, group_size=2), [1, 4, -2, -5, 7, -8])


@pytest.mark.parametrize("weighting", ["constant", "cos"])
def test_dose_sums_to_total(weighting):
    tilts = tilt_grid(-60, 60, 2)
    dose = dose_per_view(tilts, 120.0, weighting)
    assert dose.shape == tilts.shape
    assert abs(dose.sum() - 120.0) <= 1e-12 * 120.0


def test_cos_weighting_doubles_dose_at_60():
    dose = dose_per_view(np.array([-30.0, 0.0, 60.0]), 10.0, "cos")
    assert dose[2] / dose[1] == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(dose_per_view(np.array([0.0, 60.0]), 6.0, "constant"), [3.0, 3.0])


def test_make_tilt_scheme_dose_symmetric_permutation_and_prior_dose():
    cfg = TiltConfig(scheme="dose-symmetric", min_deg=-9, max_deg=9, step_deg=3, group_size=2, total_dose_e_per_A2=70.0)
    scheme = make_tilt_scheme(cfg)
    np.testing.assert_array_equal(scheme.tilt_deg, [-9, -6, -3, 0, 3, 6, 9])
    assert sorted(scheme.acquisition_order.tolist()) == list(range(7))
    np.testing.assert_array_equal(scheme.tilt_deg[scheme.acquisition_order], [0, 3, -3, -6, 6, 9, -9])
    np.testing.assert_array_equal(scheme.acquired_tilt_deg, [0, 3, -3, -6, 6, 9, -9])
    np.testing.assert_array_equal(scheme.acquisition_order, [3, 4, 2, 1, 5, 6, 0])
    # Constant dose of 10 per view: prior dose is 10 * (acquisition rank).
    prior = scheme.prior_dose_e_per_A2
    assert prior[scheme.acquisition_order[0]] == 0.0
    np.testing.assert_allclose(prior, [60, 30, 20, 0, 10, 40, 50])


def test_make_tilt_scheme_unidirectional_and_bidirectional():
    uni = make_tilt_scheme(TiltConfig(scheme="unidirectional", min_deg=-6, max_deg=6, step_deg=3))
    np.testing.assert_array_equal(uni.acquisition_order, np.arange(5))
    np.testing.assert_allclose(uni.prior_dose_e_per_A2, [0, 24, 48, 72, 96])
    bi = make_tilt_scheme(
        TiltConfig(scheme="bidirectional", min_deg=-60, max_deg=60, step_deg=3, start_deg=-20, dose_weighting="cos")
    )
    np.testing.assert_array_equal(bi.acquired_tilt_deg, bidirectional(-60, 60, 3, -20))
    assert bi.prior_dose_e_per_A2[bi.acquisition_order[0]] == 0.0
    assert bi.dose_e_per_A2.sum() == pytest.approx(120.0, rel=1e-12)
    # The last acquired view (-60) has had everything but its own dose.
    last = bi.acquisition_order[-1]
    assert bi.prior_dose_e_per_A2[last] == pytest.approx(120.0 - bi.dose_e_per_A2[last], rel=1e-12)


def test_standard_scheme_has_61_views():
    scheme = make_tilt_scheme(TiltConfig())
    assert scheme.n_views == 61
    assert scheme.acquired_tilt_deg[:5].tolist() == [0, 2, -2, -4, 4]


def test_tilt_scheme_is_read_only_and_validated():
    scheme = make_tilt_scheme(TiltConfig(step_deg=3))
    with pytest.raises(ValueError):
        scheme.tilt_deg[0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.tilt_deg = np.zeros(3)  # type: ignore[misc]
    with pytest.raises(ConfigError, match="acquisition_order"):
        TiltScheme(tilt_deg=[0.0, 1.0, 2.0], acquisition_order=[0, 0, 2], dose_e_per_A2=[1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="tilt_deg"):
        TiltScheme(tilt_deg=[2.0, 1.0], acquisition_order=[0, 1], dose_e_per_A2=[1.0, 1.0])
    with pytest.raises(ConfigError, match="dose_e_per_A2"):
        TiltScheme(tilt_deg=[1.0, 2.0], acquisition_order=[0, 1], dose_e_per_A2=[1.0, -1.0])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: tilt_grid(-60, 60, 0), r"step_deg: expected a positive increment, got 0"),
        (lambda: tilt_grid(-60, 60, -2), r"step_deg"),
        (lambda: tilt_grid(10, -10, 2), r"min_deg: expected a value <= max_deg \(-10\), got 10"),
        (lambda: tilt_grid(-90, 60, 2), r"min_deg: expected a tilt strictly between -90 and 90"),
        (lambda: tilt_grid(-60, 95, 2), r"max_deg"),
        (lambda: tilt_grid(-60, 60, float("nan")), r"step_deg: expected a finite number"),
        (lambda: tilt_grid(-60, 60, 1e-9), r"step_deg: expected an increment giving at most"),
        (lambda: dose_symmetric(-60, 60, 3, group_size=0), r"group_size: expected an integer >= 1, got 0"),
        (lambda: dose_symmetric(-60, 60, 3, group_size=1.5), r"group_size"),
        (lambda: bidirectional(-60, 60, 3, start_deg=70), r"start_deg: expected a start within"),
        (lambda: bidirectional(-60, 60, 3, start_deg=0, first_branch="up"), r"first_branch.*'up'"),
        (lambda: dose_per_view(np.array([0.0]), -1.0), r"total_dose_e_per_A2"),
        (lambda: dose_per_view(np.array([0.0]), 1.0, "linear"), r"weighting: expected 'constant' or 'cos', got 'linear'"),
        (lambda: dose_per_view(np.array([]), 1.0), r"tilt_deg: expected a non-empty"),
        (lambda: dose_per_view(np.array([90.0]), 1.0, "cos"), r"tilt_deg"),
    ],
)
def test_bad_input_names_the_parameter(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
