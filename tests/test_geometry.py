import numpy as np
import pytest

from simtomo.errors import ConfigError
from simtomo.geometry import Geometry, rotation_2d, rotation_y


def one_view(tilt=0.0, rot=0.0, mag=1.0, shift=(0.0, 0.0)):
    return Geometry([tilt], [rot], [mag], [shift], (64, 64), 8.0)


def test_project_hand_worked():
    # X = (1, 0, 0): R_y(30) -> (cos30, 0, -sin30); P -> (cos30, 0); R(90) -> (0, cos30);
    # times 2, plus (1, 2) -> (1, 2 + sqrt(3)).
    g = one_view(tilt=30, rot=90, mag=2, shift=(1, 2))
    np.testing.assert_allclose(g.project([[1.0, 0.0, 0.0]])[0, 0], [1.0, 2.0 + np.sqrt(3.0)], atol=1e-12)


def test_positive_tilt_moves_top_of_specimen_toward_positive_x():
    # R_y row 0 is (cos, 0, sin): a point above the specimen (z > 0) goes to +x.
    p = one_view(tilt=20).project([[0.0, 0.0, 10.0]])[0, 0]
    np.testing.assert_allclose(p, [10 * np.sin(np.deg2rad(20)), 0.0], atol=1e-12)


def test_tilt_axis_appears_along_rotated_y():
    # Points on the specimen y axis do not move with tilt and lie along R(phi) (0, 1).
    g = Geometry(np.array([-50.0, 0.0, 40.0]), [85.0] * 3, [1.0] * 3, np.zeros((3, 2)), (64, 64), 8.0)
    p = g.project([[0.0, 7.0, 0.0]])[:, 0]
    expected = 7.0 * rotation_2d(85.0) @ np.array([0.0, 1.0])
    np.testing.assert_allclose(p, np.tile(expected, (3, 1)), atol=1e-12)


def test_rotation_matrices_are_orthonormal_and_match_design():
    ry = rotation_y(np.array([25.0]))[0]
    c, s = np.cos(np.deg2rad(25)), np.sin(np.deg2rad(25))
    np.testing.assert_allclose(ry, [[c, 0, s], [0, 1, 0], [-s, 0, c]])
    r = rotation_2d(25.0)
    np.testing.assert_allclose(r, [[c, -s], [s, c]])
    np.testing.assert_allclose(r @ r.T, np.eye(2), atol=1e-15)


def test_project_vectorised_equals_loop():
    rng = np.random.default_rng(0)
    g = Geometry(rng.uniform(-60, 60, 5), rng.uniform(-90, 90, 5), rng.uniform(0.9, 1.1, 5), rng.normal(0, 50, (5, 2)), (64, 64), 8.0)
    pts = rng.normal(0, 100, (7, 3))
    out = g.project(pts)
    for i in range(5):
        a = g.mag[i] * rotation_2d(g.rot_deg[i]) @ rotation_y(g.tilt_deg[i])[:2]
        np.testing.assert_allclose(out[i], pts @ a.T + g.shift_px[i], atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rot_deg=[0.0]), "rot_deg: expected shape"),
        (dict(mag=[1.0, -1.0]), "mag"),
        (dict(shift_px=[[0.0, np.nan]] * 2), "shift_px: contains NaN"),
        (dict(image_shape=(0, 5)), "image_shape"),
        (dict(pixel_size_A=0.0), "pixel_size_A"),
    ],
)
def test_geometry_rejects_bad_fields(kwargs, match):
    fields = dict(tilt_deg=[0.0, 3.0], rot_deg=[0.0, 0.0], mag=[1.0, 1.0], shift_px=np.zeros((2, 2)), image_shape=(8, 8), pixel_size_A=1.0)
    fields.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        Geometry(**fields)


def test_geometry_is_immutable_and_select_replace_work():
    g = Geometry.nominal(np.array([-3.0, 0.0, 3.0]), (16, 16), 4.0, rot_deg=10.0)
    with pytest.raises(ValueError):
        g.tilt_deg[0] = 5.0
    sub = g.select([2, 0])
    np.testing.assert_array_equal(sub.tilt_deg, [3.0, -3.0])
    moved = g.replace(shift_px=np.ones((3, 2)))
    assert not moved.equals(g) and moved.replace(shift_px=np.zeros((3, 2))).equals(g)
    with pytest.raises(TypeError, match="unknown fields"):
        g.replace(tilts=[1.0])
