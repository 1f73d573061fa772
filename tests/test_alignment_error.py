"""The gauge-free alignment error of DESIGN.md section 5."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from simtomo.alignment_error import alignment_error, error_grid, gauge_jacobian
from simtomo.errors import ConfigError
from simtomo.geometry import Geometry
from simtomo.similarity import Similarity

from conftest import random_geometry


@pytest.fixture
def truth():
    rng = np.random.default_rng(3)
    n = 41
    return Geometry(
        tilt_deg=np.linspace(-60, 60, n) + 1.5 + rng.normal(0, 0.2, n),
        rot_deg=85.3 + rng.normal(0, 0.2, n),
        mag=1 + rng.normal(0, 0.003, n),
        shift_px=rng.normal(0, 50, (n, 2)),
        image_shape=(512, 480),
        pixel_size_A=8.0,
    )


def _moved(geometry: Geometry, *, tilt=0.0, scale=1.0, translation=(0.0, 0.0, 0.0)) -> Geometry:
    """The same images explained by a specimen rotated about y, scaled and moved: a pure change of gauge."""
    g = geometry.replace(tilt_deg=geometry.tilt_deg + tilt, mag=geometry.mag / scale)
    return g.replace(shift_px=g.shift_px + g.projection_matrices() @ np.asarray(translation))


def test_grid_spans_field_and_thickness():
    grid = error_grid((100, 200), 40, n_xy=4, n_z=2)
    assert grid.shape == (32, 3)
    np.testing.assert_allclose(grid.min(axis=0), [-75, -37.5, -10])
    np.testing.assert_allclose(grid.max(axis=0), [75, 37.5, 10])


@pytest.mark.parametrize(
    "change",
    [
        dict(translation=(30.0, -20.0, 45.0)),
        dict(tilt=2.5),
        dict(scale=1.03),
        dict(tilt=-4.0, scale=0.97, translation=(-12.0, 80.0, -30.0)),
    ],
)
def test_true_geometry_in_another_gauge_has_no_error(truth, change):
    result = alignment_error(_moved(truth, **change), truth, thickness_px=250)
    assert result.rms_px < 1e-6
    assert np.all(result.per_view_px < 1e-6)


def test_fitted_gauge_is_the_applied_one(truth):
    est = _moved(truth, tilt=3.0, scale=1.05, translation=(10.0, 20.0, 30.0))
    g = alignment_error(est, truth, thickness_px=250).gauge
    # est sees X at p_est(G X) = p_true(X): G undoes the move
    np.testing.assert_allclose(g.scale, 1.05, rtol=1e-9)
    np.testing.assert_allclose(g.rotation, Rotation.from_euler("y", -3.0, degrees=True).as_matrix(), atol=1e-9)


def test_gauge_with_a_general_rotation_is_removed():
    # a similarity with a rotation that no Geometry can express still has zero error when the estimate is exactly
    # the true projection of a moved specimen: build the target from G applied to the grid
    rng = np.random.default_rng(0)
    true = random_geometry(rng, 30, shift=40.0, max_tilt=60.0)
    g = Similarity.from_params([0.02, -0.03, 0.05, 5.0, -3.0, 8.0, 0.01])
    grid = error_grid(true.image_shape, 60)
    # alignment_error compares est(G X) with true(X); feed the true geometry as the estimate, G = identity
    res = alignment_error(true, true, thickness_px=60, grid=g.apply(grid))
    assert res.rms_px < 1e-9


def test_injected_shifts_are_measured(truth):
    rng = np.random.default_rng(7)
    sigma = 0.8
    d = rng.normal(0, sigma, (truth.n_views, 2))
    result = alignment_error(truth.replace(shift_px=truth.shift_px + d), truth, thickness_px=250)
    # the gauge can absorb only the part of d that a moved specimen explains (7 of 2n degrees of freedom)
    jac = gauge_jacobian(truth, result.grid).reshape(-1, 7)
    dd = np.broadcast_to(d[:, None, :], (truth.n_views, result.grid.shape[0], 2)).reshape(-1)
    left = dd - jac @ np.linalg.lstsq(jac, dd, rcond=None)[0]
    expected_per_view = np.sqrt(np.mean(np.sum(left.reshape(truth.n_views, -1, 2) ** 2, axis=-1), axis=1))
    np.testing.assert_allclose(result.per_view_px, expected_per_view, rtol=1e-6, atol=1e-9)
    # and it is close to the injected RMS displacement
    injected = np.sqrt(np.mean(np.sum(d**2, axis=1)))
    assert abs(result.rms_px - injected) < 0.1 * injected


def test_components_along_and_across_the_axis(truth):
    axis = np.stack([-np.sin(np.deg2rad(truth.rot_deg)), np.cos(np.deg2rad(truth.rot_deg))], axis=1)
    sign = np.where(np.arange(truth.n_views) % 2 == 0, 1.0, -1.0)[:, None]
    along_only = truth.replace(shift_px=truth.shift_px + 0.5 * sign * axis)
    res = alignment_error(along_only, truth, thickness_px=250)
    assert res.across_rms_px < 0.02
    assert abs(res.along_rms_px - 0.5) < 0.02
    np.testing.assert_allclose(res.along_axis_px**2 + res.across_axis_px**2, res.per_view_px**2, rtol=1e-12)


def test_mismatched_geometries_are_rejected(truth):
    with pytest.raises(ConfigError, match="40 views, the truth 41"):
        alignment_error(truth.select(slice(0, 40)), truth, thickness_px=100)
    with pytest.raises(ConfigError, match="images of"):
        alignment_error(truth.replace(image_shape=(100, 100)), truth, thickness_px=100)
    with pytest.raises(ConfigError, match="thickness_px"):
        alignment_error(truth, truth, thickness_px=0)
